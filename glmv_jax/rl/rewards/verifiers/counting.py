"""The counting verifier (:func:`verify_count`) on an extracted answer.

Exact integer [code: exact string, or both digit strings with equal ``int``]; English number words
``zero``..``twenty`` count as their value [ours, standing in for the official LLM judge's number-word equivalence].
``3.0``, ``3 circles`` or "a number between 0 and 10" get 0.
"""
from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

_NUMBER_WORDS = {w: i for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}
_INT_RE = re.compile(r"[+-]?[0-9]{1,18}")


def _as_int(x: Any) -> int | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return int(x) if math.isfinite(x) and x == int(x) else None
    if isinstance(x, str):
        s = unicodedata.normalize("NFKC", x).strip().rstrip(".").strip().lower()
        if _INT_RE.fullmatch(s):
            return int(s)
        return _NUMBER_WORDS.get(s)
    try:
        import numbers

        if isinstance(x, numbers.Integral):
            return int(x)
    except Exception:
        pass
    return None


def verify_count(answer: str, ground_truth: Any) -> float:
    """Counting verifier: 1.0 iff the answer is exactly the integer ``ground_truth`` (digits, optionally signed,
    or an English number word up to twenty; a trailing period is ignored), else 0.0."""
    if not isinstance(answer, str) or len(answer) > 64:
        return 0.0
    a, g = _as_int(answer), _as_int(ground_truth)
    return 1.0 if a is not None and g is not None and a == g else 0.0
