"""The built-in verifiers, one module per family: plain functions ``verify(answer, ground_truth, **kwargs) -> float``
on the extracted answer (the box content). They import no jax and nothing of glmv_jax outside this package, so the
reward workers load them quickly."""
from __future__ import annotations

from collections.abc import Callable

from glmv_jax.rl.rewards.verifiers.counting import verify_count
from glmv_jax.rl.rewards.verifiers.grounding import box_iou, verify_grounding
from glmv_jax.rl.rewards.verifiers.math import verify_math
from glmv_jax.rl.rewards.verifiers.ocr import verify_ocr

BUILTINS: dict[str, Callable[..., float]] = {
    "math": verify_math, "counting": verify_count, "ocr": verify_ocr, "grounding": verify_grounding}

__all__ = ["BUILTINS", "box_iou", "verify_count", "verify_grounding", "verify_math", "verify_ocr"]
