"""What a training run sets up before its first step, shared by `glmv train` (train/loop.py) and RLCS
(rl/loop.py): the workdir (local or a URL), the mesh, the tokenizer and the model config that fits it,
the train state's layout (shapes, shardings, optimizer), restore-or-init, and the config files written
to the workdir.

The workdir goes through `etils.epath`, as orbax does: `gs://bucket/run` stays a URL, and a scheme whose
filesystem is not installed (gcsfs for gs://) is a `ConfigError` before anything is computed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.checkpoint.state import TrainCheckpointer, has_checkpoint
from glmv_jax.config import GlmvConfig, from_hf_dict, to_hf_dict
from glmv_jax.errors import ConfigError
from glmv_jax import sharding as mesh_lib
from glmv_jax.train.config import TrainConfig
from glmv_jax.train.optimizer import make_optimizer

VOCAB_MULTIPLE = 128
# model config fields taken from a tokenizer trained here, by tokenizer attribute
TOKEN_FIELDS = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                "video_start_token_id", "video_end_token_id")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ------------------------------------------------------------------------------------------- workdir
def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """The run folder as an `epath.Path`: a local path resolved, a URL (gs://, s3://, ...) kept as a URL.

    Raises `ConfigError` naming the scheme when epath does not know it or its filesystem (gcsfs, s3fs, ...)
    is not installed, so a run never starts writing to a local folder named `gs:`."""
    text = os.fspath(workdir)
    scheme = _SCHEME.match(text)
    if scheme is None:
        return epath.Path(text).expanduser().resolve()
    name = scheme.group(1)
    try:
        path = epath.Path(text)
    except (KeyError, NotImplementedError):
        raise ConfigError(f"workdir {text}: the {name}:// scheme is not supported (gs://, s3://, az://, hf:// or a "
                          "local path)") from None
    try:
        path.exists()  # loads the scheme's filesystem
    except ImportError as e:
        raise ConfigError(f"workdir {text}: no filesystem for the {name}:// scheme is installed ({e}); install it "
                          "(gs://: pip install gcsfs) or use a local folder") from None
    return path


def _is_url(path) -> bool:
    return _SCHEME.match(os.fspath(path)) is not None


def use_compile_cache(path: str) -> None:
    """Point JAX's persistent compilation cache at `path` (compiled programs are reused across runs)."""
    from jax.experimental.compilation_cache import compilation_cache

    path = str(Path(path).expanduser().resolve())
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()


def write_run_files(workdir: epath.Path, cfg: TrainConfig, model: GlmvConfig) -> None:
    """train_config.yaml (the resolved run config) and config.json (the model, HF layout) in the workdir."""
    (workdir / "train_config.yaml").write_text(cfg.to_yaml())
    (workdir / "config.json").write_text(json.dumps(to_hf_dict(model), indent=2))


# ---------------------------------------------------------------------------------------------- mesh
def run_mesh(cfg: TrainConfig, *, devices: int | None = None, who: str = "glmv train"):
    """(mesh, axis sizes) of `cfg.mesh` over the first `devices` devices (default: all of them)."""
    available = jax.device_count() if devices is None else devices
    sizes = cfg.mesh.sizes(available)
    used = math.prod(sizes.values())
    if used > available:
        raise mesh_lib.MeshError(f"mesh {sizes} needs {used} devices, but {available} are available")
    mesh = mesh_lib.make_mesh(**sizes, devices=jax.devices()[:used])
    if used < jax.device_count() and devices is None:
        print(f"{who}: mesh {sizes} uses {used} of the {jax.device_count()} devices", file=sys.stderr)
    return mesh, sizes


# ---------------------------------------------------------------------------------- tokenizer and model
def model_for_tokenizer(model: GlmvConfig, tokenizer) -> GlmvConfig:
    """`model` with vocab_size (the tokenizer's, rounded up to a multiple of 128), pad/eos and image/video ids
    taken from a tokenizer trained here."""
    vocab = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = dataclasses.replace(model.text, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tuple(tokenizer.eos_ids))
    ids = {name: getattr(tokenizer, name) for name in TOKEN_FIELDS}
    return dataclasses.replace(model, text=text, **ids).validate()


def check_model_tokenizer(model: GlmvConfig, tokenizer) -> None:
    """Raise `ConfigError` when the model's special ids or vocabulary do not fit the tokenizer."""
    from glmv_jax.data.tokenizer import check_ids

    expected = {name: getattr(model, name) for name in TOKEN_FIELDS}
    expected["pad_token_id"] = model.text.pad_token_id
    expected["eos_token_id"] = list(model.text.eos_token_id) or None
    try:
        check_ids(tokenizer, expected)
    except ValueError as e:
        raise ConfigError(f"the model config does not match the tokenizer: {e}") from None
    if tokenizer.vocab_size > model.text.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's "
                          f"text.vocab_size is {model.text.vocab_size}")


def tokenizer_and_model(cfg: TrainConfig, workdir, train_source, init_from: str | None):
    """(tokenizer, model config) of a run: the model's vocabulary and special ids follow a tokenizer trained
    here (data.tokenizer = synthetic) and are checked against a given one."""
    from glmv_jax.data import sources as sources_lib

    if cfg.data.tokenizer == "synthetic" and _is_url(workdir):
        raise ConfigError(f"data.tokenizer = synthetic trains a sentencepiece file into the workdir, which must then "
                          f"be local (not {workdir}): give data.tokenizer a tokenizer file")
    tokenizer, trained_here = sources_lib.tokenizer_for_run(cfg.data, workdir, train_source, init_from)
    model = cfg.base_model()
    if trained_here:
        model = model_for_tokenizer(model, tokenizer)
    check_model_tokenizer(model, tokenizer)
    return tokenizer, model


def image_processor(data, vision):
    """The ImageProcessor of a run: `data` config's pixel limits, the vision tower's patch sizes."""
    from glmv_jax.data.processor import ImageProcessor

    return ImageProcessor(min_pixels=data.min_pixels, max_pixels=data.max_pixels, patch_size=vision.patch_size,
                          temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)


def compute_dtype_of(cfg: TrainConfig):
    """`train.compute_dtype` as a dtype, None for float32 (compute in the params' dtype)."""
    return None if cfg.train.compute_dtype == "float32" else jnp.dtype(cfg.train.compute_dtype)


# ------------------------------------------------------------------------------------------ the state
class StateLayout(NamedTuple):
    """What a run's train state looks like before any array exists: shapes, shardings and the optimizer."""

    param_shardings: Any
    abstract_params: Any
    tx: Any
    abstract_state: Any      # {step, params, opt_state, rng} as ShapeDtypeStructs
    shardings: Any

    def restore_target(self):
        """The abstract state with its shardings, as `TrainCheckpointer.restore` takes it."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.shardings)

    def params_target(self):
        """The abstract params with their shardings."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_params, self.param_shardings)


def state_layout(model: GlmvConfig, cfg: TrainConfig, mesh) -> StateLayout:
    """The train state of `model` under `cfg.optimizer` on `mesh` (shared by `glmv train` and RLCS)."""
    from glmv_jax.model.glmv import init_params, param_shardings as model_param_shardings
    from glmv_jax.train.steps import init_state, state_shardings

    param_shardings = model_param_shardings(model, mesh)
    abstract_params = jax.eval_shape(functools.partial(init_params, model, cfg.train.seed))
    tx = make_optimizer(cfg.optimizer, abstract_params)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    abstract_state["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return StateLayout(param_shardings, abstract_params, tx, abstract_state,
                       state_shardings(abstract_state, param_shardings, mesh))


class TrainStep(NamedTuple):
    """The compiled step of a run: `step(state, batches)` -> (state, metrics), `batches` an iterable of
    `optimizer.accumulate` placed micro-batches, drawn one at a time. With accumulate 1, `single` is the one
    jitted step; above 1, `init` (zero sums), `micro` (acc, params, batch -> acc, acc donated) and `apply`
    (state, acc -> state, metrics) are (train/steps.py's gradient accumulation)."""

    accumulate: int
    single: Any
    init: Any
    micro: Any
    apply: Any

    def __call__(self, state, batches):
        if self.accumulate == 1:
            return self.single(state, next(iter(batches)))
        acc = self.init(state["params"])
        count = 0
        for batch in batches:
            acc = self.micro(acc, state["params"], batch)
            count += 1
        if count != self.accumulate:
            raise ValueError(f"a step takes {self.accumulate} micro-batches, got {count}")
        return self.apply(state, acc)


def jit_train_step(cfg: TrainConfig, model: GlmvConfig, layout: StateLayout, mesh, batch_shardings) -> TrainStep:
    """The compiled train step `glmv train` runs (and `glmv plan --train-config` compiles), with
    `optimizer.accumulate` micro-batches per update."""
    from glmv_jax.train import steps

    step_shardings = {k: layout.shardings[k] for k in ("step", "params", "opt_state")}
    replicated = NamedSharding(mesh, P())
    kwargs = dict(context=mesh.shape["context"], remat_policy=cfg.train.remat_policy,
                  compute_dtype=compute_dtype_of(cfg), scan_layers=cfg.train.scan_layers,
                  attention_impl=cfg.train.attention_impl)
    accumulate = cfg.optimizer.accumulate
    if accumulate == 1:
        single = jax.jit(functools.partial(steps.train_step, config=model, tx=layout.tx, **kwargs),
                         in_shardings=(step_shardings, batch_shardings), out_shardings=(step_shardings, replicated),
                         donate_argnums=0)
        return TrainStep(1, single, None, None, None)
    acc_shardings = {"grads": layout.param_shardings, "total": replicated, "count": replicated}
    init = jax.jit(steps.init_accumulator, in_shardings=(layout.param_shardings,), out_shardings=acc_shardings)
    micro = jax.jit(functools.partial(steps.accumulate_step, config=model, **kwargs),
                    in_shardings=(acc_shardings, layout.param_shardings, batch_shardings),
                    out_shardings=acc_shardings, donate_argnums=0)
    apply = jax.jit(functools.partial(steps.apply_accumulated, tx=layout.tx),
                    in_shardings=(step_shardings, acc_shardings), out_shardings=(step_shardings, replicated),
                    donate_argnums=0)  # the sums have no output to alias; freed after the call
    return TrainStep(accumulate, None, init, micro, apply)


def init_sharded_params(model: GlmvConfig, seed: int, param_shardings):
    """Random params created in place on the mesh (one program, whatever the optimizer)."""
    from glmv_jax.model.glmv import init_params

    return jax.jit(functools.partial(init_params, model, seed), out_shardings=param_shardings)()


def restore_or_init(cfg: TrainConfig, layout: StateLayout, checkpointer: TrainCheckpointer, model: GlmvConfig,
                    mesh, *, resuming: bool, data_iterator=None, who: str = "glmv train") -> dict:
    """The train state {step, params, opt_state, rng} (+ `loop`, the loop's own saved state, if any): restored
    from the latest checkpoint (and `data_iterator` set to its position), or new: params from
    `train.init_from` or random, a fresh optimizer state, the RNG key from `train.seed`."""
    from glmv_jax.train.steps import init_state

    if resuming:
        state = checkpointer.restore(layout.restore_target(), data_iterator=data_iterator)
        print(f"{who}: resumed from {checkpointer.directory}/{checkpointer.latest_step()} "
              f"(mesh {dict(mesh.shape)})", file=sys.stderr)
        return state
    rng = jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.train.seed), 1)),
                         NamedSharding(mesh, P()))
    if cfg.train.init_from:
        params = load_init_params(cfg.train.init_from, model, layout)
        print(f"{who}: params from {cfg.train.init_from}", file=sys.stderr)
    else:
        params = init_sharded_params(model, cfg.train.seed, layout.param_shardings)
    step_shardings = {k: layout.shardings[k] for k in ("step", "params", "opt_state")}
    state = jax.jit(lambda p: init_state(p, layout.tx), out_shardings=step_shardings, donate_argnums=0)(params)
    return {**state, "rng": rng}


def load_init_params(path: str, model: GlmvConfig, layout: StateLayout):
    """Params to start from: a previous workdir (its latest checkpoint), an orbax folder or an HF folder, read
    straight into `layout.param_shardings` (each process reads only the blocks its devices hold; the model
    is compared with the run's before any weight is read)."""
    from glmv_jax.checkpoint import convert, hf

    folder = workdir_path(path)   # a previous workdir may be a URL
    if not folder.is_dir():
        raise FileNotFoundError(f"train.init_from: no folder at {folder}")
    if has_checkpoint(folder):
        _same_model(from_hf_dict(json.loads((folder / "config.json").read_text())), model, folder)
        return TrainCheckpointer(folder, read_only=True).restore_params(layout.params_target())
    if _is_url(folder):
        raise ConfigError(f"train.init_from: {folder} holds no glmv checkpoints/ (orbax and Hugging Face folders "
                          "are read from local paths)")
    folder = Path(folder)
    dtype = jax.tree.leaves(layout.abstract_params)[0].dtype
    if (folder / convert.PARAMS_DIR).is_dir():  # each process reads only its devices' blocks, in place
        _same_model(convert.read_orbax_config(folder), model, folder)
        return convert.load_orbax_params(folder, dtype=dtype, shardings=layout.param_shardings)[1]
    if (folder / "config.json").is_file():
        _same_model(hf.read_hf_config(folder), model, folder)
        return hf.load_hf_checkpoint(folder, dtype=dtype, shardings=layout.param_shardings)[1]
    raise FileNotFoundError(f"train.init_from: {folder} is neither a glmv workdir (checkpoints/), an orbax "
                            "folder (config.json + params/) nor a Hugging Face folder (config.json + safetensors)")


def _same_model(saved: GlmvConfig, model: GlmvConfig, where: Path) -> None:
    if saved == model:
        return
    a, b = saved.to_dict(), model.to_dict()
    diffs = [f"{section}.{k}: {a[section][k]} there, {b[section][k]} here" for section in ("vision", "text")
             for k in a[section] if a[section][k] != b[section][k]]
    diffs += [f"{k}: {a[k]} there, {b[k]} here" for k in a if not isinstance(a[k], dict) and a[k] != b[k]]
    raise ConfigError(f"train.init_from: the model in {where} differs from this run's: {'; '.join(diffs)}")


__all__ = ["StateLayout", "check_model_tokenizer", "compute_dtype_of", "image_processor", "init_sharded_params",
           "TrainStep", "jit_train_step",
           "load_init_params", "model_for_tokenizer", "restore_or_init", "run_mesh", "state_layout",
           "tokenizer_and_model", "use_compile_cache", "workdir_path", "write_run_files"]
