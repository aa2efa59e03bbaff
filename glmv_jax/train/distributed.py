"""Multi-process jobs: `jax.distributed.initialize` from the usual environment, and a self-check.

Environment (set by launch/*.sh or the cluster): JAX_COORDINATOR_ADDRESS (host:port),
JAX_NUM_PROCESSES, JAX_PROCESS_ID. On TPU pods and SLURM, jax detects all three by itself.
On CPU, processes exchange collectives through gloo.

    python -m glmv_jax.train.distributed   # prints the loss of a fixed batch on a fixed tiny model
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np


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


def global_array(value: np.ndarray, sharding) -> jax.Array:
    """A global array from a host value every process holds in full (each keeps only its shards)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


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
        placed = {k: global_array(v, jax.sharding.NamedSharding(mesh, mesh_lib.spec(specs[k])))
                  for k, v in batch.items()}
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
