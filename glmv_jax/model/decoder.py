"""The GLM-4 decoder: token embedding, a scanned stack of sandwich-norm layers, final norm, lm head."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.config import TextConfig
from glmv_jax.model import rope
from glmv_jax.model.layers import (DEFAULT_INIT, DENSE_OUTPUT, RMSNorm, attention, cached_attention, dense,
                                   swiglu)
from glmv_jax.parallel.context import in_mesh, sharded_attention
from glmv_jax.parallel.mesh import constrain

def attend(q, k, v, *, segment, index):
    """Causal decoder self-attention: sharded over the current mesh if there is one, else local.

    index (B, T): each token's place in the causal order, or None for the column order (then the local
    attention skips the key blocks past each query block)."""
    if in_mesh():
        if index is None:
            index = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return sharded_attention(q, k, v, q_segment=segment, kv_segment=segment, q_index=index, kv_index=index)
    return attention(q, k, v, q_segment=segment, kv_segment=segment, q_index=index, kv_index=index, causal=True)


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
    (None: the column order, `attend`).
    Without `kv`, attends to its own keys and returns them: (x, (k, v)) with k, v (B, T, K, D).
    With `kv` = this layer's caches (keys (B*K, D, S), values (B*K, S, D): `cache_layout`) and one new
    token (T = 1), writes its key and value at slot `kv_meta["write_pos"]`, attends to the valid slots
    (`kv_meta["segment"]` (B, S) != 0, the new one included) and returns the written caches.
    """

    config: TextConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, segment, index, kv=None, kv_meta=None):
        cfg, pd = self.config, self.param_dtype
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, param_dtype=pd, name=name)  # noqa: E731
        x = constrain(x, ("batch", "length", "act_embed"))
        y = norm("input_norm")(x)
        if self.has_variable("params", "qkv"):  # inference weights from `fuse_qkv`: one matmul
            h, kv_h = cfg.num_heads, cfg.num_kv_heads
            qkv = dense((h + 2 * kv_h, cfg.head_dim), ("embed", "heads", "head_dim"), use_bias=True, name="qkv",
                        param_dtype=pd)(y)
            q, k, v = jnp.split(qkv, (h, h + kv_h), axis=-2)
        else:
            q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), use_bias=True, name="q",
                      param_dtype=pd)(y)
            k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=True, name="k",
                      param_dtype=pd)(y)
            v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=True, name="v",
                      param_dtype=pd)(y)
        q, k = rope.apply_text_rope(q, cos, sin), rope.apply_text_rope(k, cos, sin)
        if kv is None:
            out = attend(q, k, v, segment=segment, index=index)
        else:
            k, v = write_cache(kv, k, v, kv_meta["write_pos"])
            out = cached_attention(q, k, v, kv_meta["segment"] != 0)
        y = dense(cfg.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, name="o", in_dims=2,
                  param_dtype=pd)(out)
        x = x + norm("post_attn_norm")(y)

        y = norm("pre_mlp_norm")(x)
        gate_up = dense((2, cfg.intermediate_size), ("embed", "stack", "mlp"), use_bias=False, name="gate_up",
                        param_dtype=pd)(y)
        y = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, name="down",
                  param_dtype=pd)(swiglu(gate_up[..., 0, :], gate_up[..., 1, :]))
        return x + norm("post_mlp_norm")(y), (k, v)


class Decoder(nn.Module):
    """Embeddings in, logits out; `embed_tokens` is exposed so visual features can be scattered in between."""

    config: TextConfig
    tie_word_embeddings: bool = False
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True  # False: the same stacked parameters, layers unrolled (`_run_layers`)

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype,
                              embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, ("vocab", "embed")))
        layer = DecoderLayer
        if self.remat_policy != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.param_dtype)
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
            x, kv = _run_layers(self, unstack_layers(self.variables["params"]), x, cos, sin, segment, index)
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
    unrolled (`Decoder(scan_layers=False)`, `unrolled_hidden`, `decode_step`).

    A split, whose gradient is one concatenate back into the stack. In a layer scan XLA:CPU copies each
    layer's slice out of the stack (a dynamic_slice is not fused into a dot there; for bf16 it converts the
    whole stack to f32 and each slice back), and stacks bf16 activations for the backward by converting
    the whole stack to f32 and back at every layer. Per-layer buffers are read and written in place.
    """
    leaves, tree = jax.tree.flatten(decoder_params["layers"])
    n = leaves[0].shape[0]
    parts = [jnp.split(leaf, n) for leaf in leaves]
    return tuple(tree.unflatten([p[i][0] for p in parts]) for i in range(n))


def fuse_qkv(layer: dict) -> dict:
    """One layer's parameters with the q, k and v projections as one "qkv" (kernel (hidden, H + 2K, D)):
    one matmul reads the three weights in a decode step instead of three."""
    projections = ("q", "k", "v")
    fused = {key: jnp.concatenate([layer[name][key] for name in projections], axis=-2) for key in ("kernel", "bias")}
    return {**{name: p for name, p in layer.items() if name not in projections}, "qkv": fused}


def _run_layers(decoder: Decoder, layers: tuple[dict, ...], x, cos, sin, segment, index, kv=None, kv_meta=None):
    """x through every layer, unrolled over per-layer weights (rematerialised per `decoder.remat_policy`);
    returns x and each layer's (k, v)."""
    layer = DecoderLayer(decoder.config, decoder.param_dtype, parent=None)

    def run(weights, x, caches):
        return layer.apply({"params": weights}, x, cos, sin, segment, index, caches, kv_meta)

    if decoder.remat_policy != "none":
        run = jax.checkpoint(run, policy=REMAT_POLICIES[decoder.remat_policy], prevent_cse=False)
    written = []
    for i, weights in enumerate(layers):
        x, caches = run(weights, x, None if kv is None else kv[i])
        written.append(caches)
    return x, tuple(written)


def unrolled_hidden(decoder: Decoder, params: dict, layers: tuple[dict, ...], x: jax.Array, position_ids: jax.Array,
                    segment: jax.Array, index: jax.Array | None) -> tuple[jax.Array, tuple]:
    """`Decoder.hidden` with the layers unrolled over `unstack_layers(params)` instead of scanned (inference).

    Returns the final-norm hidden (B, T, hidden) and one (k, v) pair (B, T, K, D) per layer.
    """
    cos, sin = rope.text_cos_sin(position_ids, decoder.config, x.dtype)
    x, kv = _run_layers(decoder, layers, x, cos, sin, segment, index)
    return decoder.apply({"params": params}, x, method=lambda m, h: m.norm(h)), kv


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B, S, K, D) -> the decode caches' layouts: keys (B*K, D, S), values (B*K, S, D).

    These are the operand layouts of the two attention matmuls (scores q.k, then p.v), so XLA reads the
    caches as they are instead of transposing every layer's cache at every step (`layers.cached_attention`).
    """
    b, s, kv_heads, d = k.shape
    return (jnp.transpose(k, (0, 2, 3, 1)).reshape(b * kv_heads, d, s),
            jnp.transpose(v, (0, 2, 1, 3)).reshape(b * kv_heads, s, d))


def write_cache(kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, at) -> tuple[jax.Array, jax.Array]:
    """Write one token's k, v (B, 1, K, D) into caches in `cache_layout` at slot `at` (in place under jit).

    Written before the attention reads the caches: the old cache is never read after the write, so XLA
    updates the loop-carried buffers in place instead of copying them.
    """
    k, v = cache_layout(k.astype(kv[0].dtype), v.astype(kv[1].dtype))
    return jax.lax.dynamic_update_slice(kv[0], k, (0, 0, at)), jax.lax.dynamic_update_slice(kv[1], v, (0, at, 0))


def decode_step(decoder: Decoder, params: dict, layers: tuple[dict, ...], token: jax.Array, position_ids: jax.Array,
                kv: tuple, kv_meta: dict) -> tuple[jax.Array, tuple]:
    """One new token per row through the decoder, its layers unrolled over per-layer weights and caches.

    params: the decoder's parameters (its `layers` unused); layers: `unstack_layers(params)`; token (B,);
    position_ids (3, B, 1); kv: one (k, v) pair of caches per layer in `cache_layout`; kv_meta: "segment"
    (B, S) (0 = empty slot) and "write_pos" (the new token's slot). Returns logits (B, vocab) in the
    parameters' dtype and the caches with the new K/V written at write_pos (in place when donated;
    kv_meta["segment"] must already mark write_pos as filled).
    """
    b, at = token.shape[0], kv_meta["write_pos"]
    x = decoder.apply({"params": params}, token[:, None], method=Decoder.embed_tokens)
    cos, sin = rope.text_cos_sin(position_ids, decoder.config, x.dtype)
    x, written = _run_layers(decoder, layers, x, cos, sin, jnp.ones((b, 1), jnp.int32), jnp.full((b, 1), at),
                             kv, kv_meta)
    return decoder.apply({"params": params}, x[:, 0], method=Decoder.head), written
