"""glmv-jax: GLM-4.1V-Thinking in JAX/Flax, exact to transformers.

Public API: configs, HF checkpoints in and out, the forward pass, 3D positions, generation, meshes.
"""
from glmv_jax.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from glmv_jax.config import GlmvConfig, TextConfig, VisionConfig, load_config
from glmv_jax.generate.sampler import SamplingConfig, generate, sample
from glmv_jax.model.glmv import forward, init_params
from glmv_jax.model.rope import get_rope_index
from glmv_jax.sharding import make_mesh

__all__ = ["GlmvConfig", "SamplingConfig", "TextConfig", "VisionConfig", "forward", "generate", "get_rope_index",
           "init_params", "load_config", "load_hf_checkpoint", "make_mesh", "sample", "save_hf_checkpoint"]
