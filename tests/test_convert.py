"""HF <-> orbax conversion: a lossless float32 round trip that transformers loads back, and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import torch
import transformers

from glmv_jax.checkpoint.convert import hf_to_orbax, load_orbax_params, orbax_to_hf
from glmv_jax.checkpoint.hf import CheckpointError, load_hf_checkpoint
from reference import hf_model, relative_error, save_hf

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_folder(tiny_config, tmp_path_factory):
    """A random float32 HF model of the tiny config saved with save_pretrained, and the model itself."""
    model = hf_model(tiny_config, seed=3)
    path = tmp_path_factory.mktemp("hf")
    save_hf(model, path)
    return model, path


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (key, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(key)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(key))


def test_hf_orbax_hf_round_trip_is_exact(hf_folder, tmp_path):
    model, src = hf_folder
    hf_to_orbax(src, tmp_path / "orbax")
    assert (tmp_path / "orbax" / "config.json").is_file() and (tmp_path / "orbax" / "params").is_dir()
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back")

    # Same attention kernel as the original (hf_model uses eager; from_pretrained defaults to sdpa).
    back = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path / "back",
                                                                      attn_implementation="eager").eval()
    ours, ref = back.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(ref)
    for key, tensor in ref.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 290, (1, 12)))
    with torch.no_grad():
        got, want = back(input_ids=ids).logits.numpy(), model(input_ids=ids).logits.numpy()
    assert relative_error(got, want) <= 1e-5
    np.testing.assert_array_equal(got, want)


def test_orbax_params_equal_hf_params(hf_folder, tmp_path):
    _, src = hf_folder
    hf_to_orbax(src, tmp_path / "orbax")
    config, params = load_orbax_params(tmp_path / "orbax")
    hf_config, hf_params = load_hf_checkpoint(src)
    assert config == hf_config
    _assert_same_tree(params, hf_params)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))


def test_orbax_restores_in_requested_dtype(hf_folder, tmp_path):
    _, src = hf_folder
    hf_to_orbax(src, tmp_path / "orbax")
    _, params = load_orbax_params(tmp_path / "orbax", dtype="bfloat16")
    _, hf_params = load_hf_checkpoint(src, dtype="bfloat16")
    _assert_same_tree(params, hf_params)


def test_cli_convert_both_ways(hf_folder, tmp_path):
    _, src = hf_folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def glmv(*args):
        run = subprocess.run([sys.executable, "-m", "glmv_jax.cli", *map(str, args)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "converted" in run.stdout

    glmv("convert", src, tmp_path / "orbax", "--to", "orbax")
    config, params = load_orbax_params(tmp_path / "orbax")
    hf_config, hf_params = load_hf_checkpoint(src)
    assert config == hf_config
    _assert_same_tree(params, hf_params)

    glmv("convert", tmp_path / "orbax", tmp_path / "back", "--to", "hf")
    back_config, back_params = load_hf_checkpoint(tmp_path / "back")
    assert back_config == hf_config
    _assert_same_tree(back_params, hf_params)


def test_missing_sources_name_what_is_missing(hf_folder, tmp_path):
    _, src = hf_folder
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        hf_to_orbax(tmp_path / "no-such-folder", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        hf_to_orbax(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json and params"):
        orbax_to_hf(tmp_path / "empty", tmp_path / "out")
    # An HF folder is not an orbax checkpoint: config.json is there, the params/ folder is not.
    with pytest.raises(FileNotFoundError, match=r"missing params"):
        orbax_to_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_orbax_params_must_match_config(hf_folder, tmp_path):
    _, src = hf_folder
    hf_to_orbax(src, tmp_path / "orbax")
    config_file = tmp_path / "orbax" / "config.json"
    data = json.loads(config_file.read_text())
    data["text_config"]["intermediate_size"] = 100
    config_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"does not match .*decoder/layers/down/kernel has shape "
                                              r"\(3, 96, 80\), expected \(3, 100, 80\)"):
        load_orbax_params(tmp_path / "orbax")
    data["text_config"]["intermediate_size"] = 96
    data["tie_word_embeddings"] = True
    config_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unexpected decoder/lm_head/kernel"):
        load_orbax_params(tmp_path / "orbax")


def test_existing_destination_is_not_overwritten(hf_folder, tmp_path):
    _, src = hf_folder
    hf_to_orbax(src, tmp_path / "orbax")
    with pytest.raises(FileExistsError, match="params"):
        hf_to_orbax(src, tmp_path / "orbax")
