"""The format gate and strict box extraction: the first stages of every reward (see the package docstring).

**[code]** the official reward system (zai-org/GLM-V ``glmv_reward``), **[ours]** a choice made here.
"""
from __future__ import annotations

import itertools
import re
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_BEGIN, BOX_END = "<|begin_of_box|>", "<|end_of_box|>"

MAX_RESPONSE_CHARS = 200_000     # [ours] ~3x the longest RL response (16k tokens)


_TAG_RE = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_BOX_RE = re.compile(r"<\|(?:begin|end)_of_box\|>", re.IGNORECASE)
_ANSWER_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"</think>", re.IGNORECASE)
_BRACE_RE = re.compile(r"[{}]")
_EXPECTED_TAGS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]


def _split(response: Any) -> tuple[str, str] | None:
    """``(think, answer)`` of a response that has the ``<think>…</think> <answer>…</answer>`` layout with each
    tag exactly once, else ``None``. Linear time (no backtracking regex over the whole text)."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    s = response.strip()
    tags = [(m.start(), m.group().lower()) for m in itertools.islice(_TAG_RE.finditer(s), 5)]
    if [t for _, t in tags] != _EXPECTED_TAGS:
        return None
    (p0, _), (p1, _), (p2, _), (p3, _) = tags
    if p0 != 0 or p3 + len(ANSWER_CLOSE) != len(s) or s[p1 + len(THINK_CLOSE):p2].strip():
        return None
    return s[len(THINK_OPEN):p1], s[p2 + len(ANSWER_OPEN):p3]


def _single_box(text: str) -> str | None:
    """Content of the only ``<|begin_of_box|>…<|end_of_box|>`` pair of ``text`` (stripped), else ``None``."""
    marks = list(itertools.islice(_BOX_RE.finditer(text), 3))
    if (len(marks) != 2 or marks[0].group().lower() != BOX_BEGIN or marks[1].group().lower() != BOX_END):
        return None
    return text[marks[0].end():marks[1].start()].strip()


def _boxed_top_level(text: str, limit: int = 2) -> list[str | None]:
    """Top-level ``\\boxed{…}`` contents (at most ``limit``); an unbalanced one is reported as ``None``."""
    out: list[str | None] = []
    i = 0
    while len(out) < limit:
        j = text.find("\\boxed{", i)
        if j < 0:
            break
        start, depth, end = j + 7, 1, -1
        for m in _BRACE_RE.finditer(text, start):
            depth += 1 if m.group() == "{" else -1
            if depth == 0:
                end = m.start()
                break
        if end < 0:
            out.append(None)
            break
        out.append(text[start:end])
        i = end + 1
    return out


def gate(response: Any, box: bool = True) -> tuple[bool, str | None]:
    """The format gate: ``(ok, answer)`` where ``answer`` is the box content (``box=True``) or the stripped
    answer segment (``box=False``, which requires an answer without box markers)."""
    parts = _split(response)
    if parts is None:
        return False, None
    answer = parts[1]
    if "\\boxed{" in answer.lower():
        return False, None
    if not box:
        if _BOX_RE.search(answer):
            return False, None
        return True, answer.strip()
    content = _single_box(answer)
    return (content is not None), content


def format_ok(response: Any) -> bool:
    """True iff ``response`` passes the format gate: ``<think>…</think>`` then ``<answer>…</answer>`` (surrounding
    whitespace allowed, every tag exactly once), exactly one box in the answer and no ``\\boxed{``. Never
    raises; linear time."""
    try:
        return gate(response, True)[0]
    except Exception:  # pragma: no cover - defensive
        return False


def _answer_segment(text: str) -> str:
    a = _ANSWER_OPEN_RE.search(text)
    if a is not None:
        end = None
        for m in _ANSWER_CLOSE_RE.finditer(text, a.end()):
            end = m.start()
        return text[a.end():end] if end is not None else text[a.end():]
    last = None
    for m in _THINK_CLOSE_RE.finditer(text):
        last = m.end()
    return text[last:] if last is not None else text


def extract_boxed(response: Any) -> str | None:
    """The content of the single box of a response's answer, stripped; ``None`` unless there is exactly one.

    The answer is the text between ``<answer>`` and the last ``</answer>`` (else after the last ``</think>``,
    else the whole text). Box tokens ``<|begin_of_box|>…<|end_of_box|>`` are looked for first (exactly one
    begin and one end marker, in order); without box tokens a single top-level, brace-balanced ``\\boxed{…}``
    is accepted [code ``find_boxed_content`` with ``strict_boxed_extraction``]. Two boxes, nested boxes or
    unbalanced markers give ``None``. This does not apply the format gate (:func:`format_ok` does). Never
    raises; linear time.
    """
    try:
        if not isinstance(response, str):
            return None
        seg = _answer_segment(response)
        if _BOX_RE.search(seg):
            return _single_box(seg)
        boxed = _boxed_top_level(seg)
        if len(boxed) == 1 and boxed[0] is not None:
            return boxed[0].strip()
        return None
    except Exception:  # pragma: no cover - defensive
        return None
