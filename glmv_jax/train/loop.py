"""The trainer: data -> step -> metrics -> checkpoints, in one readable function (`train`).

`glmv train --config configs/NAME.yaml --workdir DIR [key=value ...]` runs it. The workdir holds:

    train_config.yaml   the resolved training config of the latest start
    config.json         the model config (HF layout; `load_config(DIR)` reads it)
    tokenizer.model     a tokenizer trained here (data.tokenizer = synthetic)
    checkpoints/<step>/ orbax: params, optimizer state + step + RNG, data-iterator state
    metrics.jsonl       one JSON object per logged step
    tb/                 TensorBoard scalars

Starting again on a workdir that holds a checkpoint resumes from its latest step exactly: params,
optimizer state, step, RNG key and the position of the data iterator are restored (onto the mesh of
this run, which may differ from the one that saved), and metrics.jsonl drops the records written after
that checkpoint.

Divergence: the metrics of every step are checked (on the host, at each log/eval/checkpoint step, so the
device queue is not drained every step): a non-finite loss or gradient norm stops the run with
`TrainingDiverged` naming the first bad step; the bad state is never saved, and the last good checkpoint
is left as it is. The CLI then exits with status 3.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.checkpoint.state import TrainCheckpointer, has_checkpoint
from glmv_jax.config import ConfigError, GlmvConfig, load_config, to_hf_dict
from glmv_jax.model.inputs import frame_pixels
from glmv_jax import sharding as mesh_lib
from glmv_jax.model.glmv import check_model, param_shardings as model_param_shardings
from glmv_jax.train import sources as sources_lib
from glmv_jax.train.config import TrainConfig, check_model_tokenizer, load_train_config, model_for_tokenizer
from glmv_jax.train.metrics import MetricsWriter, Progress, read_jsonl
from glmv_jax.train.optimizer import make_optimizer, schedule
from glmv_jax.errors import GlmvError

TOKEN_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "targets", "loss_mask")
BATCH_SPECS: dict[str, tuple] = {**{k: ("batch", "length") for k in TOKEN_KEYS},
                                 "pixel_values": ("patches", None), "image_grid_thw": (None, None)}


class TrainingDiverged(GlmvError, RuntimeError):
    """The loss or the gradient norm of a step is not finite."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def train(cfg: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) the run `cfg` in `workdir`; returns the metrics of the last logged step."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.train.compile_cache:
        _use_compile_cache(cfg.train.compile_cache)
    if jax.process_count() > 1:
        raise NotImplementedError("glmv train places host batches on one process only; multi-host data "
                                  "placement (make_array_from_process_local_data) is not written yet")

    # ------------------------------------------------------------------------------------------ mesh
    sizes = cfg.mesh.sizes(jax.device_count())
    used = math.prod(sizes.values())
    if used > jax.device_count():
        raise mesh_lib.MeshError(f"mesh {sizes} needs {used} devices, but {jax.device_count()} are available")
    mesh = mesh_lib.make_mesh(**sizes, devices=jax.devices()[:used])
    if used < jax.device_count():
        print(f"glmv train: mesh {sizes} uses {used} of the {jax.device_count()} devices", file=sys.stderr)

    # ------------------------------------------------------------------------- tokenizer and model config
    train_source, eval_source = sources_lib.make_sources(cfg.data)
    resuming = has_checkpoint(workdir)
    init_from = None if resuming else cfg.train.init_from
    tokenizer, trained_here = sources_lib.tokenizer_for_run(cfg.data, workdir, train_source, init_from)
    model = cfg.base_model()
    if trained_here:
        model = model_for_tokenizer(model, tokenizer)  # vocab and special ids follow the tokenizer trained here
    check_model_tokenizer(model, tokenizer)
    check_model(model, mesh)
    mesh_lib.check_batch(mesh, cfg.data.batch_size, cfg.data.seq_len)

    # ------------------------------------------------------------------------------------------- data
    from glmv_jax.data.pipeline import find_stats, make_pipeline, per_host_batch_size
    v = model.vision
    largest = cfg.data.max_pixels // (v.temporal_patch_size * v.patch_size ** 2)  # patches of the largest image
    frame_patches = cfg.data.frame_patches
    if frame_patches and (frame_patches < largest or frame_patches % v.spatial_merge_size ** 2):
        raise ConfigError(f"data.frame_patches = {cfg.data.frame_patches} must be a multiple of "
                          f"{v.spatial_merge_size ** 2} and hold the largest image data.max_pixels allows "
                          f"({largest} patches)")
    processor = image_processor(cfg.data, v)
    pipeline_args = dict(tokenizer=tokenizer, mode=sources_lib.example_format(cfg.data.mode), seq_len=cfg.data.seq_len,
                         batch_size=per_host_batch_size(cfg.data.batch_size), processor=processor,
                         pack_buffer=cfg.data.pack_buffer, require_image=None)
    train_iter = iter(make_pipeline(train_source, seed=cfg.data.seed, worker_count=cfg.data.workers,
                                    **pipeline_args))
    eval_data = (make_pipeline(eval_source, shuffle=False, num_epochs=1, **pipeline_args)
                 if eval_source is not None and cfg.train.eval_every else None)
    place = functools.partial(_place_batch, mesh=mesh, pixel_rows=cfg.data.pixel_rows,
                              max_images=cfg.data.max_images, merge=v.spatial_merge_size,
                              frame_patches=frame_patches)

    # ----------------------------------------------------------------------- optimizer and sharded state
    from glmv_jax.train.steps import batch_loss, init_state, train_step

    layout = state_layout(model, cfg, mesh)
    param_shardings, tx, shardings = layout.param_shardings, layout.tx, layout.shardings
    replicated = NamedSharding(mesh, P())
    step_shardings = {k: shardings[k] for k in ("step", "params", "opt_state")}

    # ------------------------------------------------------------ restore, or init (from scratch / init_from)
    checkpointer = TrainCheckpointer(workdir, keep=cfg.checkpoint.keep)
    if resuming:
        restored = checkpointer.restore(layout.restore_target(), data_iterator=train_iter)
        rng = restored.pop("rng")
        state = restored
        print(f"glmv train: resumed from {checkpointer.directory}/{checkpointer.latest_step()} "
              f"(mesh {sizes})", file=sys.stderr)
    else:
        rng = jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.train.seed), 1)),
                             replicated)
        if init_from:
            params = _load_init_params(init_from, model, layout.abstract_params, param_shardings)
            print(f"glmv train: params from {init_from}", file=sys.stderr)
        else:
            params = init_sharded_params(model, cfg.train.seed, param_shardings)
        state = jax.jit(lambda p: init_state(p, tx), out_shardings=step_shardings, donate_argnums=0)(params)
    step = int(jax.device_get(state["step"]))
    (workdir / "train_config.yaml").write_text(cfg.to_yaml())   # after a restore that fits this config
    (workdir / "config.json").write_text(json.dumps(to_hf_dict(model), indent=2))

    # ------------------------------------------------------------------------------ the compiled steps
    compute_dtype = compute_dtype_of(cfg)
    batch_shardings = {k: NamedSharding(mesh, mesh_lib.spec(s)) for k, s in BATCH_SPECS.items()}
    train_fn = jax.jit(
        functools.partial(train_step, config=model, tx=tx, context=mesh.shape["context"],
                          remat_policy=cfg.train.remat_policy, compute_dtype=compute_dtype,
                          scan_layers=cfg.train.scan_layers, attention_impl=cfg.train.attention_impl),
        in_shardings=(step_shardings, batch_shardings), out_shardings=(step_shardings, replicated),
        donate_argnums=0)
    eval_fn = jax.jit(lambda params, batch: batch_loss(params, model, batch, context=mesh.shape["context"],
                                                       compute_dtype=compute_dtype, scan_layers=cfg.train.scan_layers,
                                                       attention_impl=cfg.train.attention_impl),
                      in_shardings=(param_shardings, batch_shardings), out_shardings=(replicated, replicated))
    learning_rate = schedule(cfg.optimizer)

    def evaluate(params) -> float:
        total, count = jnp.zeros(()), jnp.zeros(())
        for host_batch in iter(eval_data):
            loss, n = eval_fn(params, place(host_batch))
            total, count = total + loss * n, count + n
        total, count = jax.device_get((total, count))
        return float(total / max(float(count), 1.0))

    # ------------------------------------------------------------------------------------------- loop
    total_steps = cfg.train.steps
    writer = MetricsWriter(workdir, resume_step=step)
    progress = Progress(total_steps, initial=step)
    stats = find_stats(train_iter)
    pending: list[tuple[int, Any, int, int]] = []   # (step, device metrics, real tokens, token positions)
    last: dict[str, Any] = {}
    first_step = step
    interval_start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                host_batch = next(train_iter)
                state, metrics = train_fn(state, place(host_batch))
                step += 1
                segments = host_batch["segment_ids"]
                pending.append((step, metrics, int((segments > 0).sum()), int(segments.size)))
                progress.update()

                log_now = step % cfg.train.log_every == 0 or step == total_steps
                eval_now = eval_data is not None and (step % cfg.train.eval_every == 0 or step == total_steps)
                save_now = step % cfg.checkpoint.every == 0 or step == total_steps
                if not (log_now or eval_now or save_now):
                    continue

                # every step since the last check must be finite before anything is logged or saved
                fetched = jax.device_get([m for _, m, _, _ in pending])
                for (s, _, _, _), m in zip(pending, fetched):
                    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        checkpointer.wait()
                        good = checkpointer.latest_step()
                        kept = (f"the last good checkpoint is step {good} in {checkpointer.directory}"
                                if good is not None else "no checkpoint was saved before it")
                        raise TrainingDiverged(
                            f"training diverged at step {s}: loss = {loss}, grad_norm = {grad_norm}. Stopped "
                            f"without saving this state; {kept}. Lower optimizer.learning_rate or check the data, "
                            "then run again (it resumes from that checkpoint).", s)
                elapsed = time.perf_counter() - interval_start
                real = sum(p[2] for p in pending)
                positions = sum(p[3] for p in pending)
                last = {"step": step, "loss": float(fetched[-1]["loss"]),
                        "grad_norm": float(fetched[-1]["grad_norm"]),
                        "lr": float(learning_rate((step - 1) // cfg.optimizer.accumulate)),
                        "tokens_per_s": real / elapsed if elapsed > 0 else 0.0,
                        "trained_tokens": int(sum(float(m["tokens"]) for m in fetched)),
                        "padding_fraction": 1.0 - real / positions,
                        "examples": stats.examples, "skipped_total": stats.skipped_total,
                        **{f"skipped_{reason}": n for reason, n in sorted(stats.skipped.items())}}
                pending = []
                if eval_now:
                    last["eval_loss"] = evaluate(state["params"])
                if log_now or eval_now:
                    writer.write(last)
                    progress.log(last)
                if save_now:
                    checkpointer.save(step, {**state, "rng": rng}, train_iter)
                interval_start = time.perf_counter()
    finally:
        progress.close()
        writer.close()
        checkpointer.close()  # waits for the saves in flight
    latest = checkpointer.latest_step()

    if not last:  # nothing to do: the run had already reached train.steps
        records = read_jsonl(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
        last = records[-1] if records else {"step": step}
    wall = time.perf_counter() - started
    print(f"glmv train: steps {first_step}..{step} in {wall:.1f}s; loss {last.get('loss')}"
          + (f", eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
          + f"; checkpoints in {checkpointer.directory} (latest step {latest})",
          file=sys.stderr)
    return last


# ------------------------------------------------------------------------------------------- helpers
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


def state_layout(model: GlmvConfig, cfg: TrainConfig, mesh) -> StateLayout:
    """The train state of `model` under `cfg.optimizer` on `mesh` (shared by `glmv train` and RLCS)."""
    from glmv_jax.model.glmv import init_params
    from glmv_jax.train.steps import init_state, state_shardings

    param_shardings = model_param_shardings(model, mesh)
    abstract_params = jax.eval_shape(functools.partial(init_params, model, cfg.train.seed))
    tx = make_optimizer(cfg.optimizer, abstract_params)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    abstract_state["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return StateLayout(param_shardings, abstract_params, tx, abstract_state,
                       state_shardings(abstract_state, param_shardings, mesh))


def image_processor(data, vision):
    """The ImageProcessor of a run: `data` config's pixel limits, the vision tower's patch sizes."""
    from glmv_jax.data.processor import ImageProcessor

    return ImageProcessor(min_pixels=data.min_pixels, max_pixels=data.max_pixels, patch_size=vision.patch_size,
                          temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)


def compute_dtype_of(cfg: TrainConfig):
    """`train.compute_dtype` as a dtype, None for float32 (compute in the params' dtype)."""
    return None if cfg.train.compute_dtype == "float32" else jnp.dtype(cfg.train.compute_dtype)


def init_sharded_params(model: GlmvConfig, seed: int, param_shardings):
    """Random params created in place on the mesh (one program, whatever the optimizer)."""
    from glmv_jax.model.glmv import init_params

    return jax.jit(functools.partial(init_params, model, seed), out_shardings=param_shardings)()


def _place_batch(batch: dict[str, np.ndarray], *, mesh, pixel_rows: int, max_images: int, merge: int,
                 frame_patches: int = 0):
    """Pad the visual arrays to fixed shapes (one compiled program) and place the batch on the mesh.

    With `frame_patches`, pixels go in the framed layout (max_images rows of frame_patches patches, one
    image per row: attention per image); else flat, padded to pixel_rows."""
    batch = dict(batch)
    patches_axis = mesh_lib.axis_size(mesh, mesh_lib.RULES["patches"])
    pixels, grids = batch["pixel_values"], batch["image_grid_thw"]
    images = max(max_images, len(grids))
    if max_images and len(grids) > max_images:
        _warn_once("max_images", f"a batch has {len(grids)} image rows > data.max_images = {max_images}; it "
                                 "compiles another program (raise data.max_images)")
    if images != len(grids):
        grids = np.concatenate([grids, np.zeros((images - len(grids), 3), grids.dtype)])
    if frame_patches:
        pixels = frame_pixels(pixels, grids, _round_up(images, patches_axis), frame_patches)
    else:
        rows = _round_up(max(pixel_rows, len(pixels)), math.lcm(patches_axis, merge * merge))
        if pixel_rows and len(pixels) > pixel_rows:
            _warn_once("pixel_rows", f"a batch has {len(pixels)} pixel rows > data.pixel_rows = {pixel_rows}; it "
                                     "is padded to its own bucket, which compiles another program (raise "
                                     "data.pixel_rows)")
        if rows != len(pixels):
            pixels = np.concatenate([pixels, np.zeros((rows - len(pixels), pixels.shape[1]), pixels.dtype)])
    batch["pixel_values"], batch["image_grid_thw"] = pixels, grids
    specs = {**BATCH_SPECS, "pixel_values": ("patches",) + (None,) * (pixels.ndim - 1)}
    return mesh_lib.shard_batch({k: batch[k] for k in BATCH_SPECS}, mesh, specs)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"glmv train: warning: {message}", file=sys.stderr)


def _use_compile_cache(path: str) -> None:
    """Point JAX's persistent compilation cache at `path` (compiled programs are reused across runs)."""
    from jax.experimental.compilation_cache import compilation_cache

    path = str(Path(path).expanduser().resolve())
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()


def _load_init_params(path: str, model: GlmvConfig, abstract_params, param_shardings):
    """Params to start from: a previous workdir (its latest checkpoint), an orbax folder or an HF folder."""
    from glmv_jax.checkpoint import convert, hf

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"train.init_from: no folder at {folder}")
    if has_checkpoint(folder):
        saved = load_config(folder)
        _same_model(saved, model, folder)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_params, param_shardings)
        return TrainCheckpointer(folder, read_only=True).restore_params(target)
    if (folder / convert.PARAMS_DIR).is_dir():
        saved, params = convert.load_orbax_params(folder)
    elif (folder / "config.json").is_file():
        saved, params = hf.load_hf_checkpoint(folder)
    else:
        raise FileNotFoundError(f"train.init_from: {folder} is neither a glmv workdir (checkpoints/), an orbax "
                                "folder (config.json + params/) nor a Hugging Face folder (config.json + safetensors)")
    _same_model(saved, model, folder)
    return jax.device_put(params, param_shardings)


def _same_model(saved: GlmvConfig, model: GlmvConfig, where: Path) -> None:
    if saved == model:
        return
    a, b = saved.to_dict(), model.to_dict()
    diffs = [f"{section}.{k}: {a[section][k]} there, {b[section][k]} here" for section in ("vision", "text")
             for k in a[section] if a[section][k] != b[section][k]]
    diffs += [f"{k}: {a[k]} there, {b[k]} here" for k in a if not isinstance(a[k], dict) and a[k] != b[k]]
    raise ConfigError(f"train.init_from: the model in {where} differs from this run's: {'; '.join(diffs)}")


# ------------------------------------------------------------------------------------------------ CLI
def main(config: str, workdir: str, overrides: list[str]) -> int:
    """`glmv train`: 0 when done, 3 when training diverged (bad config/data errors propagate to the CLI)."""
    cfg = load_train_config(config, overrides)
    try:
        if cfg.rl is not None:
            from glmv_jax.rl.loop import train_rl
            final = train_rl(cfg, workdir)
        else:
            final = train(cfg, workdir)
    except TrainingDiverged as e:
        print(f"\nglmv train: error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({k: final[k] for k in ("step", "loss", "eval_loss", "eval_reward") if k in final}))
    return 0


__all__ = ["BATCH_SPECS", "TrainingDiverged", "init_sharded_params", "main", "train"]
