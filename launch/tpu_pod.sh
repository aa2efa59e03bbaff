#!/usr/bin/env bash
# Train on a Cloud TPU VM slice as one job: create (or reuse) the slice, install this code on every worker,
# stage the data, and start `glmv train` on all workers at once, detached; then read their logs.
#
#   launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [key=value ...]   start the run on every worker (detached)
#   launch/tpu_pod.sh [--dry-run] logs [LINES]                     the last LINES (default 50) of every worker's log
#   launch/tpu_pod.sh [--dry-run] stop                             stop the run on every worker
#
# Every worker runs the same command; the TPU runtime gives each process its place in the slice (coordinator,
# process count and id), which `jax.distributed.initialize()` in `glmv train` reads by itself, so the workers
# form one job. WORKDIR should be a gs:// path (orbax and metrics go through etils.epath; gcsfs is installed),
# and so may be the config's data paths (data.path, data.image_root, data.data_dir, train.init_from).
#
# Variables (required): TPU_NAME, ZONE, PROJECT. ACCELERATOR (default v5p-32), RUNTIME (default v2-alpha-tpuv5),
# REPO_URL (git URL the workers clone; default: this checkout's HEAD copied with scp), BRANCH (default main),
# DATA_STAGE (a gs:// folder copied to ~/glmv-jax/data on every worker before the run, for configs that read
# local data/ paths), LOG (default glmv-train.log, in each worker's home). --dry-run prints every command.
set -euo pipefail
flag=()
if [[ "${1:-}" == "--dry-run" ]]; then flag=(--dry-run); shift; fi
action=train
case "${1:-}" in
  logs | stop) action=$1; shift; lines=${1:-50}; set -- "${flag[@]}" - - ;;
  *) set -- "${flag[@]}" "$@" ;;
esac
source "$(dirname "$0")/common.sh"  # cd to the repo; dry_run, config, workdir, run
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
BRANCH=${BRANCH:-main}
LOG=${LOG:-glmv-train.log}
gcloud_tpu=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")
on_all() { run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all --command "$1"; }

if [[ $action == logs ]]; then
  on_all "tail -n $lines ~/$LOG | sed \"s/^/[\$(hostname)] /\""
  exit 0
fi
if [[ $action == stop ]]; then
  on_all "if [ -f ~/glmv-train.pid ]; then kill \$(cat ~/glmv-train.pid) 2>/dev/null; rm -f ~/glmv-train.pid; fi"
  exit 0
fi

if (( dry_run )) || ! "${gcloud_tpu[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
  run "${gcloud_tpu[@]}" create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
if [[ -n "${REPO_URL:-}" ]]; then
  fetch="rm -rf glmv-jax && git clone --branch $BRANCH $REPO_URL glmv-jax"
else
  tarball=$(mktemp -u /tmp/glmv-jax-XXXX).tar.gz
  run git archive --format=tar.gz -o "$tarball" HEAD
  run "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:glmv-jax.tar.gz" --worker=all
  fetch="rm -rf glmv-jax && mkdir glmv-jax && tar -xzf glmv-jax.tar.gz -C glmv-jax"
fi
install="cd glmv-jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]' gcsfs"
on_all "$fetch && $install"
if [[ -n "${DATA_STAGE:-}" ]]; then  # every worker reads its own shard of the same files: copy them once per worker
  on_all "mkdir -p glmv-jax/data && gcloud storage rsync --recursive $DATA_STAGE glmv-jax/data"
fi
# Detached: nohup keeps the run alive after ssh returns; its pid and log stay in the worker's home.
train="cd glmv-jax && (nohup .venv/bin/glmv train --config $config --workdir $workdir $* > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/glmv-train.pid)"
on_all "$train"
echo "started on every worker of $TPU_NAME; logs: $0 logs, stop: $0 stop" >&2
