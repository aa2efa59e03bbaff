"""Model configuration: frozen dataclasses, YAML presets and Hugging Face `config.json` in and out.

`GlmvConfig` is hashable, so it can be a static argument of `jax.jit`. Every way of building one
(`from_dict`, YAML presets, HF `config.json` in the transformers 4.5x or 5.x layout) ends in
`validate()`, which names the offending field when sizes are inconsistent.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glmv_jax.errors import ConfigError

# Model presets (tiny, small, glm41v_9b) ship inside the package (package data), so any install finds them;
# presets/demo/ holds the run configs of `glmv demo`. The repository's configs/ holds run configs to copy.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class VisionConfig:
    """The ViT: 3D-conv patches, bicubic-resampled learned positions, 2D RoPE blocks, 2x2 downsample.

    `intermediate_size` is the width of the projector (merger) SwiGLU only; the blocks' MLP width
    is `out_hidden_size`, exactly as in the reference.
    """

    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    intermediate_size: int = 13696
    out_hidden_size: int = 4096
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    image_size: int = 336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def position_grid(self) -> int:
        """Side of the learned position table (24 for the 9B model)."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        _positive(self, "depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                  "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels", "image_size")
        _divides(self, "num_heads", "hidden_size")
        if self.head_dim % 4:
            raise ConfigError(f"vision.hidden_size / vision.num_heads = {self.head_dim} must be a multiple "
                              "of 4 (the 2D RoPE splits each head into h and w halves of cos/sin pairs)")
        _divides(self, "patch_size", "image_size")


@dataclass(frozen=True)
class TextConfig:
    """The GLM-4 decoder: sandwich RMSNorms, GQA with q/k/v biases, partial interleaved 3D M-RoPE."""

    vocab_size: int = 151552
    hidden_size: int = 4096
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2
    intermediate_size: int = 13696
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, ...] = (8, 12, 12)
    max_position_embeddings: int = 32768
    pad_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that are rotated (64 of 128 for the 9B model)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size")
        _divides(self, "num_heads", "hidden_size")
        _divides(self, "num_kv_heads", "num_heads")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"text.partial_rotary_factor = {self.partial_rotary_factor} must be in (0, 1]")
        if self.rotary_dim % 2:
            raise ConfigError(f"text rotary dim head_dim * partial_rotary_factor = {self.rotary_dim} must be even")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.rotary_dim // 2:
            raise ConfigError(
                f"text.mrope_section = {list(self.mrope_section)} must have 3 entries (t, h, w) adding up to "
                f"rotary_dim / 2 = {self.rotary_dim // 2} (head_dim {self.head_dim} x partial_rotary_factor "
                f"{self.partial_rotary_factor} / 2)")


@dataclass(frozen=True)
class GlmvConfig:
    """The whole model: vision tower + projector + decoder, and the special token ids it reads."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False

    def validate(self) -> "GlmvConfig":
        self.vision.validate()
        self.text.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(f"vision.out_hidden_size = {self.vision.out_hidden_size} must equal "
                              f"text.hidden_size = {self.text.hidden_size} (visual tokens enter the decoder)")
        for name in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                     "video_start_token_id", "video_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name} = {value} is outside the vocabulary [0, {self.text.vocab_size})")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["text"]["mrope_section"] = list(self.text.mrope_section)
        out["text"]["eos_token_id"] = list(self.text.eos_token_id)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GlmvConfig":
        """Build from a nested dict (the YAML layout); unknown keys raise `ConfigError`."""
        data = dict(data)
        vision = _build(VisionConfig, data.pop("vision", {}), "vision")
        text = _build(TextConfig, data.pop("text", {}), "text")
        return _build(cls, data, "", vision=vision, text=text).validate()

    def replace(self, **changes: Any) -> "GlmvConfig":
        return dataclasses.replace(self, **changes).validate()


def _build(cls, data: dict[str, Any], where: str, **extra: Any):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if f.name in _TUPLE_FIELDS:
                if f.name == "eos_token_id" and isinstance(value, int):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"{where}.{f.name} must be a list, got {value!r}")
                value = tuple(value)
            values[f.name] = value
    return cls(**values, **extra)


_TUPLE_FIELDS = {"mrope_section", "eos_token_id"}


def _positive(cfg, *names: str) -> None:
    prefix = "vision" if isinstance(cfg, VisionConfig) else "text"
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{prefix}.{name} = {value!r} must be a positive integer")


def _divides(cfg, divisor: str, dividend: str) -> None:
    prefix = "vision" if isinstance(cfg, VisionConfig) else "text"
    a, b = getattr(cfg, divisor), getattr(cfg, dividend)
    if b % a:
        raise ConfigError(f"{prefix}.{divisor} = {a} does not divide {prefix}.{dividend} = {b}")


# ---------------------------------------------------------------------------------------------
# Loading: preset names, YAML files, HF folders / config.json
# ---------------------------------------------------------------------------------------------

def load_config(name_or_path: str | os.PathLike) -> GlmvConfig:
    """A preset name (`tiny`, `small`, `glm41v_9b`), a YAML file, an HF `config.json` or a folder holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (PRESET_DIR / f"{name_or_path}.yaml").is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config at {name_or_path!r}; presets: {', '.join(presets)}")
    if path.suffix == ".json":
        return from_hf_dict(json.loads(path.read_text()))
    data = yaml.safe_load(path.read_text()) or {}
    if "model" in data and isinstance(data["model"], dict):  # a training config embeds the model
        data = data["model"]
    return GlmvConfig.from_dict(data)


# Keys every transformers PreTrainedConfig may carry; they do not describe the model's math.
_HF_GENERIC_KEYS = {
    "architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "transformers_version", "_name_or_path", "model_type", "initializer_range", "use_cache",
    "attention_dropout", "hidden_act", "bos_token_id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "tie_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "pruned_heads", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "_attn_implementation_autoset", "attention_bias",
    "layer_types", "num_labels", "pad_token_id", "eos_token_id",
}
_HF_ARCHITECTURES = {"Glm4vForConditionalGeneration", "Glm4vModel"}


def from_hf_dict(data: dict[str, Any]) -> GlmvConfig:
    """Read an HF GLM-4.1V `config.json` (transformers 4.5x `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = data.get("model_type")
    archs = set(data.get("architectures") or [])
    if model_type != "glm4v" or (archs and not archs & _HF_ARCHITECTURES):
        raise ConfigError(f"config.json describes model_type={model_type!r}, architectures={sorted(archs)}; "
                          "glmv-jax reads only GLM-4.1V (model_type 'glm4v', Glm4vForConditionalGeneration)")
    top = dict(data)
    text = dict(top.pop("text_config", None) or {})
    vision = dict(top.pop("vision_config", None) or {})
    # 4.5x keeps a few text fields at the top level as well; they must agree with text_config.
    for key in ("rope_theta", "partial_rotary_factor", "rope_scaling", "vocab_size", "hidden_size",
                "rms_norm_eps", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "max_position_embeddings"):
        if key in top:
            value = top.pop(key)
            text.setdefault(key, value)
    tokens = {k: top.pop(k) for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                      "image_end_token_id", "video_start_token_id", "video_end_token_id",
                                      "tie_word_embeddings") if k in top}
    _reject_unknown(top, "config.json", set())
    return GlmvConfig(vision=_vision_from_hf(vision), text=_text_from_hf(text),
                      **tokens).validate()


def _reject_unknown(data: dict[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(data) - known - _HF_GENERIC_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"text_config rope type {rope_type!r} is not supported (only 'default' M-RoPE)")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    section = rope.get("mrope_section", (8, 12, 12))
    if d.get("head_dim") not in (None, d.get("hidden_size", 4096) // d.get("num_attention_heads", 32)):
        raise ConfigError(f"text_config.head_dim = {d['head_dim']} differs from hidden_size / num_attention_heads; "
                          "the reference ignores head_dim, so such a checkpoint would not load there")
    known = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "rope_parameters",
             "rope_scaling", "max_position_embeddings", "head_dim", "image_token_id", "video_token_id"}
    _reject_unknown(d, "text_config", known)
    eos = d.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    kv = d.get("num_key_value_heads") or d.get("num_attention_heads", 32)
    return TextConfig(
        vocab_size=d.get("vocab_size", 151552), hidden_size=d.get("hidden_size", 4096),
        num_layers=d.get("num_hidden_layers", 40), num_heads=d.get("num_attention_heads", 32),
        num_kv_heads=kv, intermediate_size=d.get("intermediate_size", 13696),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
        partial_rotary_factor=float(partial), mrope_section=tuple(section),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        pad_token_id=d.get("pad_token_id"), eos_token_id=eos)


def _vision_from_hf(d: dict[str, Any]) -> VisionConfig:
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"vision_config rope type {rope.get('rope_type')!r} is not supported (only 'axial')")
    known = {"depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
             "temporal_patch_size", "spatial_merge_size", "in_channels", "image_size", "rms_norm_eps",
             "rope_parameters", "num_hidden_layers", "num_attention_heads"}
    _reject_unknown(d, "vision_config", known)
    for key in ("patch_size", "image_size", "temporal_patch_size"):
        if isinstance(d.get(key), (list, tuple)):
            if len(set(d[key])) != 1:
                raise ConfigError(f"vision_config.{key} = {d[key]}: only square sizes are supported")
            d[key] = d[key][0]
    return VisionConfig(
        depth=d.get("depth", d.get("num_hidden_layers", 24)), hidden_size=d.get("hidden_size", 1536),
        num_heads=d.get("num_heads", d.get("num_attention_heads", 12)),
        intermediate_size=d.get("intermediate_size", 13696), out_hidden_size=d.get("out_hidden_size", 4096),
        patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
        spatial_merge_size=d.get("spatial_merge_size", 2), in_channels=d.get("in_channels", 3),
        image_size=d.get("image_size", 336), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", 10000.0)), attention_bias=bool(d.get("attention_bias", False)))


def to_hf_dict(config: GlmvConfig, *, layout: str = "5.x", dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` that transformers loads; `layout` is "5.x" (`rope_parameters`) or "4.5x"."""
    if layout not in ("5.x", "4.5x"):
        raise ConfigError(f"layout must be '5.x' or '4.5x', got {layout!r}")
    v, t = config.vision, config.text
    text = {
        "model_type": "glm4v_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "intermediate_size": t.intermediate_size,
        "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "attention_dropout": 0.0,
        "pad_token_id": t.pad_token_id, "dtype": dtype,
    }
    if t.eos_token_id:
        text["eos_token_id"] = list(t.eos_token_id)
    if layout == "5.x":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": t.rope_theta,
                                   "partial_rotary_factor": t.partial_rotary_factor,
                                   "mrope_section": list(t.mrope_section)}
    else:
        text.update(rope_theta=t.rope_theta, partial_rotary_factor=t.partial_rotary_factor,
                    rope_scaling={"type": "default", "rope_type": "default",
                                  "mrope_section": list(t.mrope_section)})
        text["torch_dtype"] = text.pop("dtype")
    vision = {
        "model_type": "glm4v_vision", "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size, "out_hidden_size": v.out_hidden_size,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels, "image_size": v.image_size,
        "rms_norm_eps": v.rms_norm_eps, "hidden_act": "silu", "attention_bias": v.attention_bias,
    }
    if layout == "5.x":
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
    out = {
        "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v",
        "text_config": text, "vision_config": vision,
        "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
        "image_start_token_id": config.image_start_token_id, "image_end_token_id": config.image_end_token_id,
        "video_start_token_id": config.video_start_token_id, "video_end_token_id": config.video_end_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        ("dtype" if layout == "5.x" else "torch_dtype"): dtype,
        "transformers_version": "5.23.0" if layout == "5.x" else "4.57.1",
    }
    return out
