"""`import glmv_jax` and the `glmv` command's help import no jax or flax (checked in fresh interpreters); the
public names still resolve, on first attribute access."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import glmv_jax

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("jax", "flax")
REPORT = ("import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          f"{HEAVY!r})))")


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(**env))


def test_import_glmv_jax_imports_no_jax():
    out = _python("import glmv_jax; " + REPORT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_import_rewards_imports_no_jax():
    out = _python("import glmv_jax.rl.rewards; " + REPORT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def _imported_by_command(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python -m glmv_jax.cli ARGS` as the `glmv` command runs (re-executing itself for malloc tuning, which
    keeps the environment), with -X importtime on through the environment: every module either process
    imported is named on stderr."""
    out = subprocess.run([sys.executable, "-m", "glmv_jax.cli", *args], capture_output=True, text=True, timeout=120,
                         env=_env(PYTHONPROFILEIMPORTTIME="1"))
    names = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "glmv_jax.cli" in names or "glmv_jax.hostmem" in names, out.stderr[-2000:]  # the report is there
    return out, names


@pytest.mark.parametrize("args", [("--help",), ("train", "--help"), ("bench", "--help"), ("generate", "--help")])
def test_glmv_help_imports_no_jax(args):
    out, names = _imported_by_command(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: glmv" in out.stdout
    assert [n for n in names if n.split(".")[0] in HEAVY] == []
    assert "numpy" not in names  # the bench's options come without the benchmark


def test_public_names_resolve_on_access():
    from glmv_jax.checkpoint import hf
    from glmv_jax.config import GlmvConfig
    from glmv_jax.generate import sampler
    from glmv_jax.model import glmv, rope
    from glmv_jax import sharding

    assert glmv_jax.forward is glmv.forward and glmv_jax.init_params is glmv.init_params
    assert glmv_jax.get_rope_index is rope.get_rope_index
    assert glmv_jax.generate is sampler.generate and glmv_jax.sample is sampler.sample
    assert glmv_jax.SamplingConfig is sampler.SamplingConfig
    assert glmv_jax.load_hf_checkpoint is hf.load_hf_checkpoint and glmv_jax.save_hf_checkpoint is hf.save_hf_checkpoint
    assert glmv_jax.GlmvConfig is GlmvConfig and glmv_jax.make_mesh is sharding.make_mesh
    for name in glmv_jax.__all__:
        assert getattr(glmv_jax, name) is not None
        assert name in dir(glmv_jax)
    from glmv_jax import forward, load_config  # noqa: F401 - `from glmv_jax import x` goes through __getattr__
    with pytest.raises(AttributeError, match="no_such_name"):
        glmv_jax.no_such_name  # noqa: B018


def test_all_is_unchanged():
    assert sorted(glmv_jax.__all__) == [
        "GlmvConfig", "SamplingConfig", "TextConfig", "VisionConfig", "forward", "generate", "get_rope_index",
        "init_params", "load_config", "load_hf_checkpoint", "make_mesh", "sample", "save_hf_checkpoint"]
