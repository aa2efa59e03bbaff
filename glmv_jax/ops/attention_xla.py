"""The "xla" attention: `jax.nn.dot_product_attention(implementation="xla")` with the segment and causal rule as
its boolean mask, and the pieces the accelerator kernels share with it (the mask, the fallback with its one log).

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def allowed_mask(q_segment, kv_segment, q_index=None, kv_index=None, causal: bool = False) -> jax.Array:
    """(B, T, S) bool: the keys each query sees. Same non-zero segment; if indices are given, kv_index <= q_index;
    else if `causal`, causal in column order with the T queries as the last T of the S keys (bottom-right:
    query t sees keys s <= t + S - T)."""
    t, s = q_segment.shape[1], kv_segment.shape[1]
    allowed = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    if q_index is not None:
        allowed &= kv_index[:, None, :] <= q_index[:, :, None]
    elif causal:
        allowed &= jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None] + (s - t)
    return allowed


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """`logging.warning(message)` the first time this message is given in this process."""
    log.warning(message)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
                  q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
                  chunk: int | None = None) -> jax.Array:
    """`ops.attention` as `jax.nn.dot_product_attention` with a (B, 1, T, S) boolean mask (`chunk` unused).

    Scores (B, K, H/K, T, S) in float32 in memory; plain autodiff. A query that sees no key (padding) is set
    to 0 (the dot-product attention gives it a uniform average)."""
    allowed = allowed_mask(q_segment, kv_segment, q_index, kv_index, causal)
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")
    return jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None], out, jnp.zeros((), out.dtype))
