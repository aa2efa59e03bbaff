"""Dense layers whose products accumulate in float32 and round once (a custom VJP), with logical axis names."""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Dtype = jnp.dtype
# Kernels: N(0, 1 / fan_in) (fan_in = the product of the contracted dims; flax's DenseGeneral hands the initializer
# the flattened (in, out) shape), so a layer keeps the scale of its input at any width. A fixed N(0, 0.02) (the
# reference's `initializer_range`) is this at width 2500 (GLM-4.1V's 4096: 0.0156), but shrinks the signal
# 0.02 * sqrt(width) per layer in narrow models: 0.14-0.18x at the tiny config's widths 48-80, where the projector's
# output at init came out 20x below the text embeddings (1.0e-3 vs 0.020 RMS) and stayed blind after training.
DEFAULT_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
# Token embeddings: N(0, 0.2^2), the scale of the projector's output at init under DEFAULT_INIT (RMS 0.19 for the
# tiny config, 0.23 for small: independent of width), so image and text tokens enter the decoder at one scale
# (tests/test_init.py). The decoder's first op is an RMSNorm, so only that ratio matters.
EMBED_INIT = nn.initializers.normal(stddev=0.2)
DENSE_OUTPUT = "dense"  # the checkpoint name of every dense layer's output (remat policies can save it)


def accumulate_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` that accumulates in float32 and rounds once to the operands' dtype (flax's
    `dot_general` hook of every `dense`), in the forward and in both gradients (`_rounded_dot`). The
    output is named `DENSE_OUTPUT` for remat policies (a custom-VJP dot is not a `dot_general` to them).

    Same result for float32; for bfloat16 it is the reference's rounding (PyTorch's bf16 matmuls
    accumulate in f32) and lets XLA:CPU run the native bf16 x bf16 -> f32 kernel: a bf16-output dot was
    lowered as converts of both operands to f32 (the whole weight matrix, at every call) and an f32 dot.
    """
    contracting, batch = dimension_numbers
    if any(batch):
        raise NotImplementedError("accumulate_f32: dense layers have no batch dimensions")
    out = _rounded_dot(lhs, rhs, tuple(tuple(int(a) for a in axes) for axes in contracting), precision)
    return checkpoint_name(out, DENSE_OUTPUT).astype(preferred_element_type or out.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rounded_dot(lhs, rhs, contracting, precision=None):
    """lhs . rhs over `contracting` ((lhs axes), (rhs axes)), no batch axes: float32 accumulation, one
    rounding to the operands' dtype. Output axes: lhs's free axes, then rhs's."""
    out = jax.lax.dot_general(lhs, rhs, (contracting, ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(lhs, rhs))


def _rounded_dot_fwd(lhs, rhs, contracting, precision):
    return _rounded_dot(lhs, rhs, contracting, precision), (lhs, rhs)


def _rounded_dot_bwd(contracting, precision, residuals, g):
    """Both gradients as `_rounded_dot`s of the cotangent, itself in the operands' dtype. (JAX's own rule
    multiplies the float32 cotangent of the rounding by the bf16 operand: XLA:CPU converts that operand and
    runs an f32 matmul, at half the bf16 speed, for two thirds of a training step's matmuls.)"""
    lhs, rhs = residuals
    lhs_axes, rhs_axes = contracting
    lhs_free = tuple(i for i in range(lhs.ndim) if i not in lhs_axes)
    rhs_free = tuple(i for i in range(rhs.ndim) if i not in rhs_axes)
    g_lhs, g_rhs = tuple(range(len(lhs_free))), tuple(range(len(lhs_free), g.ndim))
    g = g.astype(jnp.result_type(lhs, rhs))
    # Each gradient comes out as (the other free axes, then the contracted axes in the other operand's order).
    d_lhs = _rounded_dot(g, rhs, (g_rhs, rhs_free), precision)
    d_lhs = jnp.transpose(d_lhs, np.argsort(lhs_free + tuple(np.array(lhs_axes)[np.argsort(rhs_axes)])))
    d_rhs = _rounded_dot(lhs, g, (lhs_free, g_lhs), precision)
    d_rhs = jnp.transpose(d_rhs, np.argsort(tuple(np.array(rhs_axes)[np.argsort(lhs_axes)]) + rhs_free))
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)


def dense(features: int | Sequence[int], axes: Sequence[str], *, use_bias: bool, name: str | None = None,
          in_dims: int = 1, param_dtype: Dtype = jnp.float32) -> nn.DenseGeneral:
    """A dense layer over the last `in_dims` input dims whose kernel carries the logical `axes`.

    The kernel has shape (*in, *features) and axes names every one of its dims; the bias has the
    feature dims and their names. Split feature dims (heads, head_dim) keep tensor sharding local.
    Products accumulate in float32 (`accumulate_f32`).
    """
    features = (features,) if isinstance(features, int) else tuple(features)
    return nn.DenseGeneral(
        features, axis=tuple(range(-in_dims, 0)), use_bias=use_bias, name=name, param_dtype=param_dtype,
        dot_general=accumulate_f32,
        kernel_init=nn.with_logical_partitioning(DEFAULT_INIT, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[in_dims:])))
