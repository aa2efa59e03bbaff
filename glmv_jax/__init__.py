"""glmv-jax: GLM-4.1V-Thinking in JAX/Flax, exact to transformers.

Public API (see ../shared design): configs, HF checkpoints in and out, the forward pass and 3D positions.
"""
from glmv_jax.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from glmv_jax.config import GlmvConfig, TextConfig, VisionConfig, load_config
from glmv_jax.generate.sampler import SamplingConfig, generate, sample
from glmv_jax.model.glmv import forward, init_params
from glmv_jax.model.rope import get_rope_index

__all__ = ["GlmvConfig", "SamplingConfig", "TextConfig", "VisionConfig", "forward", "generate", "get_rope_index",
           "init_params", "load_config", "load_hf_checkpoint", "sample", "save_hf_checkpoint"]
