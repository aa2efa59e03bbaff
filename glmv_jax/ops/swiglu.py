"""silu(gate) * up with its own VJP, and the SwiGLU MLP (vision blocks, projector)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.ops.dense import Dtype, dense


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, computed in float32 and rounded once to the inputs' dtype.

    Its own VJP keeps only gate and up for the backward, which is one fused pass; autodiff of
    `nn.silu(gate) * up` saved the sigmoid and the product too (four MLP-wide arrays a layer more) and,
    in bfloat16, rounded after every op (XLA:CPU converted to f32 and back around each).
    """
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(jnp.result_type(gate, up))


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = residuals
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), d_out.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_gate = d * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg = sig + g sig (1 - sig)
    return d_gate.astype(gate.dtype), (d * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))` with separate gate and up projections (vision blocks, projector)."""

    hidden: int
    mlp_axis: str = "mlp"
    embed_axis: str = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        io = (self.embed_axis, self.mlp_axis)
        gate = dense(self.hidden, io, use_bias=False, name="gate", param_dtype=self.param_dtype)(x)
        up = dense(self.hidden, io, use_bias=False, name="up", param_dtype=self.param_dtype)(x)
        return dense(x.shape[-1], io[::-1], use_bias=False, name="down",
                     param_dtype=self.param_dtype)(swiglu(gate, up))
