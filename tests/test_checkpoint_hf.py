"""HF checkpoints in and out: transformers loads what we save, with the same keys, shapes and logits."""
from __future__ import annotations

import json
import shutil
import struct

import jax
import numpy as np
import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import torch
import transformers

from glmv_jax import forward, load_hf_checkpoint, save_hf_checkpoint
from glmv_jax.checkpoint.hf import CheckpointError, weight_map
from glmv_jax.config import ConfigError
from reference import Prompt, batch, hf_logits, relative_error


def test_export_round_trip_loads_in_transformers(tiny_pair, tmp_path):
    config, model, params, _ = tiny_pair
    save_hf_checkpoint(tmp_path, config, params)
    reloaded = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours_state, ref_state = reloaded.state_dict(), model.state_dict()
    assert set(ours_state) == set(ref_state)
    for key, value in ref_state.items():
        assert ours_state[key].shape == value.shape, key
        torch.testing.assert_close(ours_state[key], value, rtol=0, atol=0, msg=key)
    inputs = batch(config, [Prompt(config, 11).text(5).image(4, 6).text(4)])
    assert relative_error(hf_logits(reloaded, inputs), hf_logits(model, inputs)) <= 1e-5


def test_sharded_checkpoint_round_trip(tiny_pair, tmp_path):
    config, _, params, _ = tiny_pair
    save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert len(index["weight_map"]) == sum(e.layers or 1 for e in weight_map(config))
    again_config, again = load_hf_checkpoint(tmp_path)
    assert again_config == config
    jax.tree.map(np.testing.assert_array_equal, again, params)
    reloaded = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = np.array([[5, 7, 9, 11, 13]])
    assert relative_error(forward(params, config, ids), hf_logits(reloaded, {"input_ids": ids})) <= 1e-4


def test_bfloat16_save_and_load(tiny_pair, tmp_path):
    config, _, _, path = tiny_pair
    _, params16 = load_hf_checkpoint(path, dtype="bfloat16")
    save_hf_checkpoint(tmp_path, config, params16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.lm_head.weight.dtype == torch.bfloat16
    _, again = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 again, params16)


def test_config_in_4_5x_layout(tiny_config, tmp_path):
    """A config.json as the published checkpoint ships it (rope_scaling, partial_rotary_factor at text level)."""
    from reference import hf_model, save_hf
    model = hf_model(tiny_config, seed=3)
    save_hf(model, tmp_path, layout="4.5x")
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert "rope_scaling" in text and "rope_parameters" not in text
    config, params = load_hf_checkpoint(tmp_path)
    assert config == tiny_config
    reference = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = batch(config, [Prompt(config, 12).text(4).image(6, 4).text(6)])
    ours = forward(params, config, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                   image_grid_thw=inputs["image_grid_thw"])
    assert relative_error(ours, hf_logits(reference, inputs)) <= 1e-4


# ----------------------------------------------------------------------------- bad folders

@pytest.fixture
def sharded(tiny_pair, tmp_path):
    config, _, params, _ = tiny_pair
    save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=200_000)
    return tmp_path


def test_missing_shard_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_hf_checkpoint(sharded)


def test_other_architecture_is_refused(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="llama"):
        load_hf_checkpoint(sharded)


def test_truncated_shard_is_refused(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_checkpoint(sharded)


def _rewrite_header(victim, change):
    """Rewrite the safetensors file `victim` with its JSON header passed through `change(header) -> header`."""
    data = victim.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    blob = json.dumps(change(json.loads(data[8:8 + n]))).encode()
    blob += b" " * (-len(blob) % 8)
    victim.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _lie(field, value):
    def change(header):
        header[_first_tensor(header)][field] = value
        return header
    return change


HOSTILE = {  # a corrupt file or a header that lies: refused before any allocation it asks for
    "header length past the end": lambda data: struct.pack("<Q", len(data)) + data[8:],
    "header length of 2**60": lambda data: struct.pack("<Q", 1 << 60) + data[8:],
    "header not JSON": lambda data: data[:8] + b"{" * 16 + data[24:],
    "too short": lambda data: data[:5],
    "empty": lambda data: b"",
    "trailing bytes": lambda data: data + b"\0" * 8,
}
LIES = {
    "shape larger than its bytes": _lie("shape", [100_000, 100_000]),
    "offsets past the end": _lie("data_offsets", [0, 1 << 40]),
    "shape whose size overflows": _lie("shape", [1 << 40, 1 << 40]),
    "negative dimension": _lie("shape", [-1, 4]),
    "unknown dtype": _lie("dtype", "Q99"),
    "dtype we do not read": _lie("dtype", "F8_E4M3"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_corrupt_shard_is_a_checkpoint_error(sharded, name):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.write_bytes(HOSTILE[name](victim.read_bytes()))
    with pytest.raises(CheckpointError, match=victim.name):
        load_hf_checkpoint(sharded)


@pytest.mark.parametrize("name", sorted(LIES))
def test_lying_header_is_a_checkpoint_error(sharded, name):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    _rewrite_header(victim, LIES[name])
    with pytest.raises(CheckpointError, match=victim.name):
        load_hf_checkpoint(sharded)


def test_shape_mismatch_is_refused(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 64
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gate_up_proj.weight has shape"):
        load_hf_checkpoint(sharded)


def test_pickle_checkpoints_are_never_loaded(sharded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickle")
    shutil.copy(sharded / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_hf_checkpoint(folder)
