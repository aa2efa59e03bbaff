"""The `glmv` command keeps freed host memory on CPU by re-executing itself with glibc malloc tunables."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from glmv_jax import hostmem

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_when_the_tuning_applies():
    base = {"JAX_PLATFORMS": "cpu"}
    assert hostmem.wants_tuned_malloc(base) == GLIBC
    assert not hostmem.wants_tuned_malloc({**base, "GLMV_HOST_MALLOC": "system"})
    assert not hostmem.wants_tuned_malloc({**base, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})  # user's own
    assert not hostmem.wants_tuned_malloc({"JAX_PLATFORMS": "tpu"})
    assert not hostmem.wants_tuned_malloc({"JAX_PLATFORMS": "cuda,cpu"})


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_reexecutes_once_with_the_tunables_added(tmp_path):
    """The process is replaced by `python -m module args` whose environment has the tunables after the user's
    own GLIBC_TUNABLES; the replacement does not re-execute again."""
    (tmp_path / "probe.py").write_text(
        "import os, sys\nfrom glmv_jax import hostmem\n"
        "print('args', sys.argv[1:], 'tunables', os.environ['GLIBC_TUNABLES'])\n"
        "hostmem.reexec_with_tuned_malloc('probe', ['again'])\nprint('no second exec')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("GLMV_HOST_MALLOC", None)
    parent = "from glmv_jax import hostmem; hostmem.reexec_with_tuned_malloc('probe', ['x', '-y']); print('not replaced')"
    out = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"args ['x', '-y'] tunables glibc.rtld.optional_static_tls=4096:{hostmem.TUNABLES}", "no second exec"]


def test_glmv_command_runs_under_the_tuning():
    out = subprocess.run([sys.executable, "-m", "glmv_jax.cli", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.count("usage: glmv") == 1, out.stderr
