"""The RMSNorm shared by the vision tower and the decoder (a layer, not an op: the ops live in `glmv_jax.ops`)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """`scale * (x / rms(x))`: statistics in float32, cast back to x's dtype before the scale (as HF)."""

    eps: float
    axis: str = "embed"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(x.dtype)
