"""One mesh (data, fsdp, context, tensor), one table of logical-axis rules, and the shardings they give.

A leaf of the package: it imports nothing of glmv_jax but `errors`. Parameters carry logical axis names
from their creation (`ops/dense.py`, `model/`); `RULES` maps each name to mesh axes (the model turns them
into its parameters' shardings: `model.glmv.param_shardings`). Weights are sharded over `fsdp` and
`context` on their embed dim (so context-parallel devices do not each hold a full copy) and over `tensor`
by heads, MLP width and vocabulary.
Activations: batch over (data, fsdp), sequence over context, heads over tensor.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

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
    "visual_blocks": BATCH,          # the trainer's visual blocks: one per batch shard, placed with its rows
    "block_patches": ("context",),   # a block's pixel rows (flat) or frame rows (framed)
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
            raise MeshError(f"no sharding rule for logical axis {name!r}; add it to glmv_jax/sharding.py RULES")
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
    if not in_mesh():
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical))


def global_array(value: np.ndarray, sharding) -> jax.Array:
    """A global array from a host value every process holds in full (each keeps only its shards)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_batch(batch: dict[str, np.ndarray], mesh, specs: dict[str, Sequence[str | None]]) -> dict[str, jax.Array]:
    """Place a host batch on the mesh by logical specs, e.g. {"input_ids": ("batch", "length")}. Every process
    passes the whole batch (the same values) and keeps its devices' shards (`global_array`)."""
    out = {}
    for key, value in batch.items():
        pspec = spec(specs.get(key, (None,) * np.ndim(value)))
        check_divisible(mesh, np.shape(value), pspec, key)
        out[key] = global_array(value, NamedSharding(mesh, pspec))
    return out


def mesh_axes_in(axes: Sequence[str], mesh) -> tuple[str, ...]:
    """The subset of `axes` the mesh splits (size > 1)."""
    return tuple(a for a in axes if mesh.shape[a] > 1)


def mesh_size(axes: Sequence[str]) -> int:
    """How many ways the current mesh splits over `axes` (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in axes)


_UNSHARDED = contextvars.ContextVar("glmv_unsharded", default=False)


@contextlib.contextmanager
def unsharded():
    """Trace the model without mesh-aware ops (parameter creation), even under `jax.set_mesh`."""
    token = _UNSHARDED.set(True)
    try:
        yield
    finally:
        _UNSHARDED.reset(token)


def in_mesh() -> bool:
    """Whether model ops should shard over a current mesh."""
    return not _UNSHARDED.get() and not jax.sharding.get_abstract_mesh().empty
