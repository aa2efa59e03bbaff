"""The decoder's inference weights: one tree per layer (unrolled decode reads each in place), q, k and v fused.

`prepare(params)` turns model parameters into the weights `generate.sampler` runs on; the decoder layers
exist once in them, as per-layer trees instead of the training stack. Prepare once and reuse across calls
(evaluation, rollouts); with `donate=True` the stacked originals are deleted, so one copy of the decoder
weights is held while decoding (about 17 GB at 9B in bfloat16, instead of two).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmv_jax.model.decoder import unstack_layers


def fuse_qkv(layer: dict) -> dict:
    """One layer's parameters with the q, k and v projections as one "qkv" (kernel (hidden, H + 2K, D)):
    one matmul reads the three weights in a decode step instead of three."""
    projections = ("q", "k", "v")
    fused = {key: jnp.concatenate([layer[name][key] for name in projections], axis=-2) for key in ("kernel", "bias")}
    return {**{name: p for name, p in layer.items() if name not in projections}, "qkv": fused}


def _layers(stacked: dict) -> tuple[dict, ...]:
    return tuple(map(fuse_qkv, unstack_layers({"layers": stacked})))


_split = jax.jit(_layers)


def is_prepared(params: dict) -> bool:
    """Whether `params` are inference weights (`prepare`) rather than the model's stacked parameters."""
    return isinstance(params["decoder"]["layers"], tuple)


def prepare(params: dict, *, donate: bool = False) -> dict:
    """Model parameters -> inference weights: the same tree with params["decoder"]["layers"] (stacked, leading
    axis L) replaced by a tuple of L per-layer trees, q/k/v fused (`fuse_qkv`). Other arrays are shared.

    donate: delete the stacked layer arrays once split (the caller's too: they are consumed), so that only the
    per-layer weights remain (a donated buffer XLA cannot reuse for an output would stay alive). Weights
    already prepared are returned as they are.
    """
    if is_prepared(params):
        return params
    layers = _split(params["decoder"]["layers"])
    if donate:
        jax.block_until_ready(layers)
        for x in jax.tree.leaves(params["decoder"]["layers"]):
            x.delete()
    return {**params, "decoder": {**params["decoder"], "layers": layers}}


def without_layers(decoder: dict) -> dict:
    """The decoder's parameters but its layers (embedding, final norm, lm head)."""
    return {name: p for name, p in decoder.items() if name != "layers"}
