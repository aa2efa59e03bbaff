"""Bad inputs fail with a clear message before any compile; shape buckets share one compile."""
from __future__ import annotations

import numpy as np
import pytest

from glmv_jax import forward
from glmv_jax.model.glmv import forward_jit
from glmv_jax.model.inputs import InputError
from glmv_jax.shapes import bucket
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
from reference import Prompt, batch


def test_bucket_pads_at_most_a_quarter():
    for n in range(1, 5000):
        size = bucket(n)
        assert size >= n and (size <= 64 or size <= 1.25 * n + 1)


def call(config, params, inputs, **overrides):
    args = {k: inputs[k] for k in ("attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                                   "video_grid_thw")}
    args.update(overrides)
    return forward(params, config, inputs["input_ids"], **args)


def test_one_compile_serves_different_image_sizes(tiny_pair):
    """Images of 24, 24, 32 and 40 patches in a 48-token prompt: one compile for all four."""
    config, _, params, _ = tiny_pair
    before = forward_jit._cache_size()
    for seed, (h, w) in enumerate([(4, 6), (6, 4), (4, 8), (2, 20)]):
        prompt = Prompt(config, seed).text(4).image(h, w)
        prompt.text(48 - len(prompt.ids))
        logits = call(config, params, batch(config, [prompt]))
        assert logits.shape == (1, 48, config.text.vocab_size) and np.isfinite(np.asarray(logits)).all()
    assert forward_jit._cache_size() - before == 1


@pytest.fixture
def one_image(tiny_config):
    return batch(tiny_config, [Prompt(tiny_config).text(4).image(4, 6).text(3)])


def expect_error(tiny_pair, inputs, match, **overrides):
    config, _, params, _ = tiny_pair
    before = forward_jit._cache_size()
    with pytest.raises(InputError, match=match):
        call(config, params, inputs, **overrides)
    assert forward_jit._cache_size() == before  # refused before any compile


def test_image_token_count_mismatch(tiny_pair, one_image):
    ids = one_image["input_ids"].copy()
    ids[0, 6] = 5  # one placeholder less
    expect_error(tiny_pair, {**one_image, "input_ids": ids}, "5 image tokens but image_grid_thw gives 6")


def test_odd_grid(tiny_pair, one_image):
    pixels = np.zeros((3 * 8, 1176), np.float32)
    expect_error(tiny_pair, one_image, "multiples of spatial_merge_size", image_grid_thw=np.array([[1, 3, 8]]),
                 pixel_values=pixels)


def test_pixel_rows_do_not_match_grid(tiny_pair, one_image):
    expect_error(tiny_pair, one_image, "have 23 patches", pixel_values=one_image["pixel_values"][:23])


def test_pixel_width(tiny_pair, one_image):
    expect_error(tiny_pair, one_image, r"shape \(num_patches, 1176\)", pixel_values=np.zeros((24, 100), np.float32))


def test_placeholders_without_pixels(tiny_pair, one_image):
    expect_error(tiny_pair, one_image, "no pixel values", pixel_values=None, image_grid_thw=None)


def test_token_outside_vocabulary(tiny_pair, one_image):
    ids = one_image["input_ids"].copy()
    ids[0, 0] = 10_000
    expect_error(tiny_pair, {**one_image, "input_ids": ids}, "must lie in")


def test_mask_shape(tiny_pair, one_image):
    expect_error(tiny_pair, one_image, "attention_mask shape", attention_mask=np.ones((1, 3)))
