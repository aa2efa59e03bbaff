"""Checks on model inputs: clear errors before any compile or heavy work.

The shapes visual inputs are padded to (the pixel layout and its buckets) are `data/visual_layout`'s.
"""
from __future__ import annotations

import numpy as np

from glmv_jax.config import GlmvConfig
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
