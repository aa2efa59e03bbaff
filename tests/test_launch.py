"""Launch scripts build the commands they would run (--dry-run), with the variables they document."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dry_run(script, *args, **env):
    full = {**os.environ, **env}
    return subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", *args], env=full, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_tpu_pod_dry_run():
    out = dry_run("tpu_pod.sh", "configs/pretrain_9b.yaml", "gs://bucket/run1", "train.steps=10",
                  TPU_NAME="glmv-pod", ZONE="us-east5-a", PROJECT="my-proj", ACCELERATOR="v5p-64",
                  REPO_URL="https://example.invalid/glmv-jax.git")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "create glmv-pod --accelerator-type v5p-64" in lines[0] and "--zone us-east5-a" in lines[0]
    assert any("--worker=all" in line and "git\\ clone" in line for line in lines)
    assert "glmv\\ train\\ --config\\ configs/pretrain_9b.yaml\\ --workdir\\ gs://bucket/run1\\ train.steps=10" in lines[-1]


def test_tpu_pod_detaches_stages_data_and_reads_logs():
    env = dict(TPU_NAME="glmv-pod", ZONE="us-east5-a", PROJECT="my-proj", REPO_URL="https://example.invalid/g.git")
    out = dry_run("tpu_pod.sh", "configs/longctx_9b.yaml", "gs://bucket/run2", DATA_STAGE="gs://bucket/data", **env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    stage = [line for line in lines if "gcloud\\ storage\\ rsync" in line]
    assert len(stage) == 1 and "--worker=all" in stage[0] and "gs://bucket/data\\ glmv-jax/data" in stage[0]
    assert lines.index(stage[0]) < len(lines) - 1  # staged before the run starts
    start = lines[-1]
    assert "--worker=all" in start and "nohup\\ .venv/bin/glmv\\ train" in start  # every worker, detached
    assert "\\>\\ ~/glmv-train.log" in start and "glmv-train.pid" in start
    logs = dry_run("tpu_pod.sh", "logs", "20", **env)
    assert logs.returncode == 0, logs.stderr
    (line,) = logs.stdout.strip().splitlines()
    assert "ssh glmv-pod --worker=all" in line and "tail\\ -n\\ 20\\ ~/glmv-train.log" in line
    stop = dry_run("tpu_pod.sh", "stop", **env)
    assert stop.returncode == 0 and "--worker=all" in stop.stdout and "glmv-train.pid" in stop.stdout


def test_tpu_pod_needs_its_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT")}
    out = subprocess.run(["bash", str(ROOT / "launch/tpu_pod.sh"), "--dry-run", "c.yaml", "w"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_gpu_single_host_dry_run():
    out = dry_run("gpu_single_host.sh", "configs/tiny_sft.yaml", "runs/x", "mesh.data=8", INSTALL="1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "make install" and "jax\\[cuda12\\]" in lines[1]
    assert lines[-1].endswith("train --config configs/tiny_sft.yaml --workdir runs/x mesh.data=8")
