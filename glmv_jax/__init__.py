"""glmv-jax: GLM-4.1V-Thinking in JAX/Flax, exact to transformers.

Public API: configs, HF checkpoints in and out, the forward pass, 3D positions, generation, meshes.
The names are imported on first access (PEP 562), so `import glmv_jax` (and the `glmv` command's
parser, and the reward workers) import no jax.
"""
from __future__ import annotations

import importlib
import sys
import types

# public name -> the module that defines it
_LAZY = {
    "load_hf_checkpoint": "glmv_jax.checkpoint.hf", "save_hf_checkpoint": "glmv_jax.checkpoint.hf",
    "GlmvConfig": "glmv_jax.config", "TextConfig": "glmv_jax.config", "VisionConfig": "glmv_jax.config",
    "load_config": "glmv_jax.config",
    "SamplingConfig": "glmv_jax.generate.sampler", "generate": "glmv_jax.generate.sampler",
    "sample": "glmv_jax.generate.sampler",
    "forward": "glmv_jax.model.glmv", "init_params": "glmv_jax.model.glmv",
    "get_rope_index": "glmv_jax.model.rope",
    "make_mesh": "glmv_jax.sharding",
}

__all__ = ["GlmvConfig", "SamplingConfig", "TextConfig", "VisionConfig", "forward", "generate", "get_rope_index",
           "init_params", "load_config", "load_hf_checkpoint", "make_mesh", "sample", "save_hf_checkpoint"]


class _Package(types.ModuleType):
    """`glmv_jax.generate` is both a subpackage and a function of the API; as with the eager imports before, the
    function wins: importing the subpackage does not bind it over the public name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """Import a public name's module on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
