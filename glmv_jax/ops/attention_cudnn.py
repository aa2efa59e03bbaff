"""The "cudnn" attention: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation=
"cudnn")`, on GPU only (`ops.attention.resolve_impl` refuses it elsewhere).

What cuDNN takes through that API: bfloat16 / float16 inputs, head dim a multiple of 8 up to 128, grouped-query
heads, a causal mask (`is_causal`, queries and keys aligned at the top left, so only for T == S: the kernel then
skips the blocks above the diagonal) and any other mask as a boolean array, which the API turns into an additive
bias the kernel reads tile by tile (the segments: images, packed examples, padding). Inputs outside that (float32,
other head dims) fall back to "xla" with one log line.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmv_jax.ops.attention_xla import allowed_mask, attention_xla, warn_once

DTYPES = (jnp.bfloat16, jnp.float16)


def attention_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
                    q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
                    chunk: int | None = None) -> jax.Array:
    """`ops.attention` through cuDNN's flash attention (same arguments and result; `chunk` unused)."""
    d = q.shape[-1]
    if q.dtype not in DTYPES or d % 8 or d > 128:
        warn_once(f"attention impl 'cudnn' takes bfloat16/float16 with head dim a multiple of 8 up to 128, got "
                  f"{q.dtype} and {d}; using 'xla' there")
        return attention_xla(q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_index=q_index,
                             kv_index=kv_index, causal=causal)
    square_causal = causal and q_index is None and q.shape[1] == k.shape[1]
    allowed = allowed_mask(q_segment, kv_segment, q_index, kv_index, causal and not square_causal)
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], is_causal=square_causal,
                                       implementation="cudnn")
    if square_causal:
        allowed &= jnp.tri(q.shape[1], dtype=bool)[None]
    return jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None], out, jnp.zeros((), out.dtype))
