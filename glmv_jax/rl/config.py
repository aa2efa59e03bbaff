"""The `rl:` section of a training config (RLCS), validated, and its registration into the training config.

Importing this module registers `rl` with `glmv_jax.train.config` (`register_section`), after which a training
YAML may hold an `rl:` section; `glmv train` (cli.py) imports it before reading a config. It imports nothing of
jax, the model or the sampler, so reading an RL YAML stays cheap.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from glmv_jax.errors import ConfigError
from glmv_jax.train.config import TrainConfig, load_train_config, register_section
from glmv_jax.train.validate import non_negative, positive


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The `rl:` section of a training config (paper values where the recipe gives them)."""

    iterations: int = 40
    groups: int = 8                  # balanced groups kept per iteration (the update batch is groups x group_size)
    group_size: int = 8              # rollouts per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0               # the paper samples from the whole vocabulary
    max_new_tokens: int = 96
    thinking_budget: int | None = None
    eps_low: float = 0.2
    eps_high: float = 0.28           # clip-higher
    kl_coef: float = 0.0             # k3 KL to the policy at the start of the RL run; none by default (paper)
    entropy_coef: float = 0.0        # entropy bonus of the updated policy; none by default (paper)
    minibatches: int = 2             # policy updates per rollout batch
    prompt_pool: int = 512           # synthetic prompts the curriculum draws from
    eval_prompts: int = 64           # held-out prompts (greedy) for before/after rewards
    eval_every: int = 10
    offline_k: int = 4               # samples per pool prompt in the offline pass@k that seeds the curriculum
    seed: int = 0

    def validate(self) -> None:
        positive("rl", self, "iterations", "groups", "group_size", "max_new_tokens", "minibatches", "prompt_pool",
                 "eval_prompts", "eval_every")
        non_negative("rl", self, "offline_k", "seed")
        if self.thinking_budget is not None:
            non_negative("rl", self, "thinking_budget")
        if not self.temperature > 0:
            raise ConfigError(f"rl.temperature = {self.temperature} must be positive")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rl.top_p = {self.top_p} must be in (0, 1]")
        for name in ("eps_low", "eps_high", "kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name} = {getattr(self, name)} must not be negative")


register_section("rl", RLConfig)


def load_rl_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A training YAML that must hold an `rl:` section, with `section.key=value` overrides."""
    cfg = load_train_config(path, overrides)
    if cfg.rl is None:
        raise ConfigError(f"{path}: no rl: section (an RLCS run needs one)")
    return cfg


__all__ = ["RLConfig", "load_rl_config"]
