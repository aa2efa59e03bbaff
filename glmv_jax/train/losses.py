"""Losses: masked next-token cross entropy (pretraining, SFT)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmv_jax.ops.logprobs import token_log_probs


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) over masked tokens, number of masked tokens), both float32 scalars."""
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)


def grpo_loss(new_logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              eps_low: float = 0.2, eps_high: float = 0.28, ref_logp: jax.Array | None = None, kl_coef: float = 0.0,
              entropy: jax.Array | None = None, entropy_coef: float = 0.0) -> tuple[jax.Array, dict]:
    """GRPO policy loss with clip-higher, averaged per sample over its tokens, then over samples.

    new_logp, old_logp, mask (S, N): log-probs of the sampled tokens under the current and the
    rollout policy, 1 on response tokens; advantages (S,). Per token: -min(r A, clip(r, 1 - eps_low,
    1 + eps_high) A) with r = exp(new - old). Optional terms, off by default as in the paper: a KL
    penalty `kl_coef` * k3 to `ref_logp` (S, N) (the reference policy's log-probs of the same tokens;
    k3 = exp(ref - new) - (ref - new) - 1, an unbiased, non-negative estimate of KL(new || ref)) and an
    entropy bonus -`entropy_coef` * `entropy` (S, N). Both are averaged like the policy term.
    Returns (loss, {clip_fraction, ratio} + {kl} / {entropy}: their token means, when their coefficient is set).
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(new_logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    tokens_total = jnp.maximum(mask.sum(), 1.0)
    extra = {}
    if kl_coef:
        delta = ref_logp - new_logp
        kl = jnp.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * kl
        extra["kl"] = (kl * mask).sum() / tokens_total
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
        extra["entropy"] = (entropy * mask).sum() / tokens_total
    tokens = mask.sum(-1)
    per_sample = (per_token * mask).sum(-1) / jnp.maximum(tokens, 1.0)
    has_tokens = (tokens > 0).astype(jnp.float32)
    loss = (per_sample * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)
    was_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    aux = {"clip_fraction": (was_clipped * mask).sum() / tokens_total,
           "ratio": (ratio * mask).sum() / tokens_total, **extra}
    return loss, aux
