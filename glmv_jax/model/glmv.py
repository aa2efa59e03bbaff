"""GLM-4.1V: vision tower + projector, visual features scattered into the token embeddings, decoder; its
parameters' initialisation, logical axes and shardings."""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax import sharding
from glmv_jax.config import GlmvConfig
from glmv_jax.data.visual_layout import pad_visual
from glmv_jax.errors import MeshError
from glmv_jax.model import inputs, rope
from glmv_jax.model.decoder import Decoder
from glmv_jax.model.projector import Projector
from glmv_jax.model.vision import VisionTower
from glmv_jax.ops.attention import resolve_impl
from glmv_jax.ops.context import balanced_order, reorder

TEXT, IMAGE, VIDEO = 0, 1, 2


def scatter_visual(embeds: jax.Array, features: jax.Array, where: jax.Array, rank: jax.Array) -> jax.Array:
    """embeds (B, T, D) with features[rank] (features (M, D), rank (B, T)) at the True places of `where`.

    Blocked features (S, K, D) (one block per B / S rows): a token of block s takes features[s, rank], its rank
    counted within the block (`rope.visual_ranks(types, S)`)."""
    if features.ndim == 3:
        s, k = features.shape[:2]
        block = jnp.arange(embeds.shape[0])[:, None] // (embeds.shape[0] // s)
        rank = block * k + jnp.clip(rank, 0, k - 1)
        features = features.reshape(s * k, -1)
    picked = features[jnp.clip(rank, 0, features.shape[0] - 1)]
    return jnp.where(where[..., None], picked.astype(embeds.dtype), embeds)


class Glmv(nn.Module):
    """The whole model as one Linen module; params: {vision, projector, decoder}."""

    config: GlmvConfig
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True  # decoder layers in a scan (compile time independent of depth) or unrolled
    attention_impl: str | None = None  # `ops.attention` impl of every attention; None: from the backend

    def setup(self):
        cfg = self.config
        self.vision = VisionTower(cfg.vision, self.param_dtype, remat=self.remat_policy != "none",
                                  attention_impl=self.attention_impl)
        self.projector = Projector(cfg.vision, self.param_dtype)
        self.decoder = Decoder(cfg.text, cfg.tie_word_embeddings, self.param_dtype, self.remat_policy,
                               self.scan_layers, self.attention_impl)

    def encode_visual(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        """pixel_values (N, patch_dim) or framed (F, W, patch_dim) (see `vision`), grid_thw (G, 3) -> merged
        visual tokens (N / merge^2 or F * W / merge^2, hidden) in grid order; blocked grids (S, G, 3) give
        (S, K, hidden)."""
        return self.projector(self.vision(pixel_values, grid_thw))

    def embed_inputs(self, input_ids, token_types, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None, ranks=None):
        """Token embeddings (B, T, hidden) with image and video features scattered in at their placeholders.

        `ranks` = (image rank, video rank) per token (`rope.visual_ranks` in the original token
        order); pass them when the tokens were reordered (context parallelism).
        """
        if ranks is None:
            ranks = rope.visual_ranks(token_types, (rope.block_count(image_grid_thw), rope.block_count(video_grid_thw)))
        image_rank, video_rank = ranks
        x = self.decoder.embed_tokens(input_ids)
        if pixel_values is not None:
            x = scatter_visual(x, self.encode_visual(pixel_values, image_grid_thw), token_types == IMAGE, image_rank)
        if pixel_values_videos is not None:
            x = scatter_visual(x, self.encode_visual(pixel_values_videos, video_grid_thw), token_types == VIDEO,
                               video_rank)
        return x

    def __call__(self, input_ids, position_ids, segment, token_types, *, index=None, ranks=None, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """input_ids (B, T), position_ids (3, B, T), segment (B, T), token_types (B, T) -> logits (B, T, V).

        `index` (B, T) is each token's place in the causal order (None: its column).
        """
        x = self.embed_inputs(input_ids, token_types, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw, ranks)
        return self.decoder(x, position_ids, segment, index)


def params_dtype(params) -> jnp.dtype:
    """The dtype the model computes in: that of the token embedding."""
    return params["decoder"]["embed"]["embedding"].dtype


def token_inputs(config: GlmvConfig, input_ids, segment_ids, token_types=None, position_ids=None,
                 image_grid_thw=None, video_grid_thw=None, context: int = 1,
                 extra: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Everything per token the model reads, in the order it will run (load-balanced if context > 1).

    segment_ids (B, T): 1 (or 1..k for packed examples) on real tokens, 0 on padding. Returns
    input_ids, segment, token_types, position_ids (3, B, T), ranks, `order` (the permutation applied; undo
    with `jnp.argsort(order)`) and, if reordered (context > 1), index (each token's original column).
    `extra` per-token (B, T) arrays (e.g. targets, loss_mask) are returned under their names, reordered alike.
    """
    types = rope.token_types(config, input_ids) if token_types is None else token_types
    types = jnp.where(segment_ids > 0, types, 0)
    if position_ids is None:
        position_ids, _ = rope.get_rope_index(config, input_ids, image_grid_thw=image_grid_thw,
                                              video_grid_thw=video_grid_thw, mm_token_type_ids=types,
                                              segment_ids=segment_ids)
    b, t = input_ids.shape
    order = balanced_order(t, context)
    image_rank, video_rank = rope.visual_ranks(types, (rope.block_count(image_grid_thw),
                                                       rope.block_count(video_grid_thw)))
    tokens = {"input_ids": input_ids, "segment": segment_ids, "token_types": types, "position_ids": position_ids,
              "image_rank": image_rank, "video_rank": video_rank, **(extra or {})}
    if context > 1:
        tokens = reorder({**tokens, "index": jnp.broadcast_to(jnp.arange(t), (b, t))}, order, {"position_ids": 2})
    return {**tokens, "order": jnp.asarray(order)}


def apply(params, config: GlmvConfig, tokens: dict, visual: dict, remat_policy: str = "none",
          scan_layers: bool = True, attention_impl: str | None = None) -> jax.Array:
    """Logits (B, T, V) in the order of `tokens` (see `token_inputs`); visual = pixel values and grids.
    attention_impl: "cpu", "xla" or None / "auto" (from the backend), see `glmv_jax.ops.attention`."""
    dtype = params_dtype(params)
    visual = {k: (v.astype(dtype) if k.startswith("pixel") and v is not None else v) for k, v in visual.items()}
    return Glmv(config, dtype, remat_policy, scan_layers, resolve_impl(attention_impl)).apply(
        {"params": params}, tokens["input_ids"], tokens["position_ids"], tokens["segment"], tokens["token_types"],
        index=tokens.get("index"), ranks=(tokens["image_rank"], tokens["video_rank"]), **visual)


@functools.partial(jax.jit, static_argnames=("config", "remat_policy", "context", "attention_impl"))
def forward_jit(params, config: GlmvConfig, input_ids, segment_ids, position_ids, mm_token_type_ids, pixel_values,
                image_grid_thw, pixel_values_videos, video_grid_thw, remat_policy: str = "none", context: int = 1,
                attention_impl: str | None = None):
    """The jitted forward on checked, bucketed inputs (see `glmv_jax.model.inputs`); logits in input order."""
    tokens = token_inputs(config, input_ids, segment_ids, mm_token_type_ids, position_ids, image_grid_thw,
                          video_grid_thw, context)
    visual = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
              "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}
    logits = apply(params, config, tokens, visual, remat_policy, attention_impl=attention_impl)
    return jnp.take(logits, jnp.argsort(tokens["order"]), axis=1) if context > 1 else logits


def forward(params, config: GlmvConfig, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None, position_ids=None, mesh=None,
            segment_ids=None, remat_policy: str = "none", attention_impl: str | None = None):
    """Logits (B, T, vocab) of GLM-4.1V, as transformers' Glm4vForConditionalGeneration computes them.

    Inputs are checked on the host first (shapes, vocabulary range, placeholder count against the
    grids), then visual inputs are padded to shape buckets so that one compile serves many image
    sizes. `mm_token_type_ids=None` reads video tokens as the placeholders between the video
    start/end ids. `position_ids` (3, B, T) overrides the computed 3D positions; by default padding
    gets position 0 and real tokens count from 0 (transformers does the same whenever it is given
    image grids; its text-only forward counts pads too, so pass position_ids there to compare).
    `segment_ids` (B, T) packs several examples per row (1..k, 0 padding) instead of attention_mask.
    With `mesh`, runs sharded over it (params may already be placed with `param_shardings`).
    `attention_impl`: "cpu", "xla" or None / "auto" (from the backend), see `glmv_jax.ops.attention`.
    """
    attention_impl = resolve_impl(attention_impl)
    if segment_ids is not None:
        attention_mask = segment_ids
    ids, mask, image_grid, video_grid = inputs.check_inputs(
        config, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        mm_token_type_ids=mm_token_type_ids, position_ids=position_ids)
    pixel_values, image_grid = pad_visual(pixel_values, image_grid, config.vision)
    pixel_values_videos, video_grid = pad_visual(pixel_values_videos, video_grid, config.vision)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    context = 1
    scope = contextlib.nullcontext()
    if mesh is not None:
        check_model(config, mesh)
        sharding.check_batch(mesh, ids.shape[0], ids.shape[1])
        context = mesh.shape["context"]
        scope = jax.set_mesh(mesh)
    with scope:
        return forward_jit(params, config, ids, mask, as_int(position_ids), as_int(mm_token_type_ids),
                           pixel_values, image_grid, pixel_values_videos, video_grid, remat_policy=remat_policy,
                           context=context, attention_impl=attention_impl)


def init_params(config: GlmvConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters (plain arrays, logical axes stripped) for tests and training from scratch."""
    return nn.unbox(init_boxed(config, seed, dtype))


def init_boxed(config: GlmvConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters still boxed with their logical axis names (`nn.get_partition_spec` reads them)."""
    v, m = config.vision, config.vision.spatial_merge_size
    ids = jnp.full((1, 4), config.image_token_id, jnp.int32)
    grid = jnp.array([[1, m, 2 * m]], jnp.int32)
    pixels = jnp.zeros((2 * m * m, v.patch_dim), dtype)
    positions = jnp.zeros((3, 1, 4), jnp.int32)
    ones = jnp.ones((1, 4), jnp.int32)
    with sharding.unsharded():  # the dummy forward that creates the params runs unsharded
        variables = Glmv(config, dtype).init(jax.random.key(seed), ids, positions, ones, ones,
                                             pixel_values=pixels, image_grid_thw=grid)
    return variables["params"]


def logical_axes(config: GlmvConfig):
    """The tree of logical axis names of every parameter (PartitionSpecs of logical names)."""
    boxed = jax.eval_shape(lambda: init_boxed(config))
    return nn.get_partition_spec(boxed)


def param_specs(config: GlmvConfig) -> Any:
    """The PartitionSpec of every parameter (mesh axes), from the model's logical axis names."""
    return jax.tree.map(lambda logical: sharding.spec(tuple(logical)), logical_axes(config),
                        is_leaf=lambda x: isinstance(x, P))


def param_shardings(config: GlmvConfig, mesh) -> Any:
    """NamedShardings of every parameter; raises MeshError before any compile if a size does not divide."""
    shapes = jax.eval_shape(lambda: init_params(config))
    specs = param_specs(config)

    def one(path, shape, pspec):
        sharding.check_divisible(mesh, shape.shape, pspec,
                                 "param " + "/".join(str(getattr(k, "key", k)) for k in path))
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(one, shapes, specs)


def check_model(config: GlmvConfig, mesh) -> None:
    """Every size the mesh splits (heads, KV heads, vocab, widths) divides; clear error otherwise."""
    t = mesh.shape["tensor"]
    for what, value in (("text num_heads", config.text.num_heads), ("text num_kv_heads", config.text.num_kv_heads),
                        ("vision num_heads", config.vision.num_heads), ("vocab_size", config.text.vocab_size)):
        if value % t:
            raise MeshError(f"{what} = {value} is not divisible by tensor = {t}")
    param_shardings(config, mesh)
