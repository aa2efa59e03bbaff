"""The "cpu" attention: chunked, flash-style (log-sum-exp saved, probabilities recomputed in the backward),
head-major, its own VJP; causal attention in column order skips the key blocks past each query block.

Tuned on XLA:CPU (see `attention`'s docstring for the measured reasons); `ops.attention` picks it by default
on the CPU backend. Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _allowed(q_segment, kv_segment, q_index, kv_index):
    """(B, T, S): same non-zero segment and key index <= query index."""
    same = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    return same & (kv_index[:, None, :] <= q_index[:, :, None])


def _scores(q, k, allowed):
    """Scores (B, K, G, T, S) in float32, -inf where a key is not allowed; q (B, K, G, T, D) comes pre-scaled
    by 1/sqrt(D), k is (B, K, S, D)."""
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(allowed[:, None, None], s, -jnp.inf)


def _chunk_forward(q, k, v, allowed):
    """One query chunk (q pre-scaled): output (B, K, G, T, D) in q's dtype and the log-sum-exp (B, K, G, T),
    +inf for a query that sees no key (its output is 0). The normalisation is applied to the (T, D) output,
    not to the (T, S) probabilities: one pass less over the scores."""
    s = _scores(q, k, allowed)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out * jnp.where(total > 0, 1.0 / total, 0.0)[..., None]
    lse = jnp.where(total > 0, m[..., 0] + jnp.log(total), jnp.inf)
    return out.astype(q.dtype), lse


def _chunk_backward(q, k, v, allowed, out, d_out, lse):
    """Gradients of one query chunk (q pre-scaled; dq w.r.t. that q, dk, dv in float32), flash-attention
    style: probabilities from the saved log-sum-exp, and the softmax Jacobian through rowsum(dO * O)
    instead of a sum over keys."""
    p = jnp.exp(_scores(q, k, allowed) - lse[..., None])
    dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # a fused reduce, not a dot
    ds = (p * (dp - row[..., None])).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _split(x, n: int, size: int, axis: int = 1):
    """Split `axis` (length T) into n chunks of `size`, stacked in front: (n, ..., size, ...); zero-padded
    (padded queries get segment 0)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * size - x.shape[axis])
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1:]), axis, 0)


def _merge(x, t: int, axis: int = 1):
    """Undo `_split`: (n, ..., size, ...) -> (..., t, ...)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, t, axis=axis)


def _chunks(t: int, chunk: int) -> tuple[int, int]:
    n = -(-t // chunk)
    return n, -(-t // n)  # balanced chunks: padding stays below n queries


Q_AXIS = 3  # the query axis of q, outputs and gradients in the head-major layout (B, K, G, T, D)


def _chunked_forward(q, k, v, q_segment, kv_segment, q_index, kv_index, chunk):
    """`_chunk_forward` over all queries, at most `chunk` at a time (a `lax.map` over query chunks)."""
    t = q.shape[Q_AXIS]
    if t <= chunk:
        return _chunk_forward(q, k, v, _allowed(q_segment, kv_segment, q_index, kv_index))
    n, size = _chunks(t, chunk)

    def one(xs):
        qc, qs, qi = xs
        return _chunk_forward(qc, k, v, _allowed(qs, kv_segment, qi, kv_index))

    out, lse = jax.lax.map(one, (_split(q, n, size, Q_AXIS), _split(q_segment, n, size), _split(q_index, n, size)))
    return _merge(out, t, Q_AXIS), _merge(lse, t, Q_AXIS)


def _chunked_backward(q, k, v, q_segment, kv_segment, q_index, kv_index, out, d_out, lse, chunk):
    """`_chunk_backward` over all queries, `chunk` at a time: dq, and dk, dv summed over the chunks (float32)."""
    t = q.shape[Q_AXIS]

    def one(carry, xs):
        qc, qs, qi, oc, doc, lc = xs
        dq, dk, dv = _chunk_backward(qc, k, v, _allowed(qs, kv_segment, qi, kv_index), oc, doc, lc)
        return (carry[0] + dk, carry[1] + dv), dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if t <= chunk:
        (dk, dv), dq = one(zeros, (q, q_segment, q_index, out, d_out, lse))
        return dq, dk, dv
    n, size = _chunks(t, chunk)
    axes = (Q_AXIS, 1, 1, Q_AXIS, Q_AXIS, Q_AXIS)
    xs = tuple(_split(x, n, size, a) for x, a in zip((q, q_segment, q_index, out, d_out, lse), axes))
    (dk, dv), dq = jax.lax.scan(one, zeros, xs)
    return _merge(dq, t, Q_AXIS), dk, dv


def _prefix_blocks(t: int, chunk: int) -> list[tuple[int, int]]:
    """Query blocks [start, stop) for causal attention in column order: block [a, z) needs keys [0, z) only
    (queries the last T of S keys: [0, z + S - T)).

    One block per `chunk` queries, at least 4 blocks of at least 128 queries (short sequences skip keys
    too), at most 16 (each block is its own piece of program; longer blocks run `chunk` queries at a time).
    n blocks compute (n + 1) / 2n of the scores: 10/16 for 4, 17/32 for 16."""
    n = min(16, max(-(-t // chunk), min(4, t // 128), 1))
    size = -(-t // n)
    return [(a, min(a + size, t)) for a in range(0, t, size)]


def _prefix_forward(q, k, v, q_segment, kv_segment, chunk):
    """`_chunked_forward` for causal attention in column order, each query block against its key prefix."""
    outs, lses = [], []
    off = k.shape[2] - q.shape[Q_AXIS]  # the queries are the last T of the S keys
    for a, z in _prefix_blocks(q.shape[Q_AXIS], chunk):
        columns = jnp.broadcast_to(jnp.arange(z + off), (q.shape[0], z + off))
        out, lse = _chunked_forward(q[:, :, :, a:z], k[:, :, :z + off], v[:, :, :z + off], q_segment[:, a:z],
                                    kv_segment[:, :z + off], columns[:, a + off:], columns, chunk)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=Q_AXIS), jnp.concatenate(lses, axis=Q_AXIS)


def _prefix_backward(q, k, v, q_segment, kv_segment, out, d_out, lse, chunk):
    """`_chunked_backward` over the blocks of `_prefix_forward`: dq per block, dk and dv summed over the prefixes."""
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    off = k.shape[2] - q.shape[Q_AXIS]
    for a, z in _prefix_blocks(q.shape[Q_AXIS], chunk):
        e = z + off  # the keys this block sees: [0, e)
        columns = jnp.broadcast_to(jnp.arange(e), (q.shape[0], e))
        rows = lambda x: x[:, :, :, a:z]  # noqa: E731
        dq, dk_e, dv_e = _chunked_backward(rows(q), k[:, :, :e], v[:, :, :e], q_segment[:, a:z], kv_segment[:, :e],
                                           columns[:, a + off:], columns, rows(out), rows(d_out), rows(lse), chunk)
        dqs.append(dq)
        dk, dv = dk.at[:, :, :e].add(dk_e), dv.at[:, :, :e].add(dv_e)
    return jnp.concatenate(dqs, axis=Q_AXIS), dk, dv


def _segment_attention_fwd(q, k, v, q_segment, kv_segment, q_index, kv_index, chunk):
    if q_index is None:
        out, lse = _prefix_forward(q, k, v, q_segment, kv_segment, chunk)
    else:
        out, lse = _chunked_forward(q, k, v, q_segment, kv_segment, q_index, kv_index, chunk)
    return out, (q, k, v, q_segment, kv_segment, q_index, kv_index, out, lse)


def _segment_attention_bwd(chunk, residuals, d_out):
    q, k, v, q_segment, kv_segment, q_index, kv_index, out, lse = residuals
    if q_index is None:
        dq, dk, dv = _prefix_backward(q, k, v, q_segment, kv_segment, out, d_out, lse, chunk)
    else:
        dq, dk, dv = _chunked_backward(q, k, v, q_segment, kv_segment, q_index, kv_index, out, d_out, lse, chunk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _segment_attention(q, k, v, q_segment, kv_segment, q_index, kv_index, chunk):
    """Head-major: q (B, K, G, T, D), k and v (B, K, S, D) -> (B, K, G, T, D); queries `chunk` at a time.

    q_index = kv_index = None: causal in column order (the queries the last T of the S keys), key blocks past
    each query block skipped."""
    return _segment_attention_fwd(q, k, v, q_segment, kv_segment, q_index, kv_index, chunk)[0]


_segment_attention.defvjp(_segment_attention_fwd, _segment_attention_bwd)


def attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array, kv_segment: jax.Array,
                  q_index: jax.Array | None = None, kv_index: jax.Array | None = None, causal: bool = False,
                  chunk: int | None = None) -> jax.Array:
    """`ops.attention` (same arguments and result, checked there) without an S x T mask in memory.

    Causal in column order (`causal=True` without indices; queries the last T of the S keys): the keys past
    each block of queries are not computed at all (`_prefix_blocks`), which skips about 3/8 of the scores' work at T = 512.
    Queries are processed at most `chunk` at a time (default: 1024, fewer for long keys so that
    chunk x S stays near 4M per head); the backward recomputes each chunk's probabilities from the
    saved log-sum-exp (flash-attention style), so neither pass holds more than chunk x S scores per
    head. Scores and softmax in float32; returns (B, T, H, D) in q's dtype.

    Inside, everything is head-major ((B, K, G, T, .), q, k, v transposed once, each O(T x D)): the
    (T, S) scores and probabilities are then read by every matmul as they are laid out. With the
    sequence-major einsums XLA:CPU transposed the probabilities for the value matmul (2.2x slower
    vision attention, 1.4x slower decoder attention).
    """
    b, t, h, d = q.shape
    if chunk is None:  # bound each chunk's scores to ~4M entries per head: chunk x S
        chunk = max(128, min(1024, (1 << 22) // max(k.shape[1], 1)))
    if not causal and q_index is None:
        q_index = jnp.zeros((b, t), jnp.int32)
        kv_index = jnp.zeros(kv_segment.shape, jnp.int32)
    elif q_index is None and k.shape[1] > t:  # queries the last T of S keys (a context shard's chunk): by indices,
        # `chunk` queries at a time; the prefix blocks' pieces are unrolled and would all be live at once
        kv_index = jnp.broadcast_to(jnp.arange(k.shape[1]), kv_segment.shape)
        q_index = kv_index[:, k.shape[1] - t:]

    kv_heads = k.shape[2]
    grouped = q.reshape(b, t, kv_heads, h // kv_heads, d)  # query head i uses K/V head i // (H / K)
    grouped = (grouped.astype(jnp.float32) * d ** -0.5).astype(q.dtype)  # scale the queries, not T x S scores
    heads_first = lambda x: jnp.moveaxis(x, 1, 2)  # noqa: E731  (B, S, K, D) -> (B, K, S, D)
    out = _segment_attention(jnp.moveaxis(grouped, 1, 3), heads_first(k), heads_first(v), q_segment, kv_segment,
                             q_index, kv_index, chunk)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d)
