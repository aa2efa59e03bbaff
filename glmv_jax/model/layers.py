"""Building blocks shared by the vision tower and the decoder.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def dense(features: int | Sequence[int], axes: Sequence[str], *, use_bias: bool, name: str | None = None,
          in_dims: int = 1, param_dtype: Dtype = jnp.float32) -> nn.DenseGeneral:
    """A dense layer over the last `in_dims` input dims whose kernel carries the logical `axes`.

    The kernel has shape (*in, *features) and axes names every one of its dims; the bias has the
    feature dims and their names. Split feature dims (heads, head_dim) keep tensor sharding local.
    """
    features = (features,) if isinstance(features, int) else tuple(features)
    return nn.DenseGeneral(
        features, axis=tuple(range(-in_dims, 0)), use_bias=use_bias, name=name, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(DEFAULT_INIT, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[in_dims:])))


class RMSNorm(nn.Module):
    """`scale * (x / rms(x))`: statistics in float32, cast back to x's dtype before the scale (as HF)."""

    eps: float
    axis: str = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(x.dtype)


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))` with separate gate and up projections (vision blocks, projector)."""

    hidden: int
    mlp_axis: str = "mlp"
    embed_axis: str = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        io = (self.embed_axis, self.mlp_axis)
        gate = dense(self.hidden, io, use_bias=False, name="gate", param_dtype=self.param_dtype)(x)
        up = dense(self.hidden, io, use_bias=False, name="up", param_dtype=self.param_dtype)(x)
        return dense(x.shape[-1], io[::-1], use_bias=False, name="down",
                     param_dtype=self.param_dtype)(nn.silu(gate) * up)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
              q_index: jax.Array | None = None, kv_index: jax.Array | None = None,
              chunk: int | None = None) -> jax.Array:
    """Softmax attention restricted to equal segments, optionally causal, without an S x T mask in memory.

    q (B, T, H, D); k, v (B, S, K, D) with H a multiple of K (grouped-query attention, no K/V repeat).
    q_segment (B, T), kv_segment (B, S): a query sees a key only when their segment ids are equal and
    the key's id is non-zero (0 marks padding). If `q_index` (B, T) and `kv_index` (B, S) are given,
    the attention is causal: a query sees keys with `kv_index <= q_index`.
    Queries are processed at most `chunk` at a time (default: 1024, fewer for long keys so that
    chunk x S stays near 4M per head), so memory is O(chunk * S) per head. Scores and softmax
    in float32; returns (B, T, H, D) in q's dtype.
    """
    b, t, h, d = q.shape
    causal = q_index is not None
    if chunk is None:  # bound each chunk's scores to ~4M entries per head: chunk x S
        chunk = max(128, min(1024, (1 << 22) // max(k.shape[1], 1)))
    if not causal:
        q_index = jnp.zeros((b, t), jnp.int32)
        kv_index = jnp.zeros(kv_segment.shape, jnp.int32)

    def attend(qc, qseg, qidx):
        allowed = (qseg[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
        if causal:
            allowed &= kv_index[:, None, :] <= qidx[:, :, None]
        # XLA's fused attention: grouped heads without repeating K/V, float32 softmax
        return jax.nn.dot_product_attention(qc, k, v, mask=allowed[:, None], implementation="xla")

    if t <= chunk:
        return attend(q, q_segment, q_index)
    n = -(-t // chunk)
    size = -(-t // n)  # balanced chunks: padding stays below n tokens
    pad = n * size - t

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    # each chunk's scores are recomputed in the backward pass, so memory stays O(chunk * S) there too
    out = jax.lax.map(jax.checkpoint(lambda args: attend(*args)), (split(q), split(q_segment), split(q_index)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * size, h, d)[:, :t]
