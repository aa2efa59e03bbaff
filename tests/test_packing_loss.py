"""Packing changes nothing: the loss of examples packed into one row equals their loss one row each."""
from __future__ import annotations

import jax
import numpy as np

from glmv_jax import init_params, load_config
from glmv_jax.data import packing, records as records_lib, synthetic
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.train.setup import model_for_tokenizer
from glmv_jax.train.steps import batch_loss


def test_packed_loss_equals_unpacked_loss(tmp_path):
    tokenizer = synthetic.build_tokenizer(tmp_path / "tok", n=300, vocab_size=700)
    config = model_for_tokenizer(load_config("tiny"), tokenizer)
    params = init_params(config, seed=1)
    processor = ImageProcessor(min_pixels=1568, max_pixels=28 * 28 * 2 * 12)
    examples = [synthetic.make_example(d, 5) for d in synthetic.DOMAINS[:3]]
    records = [records_lib.example_to_record(ex, tokenizer, "sft", processor) for ex in examples]
    lengths = [len(r["input_ids"]) for r in records]
    seq = int(np.ceil(sum(lengths) / 8) * 8)

    packed = packing.pack_examples(records, seq, batch_size=1)[0]
    assert packed["segment_ids"].max() == 3  # all three in one row
    single = [packing.pack_examples([r], seq, batch_size=1)[0] for r in records]
    apart = {k: np.concatenate([b[k] for b in single]) for k in single[0] if k not in ("pixel_values", "image_grid_thw")}
    apart["pixel_values"] = np.concatenate([b["pixel_values"][:int(np.prod(b["image_grid_thw"], 1).sum())]
                                            for b in single])
    apart["image_grid_thw"] = np.concatenate([b["image_grid_thw"][b["image_grid_thw"][:, 0] > 0] for b in single])

    def total(batch):
        mean, count = jax.jit(lambda p, b: batch_loss(p, config, b))(params, batch)
        return float(mean) * float(count), float(count)

    (a, na), (b, nb) = total(packed), total(apart)
    assert na == nb == sum(float(r["loss_mask"].sum()) for r in records)
    assert abs(a - b) <= 1e-5 * abs(b)
