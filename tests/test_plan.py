"""`glmv plan`: the real 9B train step compiled ahead of time on 8 simulated devices, without weights."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_9b_long_context_plan_fits_a_v5p_chip():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "glmv_jax.cli", "plan", "--config", "glm41v_9b",
                          "--mesh", "tensor=2,context=4", "--seq", "32768", "--batch", "1"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    total = float(re.search(r"\| total \(XLA[^|]*\| ([\d.]+) \|", out.stdout).group(1))
    params = float(re.search(r"\| params \(f32 master\) \| ([\d.]+) \|", out.stdout).group(1))
    assert 4.5 < params < 6.0  # 10.3B f32 parameters split 8 ways
    assert total < 95
    assert re.search(r"\| TPU v5p \| 95 \| yes \|", out.stdout)
    for op in ("all-gather", "all-reduce"):
        assert f"| {op} |" in out.stdout


def test_plan_refuses_a_mesh_that_does_not_divide():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "glmv_jax.cli", "plan", "--config", "glm41v_9b",
                          "--mesh", "tensor=4,context=2", "--seq", "4096"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 2 and "num_kv_heads = 2 is not divisible by tensor = 4" in out.stderr
