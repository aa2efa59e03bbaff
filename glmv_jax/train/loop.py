"""The trainer: data -> step -> metrics -> checkpoints, in one readable function (`train`).

`glmv train --config configs/NAME.yaml --workdir DIR [key=value ...]` runs it (cli.py; a config with an `rl:`
section goes to rl/loop.py instead). Its set-up is train/setup.py's. The workdir (a local folder or a URL such
as gs://bucket/run) holds:

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

Several processes (a `jax.distributed` job; cli.py joins it before any device is used) train as one job: each
reads its data shards and places its rows and visual blocks (train/batches.py), orbax saves and restores the
state and each process's iterator across them, process 0 alone writes the files above, and every host runs
the same number of eval batches; the losses are those of one process on the same global batches.

Divergence: the metrics of every step are checked (on the host, at each log/eval/checkpoint step, so the
device queue is not drained every step): a non-finite loss or gradient norm stops the run with
`TrainingDiverged` naming the first bad step; the bad state is never saved, and the last good checkpoint
is left as it is. The CLI then exits with status 3.
"""
from __future__ import annotations

import io
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.checkpoint.state import TrainCheckpointer, has_checkpoint
from glmv_jax.data import sources as sources_lib
from glmv_jax.errors import GlmvError
from glmv_jax import sharding as mesh_lib
from glmv_jax.model.glmv import check_model
from glmv_jax.train import batches, distributed, setup
from glmv_jax.train.config import TrainConfig
from glmv_jax.train.metrics import MetricsWriter, Progress, read_jsonl
from glmv_jax.train.optimizer import schedule


class TrainingDiverged(GlmvError, RuntimeError):
    """The loss or the gradient norm of a step is not finite."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def train(cfg: TrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume) the run `cfg` in `workdir` (a local path or a URL); returns the metrics of the last
    logged step."""
    workdir = setup.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.train.compile_cache:
        setup.use_compile_cache(cfg.train.compile_cache)
    main = distributed.is_main()
    mesh, _ = setup.run_mesh(cfg)
    train_source, eval_source = sources_lib.make_sources(cfg.data)
    resuming = has_checkpoint(workdir)
    with distributed.main_first("glmv train: tokenizer"):  # process 0 trains the tokenizer (data.tokenizer = synthetic)
        tokenizer, model = setup.tokenizer_and_model(cfg, workdir, train_source,
                                                     None if resuming else cfg.train.init_from)
    check_model(model, mesh)
    mesh_lib.check_batch(mesh, cfg.data.batch_size, cfg.data.seq_len)

    # ------------------------------------------------------------------------------------------- data
    from glmv_jax.data.pipeline import find_stats, shards_iterator

    v = model.vision
    host = batches.HostData.of(cfg.data, mesh)
    place = batches.Placer(mesh, v, batches.block_budgets(cfg.data, mesh, v), host.local_blocks)
    pipeline_args = dict(tokenizer=tokenizer, mode=sources_lib.example_format(cfg.data.mode), seq_len=cfg.data.seq_len,
                         processor=setup.image_processor(cfg.data, v), pack_buffer=cfg.data.pack_buffer,
                         require_image=None)
    train_iter = shards_iterator(host.pipelines(train_source, cfg.data, seed=cfg.data.seed,
                                                worker_count=cfg.data.workers, **pipeline_args))
    eval_sets = (host.pipelines(eval_source, cfg.data, shuffle=False, num_epochs=1, **pipeline_args)
                 if eval_source is not None and cfg.train.eval_every else None)

    # ------------------------------------------------------------------------- sharded state: restore or init
    from glmv_jax.train.steps import batch_loss

    layout = setup.state_layout(model, cfg, mesh)
    param_shardings = layout.param_shardings
    replicated = NamedSharding(mesh, P())
    checkpointer = TrainCheckpointer(workdir, keep=cfg.checkpoint.keep)
    state = setup.restore_or_init(cfg, layout, checkpointer, model, mesh, resuming=resuming, data_iterator=train_iter)
    rng = state.pop("rng")
    step = int(jax.device_get(state["step"]))
    if main:
        setup.write_run_files(workdir, cfg, model)   # after a restore that fits this config

    # ------------------------------------------------------------------------------ the compiled steps
    compute_dtype = setup.compute_dtype_of(cfg)
    batch_shardings = {k: NamedSharding(mesh, mesh_lib.spec(s)) for k, s in batches.BATCH_SPECS.items()}
    train_fn = setup.jit_train_step(cfg, model, layout, mesh, batch_shardings)
    eval_fn = jax.jit(lambda params, batch: batch_loss(params, model, batch, context=mesh.shape["context"],
                                                       compute_dtype=compute_dtype, scan_layers=cfg.train.scan_layers,
                                                       attention_impl=cfg.train.attention_impl),
                      in_shardings=(param_shardings, batch_shardings), out_shardings=(replicated, replicated))
    learning_rate = schedule(cfg.optimizer)

    def evaluate(params) -> float:
        total, count = jnp.zeros(()), jnp.zeros(())
        for host_batch in batches.eval_batches(eval_sets):   # as many on every host
            loss, n = eval_fn(params, place(host_batch))
            total, count = total + loss * n, count + n
        total, count = jax.device_get((total, count))
        return float(total / max(float(count), 1.0))

    # ------------------------------------------------------------------------------------------- loop
    total_steps = cfg.train.steps
    writer = MetricsWriter(workdir, resume_step=step, enabled=main)   # process 0 writes the metrics
    progress = Progress(total_steps, initial=step, stream=None if main else io.StringIO())
    pending: list[tuple[int, Any, int, int]] = []   # (step, device metrics, real tokens, token positions)
    last: dict[str, Any] = {}
    first_step = step
    interval_start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                micro_counts: list[tuple[int, int]] = []   # this host's (real tokens, positions) per micro-batch

                def micro_batches():  # optimizer.accumulate of them, drawn and placed one at a time
                    for _ in range(cfg.optimizer.accumulate):
                        host_batch = next(train_iter)
                        segments = host_batch["segment_ids"]
                        micro_counts.append((int((segments > 0).sum()), int(segments.size)))
                        yield place(host_batch)

                state, metrics = train_fn(state, micro_batches())
                step += 1
                pending.append((step, metrics, sum(c[0] for c in micro_counts), sum(c[1] for c in micro_counts)))
                progress.update()

                log_now = step % cfg.train.log_every == 0 or step == total_steps
                eval_now = eval_sets is not None and (step % cfg.train.eval_every == 0 or step == total_steps)
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
                stats = find_stats(train_iter)
                counts = distributed.allgather([sum(p[2] for p in pending), sum(p[3] for p in pending),
                                                stats.examples, stats.skipped_total]).sum(axis=0)  # every host's
                real, positions = int(counts[0]), int(counts[1])
                last = {"step": step, "loss": float(fetched[-1]["loss"]),
                        "grad_norm": float(fetched[-1]["grad_norm"]),
                        "lr": float(learning_rate(step - 1)),
                        "tokens_per_s": real / elapsed if elapsed > 0 else 0.0,
                        "trained_tokens": int(sum(float(m["tokens"]) for m in fetched)),
                        "padding_fraction": 1.0 - real / positions,
                        "examples": int(counts[2]), "skipped_total": int(counts[3])}
                if jax.process_count() == 1:
                    last.update({f"skipped_{reason}": n for reason, n in sorted(stats.skipped.items())})
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


__all__ = ["TrainingDiverged", "train"]
