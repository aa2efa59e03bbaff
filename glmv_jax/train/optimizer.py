"""AdamW with linear warmup + cosine decay, gradient clipping, decay masks, frozen parts, accumulation."""
from __future__ import annotations

import jax
import optax

from glmv_jax.train.config import OptimizerConfig


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                              max(cfg.total_steps, cfg.warmup_steps + 1),
                                              cfg.learning_rate * cfg.end_learning_rate_ratio)


def make_optimizer(cfg: OptimizerConfig, params) -> optax.GradientTransformation:
    """The full transformation; `params` (or their shapes) fix the masks."""
    mask = jax.tree_util.tree_map_with_path(lambda path, x: _decays(path, x), params)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(schedule(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    if cfg.freeze:
        unknown = set(cfg.freeze) - set(params)
        if unknown:
            raise ValueError(f"optimizer.freeze names unknown parts {sorted(unknown)}; parts: {sorted(params)}")
        labels = {part: ("frozen" if part in cfg.freeze else "train") for part in params}
        labels = {part: jax.tree.map(lambda _, lab=lab: lab, params[part]) for part, lab in labels.items()}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate)
    return tx


def _decays(path, x) -> bool:
    """Decay weight matrices and embeddings; not biases, norm scales (any rank once stacked per layer)."""
    name = getattr(path[-1], "key", str(path[-1]))
    return name in ("kernel", "embedding", "pos_embed")
