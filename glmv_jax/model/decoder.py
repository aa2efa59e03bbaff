"""The GLM-4 decoder: token embedding, a stack of sandwich-norm layers, final norm, lm head.

The layers run in a scan over their stacked parameters, or unrolled over a split of them (`scan_layers`).
Inference (per-layer fused weights, the KV cache) builds on `DecoderLayer` in `glmv_jax.generate`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.config import TextConfig
from glmv_jax.model import rope
from glmv_jax.model.layers import RMSNorm
from glmv_jax.ops.attention import attention
from glmv_jax.ops.context import sharded_attention
from glmv_jax.ops.dense import DENSE_OUTPUT, EMBED_INIT, dense
from glmv_jax.ops.swiglu import swiglu
from glmv_jax.sharding import constrain, in_mesh, mesh_size


def attend(q, k, v, *, segment, index, impl: str | None = None):
    """Causal decoder self-attention: sharded over the current mesh if there is one, else local.

    index (B, T): each token's place in the causal order, or None for the column order (then the "cpu"
    attention skips the key blocks past each query block). Under a mesh the tokens are in the load-balanced
    order of `token_inputs` when `index` is given (the sharded attention then skips the key blocks each device's
    queries cannot see; with index None and context > 1, the column order, every key is computed).
    impl: the attention implementation (`ops.attention`)."""
    if in_mesh():
        if index is None and mesh_size(("context",)) > 1:  # column order split over context: every key computed
            index = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
            return sharded_attention(q, k, v, q_segment=segment, kv_segment=segment, q_index=index, kv_index=index,
                                     impl=impl)
        return sharded_attention(q, k, v, q_segment=segment, kv_segment=segment, causal=True, impl=impl)
    return attention(q, k, v, q_segment=segment, kv_segment=segment, q_index=index, kv_index=index, causal=True,
                     impl=impl)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(  # matmul outputs: dense layers' and attention's
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)),
}


class DecoderLayer(nn.Module):
    """x + norm(Attn(norm(x))), then x + norm(MLP(norm(x))): four RMSNorms a layer.

    x (B, T, hidden); cos, sin (B, T, rotary_dim); segment (B, T) (0 = padding); index (B, T) causal order
    (None: the column order, `attend`). Attends to its own keys and returns them: (x, (k, v)) with k, v
    (B, T, K, D). `block` runs the layer around any attention (the KV-cache decode of `glmv_jax.generate`).
    """

    config: TextConfig
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None  # `ops.attention` impl; None: from the backend

    def setup(self):
        cfg, pd = self.config, self.param_dtype
        norm = lambda: RMSNorm(cfg.rms_norm_eps, param_dtype=pd)  # noqa: E731
        self.input_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm = norm(), norm(), norm(), norm()
        self.q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), use_bias=True, param_dtype=pd)
        self.k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=True,
                       param_dtype=pd)
        self.v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=True,
                       param_dtype=pd)
        self.o = dense(cfg.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, in_dims=2, param_dtype=pd)
        self.gate_up = dense((2, cfg.intermediate_size), ("embed", "stack", "mlp"), use_bias=False, param_dtype=pd)
        self.down = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, param_dtype=pd)

    def project(self, y):
        """Normed x (B, T, hidden) -> q (B, T, H, D), k, v (B, T, K, D)."""
        return self.q(y), self.k(y), self.v(y)

    def block(self, x, cos, sin, attend_fn: Callable):
        """The layer with `attend_fn(q, k, v) -> (out (B, T, H, D), carry)` as its attention; returns (x, carry)."""
        x = constrain(x, ("batch", "length", "act_embed"))
        q, k, v = self.project(self.input_norm(x))
        q, k = rope.apply_text_rope(q, cos, sin), rope.apply_text_rope(k, cos, sin)
        out, carry = attend_fn(q, k, v)
        x = x + self.post_attn_norm(self.o(out))
        gate_up = self.gate_up(self.pre_mlp_norm(x))
        y = self.down(swiglu(gate_up[..., 0, :], gate_up[..., 1, :]))
        return x + self.post_mlp_norm(y), carry

    def __call__(self, x, cos, sin, segment, index):
        def self_attention(q, k, v):
            return attend(q, k, v, segment=segment, index=index, impl=self.attention_impl), (k, v)

        return self.block(x, cos, sin, self_attention)


class Decoder(nn.Module):
    """Embeddings in, logits out; `embed_tokens` is exposed so visual features can be scattered in between."""

    config: TextConfig
    tie_word_embeddings: bool = False
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True  # False: the same stacked parameters, layers unrolled (`run_layers`)
    attention_impl: str | None = None  # `ops.attention` impl; None: from the backend

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype,
                              embedding_init=nn.with_logical_partitioning(EMBED_INIT, ("vocab", "embed")))
        layer = DecoderLayer
        if self.remat_policy != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.param_dtype,
                                                                             self.attention_impl)
        self.norm = RMSNorm(cfg.rms_norm_eps, param_dtype=self.param_dtype)
        if not self.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                 param_dtype=self.param_dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, hidden) in the embedding's dtype."""
        return self.embed(input_ids)

    def hidden(self, x, position_ids, segment, index=None):
        """x (B, T, hidden), position_ids (3, B, T), segment (B, T), index (B, T) causal order or None (the
        columns) -> (final-norm hidden (B, T, hidden), (k, v) (L, B, T, K, D))."""
        cos, sin = rope.text_cos_sin(position_ids, self.config, x.dtype)
        if self.scan_layers or self.is_initializing():
            x, kv = self.layers(x, cos, sin, segment, index)
        else:
            layer = DecoderLayer(self.config, self.param_dtype, self.attention_impl, parent=None)
            x, kv = run_layers(layer, unstack_layers(self.variables["params"]), x, (cos, sin, segment, index),
                               remat_policy=self.remat_policy)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kv)
        return self.norm(x), kv

    def head(self, h: jax.Array) -> jax.Array:
        """Pre-norm hidden (..., hidden) -> logits (..., vocab): final norm, then `logits`."""
        return self.logits(self.norm(h))

    def logits(self, h: jax.Array) -> jax.Array:
        """(..., hidden) -> (..., vocab) in the parameters' dtype."""
        return self.embed.attend(h) if self.tie_word_embeddings else self.lm_head(h)

    def __call__(self, x: jax.Array, position_ids: jax.Array, segment: jax.Array,
                 index: jax.Array | None = None) -> jax.Array:
        """x (B, T, hidden), position_ids (3, B, T) -> logits (B, T, vocab) in the parameters' dtype."""
        return self.logits(self.hidden(x, position_ids, segment, index)[0])


def unstack_layers(decoder_params: dict) -> tuple[dict, ...]:
    """The decoder's stacked layer parameters (leading axis L) as L per-layer trees, for running the layers
    unrolled (`Decoder(scan_layers=False)`; `glmv_jax.generate.weights` builds the inference weights on it).

    A split, whose gradient is one concatenate back into the stack. In a layer scan XLA:CPU copies each
    layer's slice out of the stack (a dynamic_slice is not fused into a dot there; for bf16 it converts the
    whole stack to f32 and each slice back), and stacks bf16 activations for the backward by converting
    the whole stack to f32 and back at every layer. Per-layer buffers are read and written in place.
    """
    leaves, tree = jax.tree.flatten(decoder_params["layers"])
    n = leaves[0].shape[0]
    parts = [jnp.split(leaf, n) for leaf in leaves]
    return tuple(tree.unflatten([p[i][0] for p in parts]) for i in range(n))


def run_layers(layer: nn.Module, layers: Sequence[dict], x: jax.Array, args: tuple, caches: Sequence | None = None,
               remat_policy: str = "none") -> tuple[jax.Array, tuple]:
    """x through `layer` applied with each of `layers` (per-layer parameters) in turn, unrolled: layer i runs
    `layer(x, *args, caches[i])` (`caches` None: `layer(x, *args)`), rematerialised per `remat_policy`.

    Returns x and each layer's second output (its (k, v))."""
    def run(weights, x, *cache):
        return layer.apply({"params": weights}, x, *args, *cache)

    if remat_policy != "none":
        run = jax.checkpoint(run, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    written = []
    for i, weights in enumerate(layers):
        x, out = run(weights, x, *(() if caches is None else (caches[i],)))
        written.append(out)
    return x, tuple(written)
