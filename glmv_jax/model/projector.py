"""The patch merger: maps downsampled vision features into the decoder's embedding space."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.config import VisionConfig
from glmv_jax.ops.dense import dense
from glmv_jax.ops.swiglu import SwiGLU


class Projector(nn.Module):
    """x (M, out_hidden_size) -> SwiGLU(GELU(LayerNorm(proj(x)))) of width intermediate_size -> (M, out_hidden_size)."""

    config: VisionConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        x = dense(cfg.out_hidden_size, ("embed", "embed_out"), use_bias=False, name="proj", param_dtype=pd)(x)
        x = nn.LayerNorm(epsilon=1e-5, name="norm", param_dtype=pd,
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)
        x = nn.gelu(x, approximate=False)
        return SwiGLU(cfg.intermediate_size, param_dtype=pd, name="mlp")(x)
