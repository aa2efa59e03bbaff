"""Context parallelism: the load-balanced sequence order and attention over sharded sequences.

The sequence is cut into 2c chunks for c context devices and device i holds chunks i and 2c-1-i,
so every device does the same causal work. The permutation is applied once at the input to every
per-token array (ids, segments, positions, labels). Keys and values are all-gathered across the context
axis: with 2 KV heads they are small (about 1 KiB per token per layer in bf16), so a ring buys nothing here.

Causal block skipping: after the gather, the keys are put back in column order (a static permutation of
chunks), and device i runs its chunk i against keys [0, (i+1) n) and its chunk 2c-1-i against keys
[0, (2c-i) n) (n = T / 2c), each as causal attention in column order with the queries the last n of those
keys (`ops.attention`, `causal=True`). That is 2c+1 chunk-sized key blocks on every device (one branch of a
`lax.switch` on the device's place), against 2c·n^2 useful causal scores: 1.125x for c = 4 where the diagonal
blocks are computed whole ("cpu", "xla"; the kernels skip their upper halves); gathering every key for every
query computed 2x.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
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


def causal_flops(length: int, heads: int, head_dim: int, batch: int = 1) -> float:
    """The useful FLOPs of a causal attention forward: q·k and p·v (2 each per multiply-add) over the
    length (length + 1) / 2 visible scores of each head."""
    return 4.0 * batch * heads * head_dim * length * (length + 1) / 2


def _balanced_causal(q, k, v, q_segment, kv_segment, *, context: int, axis, impl):
    """Device-local causal attention in the balanced order: q (B, 2n, H, D) = this device's chunks i and
    2c-1-i; k, v (B, 2cn, K, D) and kv_segment (B, 2cn) gathered in the balanced order. Each chunk attends
    to its key prefix only (see the module docstring)."""
    if context == 1:
        return attention(q, k, v, q_segment=q_segment, kv_segment=kv_segment, causal=True, impl=impl)
    n = q.shape[1] // 2
    columns = np.argsort(balanced_order(2 * context * n, context))  # gathered (balanced) -> column order
    k, v, kv_segment = (jnp.take(x, columns, axis=1) for x in (k, v, kv_segment))

    def branch(i):
        def run(q, k, v, q_segment, kv_segment):
            halves = []
            for half, stop in ((slice(0, n), (i + 1) * n), (slice(n, 2 * n), (2 * context - i) * n)):
                halves.append(attention(q[:, half], k[:, :stop], v[:, :stop], q_segment=q_segment[:, half],
                                        kv_segment=kv_segment[:, :stop], causal=True, impl=impl,
                                        chunk=max(128, (1 << 21) // stop)))  # "cpu": two halves' scores ~4M
            return jnp.concatenate(halves, axis=1)
        return run

    # XLA does not share temporaries between the branches: the 9B 32K plan's temporaries with "cpu" are 26.1 GB
    # against 20.8 GB for one branch alone (21.0 GB before the skipping); not solved yet
    return jax.lax.switch(jax.lax.axis_index(axis), [branch(i) for i in range(context)], q, k, v, q_segment,
                          kv_segment)


def sharded_attention(q, k, v, *, q_segment, kv_segment, q_index=None, kv_index=None, causal: bool = False,
                      seq_axes: Sequence[str] = ("context",), batch_axes: Sequence[str] = BATCH,
                      impl: str | None = None) -> jax.Array:
    """`ops.attention` (implementation `impl`) on arrays sharded over the current mesh (`jax.set_mesh`).

    q (B, T, H, D) and k, v (B, S, K, D) are split over `batch_axes` (batch), `seq_axes` (sequence)
    and `tensor` (heads). Each device keeps its queries and all-gathers keys, values, their segments
    (and `kv_index`) across `seq_axes` before the local attention. `causal=True` (no indices): causal
    self-attention (T == S) of a sequence laid out in `balanced_order(T, c)` for the c devices of `seq_axes`
    (what `model.glmv.token_inputs` gives; c = 1: the column order), with the key blocks no query of a device
    sees skipped. `q_index`, `kv_index` (B, T): causal by those indices, in any order (every key computed).
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch = mesh_axes_in(batch_axes, mesh) or None
    seq = mesh_axes_in(seq_axes, mesh) or None
    context = int(np.prod([mesh.shape[a] for a in seq])) if seq else 1
    heads = "tensor" if mesh.shape["tensor"] > 1 else None
    indexed = q_index is not None
    specs = (P(batch, seq, heads, None),) * 3 + (P(batch, seq),) * (4 if indexed else 2)

    def local(q, k, v, q_segment, kv_segment, *index):
        if seq:
            gather = functools.partial(jax.lax.all_gather, axis_name=seq, axis=1, tiled=True)
            k, v, kv_segment = gather(k), gather(v), gather(kv_segment)
            index = (index[0], gather(index[1])) if indexed else ()
        if causal and not indexed:
            return _balanced_causal(q, k, v, q_segment, kv_segment, context=context, axis=seq, impl=impl)
        q_idx, kv_idx = index if indexed else (None, None)
        return attention(q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_index=q_idx, kv_index=kv_idx,
                         impl=impl)

    args = (q, k, v, q_segment, kv_segment) + ((q_index, kv_index) if indexed else ())
    return jax.shard_map(local, in_specs=specs, out_specs=P(batch, seq, heads, None), check_vma=False)(*args)
