"""Checks on model inputs (clear errors before any compile or heavy work) and shape buckets for jit.

Visual inputs are padded to buckets (patches, frames, frame width) and a power-of-two number of grid
rows, so images of different sizes with about the same token budget share one compiled program.
"""
from __future__ import annotations

import numpy as np

from glmv_jax.config import GlmvConfig, VisionConfig
from glmv_jax.shapes import bucket, pow2, round_up
from glmv_jax.errors import InputError


def _count_types(config: GlmvConfig, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> np.ndarray:
    if types is None:
        visual = ids == config.image_token_id
        opened = np.cumsum(ids == config.video_start_token_id, axis=-1)
        closed = np.cumsum(ids == config.video_end_token_id, axis=-1)
        types = np.where(visual, np.where(opened > closed, 2, 1), 0)
    return np.where(mask, types, 0)


def _check_grid(config: GlmvConfig, name: str, grid, pixels, kind_count: int) -> np.ndarray | None:
    """Validate one modality's pixels and grid against its token count; return the grid as int32."""
    v = config.vision
    if grid is None and pixels is None:
        if kind_count:
            raise InputError(f"input_ids hold {kind_count} {name} tokens but no pixel values were given")
        return None
    if grid is None or pixels is None:
        raise InputError(f"{name}: pass both the pixel values and the grid_thw, or neither")
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise InputError(f"{name}_grid_thw must be an integer array (num_{name}s, 3), got {grid.shape} {grid.dtype}")
    m = v.spatial_merge_size
    if (grid <= 0).any():
        raise InputError(f"{name}_grid_thw has a non-positive entry: {grid.tolist()}")
    if (grid[:, 1:] % m).any():
        raise InputError(f"{name}_grid_thw h and w must be multiples of spatial_merge_size {m}; got "
                         f"{grid[:, 1:].tolist()} (an odd grid cannot be merged 2x2)")
    shape = tuple(np.shape(pixels))
    if len(shape) != 2 or shape[1] != v.patch_dim:
        raise InputError(f"{name} pixel values must have shape (num_patches, {v.patch_dim}), got {shape}")
    patches = int(np.prod(grid, axis=1).sum())
    if shape[0] != patches:
        raise InputError(f"{name} pixel values have {shape[0]} patches but {name}_grid_thw adds up to {patches}")
    tokens = patches // (m * m)
    if tokens != kind_count:
        raise InputError(f"input_ids hold {kind_count} {name} tokens but {name}_grid_thw gives {tokens} "
                         f"({name} placeholder count does not match the grids)")
    return grid.astype(np.int32)


def check_inputs(config: GlmvConfig, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None, position_ids=None):
    """Validate on the host; returns (input_ids, attention_mask, image_grid, video_grid) as numpy."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be an integer array (batch, length), got {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.text.vocab_size):
        raise InputError(f"input_ids must lie in [0, {config.text.vocab_size}); got [{ids.min()}, {ids.max()}]")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    types = None if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    if types is not None and types.shape != ids.shape:
        raise InputError(f"mm_token_type_ids shape {types.shape} differs from input_ids shape {ids.shape}")
    if position_ids is not None and np.shape(position_ids) != (3, *ids.shape):
        raise InputError(f"position_ids must have shape (3, {ids.shape[0]}, {ids.shape[1]}), "
                         f"got {np.shape(position_ids)}")
    types = _count_types(config, ids, mask.astype(bool), types)
    image_grid = _check_grid(config, "image", image_grid_thw, pixel_values, int((types == 1).sum()))
    if image_grid is not None and (image_grid[:, 0] != 1).any():
        raise InputError(f"image_grid_thw t must be 1 for images (got {image_grid[:, 0].tolist()}); "
                         "pass frame pairs as videos")
    video_grid = _check_grid(config, "video", video_grid_thw, pixel_values_videos, int((types == 2).sum()))
    return ids.astype(np.int32), mask.astype(np.int32), image_grid, video_grid


def pad_visual(pixels, grid: np.ndarray | None, vision: VisionConfig):
    """Visual inputs in the cheaper of the vision tower's two layouts, padded to shape buckets.

    Returns (pixels, grid): grid rows padded to a power of two (zero rows); pixels either framed
    (F, W, patch_dim), one frame pair per row, F and W powers of two (W >= 16, the largest frame),
    or flat (N, patch_dim), N a bucket of the patch count (always for a single frame). Framed is taken
    when it saves cross-image attention scores without padding many more patches: a layout's estimated
    cost is rows x (A + keys per query), A = 2 * hidden + 1.5 * intermediate being a patch's dense-layer
    FLOPs in units of one key's attention FLOPs. Both layouts compute the same features.
    """
    if grid is None:
        return None, None
    grid = np.asarray(grid, np.int32)
    pixels = np.asarray(pixels)
    unit = vision.spatial_merge_size ** 2
    sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # patches per frame pair, in order
    rows = int(sizes.sum())
    flat = round_up(bucket(rows), unit)
    frames, width = pow2(len(sizes)), round_up(pow2(max(int(sizes.max()), 16)), unit)
    grid = np.concatenate([grid, np.zeros((pow2(len(grid)) - len(grid), 3), np.int32)])
    per_patch = 2 * vision.hidden_size + 1.5 * vision.intermediate_size
    if len(sizes) > 1 and frames * width * (per_patch + width) < flat * (per_patch + flat):
        return frame_pixels(pixels, grid, frames, width), grid
    return np.concatenate([pixels, np.zeros((flat - rows, pixels.shape[1]), pixels.dtype)]), grid


def frame_pixels(pixels: np.ndarray, grid: np.ndarray, frames: int, width: int) -> np.ndarray:
    """Flat pixel rows (N, patch_dim) of `grid` (zero rows allowed) -> the framed layout (frames, width, patch_dim):
    frame pair f of the grid order in row f, zero-padded. Raises InputError if they do not fit."""
    grid = np.asarray(grid, np.int64)
    sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    if len(sizes) > frames or (len(sizes) and sizes.max() > width):
        raise InputError(f"{len(sizes)} frames of up to {sizes.max() if len(sizes) else 0} patches do not fit "
                         f"a framed layout of {frames} x {width}")
    out = np.zeros((frames, width, pixels.shape[1]), pixels.dtype)
    for f, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
        out[f, :size] = pixels[start:start + size]
    return out
