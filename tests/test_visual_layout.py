"""data/visual_layout: the one policy for a batch's pixel blocks and grids, in its two modes (bucket: inference;
fixed budgets: training, the pipeline's collate, the plan), with the patch dimension taken from the vision config."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from glmv_jax.config import load_config
from glmv_jax.data import packing
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.visual_layout import VisualBudgets, abstract_shapes, frame_pixels, layout, pad_visual
from glmv_jax.errors import ConfigError, DataError, InputError

TINY = load_config("tiny").vision                                               # patch 14: rows of 1176
WIDE = dataclasses.replace(TINY, patch_size=16, spatial_merge_size=3)           # rows of 1536, merge unit 9


def visual(grids, vision=TINY, seed=0):
    """Random pixels (sum t*h*w, patch_dim) of `grids` and the grids as int32."""
    grids = np.asarray(grids, np.int32)
    rows = int(np.prod(grids, axis=1).sum())
    return np.random.default_rng(seed).standard_normal((rows, vision.patch_dim)).astype(np.float32), grids


def unframe(pixels, grids):
    """The real patch rows of a framed layout, in order."""
    sizes = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
    return np.concatenate([pixels[f, :n] for f, n in enumerate(sizes)])


# ------------------------------------------------------------------------------------------- bucket mode
@pytest.mark.parametrize("grid, rows", [([[1, 12, 11]], 160), ([[1, 4, 4]], 64), ([[1, 30, 30]], 1024),
                                        ([[1, 34, 34]], 1280)])
def test_one_image_is_flat_in_a_bucket(grid, rows):
    pixels, grids = visual(grid)
    out, g = pad_visual(pixels, grids, TINY)
    assert out.shape == (rows, TINY.patch_dim) and g.shape == (1, 3)
    assert np.array_equal(out[:len(pixels)], pixels) and not out[len(pixels):].any()
    assert np.array_equal(g, grids)


def test_several_small_images_are_framed_one_per_row():
    pixels, grids = visual([[1, 4, 4], [1, 4, 2], [1, 2, 6]])
    out, g = pad_visual(pixels, grids, TINY)
    assert out.shape == (4, 16, TINY.patch_dim)                 # pow2(3 frames) x pow2(max(16, 16)) patches
    assert g.shape == (4, 3) and np.array_equal(g[:3], grids) and not g[3].any()
    assert np.array_equal(unframe(out, grids), pixels)
    assert not out[1, 8:].any() and not out[3].any()


def test_a_video_is_one_row_per_frame_pair():
    pixels, grids = visual([[3, 4, 4], [1, 2, 2]])
    out, g = pad_visual(pixels, grids, TINY)
    assert out.ndim == 3 and out.shape[0] == 4                  # 4 frame pairs
    assert np.array_equal(unframe(out, grids), pixels) and g.shape == (2, 3)


def test_no_visual_input_passes_through():
    assert pad_visual(None, None, TINY) == (None, None)


def test_pixels_must_match_the_vision_configs_patch_dim():
    pixels, grids = visual([[1, 4, 4]])
    with pytest.raises(InputError, match=r"\(patches, 1536\)"):
        layout(pixels, grids, WIDE)


# -------------------------------------------------------------------------------------------- fixed mode
def test_zero_budgets_are_the_pipelines_bucketed_flat_layout():
    pixels, grids = visual([[1, 8, 10], [1, 6, 6], [1, 4, 4]])   # 132 patches
    out, g, overflow = layout(pixels, grids, TINY, VisualBudgets())
    assert out.shape == (160, TINY.patch_dim) and g.shape == (4, 3) and overflow == {}
    empty, g0, _ = layout(np.zeros((0, TINY.patch_dim), np.float32), np.zeros((0, 3)), TINY, VisualBudgets())
    assert empty.shape == (64, TINY.patch_dim) and not empty.any() and g0.shape == (1, 3) and not g0.any()
    # and the pipeline's collate gives exactly that
    rec = {"input_ids": np.arange(1, 11), "mm_token_type_ids": np.zeros(10, np.int32), "loss_mask": np.ones(10),
           "pixel_values": pixels, "image_grid_thw": grids}
    (batch,) = packing.pack_examples([rec], seq_len=16)
    assert np.array_equal(batch["pixel_values"], out) and np.array_equal(batch["image_grid_thw"], g)


@pytest.mark.parametrize("row_multiple, rows", [(1, 512), (2, 512), (3, 516), (8, 512)])
def test_training_budgets_fix_the_flat_shapes(row_multiple, rows):
    pixels, grids = visual([[1, 8, 10], [1, 6, 6], [1, 4, 4]])
    budgets = VisualBudgets(max_images=32, pixel_rows=512, row_multiple=row_multiple)
    # the trainer gets the pipeline's batch (already bucketed): the same shapes as from the raw pixels
    collated, cgrids, _ = layout(pixels, grids, TINY, VisualBudgets())
    for p, g in ((pixels, grids), (collated, cgrids)):
        out, og, overflow = layout(p, g, TINY, budgets)
        assert out.shape == (rows, TINY.patch_dim) and og.shape == (32, 3) and overflow == {}   # lcm(multiple, 4)
        assert np.array_equal(out[:132], pixels) and not out[132:].any()
        assert np.array_equal(og[:3], grids) and not og[3:].any()
    assert abstract_shapes(TINY, budgets, images=3, patches=132) == {"pixel_values": (rows, TINY.patch_dim),
                                                                     "image_grid_thw": (32, 3)}


def test_framed_budgets_give_one_image_per_row():
    pixels, grids = visual([[1, 8, 10], [1, 6, 6], [1, 4, 4]])
    budgets = VisualBudgets(max_images=4, frame_patches=80, row_multiple=3)
    out, g, overflow = layout(pixels, grids, TINY, budgets)
    assert out.shape == (6, 80, TINY.patch_dim) and g.shape == (4, 3) and overflow == {}   # round_up(4, 3) rows
    assert np.array_equal(out, frame_pixels(pixels, g, 6, 80))
    assert np.array_equal(unframe(out, grids), pixels)
    assert abstract_shapes(TINY, budgets, images=3, patches=132, widest=80)["pixel_values"] == out.shape


def test_budgets_exceeded_grow_and_say_so_or_are_an_error():
    pixels, grids = visual([[1, 20, 20], [1, 10, 10], [1, 4, 4]])   # 516 patches -> bucket 640, 4 grid rows
    out, g, overflow = layout(pixels, grids, TINY, VisualBudgets(max_images=2, pixel_rows=512))
    assert out.shape == (640, TINY.patch_dim) and g.shape == (4, 3)
    assert "data.pixel_rows = 512" in overflow["pixel_rows"] and "data.max_images = 2" in overflow["max_images"]
    with pytest.raises(DataError, match=r"exceeds its fixed visual budgets.*640 pixel rows > data\.pixel_rows"):
        layout(pixels, grids, TINY, VisualBudgets(pixel_rows=512, strict=True))
    with pytest.raises(DataError, match=r"4 image rows > data\.max_images = 2"):
        layout(pixels, grids, TINY, VisualBudgets(max_images=2, frame_patches=400, strict=True))
    # an image wider than a frame row never fits, strict or not
    with pytest.raises(DataError, match=r"an image of 400 patches does not fit a frame row of data\.frame_patches"):
        layout(pixels, grids, TINY, VisualBudgets(max_images=4, frame_patches=256))


def test_budgets_are_checked():
    with pytest.raises(ConfigError, match="non-negative"):
        VisualBudgets(pixel_rows=-1)
    with pytest.raises(ConfigError, match="row_multiple positive"):
        VisualBudgets(row_multiple=0)
    max_pixels = 28 * 28 * 2 * 40                                       # 160 patches at most
    VisualBudgets(max_images=8, frame_patches=160).validate(TINY, max_pixels)
    for frame_patches in (150, 162):                                    # too small; not a multiple of 4
        with pytest.raises(ConfigError, match=r"data\.frame_patches = \d+ must be a multiple of 4 and hold the "
                                              r"largest image data\.max_pixels allows \(160 patches\)"):
            VisualBudgets(max_images=8, frame_patches=frame_patches).validate(TINY, max_pixels)


# -------------------------------------------------------------------------------- another patch geometry
def test_patch_dim_and_merge_unit_come_from_the_vision_config():
    assert (TINY.patch_dim, WIDE.patch_dim) == (3 * 2 * 14 * 14, 3 * 2 * 16 * 16)
    pixels, grids = visual([[1, 9, 12]], WIDE)                          # 108 patches, merge unit 9
    out, g, _ = layout(pixels, grids, WIDE, VisualBudgets())
    assert out.shape == (117, 1536)                                     # round_up(bucket(108) = 112, 9)
    out, g, _ = layout(pixels, grids, WIDE, VisualBudgets(pixel_rows=200, row_multiple=2))
    assert out.shape == (216, 1536)                                     # round_up(200, lcm(2, 9))
    framed, _ = pad_visual(*visual([[1, 3, 3], [1, 3, 3]], WIDE), WIDE)
    assert framed.shape == (2, 18, 1536)                                # width round_up(pow2(16), 9)
    # the pipeline lays its batches out by the processor's geometry
    proc = ImageProcessor(patch_size=16, merge_size=3)
    assert proc.geometry().patch_dim == 1536 and proc.geometry().spatial_merge_size == 3
    rec = {"input_ids": np.arange(1, 5), "mm_token_type_ids": np.zeros(4, np.int32), "loss_mask": np.ones(4),
           "pixel_values": np.zeros((0, 1536), np.float32), "image_grid_thw": np.zeros((0, 3), np.int32)}
    (batch,) = packing.pack_examples([rec], seq_len=8, vision=proc.geometry())
    assert batch["pixel_values"].shape == (72, 1536)                   # round_up(64, 9), no image
