"""The attention core against a plain dense-mask softmax differentiated by JAX: outputs and gradients.

`ops.attention` in each implementation: "cpu" runs its own custom VJP (flash-style, query chunks, head-major
layout), "xla" is `jax.nn.dot_product_attention` with a mask, "splash" the Pallas TPU kernel (here in Pallas
interpret mode on CPU: the kernel's own forward and backward), "cudnn" cuDNN's flash attention (GPU only: skipped
elsewhere); tests/test_gradients.py holds them to transformers inside the whole model. Here: grouped-query heads,
segments with padding, causal (by indices, or in column order with key blocks skipped, queries the last T of
S >= T keys) and not, one chunk and several uneven chunks. `cached_attention` (decode) against the same reference
on cache slots. The context-parallel path: tests/test_attention_context.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.errors import ConfigError
from glmv_jax.generate.kv_cache import cache_layout, cached_attention
from glmv_jax.ops.attention import CHOICES, attention, default_impl, resolve_impl
from glmv_jax.train.config import ATTENTION_IMPLS

B, T, S, H, K, D = 2, 13, 13, 6, 2, 5
IMPLS = ["cpu", "xla", "splash"]  # float32 on CPU; "cudnn": test_cudnn_* (GPU)
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on GPU only")


def reference(q, k, v, allowed):
    """q (B, T, H, D), k/v (B, S, K, D), allowed (B, T, S) -> (B, T, H, D); rows with no key give 0."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    p = jax.nn.softmax(jnp.where(allowed[:, None].any(-1, keepdims=True), s, 0.0), axis=-1) * allowed[:, None]
    return jnp.einsum("bhts,bshd->bthd", p, v)


def case(causal):
    """causal: False, "indices" (q_index/kv_index given) or "columns" (causal=True: the column order, with key
    blocks past each query block skipped)."""
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (B, T, H, D))
    k = jax.random.normal(keys[1], (B, S, K, D))
    v = jax.random.normal(keys[2], (B, S, K, D))
    segment = jnp.array([[1] * 5 + [2] * 6 + [0] * 2, [0] * 3 + [1] * 10])  # two documents + padding; left pad
    index = jnp.broadcast_to(jnp.arange(T), (B, T))
    allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] != 0)
    if causal:
        allowed &= index[:, None, :] <= index[:, :, None]
    masks = dict(q_segment=segment, kv_segment=segment)
    if causal == "indices":
        masks.update(q_index=index, kv_index=index)
    elif causal == "columns":
        masks.update(causal=True)
    return (q, k, v), masks, allowed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", ["columns", "indices", False])
@pytest.mark.parametrize("chunk", [None, 4])  # 4: four uneven query chunks (lax.map / lax.scan, or prefix blocks)
def test_attention_and_its_gradients_equal_the_dense_reference(causal, chunk, impl):
    args, masks, allowed = case(causal)
    cotangent = jax.random.normal(jax.random.key(9), (B, T, H, D))
    ours = lambda *a: jnp.vdot(attention(*a, chunk=chunk, impl=impl, **masks), cotangent)  # noqa: E731
    theirs = lambda *a: jnp.vdot(reference(*a, allowed), cotangent)  # noqa: E731
    out, ref = attention(*args, chunk=chunk, impl=impl, **masks), reference(*args, allowed)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[0, 11:] == 0)  # padding queries see no key: exactly 0
    for g_ours, g_ref in zip(jax.grad(ours, argnums=(0, 1, 2))(*args), jax.grad(theirs, argnums=(0, 1, 2))(*args)):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-5, rtol=1e-5)


def test_cached_attention_equals_the_dense_reference():
    (q, k, v), _, _ = case(False)
    q = q[:, :1]
    valid = jnp.array([[True] * 9 + [False] * 4, [False] * 3 + [True] * 10])
    out = cached_attention(q, *cache_layout(k, v), valid)
    np.testing.assert_allclose(out, reference(q, k, v, valid[:, None, :]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_column_order_needs_as_many_keys_as_queries(impl):
    (q, k, v), masks, _ = case(False)
    with pytest.raises(ValueError, match="as many keys as queries"):
        attention(q, k[:, :-1], v[:, :-1], q_segment=masks["q_segment"], kv_segment=masks["kv_segment"][:, :-1],
                  causal=True, impl=impl)


def test_impl_choice():
    """The default comes from the backend; "auto" means it; an unknown name is a ConfigError naming the choices;
    "cudnn" off GPU is a ConfigError."""
    assert default_impl() == {"cpu": "cpu", "gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    assert resolve_impl(None) == resolve_impl("auto") == default_impl()
    assert set(CHOICES) == {"auto", "cpu", "xla", "cudnn", "splash"} and CHOICES == ATTENTION_IMPLS
    (q, k, v), masks, _ = case(False)
    with pytest.raises(ConfigError, match="unknown attention impl 'flash'; choose one of auto, cpu, xla, cudnn, "
                                          "splash"):
        attention(q, k, v, impl="flash", **masks)
    if jax.default_backend() != "gpu":
        with pytest.raises(ConfigError, match="attention impl 'cudnn' needs a GPU"):
            attention(q, k, v, impl="cudnn", **masks)


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_queries_as_the_last_of_longer_keys(impl):
    """`causal=True` with S > T: the T queries are the last T of the S keys (query t sees s <= t + S - T), as a
    context shard's query chunk runs against its key prefix; packed segments and padding across the boundary."""
    t, s = 9, 21
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (B, t, H, D))
    k, v = (jax.random.normal(key, (B, s, K, D)) for key in keys[1:3])
    kv_segment = jnp.array([[1] * 8 + [2] * 10 + [0] * 3, [0] * 2 + [1] * 19])
    q_segment = kv_segment[:, s - t:]
    allowed = ((q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
               & (jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None] + s - t))
    masks = dict(q_segment=q_segment, kv_segment=kv_segment, causal=True, impl=impl)
    cotangent = jax.random.normal(keys[3], (B, t, H, D))
    np.testing.assert_allclose(attention(q, k, v, chunk=4, **masks), reference(q, k, v, allowed), atol=1e-5,
                               rtol=1e-5)
    ours = jax.grad(lambda *a: jnp.vdot(attention(*a, chunk=4, **masks), cotangent), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(lambda *a: jnp.vdot(reference(*a, allowed), cotangent), argnums=(0, 1, 2))(q, k, v)
    for g_ours, g_ref in zip(ours, theirs):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-5, rtol=1e-5)


@on_gpu
@pytest.mark.parametrize("causal", ["columns", "indices", False])
def test_cudnn_bfloat16_against_the_reference(causal):
    """cuDNN's kernel in bfloat16 (the dtypes it takes) against the float32 reference: bf16 inputs carry ~3
    significant digits, so 2e-2; its gradients likewise."""
    args, masks, allowed = case(causal)
    args = tuple(jnp.tile(x, (1, 1, 1, 16)) for x in args)  # head dim 80: cuDNN takes multiples of 8
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args)
    out = attention(*bf16, impl="cudnn", **masks).astype(jnp.float32)
    np.testing.assert_allclose(out, reference(*(x.astype(jnp.float32) for x in bf16), allowed), atol=2e-2, rtol=2e-2)
    assert np.all(np.asarray(out)[0, 11:] == 0)
    cotangent = jax.random.normal(jax.random.key(9), out.shape)
    ours = jax.grad(lambda *a: jnp.vdot(attention(*a, impl="cudnn", **masks).astype(jnp.float32), cotangent),
                    argnums=(0, 1, 2))(*bf16)
    theirs = jax.grad(lambda *a: jnp.vdot(reference(*a, allowed), cotangent), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in bf16))
    for g_ours, g_ref in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(g_ours, np.float32), g_ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_column_order_with_long_blocks_runs_each_block_in_chunks(impl):
    """41 queries in chunks of 2: the cap of 16 blocks gives blocks of 3 queries (14 of them), each run 2 at a time
    ("cpu"; "xla" has no chunks: the same case holds it to the reference on a longer sequence)."""
    t = 41
    keys = jax.random.split(jax.random.key(5), 4)
    q, k, v = (jax.random.normal(key, (B, t, h, D)) for key, h in zip(keys, (H, K, K)))
    segment = jnp.array([[1] * 20 + [2] * 19 + [0] * 2, [0] * 5 + [1] * 36])
    columns = jnp.arange(t)
    allowed = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] != 0)
               & (columns[None, None, :] <= columns[None, :, None]))
    cotangent = jax.random.normal(keys[3], (B, t, H, D))
    ours = lambda *a: jnp.vdot(attention(*a, q_segment=segment, kv_segment=segment, causal=True, chunk=2,  # noqa: E731
                                         impl=impl), cotangent)
    theirs = lambda *a: jnp.vdot(reference(*a, allowed), cotangent)  # noqa: E731
    np.testing.assert_allclose(attention(q, k, v, q_segment=segment, kv_segment=segment, causal=True, chunk=2,
                                         impl=impl),
                               reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    for g_ours, g_ref in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(theirs, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-5, rtol=1e-5)
