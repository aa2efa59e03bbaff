"""RL prompts: the user's prompt pool and the encoded prompt batch a rollout reads.

`make_prompts(examples, tokenizer, processor, pad_id) -> Prompts`: examples (synthetic or the pool's) chat-encoded
with the generation prompt, left-padded to a bucket, their images processed; `Prompts.rows(index)` the model inputs.

The pool from the user's data (`data.source: jsonl` in a config with an `rl:` section):

One JSON object per line:

    {"question": "How many red circles?", "image": "img/001.png", "answer": "3", "domain": "counting"}

- `question` (text) or `messages` (a chat: a list of {"role", "content"}; images as {"type": "image"} parts),
- `image` (a path) or `images` (a list of paths; relative paths against `data.image_root`), optional,
- `answer`: the reference answer the domain's verifier compares with,
- `domain`: a domain with a registered verifier (`glmv_jax.rl.rewards.register`; built in: counting,
  arithmetic, ocr, grounding, ...), optional `id`.

Every line is checked when the pool is read, before any rollout: a line that is not a JSON object, lacks a
question or an answer, or names a domain without a verifier is a `DataError` naming the file and line.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from glmv_jax.data import chat
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.sources import JsonlSource
from glmv_jax.data.synthetic import messages
from glmv_jax.errors import DataError
from glmv_jax.rl import rewards
from glmv_jax.shapes import bucket


class JsonlPromptPool:
    """The lines of an RL JSONL file as examples {id, domain, question / messages, images (PIL), ground_truth};
    images are opened when an example is read. The last min(`held_out`, a quarter of the lines) lines are left out of
    the pool and served by `held_out_examples` (the before/after evaluation)."""

    def __init__(self, path: str | Path, image_root: str | Path = "", *, held_out: int = 0):
        source = JsonlSource(path, image_root)
        known = set(rewards.domains())
        self.records = [check_line(source.path, number, source[i], known)
                        for i, (number, _) in enumerate(source.lines)]
        if not self.records:
            raise DataError(f"{source.path}: no prompts")
        self.n = len(self.records) - min(held_out, len(self.records) // 4)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise KeyError(index)
        return _example(self.records[index])

    def domains(self) -> list[str]:
        return [r["domain"] for r in self.records[:self.n]]

    def held_out_examples(self) -> list[dict]:
        return [_example(r) for r in self.records[self.n:]]


def check_line(path: Path, number: int, record: dict, known: set[str]) -> dict:
    """`record` (line `number` of `path`) if it is a usable RL prompt; DataError saying what is wrong otherwise."""
    where = f"{path} line {number}"
    if "error" in record and type(record).__name__ == "_BadRecord":
        raise DataError(f"{where}: {record['error']}")
    if record.get("answer") in (None, ""):
        raise DataError(f"{where}: no \"answer\" (the reference answer the verifier compares with)")
    if not record.get("question") and not record.get("messages"):
        raise DataError(f"{where}: no \"question\" or \"messages\"")
    domain = record.get("domain")
    if domain not in known:
        raise DataError(f"{where}: domain {domain!r} has no registered verifier (registered: {', '.join(sorted(known))}"
                        "; add one with glmv_jax.rl.rewards.register)")
    return record


def _example(record: dict) -> dict:
    from PIL import Image

    paths = record.get("images") or ([record["image"]] if record.get("image") else [])
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"prompt {record['id']}: cannot read image {p}: {e}") from None
    messages = record.get("messages") or [{"role": "user", "content": [{"type": "image"} for _ in images]
                                           + [{"type": "text", "text": record["question"]}]}]
    return {"id": record["id"], "domain": record["domain"], "images": images, "messages": messages,
            "question": record.get("question", ""), "answer": record["answer"], "ground_truth": record["answer"]}


# ------------------------------------------------------------------------ encoded for rollouts
@dataclasses.dataclass
class Prompts:
    """Left-padded prompts (P, T) with their images, one list of pixel rows per prompt."""

    examples: list[dict]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_types: np.ndarray
    pixels: list[np.ndarray]
    grids: list[np.ndarray]

    def rows(self, index: Sequence[int]) -> dict[str, np.ndarray | None]:
        """The model inputs of prompt rows `index` (repeats allowed), images in row order."""
        index = list(index)
        pixels = [self.pixels[i] for i in index if len(self.pixels[i])]
        grids = [self.grids[i] for i in index if len(self.grids[i])]
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "mm_token_type_ids": self.token_types[index],
                "pixel_values": np.concatenate(pixels) if pixels else None,
                "image_grid_thw": np.concatenate(grids).astype(np.int32) if grids else None}


def make_prompts(examples: list[dict], tokenizer, processor: ImageProcessor, pad_id: int) -> Prompts:
    """Chat-encode each example's images and question with the generation prompt, left-pad to a bucket. An example
    is a synthetic one (`image`, `question`) or a user's (`images`, `messages`: `rl.prompts.JsonlPromptPool`)."""
    encoded, pixels, grids = [], [], []
    for ex in examples:
        images = ex["images"] if "images" in ex else [ex["image"]]
        image = processor(images) if images else {"pixel_values": np.zeros((0, 1), np.float32),
                                                  "image_grid_thw": np.zeros((0, 3), np.int32)}
        chat_messages = ex.get("messages") or messages(ex, with_target=False)
        enc = chat.encode(chat_messages, tokenizer, image_grids=image["image_grid_thw"] if images else None)
        encoded.append(enc)
        pixels.append(image["pixel_values"])
        grids.append(image["image_grid_thw"])
    length = bucket(max(len(e["input_ids"]) for e in encoded), minimum=32)
    ids = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[row, length - n:] = e["input_ids"]
        mask[row, length - n:] = 1
        types[row, length - n:] = e["mm_token_type_ids"]
    return Prompts(examples, ids, mask, types, pixels, grids)


__all__ = ["JsonlPromptPool", "Prompts", "check_line", "make_prompts"]
