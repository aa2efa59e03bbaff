"""The KV cache of decoding: its layout, the write of a new token's K/V, and attention over its valid slots.

Caches are per layer, in one of two layouts (B batch, K key/value heads, D head dim, S slots):
- merged (one device): keys (B*K, D, S), values (B*K, S, D), the operand layouts of the two attention
  matmuls, tuned on XLA:CPU;
- split (on a mesh): keys (B, K, D, S), values (B, K, S, D), batch sharded over the data axes and KV heads
  over `tensor` (`constrain_cache`); a merged B*K axis cannot carry both shardings at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmv_jax.sharding import constrain

CACHE_AXES = ("batch", "act_kv_heads", None, None)   # logical axes of a split-layout cache


def cache_layout(k: jax.Array, v: jax.Array, *, split: bool = False) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B, S, K, D) -> the decode caches' layouts: keys (B*K, D, S), values (B*K, S, D), or with
    `split` keys (B, K, D, S), values (B, K, S, D) (sharded on a mesh by `constrain_cache`).

    These are the operand layouts of the two attention matmuls (scores q.k, then p.v), so XLA reads the
    caches as they are instead of transposing every layer's cache at every step (`cached_attention`).
    """
    b, s, kv_heads, d = k.shape
    k, v = jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))
    if split:
        return constrain_cache((k, v))
    return k.reshape(b * kv_heads, d, s), v.reshape(b * kv_heads, s, d)


def constrain_cache(kv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Split-layout caches sharded by batch over the data axes and by KV head over `tensor` (a no-op without a
    mesh)."""
    return tuple(constrain(x, CACHE_AXES) for x in kv)


def write_cache(kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, at) -> tuple[jax.Array, jax.Array]:
    """Write one token's k, v (B, 1, K, D) into caches in `cache_layout` at slot `at` (in place under jit).

    Written before the attention reads the caches: the old cache is never read after the write, so XLA
    updates the loop-carried buffers in place instead of copying them.
    """
    split = kv[0].ndim == 4
    k, v = cache_layout(k.astype(kv[0].dtype), v.astype(kv[1].dtype), split=split)
    lead = (0,) * (kv[0].ndim - 2)
    k, v = jax.lax.dynamic_update_slice(kv[0], k, (*lead, 0, at)), jax.lax.dynamic_update_slice(kv[1], v, (*lead, at, 0))
    return constrain_cache((k, v)) if split else (k, v)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_valid: jax.Array) -> jax.Array:
    """Decode attention: q (B, T, H, D) attends to the valid slots (cache_valid (B, S) bool) of K/V caches.

    The caches are kept in the layouts the two matmuls read as they are: merged keys (B*K, D, S), values
    (B*K, S, D), batch and KV heads as one leading axis (a separate size-1 batch axis is a bitcast in front of
    the matmul, and XLA:CPU then copies each updated cache every step instead of writing it in place), or split
    (B, K, D, S), (B, K, S, D) on a mesh. The queries of one KV head are one (T x H/K, D) matrix (a separate
    size-1 T axis makes XLA:CPU pick a 4x slower matmul). Scores and softmax in float32; returns (B, T, H, D) in
    q's dtype.
    """
    b, t, h, d = q.shape
    split = k_cache.ndim == 4
    kv_heads = k_cache.shape[1] if split else k_cache.shape[0] // b
    rows = jnp.moveaxis(q.reshape(b, t, kv_heads, h // kv_heads, d), 1, 2).reshape(b, kv_heads, -1, d)
    rows = rows * jnp.asarray(d ** -0.5, q.dtype)
    valid = cache_valid[:, None, None, :]
    if not split:
        rows, valid = rows.reshape(b * kv_heads, -1, d), jnp.repeat(cache_valid, kv_heads, axis=0)[:, None, :]
    lead = "bk" if split else "n"
    scores = jnp.einsum(f"{lead}qd,{lead}ds->{lead}qs", rows, k_cache, preferred_element_type=jnp.float32)
    scores = jnp.where(valid, scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum(f"{lead}qs,{lead}sd->{lead}qd", p.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    out = (out / jnp.sum(p, axis=-1)[..., None]).reshape(b, kv_heads, t, h // kv_heads, d)
    return jnp.moveaxis(out, 2, 1).reshape(b, t, h, d).astype(q.dtype)
