"""GLM-4.1V: vision tower + projector, visual features scattered into the token embeddings, decoder."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmv_jax.config import GlmvConfig
from glmv_jax.model import inputs, rope
from glmv_jax.model.decoder import Decoder
from glmv_jax.model.projector import Projector
from glmv_jax.model.vision import VisionTower

TEXT, IMAGE, VIDEO = 0, 1, 2


def scatter_visual(embeds: jax.Array, features: jax.Array, where: jax.Array) -> jax.Array:
    """Put features (M, D) into embeds (B, T, D) at the True places of `where` (B, T), batch-major in order."""
    b, t, d = embeds.shape
    index = jnp.clip(jnp.cumsum(where.reshape(-1)) - 1, 0, features.shape[0] - 1)
    return jnp.where(where[..., None], features[index].reshape(b, t, d).astype(embeds.dtype), embeds)


class Glmv(nn.Module):
    """The whole model as one Linen module; params: {vision, projector, decoder}."""

    config: GlmvConfig
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        self.vision = VisionTower(cfg.vision, self.param_dtype, remat=self.remat_policy != "none")
        self.projector = Projector(cfg.vision, self.param_dtype)
        self.decoder = Decoder(cfg.text, cfg.tie_word_embeddings, self.param_dtype, self.remat_policy)

    def encode_visual(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        """pixel_values (N, patch_dim), grid_thw (G, 3) -> merged visual tokens (N / merge^2, hidden)."""
        return self.projector(self.vision(pixel_values, grid_thw))

    def embed_inputs(self, input_ids, token_types, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None):
        """Token embeddings (B, T, hidden) with image and video features scattered in at their placeholders."""
        x = self.decoder.embed_tokens(input_ids)
        if pixel_values is not None:
            x = scatter_visual(x, self.encode_visual(pixel_values, image_grid_thw), token_types == IMAGE)
        if pixel_values_videos is not None:
            x = scatter_visual(x, self.encode_visual(pixel_values_videos, video_grid_thw), token_types == VIDEO)
        return x

    def __call__(self, input_ids, position_ids, segment, token_types, *, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None):
        """input_ids (B, T), position_ids (3, B, T), segment (B, T), token_types (B, T) -> logits (B, T, V)."""
        x = self.embed_inputs(input_ids, token_types, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw)
        index = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self.decoder(x, position_ids, segment, index)


def params_dtype(params) -> jnp.dtype:
    """The dtype the model computes in: that of the token embedding."""
    return params["decoder"]["embed"]["embedding"].dtype


@functools.partial(jax.jit, static_argnames=("config", "remat_policy"))
def forward_jit(params, config: GlmvConfig, input_ids, attention_mask, position_ids, mm_token_type_ids,
                pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, remat_policy: str = "none"):
    """The jitted forward on checked, bucketed inputs (see `glmv_jax.model.inputs`)."""
    types = rope.token_types(config, input_ids) if mm_token_type_ids is None else mm_token_type_ids
    if position_ids is None:
        position_ids, _ = rope.get_rope_index(config, input_ids, image_grid_thw=image_grid_thw,
                                              video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                                              mm_token_type_ids=types)
    dtype = params_dtype(params)
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    model = Glmv(config, dtype, remat_policy)
    return model.apply({"params": params}, input_ids, position_ids, attention_mask.astype(jnp.int32), types,
                       pixel_values=cast(pixel_values), image_grid_thw=image_grid_thw,
                       pixel_values_videos=cast(pixel_values_videos), video_grid_thw=video_grid_thw)


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
    variables = Glmv(config, dtype).init(jax.random.key(seed), ids, positions, ones, ones,
                                         pixel_values=pixels, image_grid_thw=grid)
    return variables["params"]


def logical_axes(config: GlmvConfig):
    """The tree of logical axis names of every parameter (PartitionSpecs of logical names)."""
    boxed = jax.eval_shape(lambda: init_boxed(config))
    return nn.get_partition_spec(boxed)


def forward(params, config: GlmvConfig, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None, position_ids=None, mesh=None,
            remat_policy: str = "none"):
    """Logits (B, T, vocab) of GLM-4.1V, as transformers' Glm4vForConditionalGeneration computes them.

    Inputs are checked on the host first (shapes, vocabulary range, placeholder count against the
    grids), then visual inputs are padded to shape buckets so that one compile serves many image
    sizes. `mm_token_type_ids=None` reads video tokens as the placeholders between the video
    start/end ids. `position_ids` (3, B, T) overrides the computed 3D positions.
    """
    if mesh is not None:
        raise NotImplementedError("forward(mesh=...) comes with the parallelism work (parallel/mesh.py); "
                                  "pass mesh=None to run on the default device")
    ids, mask, image_grid, video_grid = inputs.check_inputs(
        config, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        mm_token_type_ids=mm_token_type_ids, position_ids=position_ids)
    merge = config.vision.spatial_merge_size
    pixel_values, image_grid = inputs.pad_visual(pixel_values, image_grid, merge)
    pixel_values_videos, video_grid = inputs.pad_visual(pixel_values_videos, video_grid, merge)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    return forward_jit(params, config, ids, mask, as_int(position_ids), as_int(mm_token_type_ids),
                       pixel_values, image_grid, pixel_values_videos, video_grid, remat_policy=remat_policy)
