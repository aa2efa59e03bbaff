"""Attention restricted to segments (packed examples, images, frames), optionally causal: one entry point,
several implementations chosen by `impl`.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (H a multiple of K), D head dim.

Implementations (`IMPLS`; `impl=None` or "auto" picks `default_impl()` from the backend):
  "cpu"  the chunked, flash-style custom-VJP jnp implementation tuned on XLA:CPU (`ops/attention_cpu.py`).
  "xla"  the portable path: `jax.nn.dot_product_attention(implementation="xla")` with the segment and
         causal rule as its boolean mask (every mask the model uses fits it: segments, causal in column
         order, causal by each token's index).
Slots for accelerator kernels (a later issue): register "cudnn" (cuDNN flash attention through
`jax.nn.dot_product_attention(implementation="cudnn")`, where its masks fit) and "splash" (Pallas splash
attention on TPU) in `IMPLS` with the signature of `attention_cpu`, and add them to `CHOICES`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from glmv_jax.errors import ConfigError
from glmv_jax.ops.attention_cpu import attention_cpu


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
                  q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
                  chunk: int | None = None) -> jax.Array:
    """`ops.attention` as `jax.nn.dot_product_attention` with a (B, 1, T, S) boolean mask (`chunk` unused).

    Scores (B, K, H/K, T, S) in float32 in memory; plain autodiff. A query that sees no key (padding) is set
    to 0 (the dot-product attention gives it a uniform average)."""
    allowed = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    if q_index is not None:
        allowed &= kv_index[:, None, :] <= q_index[:, :, None]
    elif causal:
        allowed &= jnp.arange(k.shape[1])[None, None, :] <= jnp.arange(q.shape[1])[None, :, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")
    return jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None], out, jnp.zeros((), out.dtype))


# name -> implementation; "cudnn" and "splash" go here (see the module docstring)
IMPLS: dict[str, Callable[..., jax.Array]] = {"cpu": attention_cpu, "xla": attention_xla}
CHOICES = ("auto", *IMPLS)  # the values of `train.attention_impl` and `forward(..., attention_impl=...)`


def default_impl() -> str:
    """"cpu" on the CPU backend, "xla" elsewhere."""
    return "cpu" if jax.default_backend() == "cpu" else "xla"


def resolve_impl(impl: str | None) -> str:
    """The implementation `impl` names (None or "auto": `default_impl()`); an unknown name is a ConfigError."""
    if impl is None or impl == "auto":
        return default_impl()
    if impl not in IMPLS:
        raise ConfigError(f"unknown attention impl {impl!r}; choose one of {', '.join(CHOICES)}")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
              q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
              chunk: int | None = None, impl: str | None = None) -> jax.Array:
    """Softmax attention restricted to equal segments, optionally causal.

    q (B, T, H, D); k, v (B, S, K, D) with H a multiple of K (grouped-query attention, no K/V repeat).
    q_segment (B, T), kv_segment (B, S): a query sees a key only when their segment ids are equal and
    the key's id is non-zero (0 marks padding); a query that sees no key gets 0. If `q_index` (B, T) and
    `kv_index` (B, S) are given, the attention is causal: a query sees keys with `kv_index <= q_index`.
    `causal=True` without indices means causal in column order (queries and keys are the same sequence,
    T == S). `chunk`: queries at a time ("cpu" only). Scores and softmax in float32; returns (B, T, H, D)
    in q's dtype. `impl`: see the module docstring.
    """
    if (q_index is None) != (kv_index is None):
        raise ValueError("give both q_index and kv_index, or neither")
    if causal and q_index is None and k.shape[1] != q.shape[1]:
        raise ValueError(f"causal attention in column order needs as many keys as queries, got {k.shape[1]} "
                         f"and {q.shape[1]}")
    return IMPLS[resolve_impl(impl)](q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_index=q_index,
                                     kv_index=kv_index, causal=causal, chunk=chunk)
