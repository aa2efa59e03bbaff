"""The GLM-4.1V vision tower: patch embed -> RMSNorm -> + resampled positions -> blocks -> RMSNorm -> 2x2 downsample.

`grid_thw` (G, 3) gives (t, h, w) per image or video in patch units (rows of zeros are padding).
`pixel_values` come in one of two layouts, both with the patches of a frame in the 2x2 merge-window order:
  flat    (N, C*T*P*P)     every image's patches back to back, as transformers takes them; N may be padded
                           past the real patches (a shape bucket). Attention runs over the whole sequence,
                           restricted to each (image, frame pair) by segment ids: N x N scores.
  framed  (F, W, C*T*P*P)  one frame pair per row (in grid order), zero-padded to W patches; F and W are
                           shape buckets (`data/visual_layout` builds it). Attention runs per row:
                           F x W x W scores, so a batch of images costs no cross-image scores.
Padded patches are ignored; their outputs are garbage. The output is the same in both layouts: merged
tokens in grid order, padding after the real ones.

Blocked (the trainer's layout across devices and hosts, `data/visual_layout.layout_blocks`): `grid_thw`
(S, G, 3) describes S independent blocks, each laid out as above: flat (S, N, C*T*P*P) or framed
(S, F, W, C*T*P*P). Block s holds the images of the rows [s * B / S, (s + 1) * B / S) of the token batch;
the output is (S, K, D), block s's merged tokens in its grid order (K = N / merge^2 or F * W / merge^2).
Blocks are split over the batch axes (data, fsdp) like the rows, and a flat block's patches over `context`:
attention costs S x N x N scores, not (S N)^2 as one flat sequence of every block would.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.config import VisionConfig
from glmv_jax.model import rope
from glmv_jax.model.layers import RMSNorm
from glmv_jax.ops.attention import attention
from glmv_jax.ops.context import sharded_attention
from glmv_jax.ops.dense import dense
from glmv_jax.ops.swiglu import SwiGLU
from glmv_jax.sharding import BATCH, RULES, constrain, in_mesh, mesh_size

PATCH_AXES = RULES["patches"]
BLOCK_PATCH_AXES = RULES["block_patches"]

BICUBIC_A = -0.75  # PyTorch's Keys constant, used by grid_sample


def _window_coords(p: jax.Array, w: jax.Array, merge: int) -> tuple[jax.Array, jax.Array]:
    """Row and column of the patch at position `p` of a frame `w` patches wide, in merge-window order."""
    window, inside = p // (merge * merge), p % (merge * merge)
    windows_per_row = jnp.maximum(w // merge, 1)
    return (window // windows_per_row) * merge + inside // merge, (window % windows_per_row) * merge + inside % merge


def patch_layout(grid_thw: jax.Array, num_patches: int, merge: int) -> dict[str, jax.Array]:
    """Flat layout, per patch (N,): its row and column in its image, the image's h and w, and its segment.

    Segments number every frame pair of every grid from 1; padding patches get segment 0.
    """
    grid_thw = jnp.asarray(grid_thw, jnp.int32)
    t, h, w = grid_thw[:, 0], grid_thw[:, 1], grid_thw[:, 2]
    ends = jnp.cumsum(t * h * w)
    n = jnp.arange(num_patches)
    g = jnp.clip(jnp.searchsorted(ends, n, side="right"), 0, grid_thw.shape[0] - 1)
    local = n - (ends[g] - t[g] * h[g] * w[g])
    frame_size = jnp.maximum(h[g] * w[g], 1)
    frame, p = local // frame_size, local % frame_size
    rows, cols = _window_coords(p, w[g], merge)
    first_segment = jnp.cumsum(t) - t
    real = n < ends[-1]
    segment = jnp.where(real, first_segment[g] + frame + 1, 0).astype(jnp.int32)
    return _padded_layout(real, rows, cols, h[g], w[g], segment, merge)


def frame_layout(grid_thw: jax.Array, frames: int, width: int, merge: int) -> dict[str, jax.Array]:
    """Framed layout, per patch slot (F, W): as `patch_layout`; row f holds the f-th frame pair in grid order."""
    grid_thw = jnp.asarray(grid_thw, jnp.int32)
    t, h, w = grid_thw[:, 0], grid_thw[:, 1], grid_thw[:, 2]
    frame_ends = jnp.cumsum(t)
    f = jnp.arange(frames)
    g = jnp.clip(jnp.searchsorted(frame_ends, f, side="right"), 0, grid_thw.shape[0] - 1)[:, None]
    p = jnp.arange(width)[None]
    real = (f[:, None] < frame_ends[-1]) & (p < h[g] * w[g])
    rows, cols = _window_coords(p, w[g], merge)
    segment = jnp.broadcast_to(f[:, None] + 1, real.shape).astype(jnp.int32)
    return _padded_layout(real, rows, cols, h[g], w[g], jnp.where(real, segment, 0), merge)


def _padded_layout(real, rows, cols, h, w, segment, merge) -> dict[str, jax.Array]:
    # padding patches get a harmless 2x2 image at (0, 0) so nothing downstream divides by zero
    keep = lambda x, pad: jnp.broadcast_to(jnp.where(real, x, pad), real.shape)  # noqa: E731
    return {"rows": keep(rows, 0), "cols": keep(cols, 0), "h": keep(h, merge), "w": keep(w, merge),
            "segment": segment}


def compact_frames(features: jax.Array, grid_thw: jax.Array, merge: int) -> jax.Array:
    """(F, W', D) merged tokens of the framed layout -> (F * W', D) in grid order, real tokens first."""
    frames, width = features.shape[:2]
    grid_thw = jnp.asarray(grid_thw, jnp.int32)
    t, tokens = grid_thw[:, 0], grid_thw[:, 1] * grid_thw[:, 2] // (merge * merge)
    frame_ends = jnp.cumsum(t)
    g = jnp.clip(jnp.searchsorted(frame_ends, jnp.arange(frames), side="right"), 0, grid_thw.shape[0] - 1)
    per_frame = jnp.where(jnp.arange(frames) < frame_ends[-1], tokens[g], 0)
    token_ends = jnp.cumsum(per_frame)
    m = jnp.arange(frames * width)
    frame = jnp.clip(jnp.searchsorted(token_ends, m, side="right"), 0, frames - 1)
    local = jnp.clip(m - (token_ends[frame] - per_frame[frame]), 0, width - 1)
    return features.reshape(frames * width, -1)[frame * width + local]


def _cubic_weights(frac: jax.Array) -> jax.Array:
    """Keys cubic weights (..., 4) of the taps at -1, 0, 1, 2 for a fractional offset in [0, 1)."""
    a = BICUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return jnp.stack([far(frac + 1), near(frac), near(1 - frac), far(2 - frac)], axis=-1)


def bicubic_matrix(coord: jax.Array, size: jax.Array, side: int) -> jax.Array:
    """(N, side) weights sampling a `side`-long table at patch `coord` of `size`, as torch grid_sample.

    align_corners=False and padding_mode="border": the source coordinate is (c + 0.5) * side / size - 0.5,
    each of the 4 taps is clamped to the table, so clamped taps add up on the border entry.
    """
    normalized = ((coord.astype(jnp.float32) + 0.5) / size.astype(jnp.float32)) * 2 - 1
    source = ((normalized + 1) * side - 1) / 2
    base = jnp.floor(source)
    weights = _cubic_weights(source - base)
    taps = jnp.clip(base.astype(jnp.int32)[:, None] + jnp.arange(-1, 3), 0, side - 1)
    return jnp.sum(jax.nn.one_hot(taps, side, dtype=jnp.float32) * weights[..., None], axis=1)


def resample_positions(table: jax.Array, layout: dict[str, jax.Array], side: int) -> jax.Array:
    """The learned (side*side, D) table resampled bicubically at every patch: (..., N, D) float32."""
    shape = layout["rows"].shape
    wy = bicubic_matrix(layout["rows"].reshape(-1), layout["h"].reshape(-1), side)
    wx = bicubic_matrix(layout["cols"].reshape(-1), layout["w"].reshape(-1), side)
    weights = (wy[:, :, None] * wx[:, None, :]).reshape(wy.shape[0], side * side)
    out = jnp.dot(weights, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*shape, table.shape[-1])


class VisionBlock(nn.Module):
    """Pre-norm block: x + Attn(norm1(x)), then x + SwiGLU(norm2(x)) of width out_hidden_size.

    x (B, L, D) with B = 1 (flat layout) or B = frames (framed layout); segment (B, L)."""

    config: VisionConfig
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None  # `ops.attention` impl; None: from the backend
    blocked: bool = False  # x holds flat blocks (S, N): patches of a block split over `context`

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment: jax.Array):
        cfg, pd = self.config, self.param_dtype
        if self.blocked:  # flat blocks: blocks split like the batch rows, a block's patches over `context`
            sharded = in_mesh() and x.shape[0] % mesh_size(BATCH) == 0
            if sharded:
                x = constrain(x, ("visual_blocks", "block_patches", "act_embed"))
            attend = functools.partial(sharded_attention, seq_axes=BLOCK_PATCH_AXES, batch_axes=BATCH) if sharded \
                else attention
        elif x.shape[0] == 1:  # flat: patches split over every non-tensor axis, keys gathered, attention per image
            x = constrain(x, (None, "patches", "act_embed"))
            attend = functools.partial(sharded_attention, seq_axes=PATCH_AXES, batch_axes=()) if in_mesh() \
                else attention
        elif in_mesh() and x.shape[0] % mesh_size(PATCH_AXES) == 0:  # framed: whole frames on each device
            x = constrain(x, ("patches", None, "act_embed"))
            attend = functools.partial(sharded_attention, seq_axes=(), batch_axes=PATCH_AXES)
        else:
            attend = attention
        attend = functools.partial(attend, impl=self.attention_impl)
        y = RMSNorm(cfg.rms_norm_eps, param_dtype=pd, name="norm1")(x)
        qkv = dense((3, cfg.num_heads, cfg.head_dim), ("embed", "qkv", "heads", "head_dim"),
                    use_bias=cfg.attention_bias, name="qkv", param_dtype=pd)(y)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rope.apply_vision_rope(q, cos, sin), rope.apply_vision_rope(k, cos, sin)
        out = attend(q, k, v, q_segment=segment, kv_segment=segment)
        x = x + dense(cfg.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, name="proj", in_dims=2,
                      param_dtype=pd)(out)
        y = RMSNorm(cfg.rms_norm_eps, param_dtype=pd, name="norm2")(x)
        return x + SwiGLU(cfg.out_hidden_size, param_dtype=pd, name="mlp")(y), None


class VisionTower(nn.Module):
    """pixel_values (N, patch_dim) or (F, W, patch_dim), grid_thw (G, 3) -> merged features (M, out_hidden_size)
    in grid order with M = N / merge^2 or F * W / merge^2; blocked: pixel_values (S, N, patch_dim) or
    (S, F, W, patch_dim), grid_thw (S, G, 3) -> (S, K, out_hidden_size) (module doc).

    N and W must be multiples of merge^2. Pass pixels in the parameters' dtype (the reference casts them too).
    """

    config: VisionConfig
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str | None = None  # `ops.attention` impl; None: from the backend

    @nn.compact
    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        merge = cfg.spatial_merge_size
        grid_thw = jnp.asarray(grid_thw, jnp.int32)
        blocked = grid_thw.ndim == 3
        framed = pixel_values.ndim == (4 if blocked else 3)
        if framed and blocked:  # (S, F, W, D): every block's frames in one (S * F, W, D) batch of frames
            s, frames, width = pixel_values.shape[:3]
            layout = jax.vmap(frame_layout, in_axes=(0, None, None, None))(grid_thw, frames, width, merge)
            layout = jax.tree.map(lambda a: a.reshape(s * frames, width), layout)
            pixel_values = pixel_values.reshape(s * frames, width, -1)
        elif framed:
            layout = frame_layout(grid_thw, pixel_values.shape[0], pixel_values.shape[1], merge)
        elif blocked:  # (S, N, D): one flat sequence per block
            layout = jax.vmap(patch_layout, in_axes=(0, None, None))(grid_thw, pixel_values.shape[1], merge)
        else:
            layout = jax.tree.map(lambda a: a[None], patch_layout(grid_thw, pixel_values.shape[0], merge))
            pixel_values = pixel_values[None]

        x = dense(cfg.hidden_size, ("patch", "embed"), use_bias=True, name="patch_embed", param_dtype=pd)(pixel_values)
        x = RMSNorm(cfg.rms_norm_eps, param_dtype=pd, name="post_conv_norm")(x)
        table = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("positions", "embed")),
                           (cfg.position_grid ** 2, cfg.hidden_size), pd)
        x = x + resample_positions(table, layout, cfg.position_grid).astype(table.dtype)

        cos, sin = rope.vision_cos_sin(layout["rows"], layout["cols"], cfg.head_dim, cfg.rope_theta)
        block = nn.remat(VisionBlock) if self.remat else VisionBlock
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(cfg, pd, self.attention_impl, blocked and not framed, name="blocks")(
            x, cos, sin, layout["segment"])
        x = RMSNorm(cfg.rms_norm_eps, param_dtype=pd, name="post_norm")(x)
        x = x.reshape(x.shape[0], x.shape[1] // (merge * merge), merge * merge * cfg.hidden_size)
        x = dense(cfg.out_hidden_size, ("patch", "embed"), use_bias=True, name="downsample", param_dtype=pd)(x)
        if framed and blocked:
            x = x.reshape(grid_thw.shape[0], -1, *x.shape[1:])
            return jax.vmap(compact_frames, in_axes=(0, 0, None))(x, grid_thw, merge)
        if framed:
            return compact_frames(x, grid_thw, merge)
        return x if blocked else x[0]
