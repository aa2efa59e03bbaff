"""The decoder's inference weights: one tree per layer (unrolled decode reads each in place), q, k and v fused.

`prepare(params)` turns model parameters into the weights `generate.sampler` runs on; the decoder layers
exist once in them, as per-layer trees instead of the training stack. Prepare once and reuse across calls
(evaluation, rollouts); with `donate=True` the stacked originals are deleted, so one copy of the decoder
weights is held while decoding (about 17 GB at 9B in bfloat16, instead of two).

On a mesh (`prepare(params, mesh=mesh, config=config)`) the weights are laid out for decoding: split over
`tensor` as the trainer splits them (heads, KV heads, MLP width, vocabulary) but whole on their embed dim
(`inference_spec`), so a decode step gathers no weight over `fsdp`; q, k and v stay separate when `tensor`
splits them (a fused qkv would concatenate differently sharded heads).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.model.decoder import unstack_layers


def fuse_qkv(layer: dict) -> dict:
    """One layer's parameters with the q, k and v projections as one "qkv" (kernel (hidden, H + 2K, D)):
    one matmul reads the three weights in a decode step instead of three."""
    projections = ("q", "k", "v")
    fused = {key: jnp.concatenate([layer[name][key] for name in projections], axis=-2) for key in ("kernel", "bias")}
    return {**{name: p for name, p in layer.items() if name not in projections}, "qkv": fused}


def _layers(stacked: dict, fuse: bool = True) -> tuple[dict, ...]:
    layers = unstack_layers({"layers": stacked})
    return tuple(map(fuse_qkv, layers)) if fuse else layers


_split = jax.jit(_layers, static_argnums=1)


def is_prepared(params: dict) -> bool:
    """Whether `params` are inference weights (`prepare`) rather than the model's stacked parameters."""
    return isinstance(params["decoder"]["layers"], tuple)


def inference_spec(spec: P) -> P:
    """A parameter's training PartitionSpec with every mesh axis but `tensor` dropped (and its layer axis kept):
    at inference the weights are split by heads / MLP width / vocabulary only."""
    def keep(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a == "tensor")
        return kept[0] if len(kept) == 1 else (kept or None)
    return P(*(keep(a) for a in spec))


def inference_shardings(config, mesh, *, fuse: bool):
    """NamedShardings of `prepare(params, mesh=mesh)`'s output tree: `inference_spec` of each parameter, the
    decoder layers as a tuple of per-layer trees (the stack axis dropped; q/k/v fused if `fuse`)."""
    from glmv_jax.model.glmv import param_specs

    specs = jax.tree.map(inference_spec, param_specs(config), is_leaf=lambda x: isinstance(x, P))
    layer = jax.tree.map(lambda s: P(*tuple(s)[1:]), specs["decoder"]["layers"], is_leaf=lambda x: isinstance(x, P))
    if fuse:
        layer = {**{k: v for k, v in layer.items() if k not in ("q", "k", "v")}, "qkv": layer["q"]}
    specs = {**specs, "decoder": {**specs["decoder"], "layers": (layer,) * config.text.num_layers}}
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def prepare(params: dict, *, donate: bool = False, mesh=None, config=None, dtype=None) -> dict:
    """Model parameters -> inference weights: the same tree with params["decoder"]["layers"] (stacked, leading
    axis L) replaced by a tuple of L per-layer trees, q/k/v fused (`fuse_qkv`). Other arrays are shared.

    mesh (with `config`): the weights placed as `inference_shardings` say (q/k/v fused only if the mesh's
    `tensor` is 1). dtype: cast to it (e.g. bfloat16 rollouts of float32 master weights).
    donate: delete the stacked layer arrays once split (the caller's too: they are consumed), so that only the
    per-layer weights remain (a donated buffer XLA cannot reuse for an output would stay alive). Weights
    already prepared are returned as they are.
    """
    if is_prepared(params):
        return params
    fuse = _fuses(mesh)
    stacked, rest = params["decoder"]["layers"], _without_stack(params)
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))  # noqa: E731
    if mesh is None:
        layers = _split(jax.tree.map(cast, stacked), fuse)
        rest = jax.tree.map(cast, rest)
    else:
        if config is None:
            raise ValueError("prepare(mesh=...) needs the model config")
        shardings = inference_shardings(config, mesh, fuse=fuse)
        layers = jax.jit(lambda s: _layers(jax.tree.map(cast, s), fuse),
                         out_shardings=shardings["decoder"]["layers"])(stacked)
        rest = jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=_without_stack(shardings))(rest)
    if donate:
        jax.block_until_ready(layers)
        for x in jax.tree.leaves(stacked):
            x.delete()
    return {**rest, "decoder": {**rest["decoder"], "layers": layers}}


def prepared_shapes(abstract_params: dict, *, mesh, config, dtype=None) -> dict:
    """ShapeDtypeStructs, with their shardings, of `prepare(params, mesh=mesh, config=config, dtype=dtype)` for
    the abstract `params` (no array allocated: `glmv plan`)."""
    shapes = jax.eval_shape(functools.partial(prepare, mesh=mesh, config=config, dtype=dtype), abstract_params)
    shardings = inference_shardings(config, mesh, fuse=_fuses(mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _fuses(mesh) -> bool:
    """Whether q, k and v are fused: not when `tensor` splits their heads differently."""
    return mesh is None or mesh.shape["tensor"] == 1


def _without_stack(tree: dict) -> dict:
    return {**tree, "decoder": without_layers(tree["decoder"])}


def without_layers(decoder: dict) -> dict:
    """The decoder's parameters but its layers (embedding, final norm, lm head)."""
    return {name: p for name, p in decoder.items() if name != "layers"}
