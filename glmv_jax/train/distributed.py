"""Multi-process jobs: `jax.distributed.initialize` from the usual environment, where each process's rows
and data shards lie, host batches placed as one global batch, a few host-side collectives, and a self-check.

Environment (set by launch/*.sh or the cluster): JAX_COORDINATOR_ADDRESS (host:port),
JAX_NUM_PROCESSES, JAX_PROCESS_ID. On TPU pods and SLURM, jax detects all three by itself.
On CPU, processes exchange collectives through gloo.

    python -m glmv_jax.train.distributed   # prints the loss of a fixed batch on a fixed tiny model
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from glmv_jax import sharding as mesh_lib
from glmv_jax.errors import ConfigError, DataError, MeshError


def initialize() -> None:
    """Join the job described by the environment; a no-op for a single process."""
    n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if n <= 1 and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID"):
            jax.distributed.initialize()  # cluster auto-detection
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                               process_id=int(os.environ["JAX_PROCESS_ID"]))


def is_main() -> bool:
    """Whether this is process 0, the one that writes metrics, TensorBoard and config files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_first(name: str):
    """Process 0 runs the block before the others do (e.g. it writes a file in the workdir that they then read)."""
    if not is_main():
        sync(name)
    yield
    if is_main():
        sync(name)


def host_rows(mesh, batch_size: int) -> tuple[int, int]:
    """The rows [start, stop) of a global batch of `batch_size` rows (split over data x fsdp) that this process's
    devices hold. Raises MeshError when they are not one contiguous range."""
    sharding = NamedSharding(mesh, mesh_lib.spec(("batch",)))
    held = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                   for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
    start, stop = held[0][0], held[-1][1]
    if sum(b - a for a, b in held) != stop - start:
        raise MeshError(f"this process's devices hold the batch rows {held}, not one contiguous range: order the "
                        "mesh so that each host's devices are neighbours along data x fsdp")
    return start, stop


def data_shards(batch_size: int, rows: tuple[int, int], shards: int = 0) -> tuple[list[int], int]:
    """(the data shards this process reads, their count). The global batch is `shards` pipelines' batches
    (each `batch_size / shards` rows) one after another; a process reads those of its `rows`. `shards` = 0:
    one per distinct row range of the processes (the process count, when no rows are replicated across them).
    The same `shards` gives the same global batches on any number of processes."""
    start, stop = rows
    slices = batch_size // (stop - start)
    shards = shards or slices
    if shards % slices or batch_size % shards:
        raise ConfigError(f"data.shards = {shards} must be a multiple of the {slices} hosts' row ranges and divide "
                          f"data.batch_size = {batch_size}")
    per = shards // slices
    first = start // (stop - start) * per
    return list(range(first, first + per)), shards


def place(batch: dict[str, np.ndarray], mesh, specs: dict[str, Sequence[str | None]]) -> dict:
    """This process's part of a global batch (its rows, its visual blocks) -> global arrays on the mesh,
    sharded by the logical `specs` (jax.make_array_from_process_local_data)."""
    out = {}
    for key, value in batch.items():
        sharding = NamedSharding(mesh, mesh_lib.spec(specs.get(key, (None,) * np.ndim(value))))
        out[key] = jax.make_array_from_process_local_data(sharding, value)
        mesh_lib.check_divisible(mesh, out[key].shape, sharding.spec, key)
    return out


def allgather(values) -> np.ndarray:
    """(processes, ...) : every process's `values` (a small numeric array), on every process."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def check_same(what: str, *values) -> None:
    """DataError unless every process passes equal `values` (strings and arrays, compared by a hash: one small
    allgather), so hosts that disagree (other prompt files, configs, rewards) stop with a message instead of
    computing different things or hanging in a collective. A no-op for one process."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256()
    for value in values:
        if isinstance(value, str):
            digest.update(value.encode())
        else:
            value = np.ascontiguousarray(value)
            digest.update(f"{value.dtype}{value.shape}".encode() + value.tobytes())
    every = allgather(np.frombuffer(digest.digest()[:16], np.int32))
    differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differ:
        raise DataError(f"hosts disagree on {what}: process {differ[0]}'s differs from process 0's; every process "
                        "must run the same config on the same files")


def check_same_shapes(batch: dict[str, np.ndarray]) -> None:
    """DataError naming the array unless every process's part of the batch has the same shapes (a mismatch
    would hang the first collective)."""
    keys = sorted(batch)
    shapes = [tuple(np.shape(batch[k])) for k in keys]
    width = max(len(s) for s in shapes)
    mine = np.array([list(s) + [-1] * (width - len(s)) for s in shapes], np.int64)
    every = allgather(mine)
    for p in range(len(every)):
        for k, key in enumerate(keys):
            if not np.array_equal(every[p, k], mine[k]):
                theirs = tuple(int(x) for x in every[p, k] if x >= 0)
                raise DataError(f"hosts disagree on the batch shapes: {key} is {shapes[k]} on process "
                                f"{jax.process_index()} but {theirs} on process {p}; fix the visual budgets "
                                "(data.pixel_rows, data.max_images, data.frame_patches) so every host pads to them")


def self_check(mesh_sizes: dict[str, int] | None = None, seed: int = 0) -> dict:
    """Loss and gradient norm of a fixed packed batch on a fixed tiny random model, sharded over all devices."""
    from glmv_jax.config import load_config
    from glmv_jax import sharding as mesh_lib
    from glmv_jax.model.glmv import init_params, param_shardings
    from glmv_jax.train.steps import batch_loss

    config = load_config("tiny")
    devices = jax.device_count()
    sizes = mesh_sizes or {"data": 2, "fsdp": devices // 4, "tensor": 2}
    mesh = mesh_lib.make_mesh(**sizes)
    rng = np.random.default_rng(seed)
    b, t = 8, 64
    ids = rng.integers(0, 290, (b, t)).astype(np.int32)
    segments = np.repeat(np.arange(1, 3), t // 2)[None].repeat(b, 0).astype(np.int32)
    segments[:, -5:] = 0
    batch = {"input_ids": ids, "segment_ids": segments, "mm_token_type_ids": np.zeros_like(ids),
             "targets": np.roll(ids, -1, axis=1) * (segments > 0), "loss_mask": (segments > 0).astype(np.float32)}
    specs = {k: ("batch", "length") for k in batch}
    with jax.set_mesh(mesh):
        shardings = param_shardings(config, mesh)
        params = jax.jit(lambda: init_params(config, seed), out_shardings=shardings)()
        placed = mesh_lib.shard_batch(batch, mesh, specs)
        loss_grad = jax.jit(jax.value_and_grad(lambda p, x: batch_loss(p, config, x)[0]))
        loss, grads = loss_grad(params, placed)
        norm = jax.jit(lambda g: jax.numpy.sqrt(sum(jax.numpy.sum(x * x) for x in jax.tree.leaves(g))))(grads)
    return {"processes": jax.process_count(), "devices": devices, "mesh": sizes,
            "loss": float(loss), "grad_norm": float(norm)}


if __name__ == "__main__":
    initialize()
    result = self_check()
    if jax.process_index() == 0:
        print(json.dumps(result), flush=True)
    jax.distributed.shutdown() if jax.process_count() > 1 else None
