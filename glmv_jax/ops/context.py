"""Context parallelism: the load-balanced sequence order and attention over sharded sequences.

The sequence is cut into 2c chunks for c context devices and device i holds chunks i and 2c-1-i,
so every device does the same causal work. The permutation is applied once at the input to every
per-token array (ids, segments, positions, labels); attention then needs only each token's
original index for the causal mask. Keys and values are all-gathered across the context axis: with
2 KV heads they are small (about 1 KiB per token per layer in bf16), so a ring buys nothing here.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from glmv_jax.ops.attention import attention
from glmv_jax.sharding import BATCH, mesh_axes_in


def balanced_order(length: int, context: int) -> np.ndarray:
    """Permutation (length,) putting chunks i and 2c-1-i next to each other for every device i."""
    if context == 1:
        return np.arange(length)
    chunks = np.arange(length).reshape(2 * context, length // (2 * context))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * context - 1 - i]]) for i in range(context)])


def reorder(arrays: dict[str, jax.Array], order: np.ndarray, axes: dict[str, int]) -> dict[str, jax.Array]:
    """Apply `order` along each array's sequence axis (`axes[name]`, default 1)."""
    return {k: (v if v is None else jax.numpy.take(v, order, axis=axes.get(k, 1))) for k, v in arrays.items()}


def sharded_attention(q, k, v, *, q_segment, kv_segment, q_index=None, kv_index=None,
                      seq_axes: Sequence[str] = ("context",), batch_axes: Sequence[str] = BATCH,
                      impl: str | None = None) -> jax.Array:
    """`ops.attention` (implementation `impl`) on arrays sharded over the current mesh (`jax.set_mesh`).

    q (B, T, H, D) and k, v (B, S, K, D) are split over `batch_axes` (batch), `seq_axes` (sequence)
    and `tensor` (heads). Each device keeps its queries and all-gathers keys, values, their segments
    and indices across `seq_axes` before the local attention.
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch = mesh_axes_in(batch_axes, mesh) or None
    seq = mesh_axes_in(seq_axes, mesh) or None
    heads = "tensor" if mesh.shape["tensor"] > 1 else None
    causal = q_index is not None
    specs = (P(batch, seq, heads, None), P(batch, seq, heads, None), P(batch, seq, heads, None),
             P(batch, seq), P(batch, seq)) + ((P(batch, seq), P(batch, seq)) if causal else ())

    def local(q, k, v, q_segment, kv_segment, *index):
        if seq:
            gather = functools.partial(jax.lax.all_gather, axis_name=seq, axis=1, tiled=True)
            k, v, kv_segment = gather(k), gather(v), gather(kv_segment)
            index = (index[0], gather(index[1])) if causal else ()
        q_idx, kv_idx = index if causal else (None, None)
        return attention(q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_index=q_idx, kv_index=kv_idx,
                         impl=impl)

    args = (q, k, v, q_segment, kv_segment) + ((q_index, kv_index) if causal else ())
    return jax.shard_map(local, in_specs=specs, out_specs=P(batch, seq, heads, None), check_vma=False)(*args)
