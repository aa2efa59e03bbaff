"""The unified reward system of GLM-4.1V-Thinking's RL stage, hardened for untrusted model text.

Tags say where each rule comes from: **[paper]** arXiv 2507.01006, **[code]** the official reward system
(zai-org/GLM-V ``glmv_reward``), **[ours]** a choice made here where both are silent.

Pipeline (one call = one response)
----------------------------------
1. **Length cap** [ours]: responses longer than :data:`MAX_RESPONSE_CHARS` characters fail the gate.
2. **Format gate** [code ``check_answer_format``]: the response, stripped of surrounding whitespace [ours: the
   official regex ``^<think>(.*?)</think>\\s*<answer>(.*?)</answer>$`` tolerates only a trailing newline], is
   ``<think>…</think>`` + whitespace + ``<answer>…</answer>``; each of the four tags occurs exactly once
   (tags are matched case-insensitively, as the official ``re.IGNORECASE``), so nested or duplicated tags fail;
   the answer holds exactly one ``<|begin_of_box|>…<|end_of_box|>`` and no legacy ``\\boxed{`` [code].
   Domains registered with ``box=False`` (non-verifiable answers) instead need an answer *without* box
   markers [paper: "a box in a non-verifiable answer gets the minimal reward"].
3. **Strict box extraction** [code ``find_boxed_content`` + ``strict_boxed_extraction``]: exactly one box;
   "last box wins" extraction was rejected upstream because it invites hacking. See :func:`extract_boxed`.
4. **Language-mix gate** [code ``LanguageMixVerifier``, on by default]: a response holding both a long Chinese
   paragraph (>= 50 CJK characters, > 80% of the paragraph) and a long English one (>= 200 words, > 70% of
   its whitespace tokens), paragraphs split on blank lines, gets the minimum reward.
5. **Repetition gate** [code detector ``detect_repeat``: some 50-character window occurs >= 10 times, after
   runs of >= 3 formatting characters are removed; wiring it into the reward is ours, following the paper's
   "large repetitive blocks get a low reward"]: minimum reward.
6. **Domain verifier** on the box content, its value clipped to [0, 1]; anything that fails, raises or runs
   out of time gives :data:`MIN_REWARD` (0.0, the official ``Verifier.min_reward``; the official ``-inf``
   fallback and its group-minimum repair never arise because every failure here is already 0.0).

Layout
------
:mod:`.format` the format gate and box extraction; :mod:`.gates` the language-mix and repetition gates;
:mod:`.verifiers` one module per verifier family (math, counting, ocr, grounding: plain functions, no jax);
:mod:`.pipeline` one evaluation (gates, then the verifier); :mod:`.worker` and :mod:`.sandbox` the time-bounded
worker processes and their protocol; :mod:`.registry` the domains. The verifiers' rules are in their modules'
docstrings, the time bound and isolation in :mod:`.sandbox`'s.

Public API
----------
``format_ok``, ``extract_boxed``, ``math_reward``, ``counting_reward``, ``ocr_reward``, ``grounding_reward``
take the whole response, never raise and never execute text; the ``*_reward`` functions return a float in
[0, 1] within their deadline. ``register(domain, verifier)``, ``reward(domain, response, ground_truth)``,
``score(example, response)`` and ``score_batch`` form the registry; ``counting``, ``arithmetic``, ``ocr`` and
``grounding`` (the synthetic domains of :mod:`glmv_jax.data.synthetic`) are registered by default, and
``ocr_exact`` (the OCR verifier in its exact-match mode, for domains where partial credit is unwanted) and
``math`` (the math verifier, for benchmark files of ``glmv eval``).
"""
from __future__ import annotations

from typing import Any as _Any

from glmv_jax.rl.rewards.format import BOX_BEGIN, BOX_END, MAX_RESPONSE_CHARS, extract_boxed, format_ok
from glmv_jax.rl.rewards.gates import has_language_mix, has_repetition
from glmv_jax.rl.rewards.pipeline import MIN_REWARD
from glmv_jax.rl.rewards.pipeline import Spec as _Spec
from glmv_jax.rl.rewards.registry import domains, register, reward, score, score_batch, unregister
from glmv_jax.rl.rewards.sandbox import DEFAULT_TIMEOUT, shutdown, warmup
from glmv_jax.rl.rewards.sandbox import run as _run
from glmv_jax.rl.rewards.verifiers import box_iou, verify_count, verify_grounding, verify_math, verify_ocr
from glmv_jax.rl.rewards.verifiers.grounding import IOU_THRESHOLD
from glmv_jax.rl.rewards.verifiers.math import MATH_TOLERANCE

_MATH, _COUNT, _OCR, _GROUND = (_Spec("math"), _Spec("counting"), _Spec("ocr"), _Spec("grounding"))


def _with(spec: _Spec, **kwargs) -> _Spec:
    return _Spec(spec.verifier, kwargs, spec.box, spec.language_mix, spec.repetition, spec.timeout)


def math_reward(response: _Any, ground_truth: _Any, *, tolerance: float = MATH_TOLERANCE,
                timeout: float | None = None) -> float:
    """Math reward of a whole response: format gate, box, gates, then :func:`verify_math`. In [0, 1]; never
    raises; returns within ``timeout`` (default :data:`DEFAULT_TIMEOUT`)."""
    try:
        tol = float(tolerance)
    except Exception:
        return MIN_REWARD
    return _run(_with(_MATH, tolerance=tol), response, ground_truth, timeout)["reward"]


def counting_reward(response: _Any, ground_truth: _Any, *, timeout: float | None = None) -> float:
    """Counting reward of a whole response (exact integer, :func:`verify_count`)."""
    return _run(_COUNT, response, ground_truth, timeout)["reward"]


def ocr_reward(response: _Any, ground_truth: _Any, *, ignore_case: bool = False, exact: bool = False,
               timeout: float | None = None) -> float:
    """OCR reward of a whole response (``1 - edit distance / max length``, or with ``exact`` 1 iff the texts
    are equal; :func:`verify_ocr`)."""
    return _run(_with(_OCR, ignore_case=bool(ignore_case), exact=bool(exact)), response, ground_truth,
                timeout)["reward"]


def grounding_reward(response: _Any, boxes: _Any, *, iou_threshold: float = IOU_THRESHOLD,
                     timeout: float | None = None) -> float:
    """Grounding reward of a whole response against ``boxes`` (one ``[x1, y1, x2, y2]`` or a list of them, on
    the 0..1000 scale): matched boxes / max(#predicted, #truth), :func:`verify_grounding`."""
    try:
        tau = float(iou_threshold)
    except Exception:
        return MIN_REWARD
    return _run(_with(_GROUND, iou_threshold=tau), response, boxes, timeout)["reward"]


__all__ = ["BOX_BEGIN", "BOX_END", "DEFAULT_TIMEOUT", "IOU_THRESHOLD", "MATH_TOLERANCE", "MAX_RESPONSE_CHARS",
           "MIN_REWARD", "box_iou", "counting_reward", "domains", "extract_boxed", "format_ok",
           "grounding_reward", "has_language_mix", "has_repetition", "math_reward", "ocr_reward", "register",
           "reward", "score", "score_batch", "shutdown", "unregister", "verify_count", "verify_grounding",
           "verify_math", "verify_ocr", "warmup"]
