"""The "splash" attention: the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.
splash_attention`), forward and backward, with segment ids and a static causal mask.

Off TPU the same kernel runs in Pallas interpret mode (the tests run it on CPU; slow, logged once). The kernel
takes one example and one K/V head at a time (its multi-query form, the G = H / K query heads of that K/V head
on a (G, T, D) query), so it is vmapped over the batch and the K/V heads. Its mask is static: segments as
segment ids, causal in column order (queries the last T of the S keys) as a `CausalMask` with offset S - T.
Causal by arbitrary per-token indices is not static: that falls back to "xla", with one log line.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.ops.attention_xla import attention_xla, warn_once

BLOCK = 128  # the kernel's query and key block (TPU lanes); sequences are padded to multiples of it


@functools.lru_cache(maxsize=64)
def _kernel(t: int, s: int, heads: int, offset: int | None, interpret: bool):
    """The splash kernel for (heads, t, D) queries against (s, D) keys; offset None: no causal mask, else
    query i sees keys j <= i + offset. Cached: building the mask's block tables costs host time per shape."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    one = sa.FullMask((t, s)) if offset is None else sa.CausalMask((t, s), offset=offset)
    sizes = sa.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                          block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)

    def build():  # on a thread of its own: JAX's trace and mesh contexts are per thread, so the kernel's block
        # tables come out as concrete arrays, never tracers of the caller's trace (a scan, a shard_map)
        kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * heads), block_sizes=sizes,
                                                  interpret=interpret)
        return jax.tree.map(np.asarray, kernel)  # host arrays: bound to no mesh (the cache serves every mesh)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(build).result()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def attention_splash(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
                     q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
                     chunk: int | None = None) -> jax.Array:
    """`ops.attention` through the splash kernel (same arguments and result; `chunk` unused).

    Padding (segment 0) becomes segment -1 on both sides, so a padding query sees padding keys (every row of
    the kernel sees some key: no 0/0) and a real query never sees them; its output is then set to 0. Queries and
    keys are padded to multiples of `BLOCK` (padded queries are the last ones, so with the causal offset of the
    unpadded shapes they see padded keys only; their rows are dropped)."""
    if q_index is not None:
        warn_once("attention impl 'splash' has no mask for causal order by per-token indices; using 'xla' there")
        return attention_xla(q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_index=q_index,
                             kv_index=kv_index, causal=causal)
    interpret = jax.default_backend() != "tpu"
    if interpret:
        warn_once("attention impl 'splash' runs in Pallas interpret mode off TPU (slow; for tests)")
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    t_pad = _round_up(t, BLOCK)
    s_pad = _round_up(s + (t_pad - t), BLOCK)
    kernel = _kernel(t_pad, s_pad, h // kv_heads, (s - t) if causal else None, interpret)

    def pad(x, n):
        return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    seg = lambda x, n: pad(jnp.where(x == 0, -1, x), n).at[:, x.shape[1]:].set(-1)  # noqa: E731
    scaled = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)  # the kernel does not scale
    qh = pad(scaled, t_pad).reshape(b, t_pad, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D)
    kh, vh = (pad(x, s_pad).transpose(0, 2, 1, 3) for x in (k, v))  # (B, K, S, D)

    def one(qe, ke, ve, qs, ks):  # one example, one K/V head: (G, T, D), (S, D), (S, D), (T,), (S,)
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
        return kernel(qe, ke, ve, SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qh, kh, vh, seg(q_segment, t_pad), seg(kv_segment, s_pad))  # (B, K, G, T, D)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, h, d)[:, :t]
    return jnp.where((q_segment != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
