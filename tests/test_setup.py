"""What a run sets up before training (train/setup.py), the configs it reads, and the presets shipped with the package."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from glmv_jax import cli
from glmv_jax.errors import ConfigError
from glmv_jax.train import setup

ROOT = Path(__file__).resolve().parent.parent


def test_local_workdir_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = setup.workdir_path("runs/a")
    assert str(path) == str(tmp_path / "runs" / "a") and path.is_absolute()
    assert setup.workdir_path(tmp_path / "b") == setup.workdir_path(str(tmp_path / "b"))


def test_url_workdir_without_its_filesystem_is_a_config_error(tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed: gs:// is a usable filesystem here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"gs:// scheme.*gcsfs"):
        setup.workdir_path("gs://bucket/run")
    with pytest.raises(ConfigError, match=r"the foo:// scheme is not supported"):
        setup.workdir_path("foo://bucket/run")


def test_glmv_train_on_a_gs_workdir_fails_before_training(tmp_path, monkeypatch, capsys):
    """The URL stays a URL: one error line naming the scheme, and no local folder named `gs:` appears."""
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "train": {"steps": 2}}))
    trained = []
    from glmv_jax.data import sources

    monkeypatch.setattr(sources, "make_sources", lambda *a, **k: trained.append(1))  # reached only after the check
    code = cli.main(["train", "--config", str(config), "--workdir", "gs://bucket/run"])
    err = capsys.readouterr().err
    assert code == 2 and "gs://" in err and "gcsfs" in err and len(err.strip().splitlines()) == 1
    assert not trained and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_reading_a_training_yaml_imports_no_jax(tmp_path):
    """train/config.py and rl/config.py read an RL YAML without jax, flax, the model or the sampler."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        # the package's modules without running its __init__ (the public API, which imports jax today)
        spec = importlib.util.spec_from_file_location("glmv_jax", {str(ROOT / "glmv_jax" / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT / "glmv_jax")!r}])
        sys.modules["glmv_jax"] = importlib.util.module_from_spec(spec)
        from glmv_jax.rl.config import load_rl_config
        cfg = load_rl_config({str(ROOT / "configs" / "tiny_rl.yaml")!r}, ["rl.kl_coef=0.05"])
        assert cfg.rl.kl_coef == 0.05 and cfg.optimizer.total_steps == 60
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "numpy")
                       or m in ("glmv_jax.rl.rlcs", "glmv_jax.generate.sampler", "glmv_jax.model.glmv"))
        print(heavy)
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rl_section_is_validated():
    import glmv_jax.rl.config  # noqa: F401  (registers the section)
    from glmv_jax.train.config import from_dict

    assert from_dict({"rl": {"iterations": 3}}).rl.iterations == 3
    with pytest.raises(ConfigError, match=r"unknown config key rl\.kl_cef; did you mean rl\.kl_coef\?"):
        from_dict({"rl": {"kl_cef": 0.1}})
    with pytest.raises(ConfigError, match=r"rl\.kl_coef = -0\.1 must not be negative"):
        from_dict({"rl": {"kl_coef": -0.1}})
    with pytest.raises(ConfigError, match=r"rl\.groups = 0 must be a positive integer"):
        from_dict({"rl": {"groups": 0}})


# ------------------------------------------------------------------------------------------ presets
def test_presets_and_demo_configs_load():
    from glmv_jax import demo, load_config

    assert load_config("tiny").text.num_layers == 3 and load_config("glm41v_9b").text.num_layers == 40
    assert load_config("small").vision.depth == 4
    configs = demo.stage_configs(Path("/nonexistent/demo"), fast=True)
    assert configs["rl"].rl is not None and configs["pretrain"].train.steps == 6
    with pytest.raises(FileNotFoundError, match="presets: glm41v_9b, small, tiny"):
        load_config("tinny")


@pytest.mark.slow
def test_non_editable_install_ships_the_presets(tmp_path):
    """`pip install .` (a wheel, not the source tree) holds the presets and the demo's configs."""
    import shutil

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source, target = tmp_path / "src", tmp_path / "site"   # a copy: building writes build/ into the source tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                                "__pycache__", "notebooks", "tests"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                          "--target", str(target), str(source)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    script = textwrap.dedent("""
        import importlib.resources, json
        root = importlib.resources.files("glmv_jax")
        from glmv_jax import demo, load_config
        stages = demo.stage_configs(__import__("pathlib").Path("demo"), fast=True)
        print(json.dumps({"where": str(root), "files": sorted(p.name for p in (root / "presets").iterdir()),
                          "demo": sorted(p.name for p in (root / "presets" / "demo").iterdir()),
                          "layers": load_config("tiny").text.num_layers, "rl": stages["rl"].rl.iterations}))
    """)
    # the installed copy first on the path (before the checkout's editable install); its dependencies from the venv
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    found = json.loads(out.stdout)
    assert found["where"].startswith(str(target))
    assert {"tiny.yaml", "small.yaml", "glm41v_9b.yaml"} <= set(found["files"])
    assert found["demo"] == ["pretrain.yaml", "rl.yaml", "sft.yaml"]
    assert found["layers"] == 3 and found["rl"] == 2
