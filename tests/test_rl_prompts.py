"""RL prompts from the user's JSONL: checked line by line before any rollout, then encoded and rolled out."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from glmv_jax import init_params, load_config
from glmv_jax.data import synthetic
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.errors import DataError
from glmv_jax.rl import rlcs
from glmv_jax.rl.config import RLConfig
from glmv_jax.rl.prompts import JsonlPromptPool
from glmv_jax.train.setup import model_for_tokenizer

LINES = [{"question": "How many red circles are there?", "image": "a.png", "answer": "3", "domain": "counting"},
         {"question": "What is 2 + 5?", "answer": "7", "domain": "arithmetic"},
         {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                    {"type": "text", "text": "How many shapes in both?"}]}],
          "images": ["a.png", "b.png"], "answer": "5", "domain": "counting", "id": "two-images"},
         {"question": "Read the text.", "image": "b.png", "answer": "hello", "domain": "ocr"}]


def write(folder, lines) -> str:
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.fromarray(np.full((56, 84, 3), color, np.uint8)).save(folder / name)
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_jsonl_prompts_roll_out_and_score(tmp_path):
    pool = JsonlPromptPool(write(tmp_path, LINES), tmp_path, held_out=1)
    assert len(pool) == 3 and pool.domains() == ["counting", "arithmetic", "counting"]
    assert [e["id"] for e in pool.held_out_examples()] == ["prompts.jsonl:4"]
    assert len(pool[0]["images"]) == 1 and not pool[1]["images"] and len(pool[2]["images"]) == 2
    tokenizer = synthetic.build_tokenizer(tmp_path / "tok", n=200, vocab_size=500)
    config = model_for_tokenizer(load_config("tiny"), tokenizer)
    prompts = rlcs.make_prompts([pool[i] for i in range(3)], tokenizer, ImageProcessor(max_pixels=28 * 28 * 8),
                                tokenizer.eos_ids[0])
    image_id = config.image_token_id
    merged = [int(np.prod(g, axis=1).sum()) // 4 for g in prompts.grids]
    assert [(row == image_id).sum() for row in prompts.input_ids] == merged and merged[1] == 0 < merged[0] < merged[2]
    cfg = RLConfig(max_new_tokens=6, temperature=1.0)
    out = rlcs.rollout(init_params(config, 0), config, prompts, [0, 1, 2], rlcs.sampling_config(cfg, tokenizer),
                       seed=0, group_size=2)
    texts = rlcs.responses(out["tokens"], out["lengths"], tokenizer)
    scores = rlcs.rewards.score_batch([pool[i] for i in np.repeat([0, 1, 2], 2)], texts)
    assert len(scores) == 6 and all(0.0 <= s["reward"] <= 1.0 for s in scores)


@pytest.mark.parametrize("line, message", [
    ({"question": "q", "answer": "1", "domain": "poetry"}, "line 2: domain 'poetry' has no registered verifier"),
    ({"question": "q", "domain": "counting"}, "line 2: no \"answer\""),
    ({"answer": "1", "domain": "counting"}, "line 2: no \"question\" or \"messages\""),
    ("not json", "line 2: line 2 is not valid JSON"),
])
def test_a_bad_line_is_a_clear_error(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        JsonlPromptPool(write(tmp_path, [LINES[0], line]), tmp_path)
