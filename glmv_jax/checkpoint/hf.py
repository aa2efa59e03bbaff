"""Hugging Face GLM-4.1V checkpoints (config.json + safetensors) to our params and back.

Every HF tensor maps to one of our leaves by a table built from the config (`weight_map`). Dense
weights (out, in) become kernels (in, out) reshaped to our split dims (heads, head_dim, ...);
per-layer tensors are stacked on a leading layer axis for `nn.scan`. Files go through the
safetensors library (`safe_open`; bfloat16 through ml_dtypes), which checks the whole folder (config,
shards, headers, keys, shapes) before any weight is read; a corrupt or truncated file is a
CheckpointError. Loading then reads each device's block of each tensor by byte range, sliced before it is
transposed (checkpoint/slices.py), straight into the target shardings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, for safetensors' numpy arrays
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from glmv_jax.checkpoint import slices
from glmv_jax.config import GlmvConfig, from_hf_dict, to_hf_dict
from glmv_jax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")  # the dtypes we read


class Shard:
    """One .safetensors file, checked by the safetensors library (the untrusted header: size, JSON, dtypes,
    offsets covering the file exactly) before any data is touched; `shapes[key]` is each tensor's shape, and
    `file` reads blocks of rows by byte range (`slices.TensorFile`, no memory map kept)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="numpy") as checked:
                self.shapes: dict[str, tuple[int, ...]] = {}
                for key in checked.keys():
                    view = checked.get_slice(key)
                    if view.get_dtype() not in DTYPES:
                        raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {view.get_dtype()}, "
                                              f"expected one of {', '.join(DTYPES)}")
                    self.shapes[key] = tuple(view.get_shape())
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: not a valid safetensors file (corrupt or truncated?): {e}") from None
        self.file = slices.TensorFile(self.path)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor (or, with `layers`, one per layer: `key` holds `{i}`) and the leaf it fills."""

    path: tuple[str, ...]     # our params path
    key: str                  # HF name
    hf_shape: tuple[int, ...]  # per layer
    shape: tuple[int, ...]     # ours, per layer
    kind: str = "kernel"      # kernel | copy | downsample
    layers: int | None = None

    def to_hf(self, k: np.ndarray) -> np.ndarray:
        out = self.hf_shape[0]
        if self.kind == "kernel":
            return k.reshape(-1, out).T.reshape(self.hf_shape)
        if self.kind == "downsample":
            _, c, m, _ = self.hf_shape
            return k.T.reshape(out, m, m, c).transpose(0, 3, 1, 2)
        return k.reshape(self.hf_shape)


def weight_map(config: GlmvConfig) -> list[Tensor]:
    """Every tensor of the HF checkpoint with the leaf it maps to, in checkpoint order."""
    v, t = config.vision, config.text
    dv, do, hv, m = v.hidden_size, v.out_hidden_size, v.num_heads, v.spatial_merge_size
    d, h, kv, hd = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    out: list[Tensor] = []

    def add(path, key, hf_shape, shape, kind="kernel", layers=None):
        out.append(Tensor(tuple(path.split("/")), key, tuple(hf_shape), tuple(shape), kind, layers))

    vis, blk = "model.visual.", "model.visual.blocks.{i}."
    add("vision/patch_embed/kernel", vis + "patch_embed.proj.weight",
        (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), (v.patch_dim, dv))
    add("vision/patch_embed/bias", vis + "patch_embed.proj.bias", (dv,), (dv,), "copy")
    add("vision/post_conv_norm/scale", vis + "post_conv_layernorm.weight", (dv,), (dv,), "copy")
    add("vision/pos_embed", vis + "embeddings.position_embedding.weight", (v.position_grid ** 2, dv),
        (v.position_grid ** 2, dv), "copy")
    vl = v.depth
    add("vision/blocks/norm1/scale", blk + "norm1.weight", (dv,), (dv,), "copy", vl)
    add("vision/blocks/qkv/kernel", blk + "attn.qkv.weight", (3 * dv, dv), (dv, 3, hv, v.head_dim), layers=vl)
    if v.attention_bias:
        add("vision/blocks/qkv/bias", blk + "attn.qkv.bias", (3 * dv,), (3, hv, v.head_dim), "copy", vl)
    add("vision/blocks/proj/kernel", blk + "attn.proj.weight", (dv, dv), (hv, v.head_dim, dv), layers=vl)
    add("vision/blocks/norm2/scale", blk + "norm2.weight", (dv,), (dv,), "copy", vl)
    add("vision/blocks/mlp/gate/kernel", blk + "mlp.gate_proj.weight", (do, dv), (dv, do), layers=vl)
    add("vision/blocks/mlp/up/kernel", blk + "mlp.up_proj.weight", (do, dv), (dv, do), layers=vl)
    add("vision/blocks/mlp/down/kernel", blk + "mlp.down_proj.weight", (dv, do), (do, dv), layers=vl)
    add("vision/post_norm/scale", vis + "post_layernorm.weight", (dv,), (dv,), "copy")
    add("vision/downsample/kernel", vis + "downsample.weight", (do, dv, m, m), (m * m * dv, do), "downsample")
    add("vision/downsample/bias", vis + "downsample.bias", (do,), (do,), "copy")
    mi = v.intermediate_size
    add("projector/proj/kernel", vis + "merger.proj.weight", (do, do), (do, do))
    add("projector/norm/scale", vis + "merger.post_projection_norm.weight", (do,), (do,), "copy")
    add("projector/norm/bias", vis + "merger.post_projection_norm.bias", (do,), (do,), "copy")
    add("projector/mlp/gate/kernel", vis + "merger.gate_proj.weight", (mi, do), (do, mi))
    add("projector/mlp/up/kernel", vis + "merger.up_proj.weight", (mi, do), (do, mi))
    add("projector/mlp/down/kernel", vis + "merger.down_proj.weight", (do, mi), (mi, do))

    lm, lay, tl = "model.language_model.", "model.language_model.layers.{i}.", t.num_layers
    add("decoder/embed/embedding", lm + "embed_tokens.weight", (t.vocab_size, d), (t.vocab_size, d), "copy")
    add("decoder/layers/input_norm/scale", lay + "input_layernorm.weight", (d,), (d,), "copy", tl)
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
        add(f"decoder/layers/{name}/kernel", lay + f"self_attn.{name}_proj.weight", (heads * hd, d), (d, heads, hd),
            layers=tl)
        add(f"decoder/layers/{name}/bias", lay + f"self_attn.{name}_proj.bias", (heads * hd,), (heads, hd), "copy", tl)
    add("decoder/layers/o/kernel", lay + "self_attn.o_proj.weight", (d, h * hd), (h, hd, d), layers=tl)
    add("decoder/layers/post_attn_norm/scale", lay + "post_self_attn_layernorm.weight", (d,), (d,), "copy", tl)
    add("decoder/layers/pre_mlp_norm/scale", lay + "post_attention_layernorm.weight", (d,), (d,), "copy", tl)
    ti = t.intermediate_size
    add("decoder/layers/gate_up/kernel", lay + "mlp.gate_up_proj.weight", (2 * ti, d), (d, 2, ti), layers=tl)
    add("decoder/layers/down/kernel", lay + "mlp.down_proj.weight", (d, ti), (ti, d), layers=tl)
    add("decoder/layers/post_mlp_norm/scale", lay + "post_mlp_layernorm.weight", (d,), (d,), "copy", tl)
    add("decoder/norm/scale", lm + "norm.weight", (d,), (d,), "copy")
    if not config.tie_word_embeddings:
        add("decoder/lm_head/kernel", "lm_head.weight", (t.vocab_size, d), (d, t.vocab_size))
    return out


def _keys(entry: Tensor) -> list[str]:
    return [entry.key.format(i=i) for i in range(entry.layers)] if entry.layers else [entry.key]


def _open_folder(path: Path) -> dict[str, Shard]:
    """Map every tensor name to its (lazily read) file; missing shards fail here, before any weight is read."""
    if (path / INDEX_FILE).exists():
        index = json.loads((path / INDEX_FILE).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        if any(Path(n).name != n for n in names):
            raise CheckpointError(f"{path}: {INDEX_FILE} names shards outside the folder: {names}")
    elif (path / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = " (pickle checkpoints are never loaded: convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")
    located: dict[str, Shard] = {}
    for name in names:
        shard = Shard(path / name)
        located.update({key: shard for key in shard.shapes})
    return located


def read_hf_config(path: str | os.PathLike) -> GlmvConfig:
    """The model config of an HF folder (its config.json), before any weight is read."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    return from_hf_dict(json.loads((path / "config.json").read_text()))


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: Any = "float32", mesh=None,
                       shardings=None) -> tuple[GlmvConfig, dict]:
    """Read an HF GLM-4.1V folder into (config, params) with params in `dtype`.

    Everything is checked first (architecture, shards present, every key with the expected shape). Each
    leaf is then built block by block straight into its sharding (`_build`): `shardings` (a params
    tree of shardings, e.g. a run's `param_shardings`), or those of `model.glmv.param_shardings(config, mesh)`
    with a `mesh`, or the default device. Every local device's block is read on its own
    (`slices.read_block`: only the rows it needs, sliced before it is transposed, converted to `dtype` after
    slicing), so in a multi-process run each process reads only what its devices hold, and no process ever
    holds a whole sharded weight.
    """
    path = Path(path)
    config = read_hf_config(path)
    located = _open_folder(path)
    entries = weight_map(config)
    problems = []
    for entry in entries:
        for key in _keys(entry):
            if key not in located:
                problems.append(f"missing {key}")
            elif located[key].shapes[key] != entry.hf_shape:
                problems.append(f"{key} has shape {located[key].shapes[key]}, expected {entry.hf_shape}")
    expected = {key for entry in entries for key in _keys(entry)}
    problems += [f"unexpected {key}" for key in sorted(set(located) - expected)]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} problems)" if len(problems) > 10 else "")
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: {shown}")
    if shardings is None and mesh is not None:
        from glmv_jax.model.glmv import check_model, param_shardings
        check_model(config, mesh)
        shardings = param_shardings(config, mesh)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    dtype = jnp.dtype(dtype)
    params: dict = {}
    for entry in entries:
        keys = _keys(entry)
        shape = ((len(keys),) if entry.layers else ()) + entry.shape
        sharding = default if shardings is None else _get(shardings, entry.path)
        _set(params, entry.path, _build(shape, sharding, _reader(entry, keys, located, dtype)))
    return config, params


def _build(shape: tuple[int, ...], sharding, read) -> jax.Array:
    """The array `shape` placed as `sharding` says, each local device's block `read(index)` and put on its
    device before the next is read (`jax.make_array_from_callback` reads them all first: every block of a
    leaf in host memory at once, twice the leaf's bytes while they are copied)."""
    blocks = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        blocks.append(jax.device_put(np.ascontiguousarray(read(index)), device).block_until_ready())
    return jax.make_array_from_single_device_arrays(shape, sharding, blocks)


def _reader(entry: Tensor, keys: list[str], located: dict[str, Shard], dtype):
    """The callback of one leaf: block `index` (slices of the leaf) in `dtype`, filled layer by layer."""
    def read(index):
        index = slices.normalize(index, ((len(keys),) if entry.layers else ()) + entry.shape)
        if not entry.layers:
            return slices.read_block(located[keys[0]].file, keys[0], entry.kind, entry.shape, index, dtype)
        layers = range(len(keys))[index[0]]
        out = np.empty((len(layers),) + tuple(s.stop - s.start for s in index[1:]), dtype)
        for i, layer in enumerate(layers):
            out[i] = slices.read_block(located[keys[layer]].file, keys[layer], entry.kind, entry.shape, index[1:],
                                       dtype)
        return out

    return read


def save_hf_checkpoint(path: str | os.PathLike, config: GlmvConfig, params: dict, *,
                       max_shard_bytes: int = 5 << 30, layout: str = "5.x") -> None:
    """Write `config.json` and safetensors (sharded past `max_shard_bytes`) that transformers loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entries = weight_map(config)
    dtype = np.dtype(_get(params, entries[0].path).dtype)
    by_key: dict[str, tuple[Tensor, int | None]] = {}
    for entry in entries:
        leaf = _get(params, entry.path)
        want = ((entry.layers,) if entry.layers else ()) + entry.shape
        if tuple(leaf.shape) != want:
            raise CheckpointError(f"param {'/'.join(entry.path)} has shape {tuple(leaf.shape)}, expected {want}")
        for i, key in enumerate(_keys(entry)):
            by_key[key] = (entry, i if entry.layers else None)

    shards, current, size = [], [], 0
    for key, (entry, _) in by_key.items():
        nbytes = int(np.prod(entry.hf_shape)) * dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)

    def produce(key):
        entry, i = by_key[key]
        leaf = _get(params, entry.path)
        return entry.to_hf(np.asarray(leaf if i is None else leaf[i]).astype(dtype))

    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    for name, keys in zip(names, shards):  # one shard in memory at a time (at most max_shard_bytes)
        tmp = path / (name + ".tmp")
        save_file({key: np.ascontiguousarray(produce(key)) for key in keys}, tmp, metadata={"format": "pt"})
        tmp.replace(path / name)
    if len(shards) > 1:
        total = sum(int(np.prod(e.hf_shape)) * dtype.itemsize for e, _ in by_key.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    hf_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
    (path / "config.json").write_text(json.dumps(to_hf_dict(config, layout=layout, dtype=hf_dtype), indent=2))


def _get(tree: dict, path: tuple[str, ...]):
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            raise CheckpointError(f"params have no leaf {'/'.join(path)}")
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value
