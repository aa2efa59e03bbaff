"""One mesh (data, fsdp, context, tensor), one table of logical-axis rules, and the shardings they give.

Parameters carry logical axis names from their creation (`model/layers.py`); `RULES` maps each name
to mesh axes. Weights are sharded over `fsdp` and `context` on their embed dim (so context-parallel
devices do not each hold a full copy) and over `tensor` by heads, MLP width and vocabulary.
Activations: batch over (data, fsdp), sequence over context, heads over tensor.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from glmv_jax.errors import MeshError

AXES = ("data", "fsdp", "context", "tensor")
BATCH = ("data", "fsdp")

# logical name -> mesh axes (a tuple shards over their product; None replicates)
RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "embed": ("fsdp", "context"),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "embed_out": ("tensor",),
    "head_dim": None, "qkv": None, "stack": None, "layers": None, "patch": None, "positions": None,
    # activations
    "batch": BATCH,
    "length": ("context",),
    "patches": ("data", "fsdp", "context"),
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_vocab": ("tensor",),
}


def make_mesh(data: int = 1, fsdp: int = 1, context: int = 1, tensor: int = 1, *, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, context, tensor) mesh over `devices` (all devices by default), axes in Auto mode."""
    sizes = (data, fsdp, context, tensor)
    devices = jax.devices() if devices is None else list(devices)
    if any(s < 1 for s in sizes) or math.prod(sizes) != len(devices):
        raise MeshError(f"mesh data={data} x fsdp={fsdp} x context={context} x tensor={tensor} = "
                        f"{math.prod(sizes)} devices, but {len(devices)} are available")
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}; unknown axes are an error."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.isdigit():
            raise MeshError(f"bad mesh entry {part!r}: expected NAME=N with NAME in {', '.join(AXES)}")
        sizes[name] = int(value)
    return sizes


def spec(logical: Sequence[str | None]) -> P:
    """PartitionSpec of mesh axes for a tuple of logical names (unknown names raise)."""
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in RULES:
            raise MeshError(f"no sharding rule for logical axis {name!r}; add it to parallel/mesh.py RULES")
        axes = RULES[name]
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(mesh, shape: Sequence[int], pspec: P, what: str) -> None:
    """Raise MeshError naming `what` if a sharded dim does not divide by its mesh axes."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(pspec) + (None,) * len(shape))):
        n = axis_size(mesh, axes)
        if size % n:
            raise MeshError(f"{what}: dim {dim} of size {size} is sharded over {axes} = {n} devices, which does "
                            f"not divide it; choose a mesh whose {axes} size divides {size}")


def param_specs(config) -> Any:
    """The PartitionSpec of every parameter (mesh axes), from the model's logical axis names."""
    from glmv_jax.model.glmv import logical_axes

    return jax.tree.map(lambda logical: spec(tuple(logical)), logical_axes(config),
                        is_leaf=lambda x: isinstance(x, P))


def param_shardings(config, mesh) -> Any:
    """NamedShardings of every parameter; raises MeshError before any compile if a size does not divide."""
    from glmv_jax.model.glmv import init_params

    shapes = jax.eval_shape(lambda: init_params(config))
    specs = param_specs(config)

    def one(path, shape, pspec):
        check_divisible(mesh, shape.shape, pspec, "param " + "/".join(str(getattr(k, "key", k)) for k in path))
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(one, shapes, specs)


def check_model(config, mesh) -> None:
    """Every size the mesh splits (heads, KV heads, vocab, widths) divides; clear error otherwise."""
    t = mesh.shape["tensor"]
    for what, value in (("text num_heads", config.text.num_heads), ("text num_kv_heads", config.text.num_kv_heads),
                        ("vision num_heads", config.vision.num_heads), ("vocab_size", config.text.vocab_size)):
        if value % t:
            raise MeshError(f"{what} = {value} is not divisible by tensor = {t}")
    param_shardings(config, mesh)


def check_batch(mesh, batch: int, length: int | None = None) -> None:
    """Batch divides data x fsdp; the sequence divides 2 x context (load-balanced chunks)."""
    n = axis_size(mesh, BATCH)
    if batch % n:
        raise MeshError(f"batch size {batch} is not divisible by data x fsdp = {n}")
    c = mesh.shape["context"]
    if length is not None and c > 1 and length % (2 * c):
        raise MeshError(f"sequence length {length} is not divisible by 2 x context = {2 * c} "
                        "(context parallelism splits it into 2 x context balanced chunks)")


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the current mesh (`jax.set_mesh`); a no-op without one."""
    from glmv_jax.parallel.context import in_mesh
    if not in_mesh():
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical))


def shard_batch(batch: dict[str, np.ndarray], mesh, specs: dict[str, Sequence[str | None]]) -> dict[str, jax.Array]:
    """Place a host batch on the mesh by logical specs, e.g. {"input_ids": ("batch", "length")}."""
    out = {}
    for key, value in batch.items():
        pspec = spec(specs.get(key, (None,) * np.ndim(value)))
        check_divisible(mesh, np.shape(value), pspec, key)
        out[key] = jax.device_put(value, NamedSharding(mesh, pspec))
    return out
