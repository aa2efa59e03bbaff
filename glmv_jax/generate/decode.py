"""The decoder at inference: the prompt through per-layer weights (prefill), then one token at a time
against per-layer KV caches (`decode_step`); no step copies a layer's weights or cache out of a stack.

`InferenceLayer` is the model's `DecoderLayer` (its norms, projections, MLP and `block`) on the inference
weights of `generate.weights` (q, k, v fused) and, when given caches, with the KV-cache attention of
`generate.kv_cache` instead of self-attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmv_jax.generate.kv_cache import cached_attention, write_cache
from glmv_jax.generate.weights import without_layers
from glmv_jax.model import rope
from glmv_jax.model.decoder import Decoder, DecoderLayer, run_layers
from glmv_jax.ops.dense import dense
from glmv_jax.sharding import constrain


class InferenceLayer(DecoderLayer):
    """`DecoderLayer` with one "qkv" projection (`weights.fuse_qkv`): one matmul a step instead of three
    (`fused`; on a mesh that splits heads over `tensor`, q, k and v stay separate, as in `DecoderLayer`).

    Without `kv`: self-attention over the prompt, as `DecoderLayer`; returns (x, (k, v)) with k, v (B, T, K, D).
    With `kv` = this layer's caches (keys (B*K, D, S), values (B*K, S, D): `kv_cache.cache_layout`) and one new
    token (T = 1): writes its key and value at slot `kv_meta["write_pos"]`, attends to the valid slots
    (`kv_meta["segment"]` (B, S) != 0, the new one included) and returns (x, the written caches).
    """

    fused: bool = True

    def setup(self):
        super().setup()
        cfg = self.config
        self.qkv = dense((cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                         use_bias=True, param_dtype=self.param_dtype)

    def project(self, y):
        if not self.fused:
            return super().project(y)
        h, kv_h = self.config.num_heads, self.config.num_kv_heads
        return jnp.split(self.qkv(y), (h, h + kv_h), axis=-2)

    def __call__(self, x, cos, sin, segment, index, kv_meta=None, kv=None):
        if kv is None:
            return super().__call__(x, cos, sin, segment, index)

        def attend_cache(q, k, v):
            k, v = write_cache(kv, k, v, kv_meta["write_pos"])
            return cached_attention(q, k, v, kv_meta["segment"] != 0), (k, v)

        return self.block(x, cos, sin, attend_cache)


def _layer(decoder: Decoder, weights: dict) -> InferenceLayer:
    fused = "qkv" in weights["layers"][0]
    return InferenceLayer(decoder.config, decoder.param_dtype, decoder.attention_impl, fused=fused, parent=None)


def prefill_hidden(decoder: Decoder, weights: dict, x: jax.Array, position_ids: jax.Array, segment: jax.Array,
                   index: jax.Array | None) -> tuple[jax.Array, tuple]:
    """`Decoder.hidden` over the inference weights (`weights` = the decoder's part of `weights.prepare`), layers
    unrolled. Returns the final-norm hidden (B, T, hidden) and one (k, v) pair (B, T, K, D) per layer."""
    cos, sin = rope.text_cos_sin(position_ids, decoder.config, x.dtype)
    x, kv = run_layers(_layer(decoder, weights), weights["layers"], x, (cos, sin, segment, index))
    return decoder.apply({"params": without_layers(weights)}, x, method=lambda m, h: m.norm(h)), kv


def decode_step(decoder: Decoder, weights: dict, token: jax.Array, position_ids: jax.Array, kv: tuple,
                kv_meta: dict) -> tuple[jax.Array, tuple]:
    """One new token per row through the decoder, its layers unrolled over per-layer weights and caches.

    weights: the decoder's part of `weights.prepare`; token (B,); position_ids (3, B, 1); kv: one (k, v) pair
    of caches per layer in `cache_layout`; kv_meta: "segment" (B, S) (0 = empty slot) and "write_pos" (the new
    token's slot). Returns logits (B, vocab) in the parameters' dtype and the caches with the new K/V written
    at write_pos (in place when donated; kv_meta["segment"] must already mark write_pos as filled).
    """
    b, at = token.shape[0], kv_meta["write_pos"]
    top = {"params": without_layers(weights)}
    x = decoder.apply(top, token[:, None], method=Decoder.embed_tokens)
    cos, sin = rope.text_cos_sin(position_ids, decoder.config, x.dtype)
    x, written = run_layers(_layer(decoder, weights), weights["layers"], x,
                            (cos, sin, jnp.ones((b, 1), jnp.int32), jnp.full((b, 1), at), kv_meta), caches=kv)
    # logits split over the vocabulary as the lm head is (not the head gathered whole): the caller gathers them
    return constrain(decoder.apply(top, x[:, 0], method=Decoder.head), ("batch", "act_vocab")), written
