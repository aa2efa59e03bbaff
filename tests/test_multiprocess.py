"""A real 2-process x 4-device job on localhost (jax.distributed + gloo) equals one 8-device process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(text: str) -> dict:
    lines = [line.split("] ", 1)[-1] for line in text.splitlines() if line.lstrip("[0123456789] ").startswith("{")]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_two_processes_give_the_single_process_loss():
    env = {**os.environ, "PROCESSES": "2", "DEVICES_PER_PROCESS": "4", "PORT": str(free_port()),
           "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
    multi = subprocess.run(["bash", str(ROOT / "launch/local_multiprocess.sh")], env=env, capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    single_env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    single = subprocess.run([sys.executable, "-m", "glmv_jax.train.distributed"], env=single_env,
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = last_json(multi.stdout), last_json(single.stdout)
    assert a["processes"] == 2 and b["processes"] == 1 and a["devices"] == b["devices"] == 8
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(b["grad_norm"])


def test_launch_script_dry_run():
    env = {**os.environ, "PROCESSES": "3", "DEVICES_PER_PROCESS": "2", "PORT": "4567"}
    out = subprocess.run(["bash", str(ROOT / "launch/local_multiprocess.sh"), "--dry-run", "echo", "hi"], env=env,
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and "JAX_PROCESS_ID=2" in lines[2] and "JAX_NUM_PROCESSES=3" in lines[0]
    assert "127.0.0.1:4567" in lines[0] and "device_count=2" in lines[1] and lines[0].endswith("echo hi")
