#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install this code on every worker, and run
# `glmv train` on all workers at once; jax.distributed finds the other hosts on TPU by itself.
#
#   launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [key=value ...]
#
# Variables (required): TPU_NAME, ZONE, PROJECT; ACCELERATOR (default v5p-32), RUNTIME (default
# v2-alpha-tpuv5), REPO_URL (git URL the workers clone; default: copy this checkout with scp),
# BRANCH (default main). WORKDIR should be a gs:// path or a disk every host shares.
# --dry-run prints every command instead of running it.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # cd to the repo; dry_run, config, workdir, run
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
BRANCH=${BRANCH:-main}
gcloud_tpu=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")

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
install="cd glmv-jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all --command "$fetch && $install"
train="cd glmv-jax && .venv/bin/glmv train --config $config --workdir $workdir $*"
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all --command "$train"
