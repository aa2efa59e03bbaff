"""The registry of reward domains: ``register(domain, verifier)``, and scoring a response of a registered domain
(``reward``, ``score``, ``score_batch``) through the time-bounded sandbox."""
from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import glmv_jax.rl.rewards.sandbox as sandbox
from glmv_jax.rl.rewards.format import gate
from glmv_jax.rl.rewards.pipeline import Spec
from glmv_jax.rl.rewards.verifiers import BUILTINS

_REGISTRY: dict[str, Spec] = {}


def _make_spec(verifier, kwargs, box, language_mix, repetition, timeout) -> Spec:
    if isinstance(verifier, str):
        if verifier not in BUILTINS:
            raise ValueError(f"unknown built-in verifier {verifier!r}; expected one of {sorted(BUILTINS)} or a "
                             f"callable(answer, ground_truth, **kwargs) -> float")
    elif callable(verifier):
        for name, fn in BUILTINS.items():
            if verifier is fn:
                verifier = name
                break
    else:
        raise TypeError(f"verifier must be a callable or a built-in name, got {type(verifier).__name__}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    spec = Spec(verifier, dict(kwargs), bool(box), bool(language_mix), bool(repetition), timeout)
    if not isinstance(verifier, str):
        try:
            spec.pickled = pickle.dumps(verifier)
        except Exception:
            spec.in_thread = True
    return spec


def register(domain: str, verifier: str | Callable[..., float], *, box: bool = True, language_mix: bool = True,
             repetition: bool = True, timeout: float | None = None, **kwargs: Any) -> None:
    """Register (or replace) the verifier of ``domain``.

    ``verifier`` is a built-in name (``"math"``, ``"counting"``, ``"ocr"``, ``"grounding"``) or a callable
    ``verifier(answer, ground_truth, **kwargs) -> float`` where ``answer`` is the box content (``box=True``) or
    the stripped ``<answer>`` segment (``box=False``: the domain is not verifiable by a box, and a box in the
    answer gets the minimum reward [paper]). The format gate, the language-mix and repetition gates
    (switchable), clipping to [0, 1] and the time bound are applied around it. ``kwargs`` go to the verifier,
    e.g. ``register("chart", "math", tolerance=2.5e-2)`` or ``register("ocr_exact", "ocr", exact=True)``.
    Module-level functions run in the worker processes (they are pickled by reference); lambdas and closures
    run in a thread of the caller.
    """
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    _REGISTRY[domain] = _make_spec(verifier, kwargs, box, language_mix, repetition, timeout)


def unregister(domain: str) -> None:
    """Remove ``domain`` from the registry (no error if absent)."""
    _REGISTRY.pop(domain, None)


def domains() -> list[str]:
    """The registered domain names."""
    return sorted(_REGISTRY)


def _spec_of(domain: str) -> Spec:
    try:
        return _REGISTRY[domain]
    except KeyError:
        raise KeyError(f"no verifier registered for domain {domain!r}; registered: {domains()}") from None


def reward(domain: str, response: Any, ground_truth: Any, *, timeout: float | None = None) -> float:
    """The reward in [0, 1] of ``response`` for an example of ``domain`` with ``ground_truth``. Raises
    ``KeyError`` only for an unregistered domain (a programming error); never for any response."""
    return sandbox.run(_spec_of(domain), response, ground_truth, timeout)["reward"]


def score(example: Mapping[str, Any], response: Any, *, timeout: float | None = None) -> dict:
    """Score ``response`` for ``example`` (a dict with ``domain`` and ``ground_truth``, e.g. from
    :func:`glmv_jax.data.synthetic.make_example`).

    Returns ``{"reward", "format_ok", "answer", "domain", "id", "language_mix", "repetition", "timed_out",
    "error", "seconds"}``: ``answer`` is the extracted box content (or answer segment for ``box=False``
    domains) when the format gate passes, else ``None``; ``error`` says why the reward is the minimum, if it is.
    """
    t0 = time.perf_counter()
    domain = example["domain"]
    spec = _spec_of(domain)
    out = sandbox.run(spec, response, example.get("ground_truth"), timeout)
    ok, answer = gate(response, spec.box)
    return {"reward": out["reward"], "format_ok": ok, "answer": answer, "domain": domain, "id": example.get("id"),
            "language_mix": bool(out.get("language_mix")), "repetition": bool(out.get("repetition")),
            "timed_out": bool(out.get("timed_out")), "error": out.get("error"),
            "seconds": time.perf_counter() - t0}


def score_batch(examples: Sequence[Mapping[str, Any]], responses: Sequence[Any], *,
                timeout: float | None = None) -> list[dict]:
    """:func:`score` over pairs, spread over the worker pool; results in input order."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    if not examples:
        return []
    for ex in examples:
        _spec_of(ex["domain"])
    pool = sandbox.get_pool()
    n = pool.size if pool is not None else 1
    if n == 1 or len(examples) == 1:
        return [score(e, r, timeout=timeout) for e, r in zip(examples, responses)]
    with ThreadPoolExecutor(max_workers=min(n, len(examples))) as ex:
        return list(ex.map(lambda er: score(er[0], er[1], timeout=timeout), zip(examples, responses)))


# The synthetic domains of glmv_jax.data.synthetic, and OCR graded by exact match (binary rewards, for domains
# where partial credit would turn small differences among wrong answers into full-size advantages).
register("counting", "counting")
register("arithmetic", "math")
register("math", "math")     # what benchmark files (glmv eval) call their math lines
register("ocr", "ocr")
register("grounding", "grounding")
register("ocr_exact", "ocr", exact=True)
