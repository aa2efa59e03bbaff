"""The GLM-4 decoder: token embedding, a scanned stack of sandwich-norm layers, final norm, lm head."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.config import TextConfig
from glmv_jax.model import rope
from glmv_jax.model.layers import DEFAULT_INIT, RMSNorm, attention, cached_attention, dense
from glmv_jax.parallel.context import in_mesh, sharded_attention
from glmv_jax.parallel.mesh import constrain

def attend(q, k, v, *, seq_axes=("context",), gather_kv=True, **masks):
    """Decoder attention: sharded over the current mesh if there is one, else local."""
    if in_mesh():
        return sharded_attention(q, k, v, seq_axes=seq_axes, gather_kv=gather_kv, **masks)
    return attention(q, k, v, **masks)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nn.Module):
    """x + norm(Attn(norm(x))), then x + norm(MLP(norm(x))): four RMSNorms a layer.

    x (B, T, hidden); cos, sin (B, T, rotary_dim); segment (B, T) (0 = padding); index (B, T) causal order.
    Without `kv`, attends to its own keys and returns them: (x, (k, v)) with k, v (B, T, K, D).
    With `kv` = this layer's (k, v) caches (B, S, K, D) and one new token (T = 1), attends to the cache's
    valid slots (`kv_meta["segment"]` (B, S) != 0, except `kv_meta["write_pos"]`, the new token's slot)
    and to the new key, and returns only the new (k, v) (B, 1, K, D): `Decoder.hidden` writes them into
    the stacked caches once for all layers (no per-layer copy of a cache).
    """

    config: TextConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, segment, index, kv=None, kv_meta=None):
        cfg, pd = self.config, self.param_dtype
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, param_dtype=pd, name=name)  # noqa: E731
        x = constrain(x, ("batch", "length", "act_embed"))
        y = norm("input_norm")(x)
        q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), use_bias=True, name="q",
                  param_dtype=pd)(y)
        k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=True, name="k",
                  param_dtype=pd)(y)
        v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=True, name="v",
                  param_dtype=pd)(y)
        q, k = rope.apply_text_rope(q, cos, sin), rope.apply_text_rope(k, cos, sin)
        if kv is None:
            out = attend(q, k, v, q_segment=segment, kv_segment=segment, q_index=index, kv_index=index)
        else:
            k, v = k.astype(kv[0].dtype), v.astype(kv[1].dtype)
            valid = (kv_meta["segment"] != 0) & (jnp.arange(kv[0].shape[1]) != kv_meta["write_pos"])
            out = cached_attention(q, kv[0], kv[1], valid, k, v)
        y = dense(cfg.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, name="o", in_dims=2,
                  param_dtype=pd)(out)
        x = x + norm("post_attn_norm")(y)

        y = norm("pre_mlp_norm")(x)
        gate_up = dense((2, cfg.intermediate_size), ("embed", "stack", "mlp"), use_bias=False, name="gate_up",
                        param_dtype=pd)(y)
        y = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, name="down",
                  param_dtype=pd)(gate_up[..., 1, :] * nn.silu(gate_up[..., 0, :]))
        return x + norm("post_mlp_norm")(y), (k, v)


class Decoder(nn.Module):
    """Embeddings in, logits out; `embed_tokens` is exposed so visual features can be scattered in between."""

    config: TextConfig
    tie_word_embeddings: bool = False
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype,
                              embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, ("vocab", "embed")))
        layer = DecoderLayer
        if self.remat_policy != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast), length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.param_dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, param_dtype=self.param_dtype)
        if not self.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                 param_dtype=self.param_dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, hidden) in the embedding's dtype."""
        return self.embed(input_ids)

    def hidden(self, x, position_ids, segment, index, kv=None, kv_meta=None):
        """x (B, T, hidden), position_ids (3, B, T) -> (final-norm hidden (B, T, hidden), (k, v) (L, B, S, K, D))."""
        cos, sin = rope.text_cos_sin(position_ids, self.config, x.dtype)
        if kv is None:
            x, kv = self.layers(x, cos, sin, segment, index, None, None)
            return self.norm(x), kv
        x, new = self.layers(x, cos, sin, segment, index, kv, kv_meta)  # new: (L, B, 1, K, D)
        at = (0, 0, kv_meta["write_pos"], 0, 0)
        return self.norm(x), tuple(jax.lax.dynamic_update_slice(c, n, at) for c, n in zip(kv, new))

    def logits(self, h: jax.Array) -> jax.Array:
        """(..., hidden) -> (..., vocab) in the parameters' dtype."""
        return self.embed.attend(h) if self.tie_word_embeddings else self.lm_head(h)

    def __call__(self, x: jax.Array, position_ids: jax.Array, segment: jax.Array, index: jax.Array) -> jax.Array:
        """x (B, T, hidden), position_ids (3, B, T) -> logits (B, T, vocab) in the parameters' dtype."""
        return self.logits(self.hidden(x, position_ids, segment, index)[0])
