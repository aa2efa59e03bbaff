"""Attention restricted to segments (packed examples, images, frames), optionally causal: one entry point,
several implementations chosen by `impl`.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (H a multiple of K), D head dim.

Implementations (`IMPLS`; `impl=None` or "auto" picks `default_impl()` from the backend: "cpu" on CPU, "cudnn"
on GPU, "splash" on TPU, "xla" elsewhere):
  "cpu"    the chunked, flash-style custom-VJP jnp implementation tuned on XLA:CPU (`ops/attention_cpu.py`).
  "xla"    the portable path: `jax.nn.dot_product_attention(implementation="xla")` with the segment and
           causal rule as its boolean mask (every mask the model uses fits it; `ops/attention_xla.py`).
  "cudnn"  cuDNN's flash attention through the same API (`ops/attention_cudnn.py`); GPU only.
  "splash" the Pallas TPU splash-attention kernel (`ops/attention_splash.py`); off TPU in interpret mode.
A kernel that cannot express a mask (or a dtype) falls back to "xla" there and logs it once.
"""
from __future__ import annotations

from typing import Callable

import jax

from glmv_jax.errors import ConfigError
from glmv_jax.ops.attention_cpu import attention_cpu
from glmv_jax.ops.attention_cudnn import attention_cudnn
from glmv_jax.ops.attention_splash import attention_splash
from glmv_jax.ops.attention_xla import attention_xla

IMPLS: dict[str, Callable[..., jax.Array]] = {"cpu": attention_cpu, "xla": attention_xla, "cudnn": attention_cudnn,
                                              "splash": attention_splash}
CHOICES = ("auto", *IMPLS)  # the values of `train.attention_impl` and `forward(..., attention_impl=...)`
BY_BACKEND = {"cpu": "cpu", "gpu": "cudnn", "tpu": "splash"}


def default_impl() -> str:
    """The implementation for `jax.default_backend()`: "cpu", "cudnn" (gpu), "splash" (tpu), else "xla"."""
    return BY_BACKEND.get(jax.default_backend(), "xla")


def resolve_impl(impl: str | None) -> str:
    """The implementation `impl` names (None or "auto": `default_impl()`). An unknown name, or "cudnn" off GPU,
    is a ConfigError."""
    if impl is None or impl == "auto":
        return default_impl()
    if impl not in IMPLS:
        raise ConfigError(f"unknown attention impl {impl!r}; choose one of {', '.join(CHOICES)}")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"attention impl 'cudnn' needs a GPU; this backend is {jax.default_backend()!r} "
                          f"(choose one of auto, cpu, xla, splash)")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
              q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
              chunk: int | None = None, impl: str | None = None) -> jax.Array:
    """Softmax attention restricted to equal segments, optionally causal.

    q (B, T, H, D); k, v (B, S, K, D) with H a multiple of K (grouped-query attention, no K/V repeat).
    q_segment (B, T), kv_segment (B, S): a query sees a key only when their segment ids are equal and
    the key's id is non-zero (0 marks padding); a query that sees no key gets 0. If `q_index` (B, T) and
    `kv_index` (B, S) are given, the attention is causal: a query sees keys with `kv_index <= q_index`.
    `causal=True` without indices means causal in column order with the queries the last T of the S keys
    (S >= T; query t sees keys s <= t + S - T: T == S is plain causal self-attention; S > T is a block of
    queries against its key prefix, as context parallelism runs it). `chunk`: queries at a time ("cpu" only).
    Scores and softmax in float32; returns (B, T, H, D) in q's dtype. `impl`: see the module docstring.
    """
    if (q_index is None) != (kv_index is None):
        raise ValueError("give both q_index and kv_index, or neither")
    if causal and q_index is None and k.shape[1] < q.shape[1]:
        raise ValueError(f"causal attention in column order needs at least as many keys as queries, got "
                         f"{k.shape[1]} and {q.shape[1]}")
    return IMPLS[resolve_impl(impl)](q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_index=q_index,
                                     kv_index=kv_index, causal=causal, chunk=chunk)
