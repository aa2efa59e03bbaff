#!/usr/bin/env bash
# Run one multi-process JAX job on this machine: PROCESSES processes x DEVICES_PER_PROCESS CPU devices,
# joined through a coordinator on localhost, as a cluster would run them.
#
#   launch/local_multiprocess.sh [--dry-run] [COMMAND ...]
#
# Variables: PROCESSES (default 2), DEVICES_PER_PROCESS (default 4), PORT (default 12355),
# PYTHON (default .venv/bin/python). COMMAND defaults to the distributed self-check
# (`$PYTHON -m glmv_jax.train.distributed`); e.g. `.venv/bin/glmv train --config ... --workdir ...`.
# Every process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_PLATFORMS=cpu and
# XLA_FLAGS with the device count; their output goes to stdout prefixed with the process id.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
PROCESSES=${PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-.venv/bin/python}
if [[ $# -eq 0 ]]; then set -- "$PYTHON" -m glmv_jax.train.distributed; fi

pids=()
for ((i = 0; i < PROCESSES; i++)); do
  env_vars=(JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$PROCESSES JAX_PROCESS_ID=$i
            JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS)
  if (( dry_run )); then
    echo "env ${env_vars[*]} $*"
    continue
  fi
  env "${env_vars[@]}" "$@" 2>&1 | sed -u "s/^/[$i] /" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
