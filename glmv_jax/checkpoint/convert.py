"""Orbax checkpoints of the params, and conversion to and from Hugging Face folders.

An orbax checkpoint here is a folder holding:

    config.json   the model config in the HF 5.x layout (`to_hf_dict`), so `load_config(folder)` reads it
    params/       an orbax `StandardCheckpointer` checkpoint of the params pytree: the plain nested dict
                  of arrays that `init_params` / `load_hf_checkpoint` give (per-layer leaves stacked on a
                  leading layer axis, e.g. decoder/layers/q/kernel (num_layers, hidden, heads, head_dim))

Restoring builds its target from config.json alone (`jax.eval_shape` of `init_params`, so no weights
are computed): the saved tree and every shape are checked against it before any array is read, and
the arrays are cast to the requested dtype as they are read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from glmv_jax.checkpoint.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from glmv_jax.checkpoint.state import tree_problems
from glmv_jax.config import GlmvConfig, from_hf_dict, to_hf_dict

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_orbax_params(path: str | os.PathLike, config: GlmvConfig, params: dict) -> None:
    """Write `path/config.json` and the orbax checkpoint `path/params`; returns once both are on disk.

    `params` is the nested dict of arrays (any one float dtype); `path/params` must not exist yet.
    """
    path = Path(path).resolve()
    if (path / PARAMS_DIR).exists():
        raise FileExistsError(f"{path / PARAMS_DIR} already exists; remove it or choose another destination")
    path.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    with ocp.StandardCheckpointer() as checkpointer:  # saves asynchronously; wait, then `close` on exit
        checkpointer.save(path / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(json.dumps(to_hf_dict(config, layout="5.x", dtype=dtype), indent=2))


def abstract_params(config: GlmvConfig, dtype: Any = "float32", shardings=None) -> dict:
    """The params tree of `config` as `jax.ShapeDtypeStruct`s, every leaf in `dtype`, placed as `shardings` (a
    params tree of shardings) say or on the default device."""
    from glmv_jax.model.glmv import init_params

    shapes = jax.eval_shape(lambda: init_params(config))
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=s), shapes, shardings)


def read_orbax_config(path: str | os.PathLike) -> GlmvConfig:
    """The model config of a folder written by `save_orbax_params`, before any array is read."""
    path = Path(path).resolve()
    missing = [name for name in (CONFIG_FILE, PARAMS_DIR) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: not a glmv orbax checkpoint, missing {' and '.join(missing)} "
                                f"(expected {CONFIG_FILE} beside the orbax folder {PARAMS_DIR}/)")
    return from_hf_dict(json.loads((path / CONFIG_FILE).read_text()))


def load_orbax_params(path: str | os.PathLike, *, dtype: Any = "float32", mesh=None,
                      shardings=None) -> tuple[GlmvConfig, dict]:
    """Read a folder written by `save_orbax_params` into (config, params), every leaf a jax array in `dtype`,
    restored straight into `shardings` (a params tree of shardings, e.g. a run's `param_shardings`), or those of
    `model.glmv.param_shardings(config, mesh)` with a `mesh`, or the default device: each process reads only the
    blocks its devices hold (as `hf.load_hf_checkpoint`)."""
    path = Path(path).resolve()
    config = read_orbax_config(path)
    if shardings is None and mesh is not None:
        from glmv_jax.model.glmv import check_model, param_shardings
        check_model(config, mesh)
        shardings = param_shardings(config, mesh)
    target = abstract_params(config, dtype, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        # Compare trees before reading any array: orbax's own mismatch error comes mid-read, for one
        # leaf, and leaves the other reads pending.
        problems = tree_problems(checkpointer.metadata(path / PARAMS_DIR).item_metadata.tree, target)
        if problems:
            shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} problems)" if len(problems) > 10 else "")
            raise CheckpointError(f"{path / PARAMS_DIR} does not match {path / CONFIG_FILE}: {shown}")
        params = checkpointer.restore(path / PARAMS_DIR, target)
    return config, params


def load_folder(path: str | os.PathLike, *, dtype: Any = "float32", mesh=None) -> tuple[GlmvConfig, dict]:
    """(config, params) of an orbax folder (config.json + params/, `save_orbax_params`) or an HF folder
    (config.json + safetensors), in `dtype`, on `mesh` if given (each device reads only its block)."""
    loader = load_orbax_params if (Path(path) / PARAMS_DIR).is_dir() else load_hf_checkpoint
    return loader(path, dtype=dtype, mesh=mesh)


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = "float32") -> None:
    """HF folder (config.json + safetensors) -> orbax folder `dst` (config.json + params/), params in `dtype`."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such Hugging Face model folder")
    if (Path(dst) / PARAMS_DIR).exists():  # fail before reading the weights, not after
        raise FileExistsError(f"{Path(dst) / PARAMS_DIR} already exists; remove it or choose another destination")
    config, params = load_hf_checkpoint(src, dtype=dtype)
    save_orbax_params(dst, config, params)


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = "float32") -> None:
    """Orbax folder written by `hf_to_orbax` / `save_orbax_params` -> HF folder `dst` with weights in `dtype`."""
    config, params = load_orbax_params(src, dtype=dtype)
    save_hf_checkpoint(dst, config, params)
