"""AdamW with linear warmup + cosine decay, gradient clipping, decay masks, frozen parts.

jax and optax are imported where the optimizer is built, so that the training config (which holds an
`OptimizerConfig`) is read without them."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    end_learning_rate_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    accumulate: int = 1                 # micro-batches per update, summed inside the train step (train/steps.py)
    freeze: tuple[str, ...] = ()        # top-level parts left untouched: "vision", "projector", "decoder"


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    import optax

    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                              max(cfg.total_steps, cfg.warmup_steps + 1),
                                              cfg.learning_rate * cfg.end_learning_rate_ratio)


def make_optimizer(cfg: OptimizerConfig, params) -> optax.GradientTransformation:
    """The full transformation; `params` (or their shapes) fix the masks."""
    import jax
    import optax

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
    return tx


def _decays(path, x) -> bool:
    """Decay weight matrices and embeddings; not biases, norm scales (any rank once stacked per layer)."""
    name = getattr(path[-1], "key", str(path[-1]))
    return name in ("kernel", "embedding", "pos_embed")
