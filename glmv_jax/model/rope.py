"""Rotary position embeddings and the 3D position ids of GLM-4.1V.

Vision: 2D RoPE, `rotate_half` (NeoX) style over the whole head, frequencies [h | w | h | w], f32.
Text: 3D M-RoPE, partial (first `rotary_dim` dims), interleaved (GPT-J) pairs (2j, 2j+1); each of
the `rotary_dim / 2` frequencies reads the t, h or w position by `mrope_section`.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from glmv_jax.config import GlmvConfig, TextConfig


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
    """`1 / theta^(2j / dim)` for j < dim / 2, float32."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


# ----------------------------------------------------------------------------------- vision

def vision_cos_sin(rows: jax.Array, cols: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (..., N, head_dim) float32 for patches at (rows, cols) (..., N)."""
    inv = inverse_frequencies(head_dim // 2, theta)  # head_dim / 4 frequencies per axis
    angles = jnp.concatenate([rows[..., None] * inv, cols[..., None] * inv], axis=-1).astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_vision_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (..., N, heads, D) rotated by cos, sin (..., N, D) in float32 (`rotate_half`), returned in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


# ------------------------------------------------------------------------------------- text

def text_cos_sin(position_ids: jax.Array, config: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, rotary_dim) in `dtype` from position_ids (3, B, T) = (t, h, w)."""
    inv = inverse_frequencies(config.rotary_dim, config.rope_theta)
    freqs = position_ids[..., None].astype(jnp.float32) * inv  # (3, B, T, rotary_dim / 2)
    bounds = [0, *itertools.accumulate(config.mrope_section)]
    freqs = jnp.concatenate([freqs[axis, ..., lo:hi] for axis, (lo, hi) in enumerate(zip(bounds, bounds[1:]))],
                            axis=-1)
    cos = jnp.repeat(jnp.cos(freqs), 2, axis=-1).astype(dtype)
    sin = jnp.repeat(jnp.sin(freqs), 2, axis=-1).astype(dtype)
    return cos, sin


def apply_text_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, heads, D): rotate pairs (2j, 2j+1) of the first cos.shape[-1] dims; the rest pass through."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    pairs = xr.reshape(*xr.shape[:-1], rot // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xr.shape)
    out = xr * cos[:, :, None] + rotated * sin[:, :, None]
    return jnp.concatenate([out.astype(x.dtype), xp], axis=-1)


# --------------------------------------------------------------------------- position ids

def token_types(config: GlmvConfig, input_ids: jax.Array) -> jax.Array:
    """0 text, 1 image, 2 video: `<|image|>` tokens inside `<|begin_of_video|> ... <|end_of_video|>` are video."""
    is_visual = input_ids == config.image_token_id
    opened = jnp.cumsum(input_ids == config.video_start_token_id, axis=-1)
    closed = jnp.cumsum(input_ids == config.video_end_token_id, axis=-1)
    return jnp.where(is_visual, jnp.where(opened > closed, 2, 1), 0).astype(jnp.int32)


def frame_layout(grid_thw: jax.Array, ranks: jax.Array, merge: int) -> tuple[jax.Array, ...]:
    """Where the visual token of global rank r falls: (merged row i, merged col j, merged h', w').

    grid_thw (G, 3) in patch units (rows of zeros are padding); ranks (...) count visual tokens of
    that modality in batch-major order. Each grid row is t frames of h' x w' merged tokens, row-major.
    """
    tokens_per_frame = grid_thw[:, 1] * grid_thw[:, 2] // (merge * merge)
    ends = jnp.cumsum(grid_thw[:, 0] * tokens_per_frame)
    grid = jnp.clip(jnp.searchsorted(ends, ranks, side="right"), 0, grid_thw.shape[0] - 1)
    local = ranks - (ends[grid] - grid_thw[grid, 0] * tokens_per_frame[grid])
    h, w = grid_thw[grid, 1] // merge, grid_thw[grid, 2] // merge
    k = local % jnp.maximum(h * w, 1)
    return k // jnp.maximum(w, 1), k % jnp.maximum(w, 1), h, w


def block_count(grid_thw) -> int:
    """How many visual blocks a grid array describes: S for blocked grids (S, G, 3), else 1 (grids (G, 3))."""
    return 1 if grid_thw is None or jnp.ndim(grid_thw) != 3 else int(jnp.shape(grid_thw)[0])


def visual_ranks(types: jax.Array, blocks: int | tuple[int, int] = 1) -> tuple[jax.Array, jax.Array]:
    """For image (1) and video (2) tokens of `types` (B, T): their rank among that modality's tokens,
    counted batch-major in sequence order (the order features are scattered in). 0 elsewhere.

    `blocks` (one count, or one per modality): the rows are split into that many equal groups of B / S rows
    (visual blocks, `data/visual_layout`), and ranks count within each group: rank r of block s is the r-th
    visual token of rows [s * B / S, (s + 1) * B / S)."""
    out = []
    for kind, s in zip((1, 2), (blocks, blocks) if isinstance(blocks, int) else blocks):
        is_kind = (types == kind).reshape(s, -1)
        out.append(jnp.where(is_kind, jnp.cumsum(is_kind, axis=1) - 1, 0).reshape(types.shape))
    return out[0], out[1]


def get_rope_index(config: GlmvConfig, input_ids: jax.Array, *, image_grid_thw: jax.Array | None = None,
                   video_grid_thw: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   mm_token_type_ids: jax.Array | None = None,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """3D positions (3, B, T) and rope deltas (B, 1), equal to transformers 5.x `get_rope_index`.

    Text tokens advance all three axes by one. Every image, and every frame pair of a video, is a
    block of h' x w' merged tokens placed at (st, st + i, st + j) that advances the position by
    max(h', w'). Padding (attention_mask == 0) gets position 0; `rope_deltas = max + 1 - L` with L
    the row's number of real tokens (the 5.x convention). With `segment_ids` (B, T) (packed
    examples, 0 = padding) positions restart at 0 in every segment. Jittable; grids may carry zero rows.
    Grids may also be blocked, (S, G, 3): block s describes the images of rows [s * B / S, (s + 1) * B / S)
    (`data/visual_layout.layout_blocks`).
    """
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    if segment_ids is not None:
        attention_mask = jnp.asarray(segment_ids) > 0
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    types = token_types(config, input_ids) if mm_token_type_ids is None else jnp.asarray(mm_token_type_ids)
    types = jnp.where(mask, types, 0)
    merge = config.vision.spatial_merge_size

    row = jnp.zeros((b, t), jnp.int32)
    col = jnp.zeros((b, t), jnp.int32)
    advance = mask.astype(jnp.int32)  # text: +1 per real token
    blocks = (block_count(image_grid_thw), block_count(video_grid_thw))
    for kind, grid, ranks, s in zip((1, 2), (image_grid_thw, video_grid_thw), visual_ranks(types, blocks), blocks):
        if grid is None:
            continue
        is_kind = types == kind
        # blocked grids (S, G, 3): block s's grids hold the visual tokens of rows [s * B / S, (s + 1) * B / S)
        layout = jax.vmap(frame_layout, in_axes=(0, 0, None))(
            jnp.asarray(grid, jnp.int32).reshape(s, -1, 3), ranks.reshape(s, -1), merge)
        i, j, h, w = (a.reshape(b, t) for a in layout)
        last_of_frame = i * w + j == h * w - 1
        row = jnp.where(is_kind, i, row)
        col = jnp.where(is_kind, j, col)
        advance = jnp.where(is_kind, jnp.where(last_of_frame, jnp.maximum(h, w), 0), advance)
    start = jnp.cumsum(advance, axis=-1) - advance  # exclusive: the running position before each token
    if segment_ids is not None:  # restart at every segment: subtract the running position at its first token
        seg = jnp.asarray(segment_ids)
        first = seg != jnp.pad(seg, [(0, 0), (1, 0)], constant_values=-1)[:, :-1]
        start = start - jax.lax.cummax(jnp.where(first, start, 0), axis=1)
    positions = jnp.stack([start, start + row, start + col]) * mask[None]
    length = mask.sum(-1, keepdims=True)
    rope_deltas = jnp.max(positions, axis=(0, 2))[:, None] + 1 - length
    return positions.astype(jnp.int32), rope_deltas.astype(jnp.int32)
