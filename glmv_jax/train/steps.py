"""The loss of a packed batch, shared by the train and eval steps (and the AOT plan)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmv_jax.config import GlmvConfig
from glmv_jax.model.glmv import apply, token_inputs
from glmv_jax.train.losses import cross_entropy

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def batch_loss(params, config: GlmvConfig, batch: dict, *, context: int = 1, remat_policy: str = "none"):
    """Mean masked cross entropy of a packed batch and its token count.

    batch: input_ids, segment_ids, mm_token_type_ids, targets, loss_mask (B, T); pixel values and grids.
    With context > 1 every per-token array is put in the load-balanced order once, here.
    """
    tokens = token_inputs(config, batch["input_ids"], batch["segment_ids"], batch.get("mm_token_type_ids"),
                          batch.get("position_ids"), batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                          context, extra={"targets": batch["targets"], "loss_mask": batch["loss_mask"]})
    visual = {k: batch.get(k) for k in VISUAL_KEYS}
    logits = apply(params, config, tokens, visual, remat_policy)
    total, count = cross_entropy(logits, tokens["targets"], tokens["loss_mask"])
    return total / jnp.maximum(count, 1.0), count
