#!/usr/bin/env bash
# Train on one host with several GPUs: one process sees every local GPU; the mesh in CONFIG spreads over them.
#
#   launch/gpu_single_host.sh [--dry-run] CONFIG WORKDIR [key=value ...]
#
# Variables: CUDA_VISIBLE_DEVICES (which GPUs; default all), PYTHON_BIN (default .venv/bin/python),
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90), INSTALL=1 to install `jax[cuda12]` into .venv first.
# XLA flags for latency-hiding collective scheduling are set; edit XLA_FLAGS to add your own.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # cd to the repo; dry_run, config, workdir, run
shift 2
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
if [[ "${INSTALL:-0}" == 1 ]]; then
  run make install
  run .venv/bin/pip install -q 'jax[cuda12]'
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
run "$PYTHON_BIN" -m glmv_jax.cli train --config "$config" --workdir "$workdir" "$@"
