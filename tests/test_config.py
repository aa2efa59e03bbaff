"""Config: presets, validation messages that name the field, and HF config.json in both layouts."""
from __future__ import annotations

import dataclasses
import json

import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import transformers
import yaml

from glmv_jax.config import ConfigError, GlmvConfig, from_hf_dict, load_config, to_hf_dict

PRESETS = ["tiny", "small", "glm41v_9b"]
LAYOUTS = ["5.x", "4.5x"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    config = load_config(name)
    assert isinstance(config, GlmvConfig)
    assert config.validate() is config
    assert config.vision.out_hidden_size == config.text.hidden_size
    assert sum(config.text.mrope_section) == config.text.rotary_dim // 2


def test_9b_numbers():
    config = load_config("glm41v_9b")
    t, v = config.text, config.vision
    assert (t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.rotary_dim) == (40, 32, 2, 128, 64)
    assert (t.hidden_size, t.intermediate_size, t.vocab_size) == (4096, 13696, 151552)
    assert t.mrope_section == (8, 12, 12)
    assert (v.depth, v.hidden_size, v.num_heads, v.head_dim, v.out_hidden_size) == (24, 1536, 12, 128, 4096)
    assert (v.patch_size, v.position_grid, v.patch_dim) == (14, 24, 3 * 2 * 14 * 14)
    assert config.image_token_id == 151343


def _write_yaml(tmp_path, data) -> str:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _tiny_dict() -> dict:
    return load_config("tiny").to_dict()


def test_yaml_file_loads(tmp_path):
    assert load_config(_write_yaml(tmp_path, _tiny_dict())) == load_config("tiny")


def test_unknown_yaml_key_is_named(tmp_path):
    data = _tiny_dict()
    data["text"]["hiden_size"] = 80
    with pytest.raises(ConfigError, match=r"text\.hiden_size"):
        load_config(_write_yaml(tmp_path, data))
    data = _tiny_dict()
    data["vison"] = {}
    with pytest.raises(ConfigError, match=r"vison"):
        load_config(_write_yaml(tmp_path, data))


def test_mrope_section_must_add_up():
    data = _tiny_dict()
    data["text"]["mrope_section"] = [1, 2, 3]  # rotary_dim / 2 = 5 for the tiny model
    with pytest.raises(ConfigError, match="mrope_section"):
        GlmvConfig.from_dict(data)
    data["text"]["mrope_section"] = [2, 3]
    with pytest.raises(ConfigError, match="mrope_section"):
        GlmvConfig.from_dict(data)


def test_vision_out_hidden_size_must_match_text():
    data = _tiny_dict()
    data["vision"]["out_hidden_size"] = 96
    with pytest.raises(ConfigError, match="out_hidden_size"):
        GlmvConfig.from_dict(data)


def test_heads_must_divide_hidden():
    data = _tiny_dict()
    data["text"]["num_heads"] = 3  # 80 / 3
    with pytest.raises(ConfigError, match=r"text\.num_heads"):
        GlmvConfig.from_dict(data)
    data = _tiny_dict()
    data["vision"]["num_heads"] = 5  # 48 / 5
    with pytest.raises(ConfigError, match=r"vision\.num_heads"):
        GlmvConfig.from_dict(data)
    data = _tiny_dict()
    data["text"]["num_kv_heads"] = 3  # 4 / 3
    with pytest.raises(ConfigError, match=r"text\.num_kv_heads"):
        GlmvConfig.from_dict(data)


def test_replace_validates():
    config = load_config("tiny")
    with pytest.raises(ConfigError, match="out_hidden_size"):
        config.replace(vision=dataclasses.replace(config.vision, out_hidden_size=64))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", PRESETS)
def test_hf_dict_round_trip(name, layout):
    config = load_config(name)
    data = to_hf_dict(config, layout=layout)
    assert from_hf_dict(json.loads(json.dumps(data))) == config
    assert ("rope_parameters" in data["text_config"]) == (layout == "5.x")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_reads_our_rope(layout):
    config = load_config("glm41v_9b")
    hf = transformers.Glm4vConfig.from_dict(to_hf_dict(config, layout=layout))
    rope = hf.text_config.rope_parameters  # transformers 5 folds rope_scaling / rope_theta / partial in here
    assert rope["partial_rotary_factor"] == 0.5
    assert list(rope["mrope_section"]) == [8, 12, 12]
    assert rope["rope_theta"] == 10000.0
    assert hf.text_config.num_hidden_layers == 40 and hf.text_config.num_key_value_heads == 2
    assert hf.vision_config.out_hidden_size == hf.text_config.hidden_size == 4096


def test_transformers_config_json_reads_back(tmp_path):
    """A config.json written by transformers itself (save_pretrained) reads back to the same config."""
    config = load_config("tiny")
    transformers.Glm4vConfig.from_dict(to_hf_dict(config)).save_pretrained(tmp_path)
    assert load_config(tmp_path) == config
    assert load_config(tmp_path / "config.json") == config


def test_other_architecture_is_rejected():
    data = to_hf_dict(load_config("tiny"))
    llama = dict(data, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="llama"):
        from_hf_dict(llama)
    with pytest.raises(ConfigError, match="Qwen2VLForConditionalGeneration"):
        from_hf_dict(dict(data, architectures=["Qwen2VLForConditionalGeneration"]))


def test_other_architecture_json_file_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096,
                                                      "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="llama"):
        load_config(tmp_path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unknown_text_config_key_is_rejected(layout):
    data = to_hf_dict(load_config("tiny"), layout=layout)
    data["text_config"]["hiden_size"] = 80
    with pytest.raises(ConfigError, match="hiden_size"):
        from_hf_dict(data)


def test_unknown_vision_and_top_level_keys_are_rejected():
    data = to_hf_dict(load_config("tiny"))
    data["vision_config"]["window_size"] = 112
    with pytest.raises(ConfigError, match="window_size"):
        from_hf_dict(data)
    data = to_hf_dict(load_config("tiny"))
    data["sliding_window"] = 4096
    with pytest.raises(ConfigError, match="sliding_window"):
        from_hf_dict(data)


def test_missing_preset_lists_presets():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_preset")
