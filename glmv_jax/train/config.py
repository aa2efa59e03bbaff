"""The training configuration: frozen dataclasses read from YAML, with `section.key=value` overrides.

Layout of a training YAML (every key optional except where noted; defaults below)::

    model: tiny                 # a preset name / YAML / config.json path (load_config), or an inline dict
                                # in the GlmvConfig.from_dict layout (vision: ..., text: ..., image_token_id: ...)
    data:
      source: synthetic         # synthetic | tfds | jsonl
      mode: caption             # caption (loss on the whole caption) | sft (loss on the reply; LLaVA-style
                                # "conversations" records are read as such)
      seq_len: 512              # tokens per packed row
      batch_size: 8             # GLOBAL rows per micro-batch (split over hosts); a step takes
                                # optimizer.accumulate micro-batches: global batch = batch_size x accumulate
      tokenizer: synthetic      # a tokenizer.json / sentencepiece .model (or a folder holding one), or
                                # "synthetic": a sentencepiece model trained here on the source's texts
      vocab_size: 1024          # upper bound of a tokenizer trained here
      n_train: 20000            # synthetic: examples per epoch; tfds/jsonl: at most this many (0 = all)
      n_eval: 64                # examples of the eval set (0 = no eval set)
      seed: 0                   # synthetic examples and the shuffle order
      data_dir: null            # tfds: the data_dir the dataset was prepared in
      name: synthetic_tasks     # tfds: dataset name (optionally name/config/version)
      path: null                # jsonl: the JSONL file (one example per line)
      image_root: ""            # jsonl: relative image paths are resolved against this folder
      min_pixels: 12544         # image processor budget (pixels of the 2-frame clip, as transformers)
      max_pixels: 9633792
      pixel_rows: 0             # fixed pixel_values rows of the global batch (0: the pipeline's shape buckets),
      max_images: 0             # and image_grid_thw rows (0: a power of two); split evenly over the visual
                                # blocks, one per data x fsdp shard (data/visual_layout); required (> 0) when
                                # several processes train, so every host pads to the same shapes
      shards: 0                 # data pipelines making up the global batch (0: one per host); the same value
                                # gives the same batches on any number of processes
      pack_buffer: 16           # look-ahead of the best-fit packer, in examples
      workers: 0                # grain worker processes (0: in-process with read threads)
    train:
      steps: 1000               # optimizer steps in total (a resumed run continues up to this)
      seed: 0                   # parameter init and the saved RNG key
      remat_policy: none        # none | full | dots
      scan_layers: true         # decoder layers in a scan (one compiled layer; compile time independent of
                                # depth) or unrolled (false: faster on CPU, 20% in bf16 for `small`)
      compute_dtype: float32    # float32 | bfloat16 (master params and optimizer state stay float32)
      log_every: 10             # one metrics.jsonl record / TensorBoard point every N steps (and the last)
      eval_every: 0             # eval loss every N steps and at the end (0: never)
      init_from: null           # params to start from: a previous workdir, an orbax folder
                                # (config.json + params/) or a Hugging Face folder
      compile_cache: null       # a folder for JAX's persistent compilation cache
    optimizer:                  # OptimizerConfig (glmv_jax/train/optimizer.py)
      learning_rate: 3.0e-4
      warmup_steps: 100
      total_steps: <train.steps>   # schedule length in updates
      end_learning_rate_ratio: 0.1
      b1: 0.9
      b2: 0.95
      eps: 1.0e-8
      weight_decay: 0.1
      clip_norm: 1.0
      accumulate: 1             # micro-batches per step, their gradients summed inside the compiled step
                                # (a lax.scan: one micro-batch's activations at a time); train.steps counts updates
      freeze: []                # parts left untouched: vision, projector, decoder
    checkpoint:
      every: 100                # save every N steps (and at the last step); asynchronous
      keep: 3                   # keep the last K
    mesh:                       # product = devices used; -1 = all remaining devices
      data: 1
      fsdp: 1
      context: 1
      tensor: 1

Unknown keys anywhere raise `ConfigError` naming the key (`train.stpes`) with a suggestion.

Tokenizer and model ids: the model's special-token ids must be the tokenizer's (glmv_jax/train/setup.py:
`model_for_tokenizer` takes them from a tokenizer trained here, `check_model_tokenizer` checks a given one).

An `rl:` section (RLCS; `glmv_jax.rl.config.RLConfig`) is known once glmv_jax.rl.config is imported: it
registers the section here (`register_section`), so this module imports nothing of rl/, and nothing of jax.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from glmv_jax.config import ConfigError, GlmvConfig, load_config
from glmv_jax.train.optimizer import OptimizerConfig
from glmv_jax.train.validate import build, choice, non_negative, positive, reject_unknown

SOURCES = ("synthetic", "tfds", "jsonl")
MODES = ("caption", "sft")
REMAT_POLICIES = ("none", "full", "dots")
COMPUTE_DTYPES = ("float32", "bfloat16")
SYNTHETIC_LEVELS = ("standard", "easy")                           # glmv_jax.data.synthetic.LEVELS
SYNTHETIC_DOMAINS = ("counting", "arithmetic", "ocr", "grounding")   # glmv_jax.data.synthetic.DOMAINS
# glmv_jax.ops.attention.CHOICES, named here: a config imports no jax
ATTENTION_IMPLS = ("auto", "cpu", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    mode: str = "caption"
    seq_len: int = 512
    batch_size: int = 8
    tokenizer: str = "synthetic"
    vocab_size: int = 1024
    n_train: int = 20000
    n_eval: int = 64
    seed: int = 0
    data_dir: str | None = None
    name: str = "synthetic_tasks"
    path: str | None = None
    image_root: str = ""
    min_pixels: int = 12544
    max_pixels: int = 9633792
    pixel_rows: int = 0
    max_images: int = 0
    frame_patches: int = 0    # > 0: framed pixel layout, max_images rows of this many patches (attention per image)
    pack_buffer: int = 16
    workers: int = 0
    shards: int = 0           # pipelines whose batches make the global batch (0: one per host's rows)
    level: str = "standard"   # synthetic: "standard" or "easy" (`synthetic.make_example`)
    domains: tuple[str, ...] = ()   # synthetic: the task families, round robin (empty: all four)

    def validate(self) -> None:
        choice("data.source", self.source, SOURCES)
        choice("data.mode", self.mode, MODES)
        choice("data.level", self.level, SYNTHETIC_LEVELS)
        for domain in self.domains:
            choice("data.domains", domain, SYNTHETIC_DOMAINS)
        positive("data", self, "seq_len", "batch_size", "vocab_size", "min_pixels", "max_pixels", "pack_buffer")
        non_negative("data", self, "n_train", "n_eval", "pixel_rows", "max_images", "workers", "frame_patches",
                     "shards")
        if self.frame_patches and not self.max_images:
            raise ConfigError("data.frame_patches needs data.max_images (the number of frame rows)")
        if self.source == "synthetic" and self.n_train < 1:
            raise ConfigError("data.n_train must be positive for the synthetic source")
        if self.source == "tfds" and not self.data_dir:
            raise ConfigError("data.source = tfds needs data.data_dir (where the dataset was prepared)")
        if self.source == "jsonl" and not self.path:
            raise ConfigError("data.source = jsonl needs data.path (the JSONL file)")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"data.min_pixels = {self.min_pixels} > data.max_pixels = {self.max_pixels}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    seed: int = 0
    remat_policy: str = "none"
    scan_layers: bool = True
    compute_dtype: str = "float32"
    attention_impl: str = "auto"  # "cpu" | "xla" | "cudnn" (GPU) | "splash"; "auto": from the backend (glmv_jax.ops.attention)
    log_every: int = 10
    eval_every: int = 0
    init_from: str | None = None
    compile_cache: str | None = None

    def validate(self) -> None:
        positive("train", self, "steps", "log_every")
        non_negative("train", self, "eval_every")
        choice("train.remat_policy", self.remat_policy, REMAT_POLICIES)
        choice("train.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        choice("train.attention_impl", self.attention_impl, ATTENTION_IMPLS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3

    def validate(self) -> None:
        positive("checkpoint", self, "every", "keep")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        for name, value in sizes.items():
            if value != -1 and value < 1:
                raise ConfigError(f"mesh.{name} = {value} must be a positive integer or -1 (the remaining devices)")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("at most one mesh axis may be -1 (the remaining devices)")

    def sizes(self, device_count: int) -> dict[str, int]:
        """Axis sizes with a -1 resolved against `device_count`."""
        sizes = dataclasses.asdict(self)
        fixed = math.prod(v for v in sizes.values() if v != -1)
        for name, value in sizes.items():
            if value == -1:
                if device_count % fixed:
                    raise ConfigError(f"mesh.{name} = -1: {device_count} devices do not divide by the other axes' "
                                      f"product {fixed}")
                sizes[name] = device_count // fixed
        return sizes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: Any = "tiny"   # a preset name / path (str) or an inline model dict
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    rl: Any = None        # an RLConfig (glmv_jax/rl/config.py) when the YAML has an `rl:` section: an RLCS run

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optimizer"]["freeze"] = list(self.optimizer.freeze)
        out["data"]["domains"] = list(self.data.domains)
        if self.rl is None:
            out.pop("rl")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def base_model(self) -> GlmvConfig:
        """The model config as written (before tokenizer-derived ids; see `setup.model_for_tokenizer`)."""
        if isinstance(self.model, str):
            return load_config(self.model)
        try:
            return GlmvConfig.from_dict(self.model)
        except ConfigError as e:
            message = str(e)
            lead = "unknown config key(s) "
            if message.startswith(lead):  # name the keys from the top: model.text.foo
                keys, _, rest = message[len(lead):].partition(";")
                message = lead + ", ".join(f"model.{k.strip()}" for k in keys.split(",")) + ";" + rest
            raise ConfigError(f"model: {message}") from None


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainSection, "optimizer": OptimizerConfig,
                             "checkpoint": CheckpointConfig, "mesh": MeshConfig}
# Sections a YAML may hold beyond SECTIONS, each registered by the module that owns its dataclass (`rl`: by
# glmv_jax.rl.config, so that this module imports nothing of rl/); built only when present.
OPTIONAL_SECTIONS: dict[str, type] = {}
OWNERS = {"rl": "glmv_jax.rl.config"}   # who registers a section, for the error when it is not registered


def register_section(name: str, cls: type) -> None:
    """Let training YAMLs hold a `name:` section read into the frozen dataclass `cls` (its `validate()` runs)."""
    if name in SECTIONS or name == "model" or name not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise ValueError(f"{name!r} is not an optional section of TrainConfig")
    OPTIONAL_SECTIONS[name] = cls


def _section_class(name: str) -> type:
    if name in SECTIONS:
        return SECTIONS[name]
    if name not in OPTIONAL_SECTIONS:
        raise ConfigError(f"a config with an `{name}:` section is read through {OWNERS[name]} (import it first, "
                          f"or use its loader)")
    return OPTIONAL_SECTIONS[name]


# --------------------------------------------------------------------------------------------- building
def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from the YAML layout; unknown keys raise `ConfigError` naming them."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(raw).__name__}")
    reject_unknown(raw, ("model", *SECTIONS, *OWNERS), "")
    model = raw.get("model", "tiny")
    if not isinstance(model, (str, dict)):
        raise ConfigError(f"model must be a preset name, a path or a mapping, got {model!r}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name} must be a mapping, got {values!r}")
        sections[name] = build(cls, values, name)
    if "total_steps" not in (raw.get("optimizer") or {}):  # the schedule's length: train.steps updates
        sections["optimizer"] = dataclasses.replace(sections["optimizer"], total_steps=sections["train"].steps)
    for name in OWNERS:
        if raw.get(name) is not None:
            if not isinstance(raw[name], dict):
                raise ConfigError(f"{name} must be a mapping, got {raw[name]!r}")
            sections[name] = build(_section_class(name), raw[name], name)
    cfg = TrainConfig(model=model, **sections)
    for section in sections.values():
        if hasattr(section, "validate"):
            section.validate()
    _validate_optimizer(cfg.optimizer)
    cfg.base_model()  # model keys are checked here, with their names
    return cfg


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training config at {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a training config must be a mapping")
    return from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`["train.steps=300", "mesh.data=2", "model.text.num_layers=2"]` applied to a copy of `raw`."""
    import copy

    raw = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.steps=300)")
        value = yaml.safe_load(text) if text.strip() else None
        parts = key.split(".")
        top = parts[0]
        reject_unknown({top: None}, ("model", *SECTIONS, *OWNERS), "", what=f"override {item!r}: ")
        if top == "model":
            if len(parts) == 1:
                raw["model"] = value
                continue
            model = raw.get("model", "tiny")
            if isinstance(model, str):  # a preset: override its fields inline
                model = load_config(model).to_dict()
            node = model
            for part in parts[1:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {item!r}: unknown model key {'.'.join(parts[:parts.index(part) + 1])}")
                node = node[part]
            node[parts[-1]] = value  # unknown leaf names are reported by GlmvConfig.from_dict
            raw["model"] = model
            continue
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: expected section.key=value with section in "
                              f"{', '.join(SECTIONS)} (e.g. train.steps=300)")
        names = [f.name for f in dataclasses.fields(_section_class(top))]
        reject_unknown({parts[1]: None}, names, top, what=f"override {item!r}: ")
        section = raw.get(top) or {}
        section[parts[1]] = value
        raw[top] = section
    return raw


def _validate_optimizer(opt: OptimizerConfig) -> None:
    for name in ("warmup_steps", "total_steps"):
        if getattr(opt, name) < 0:
            raise ConfigError(f"optimizer.{name} = {getattr(opt, name)} must not be negative")
    if opt.accumulate < 1:
        raise ConfigError(f"optimizer.accumulate = {opt.accumulate} must be at least 1")
    unknown = set(opt.freeze) - {"vision", "projector", "decoder"}
    if unknown:
        raise ConfigError(f"optimizer.freeze names unknown parts {sorted(unknown)}; parts: decoder, projector, vision")


__all__ = ["CheckpointConfig", "DataConfig", "MeshConfig", "TrainConfig", "TrainSection",
           "apply_overrides", "from_dict", "load_train_config", "register_section"]
