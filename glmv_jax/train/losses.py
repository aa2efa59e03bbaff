"""Losses: masked next-token cross entropy (pretraining, SFT)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) (B, T) float32 from logits (B, T, V)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) over masked tokens, number of masked tokens), both float32 scalars."""
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)
