"""The KV cache of decoding: its layout, the write of a new token's K/V, and attention over its valid slots.

Caches are per layer: keys (B*K, D, S), values (B*K, S, D) (B batch, K key/value heads, D head dim, S slots),
the operand layouts of the two attention matmuls, tuned on XLA:CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B, S, K, D) -> the decode caches' layouts: keys (B*K, D, S), values (B*K, S, D).

    These are the operand layouts of the two attention matmuls (scores q.k, then p.v), so XLA reads the
    caches as they are instead of transposing every layer's cache at every step (`cached_attention`).
    """
    b, s, kv_heads, d = k.shape
    return (jnp.transpose(k, (0, 2, 3, 1)).reshape(b * kv_heads, d, s),
            jnp.transpose(v, (0, 2, 1, 3)).reshape(b * kv_heads, s, d))


def write_cache(kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, at) -> tuple[jax.Array, jax.Array]:
    """Write one token's k, v (B, 1, K, D) into caches in `cache_layout` at slot `at` (in place under jit).

    Written before the attention reads the caches: the old cache is never read after the write, so XLA
    updates the loop-carried buffers in place instead of copying them.
    """
    k, v = cache_layout(k.astype(kv[0].dtype), v.astype(kv[1].dtype))
    return jax.lax.dynamic_update_slice(kv[0], k, (0, 0, at)), jax.lax.dynamic_update_slice(kv[1], v, (0, at, 0))


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_valid: jax.Array) -> jax.Array:
    """Decode attention: q (B, T, H, D) attends to the valid slots (cache_valid (B, S) bool) of K/V caches.

    The caches are kept in the layouts the two matmuls read as they are: keys (B*K, D, S), values
    (B*K, S, D), batch and KV heads as one leading axis (a separate size-1 batch axis is a bitcast in front of
    the matmul, and XLA:CPU then copies each updated cache every step instead of writing it in place). The
    queries of one KV head are one (T x H/K, D) matrix (a separate size-1 T axis makes XLA:CPU pick a 4x
    slower matmul). Scores and softmax in float32; returns (B, T, H, D) in q's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k_cache.shape[0] // b
    rows = jnp.moveaxis(q.reshape(b, t, kv_heads, h // kv_heads, d), 1, 2).reshape(b * kv_heads, -1, d)
    scores = jnp.einsum("nqd,nds->nqs", rows * jnp.asarray(d ** -0.5, q.dtype), k_cache,
                        preferred_element_type=jnp.float32)
    scores = jnp.where(jnp.repeat(cache_valid, kv_heads, axis=0)[:, None, :], scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("nqs,nsd->nqd", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    out = (out / jnp.sum(p, axis=-1)[..., None]).reshape(b, kv_heads, t, h // kv_heads, d)
    return jnp.moveaxis(out, 2, 1).reshape(b, t, h, d).astype(q.dtype)
