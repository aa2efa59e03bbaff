"""The OCR verifier (:func:`verify_ocr`) on an extracted answer.

``1 - edit_distance / max(len)`` after removing spaces and newlines [code], case-sensitive by default [code;
``ignore_case=True`` is the official ``ocr_ignore_case`` variant]. Texts longer than :data:`MAX_OCR_CHARS` get 0
[ours]. The Levenshtein distance (per code point) comes from the ``editdistance`` library, as in the official
reward code.

``exact=True`` [ours] is the exact-match mode, chosen per domain (``register("ocr_exact", "ocr", exact=True)`` is
registered by default; the synthetic ``ocr`` domain keeps partial credit): 1.0 iff the two texts are equal after
the same normalisation (spaces and newlines removed, lowercased with ``ignore_case``), else 0.0. Partial credit
turns small differences among wrong answers into full-size GRPO advantages (measured: the mean OCR reward rose
while exact matches fell), which the binary mode does not reward.
"""
from __future__ import annotations

from typing import Any

import editdistance

MAX_OCR_CHARS = 16_384           # [ours]


def verify_ocr(answer: str, ground_truth: Any, *, ignore_case: bool = False, exact: bool = False) -> float:
    """OCR verifier [code]: ``1 - edit_distance / max(len)`` after removing spaces and newlines (and lowercasing
    with ``ignore_case``); with ``exact`` 1.0 iff the normalised texts are equal, else 0.0 [ours]. 0.0 for two
    empty texts or a text longer than :data:`MAX_OCR_CHARS`."""
    if not isinstance(answer, str) or not isinstance(ground_truth, (str, int, float)) or isinstance(ground_truth,
                                                                                                    bool):
        return 0.0
    a, b = answer, str(ground_truth)
    if ignore_case:
        a, b = a.lower(), b.lower()
    a = a.strip().replace("\n", " ").replace(" ", "")
    b = b.strip().replace("\n", " ").replace(" ", "")
    n = max(len(a), len(b))
    if n == 0 or n > MAX_OCR_CHARS:
        return 0.0
    if exact:
        return 1.0 if a == b else 0.0
    return max(0.0, 1.0 - editdistance.eval(a, b) / n)
