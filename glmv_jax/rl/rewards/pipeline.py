"""One evaluation: format gate, language-mix and repetition gates, then the domain verifier, its value clipped to
[0, 1]; any failure gives :data:`MIN_REWARD`. Runs inside a worker (or the thread fallback of the caller)."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from glmv_jax.rl.rewards.format import gate
from glmv_jax.rl.rewards.gates import has_language_mix, has_repetition

MIN_REWARD = 0.0                 # [code] Verifier.min_reward


@dataclass
class Spec:
    """How the responses of one domain are scored: the verifier (a built-in name or a callable), its keyword
    arguments, the gates that apply and the time bound."""

    verifier: str | Callable[..., float]
    kwargs: dict = field(default_factory=dict)
    box: bool = True
    language_mix: bool = True
    repetition: bool = True
    timeout: float | None = None
    pickled: bytes | None = None      # custom verifiers that pickle by reference
    in_thread: bool = False           # custom verifiers that cannot run in a worker


def evaluate(fn: Callable[..., float], kwargs: Mapping[str, Any], box: bool, language_mix: bool,
             repetition: bool, response: Any, ground_truth: Any) -> dict:
    """The whole pipeline for one response (runs inside a worker)."""
    out = {"reward": MIN_REWARD, "language_mix": False, "repetition": False, "error": None}
    try:
        ok, answer = gate(response, box)
        if not ok:
            out["error"] = "format"
            return out
        if language_mix and has_language_mix(response):
            out["language_mix"] = True
            return out
        if repetition and has_repetition(response):
            out["repetition"] = True
            return out
        r = float(fn(answer, ground_truth, **kwargs))
        out["reward"] = min(1.0, max(0.0, r)) if math.isfinite(r) else MIN_REWARD
    except Exception as e:  # noqa: BLE001 - a verifier must never take the caller down (incl. RecursionError,
        out["reward"] = MIN_REWARD  # MemoryError)
        out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out
