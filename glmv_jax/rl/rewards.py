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

Verifiers (``answer`` is the box content)
-----------------------------------------
* **math** (:func:`verify_math`): exact string match after normalisation (NFKC, ``$``/``\\(\\)`` wrappers,
  spacing commands, ``\\left``/``\\right``, ``\\text{}``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, degree marks,
  whitespace, a trailing period, a leading ``x=``) -> 1 [code: exact first]; otherwise both sides as numbers
  and 1 iff ``|a - b| / (|b| + 1e-6) < tolerance`` [code formula], ``tolerance`` = :data:`MATH_TOLERANCE` =
  1e-6 [code ``full_config.yaml`` for math; chart data uses 2.5e-2]. So ``43`` == ``43.0`` and
  ``\\frac{1}{2}`` == ``0.5`` (both exact: decimals are read as exact rationals), but ``0.6667`` != ``2/3``
  (relative error 5e-5) unless a looser tolerance is given. Non-numeric, non-identical answers get 0 (the
  official LLM-judge fallback is not reproduced) [ours]. A trailing ``%`` on one side [ours]: either reading
  (``50%`` as 50 or as 0.5) may match.
  *Numbers are parsed, never evaluated as code* [ours]: LaTeX is rewritten to plain arithmetic, which must
  match the whitelist ``[0-9+\\-*/().]`` (at most :data:`MAX_EXPR_CHARS` characters, parentheses nested at
  most :data:`MAX_PAREN_DEPTH` deep, no ``//``) before sympy's ``parse_expr`` sees it (``evaluate=False``,
  only the number transformations, a global namespace holding just the six sympy number classes and no
  builtins). The tree is then evaluated bottom-up by :func:`_safe_value`, which allows only numbers, ``+``,
  ``*`` and powers with a rational exponent (denominator <= 64) whose result stays under
  :data:`MAX_POWER_BITS` bits, so ``9**9**9**9`` is refused before any arithmetic. (The official verifier
  calls ``sympify`` on raw model text, which evaluates it.)
* **counting** (:func:`verify_count`): exact integer [code: exact string, or both digit strings with equal
  ``int``]; English number words ``zero``..``twenty`` count as their value [ours, standing in for the
  official LLM judge's number-word equivalence]. ``3.0``, ``3 circles`` or "a number between 0 and 10" get 0.
* **ocr** (:func:`verify_ocr`): ``1 - edit_distance / max(len)`` after removing spaces and newlines [code],
  case-sensitive by default [code; ``ignore_case=True`` is the official ``ocr_ignore_case`` variant]. Texts
  longer than :data:`MAX_OCR_CHARS` get 0 [ours]. Levenshtein distance by Hyyrö's bit-parallel algorithm.
* **grounding** (:func:`verify_grounding`): [paper] reward = boxes with IoU > tau / boxes; tau is not published,
  :data:`IOU_THRESHOLD` = 0.5 [ours, the RefCOCO Acc@0.5 convention]. Predicted and ground-truth boxes are
  matched one to one (maximum bipartite matching) and the count is divided by ``max(#predicted, #truth)``
  [ours: the paper's ratio when the counts agree; extra, duplicated or missing boxes all cost reward].
  Boxes ``[x1, y1, x2, y2]`` on the 0..1000 scale are read from the box content with a regex (brackets or
  parentheses, ints or decimals, ``[[..],[..]]`` lists); a box outside 0..1000 or with ``x2 <= x1`` or
  ``y2 <= y1`` matches nothing; more than :data:`MAX_BOXES` predicted boxes give 0 [ours].

Time bound and isolation [ours]
-------------------------------
Every reward is computed in a small pool of warm worker *processes* (``python -I`` loading this file by path,
so the worker imports neither ``glmv_jax`` nor jax; sympy is imported and exercised before the worker reports
ready). The caller sends the request over a pipe and waits with ``select`` until the deadline
(:data:`DEFAULT_TIMEOUT` = 1.5 s, per call); on timeout the worker is killed and a replacement starts in the
background, and the call returns 0.0. Threads cannot stop a runaway sympy computation, processes can. The
first call of a process blocks until one worker is ready (0.5-1 s; :func:`warmup` does it up front);
that start-up is not counted against the deadline. Workers run with an address-space limit of
:data:`WORKER_MEMORY_BYTES`, in their own session, and die with their parent (EOF on stdin, plus a watchdog
thread polling the parent pid). Custom verifiers run in the workers when they pickle by reference
(module-level functions); others (lambdas, closures) run in a daemon thread of the caller: still
time-bounded for the caller, but not killable. If workers cannot start at all, everything falls back to that
thread mode with a warning. Measured on 2 CPU cores: about 0.1-0.6 ms per call for the round trip.

Public API
----------
``format_ok``, ``extract_boxed``, ``math_reward``, ``counting_reward``, ``ocr_reward``, ``grounding_reward``
take the whole response, never raise and never execute text; the ``*_reward`` functions return a float in
[0, 1] within their deadline. ``register(domain, verifier)``, ``reward(domain, response, ground_truth)``,
``score(example, response)`` and ``score_batch`` form the registry; ``counting``, ``arithmetic``, ``ocr`` and
``grounding`` (the synthetic domains of :mod:`glmv_jax.data.synthetic`) are registered by default.
"""
from __future__ import annotations

import atexit
import itertools
import json
import math
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

# ----------------------------------------------------------------------------------------------- constants
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_BEGIN, BOX_END = "<|begin_of_box|>", "<|end_of_box|>"

MIN_REWARD = 0.0                 # [code] Verifier.min_reward
MATH_TOLERANCE = 1e-6            # [code] full_config.yaml, math
IOU_THRESHOLD = 0.5              # [ours] the paper gives no tau
MAX_RESPONSE_CHARS = 200_000     # [ours] ~3x the longest RL response (16k tokens)
MAX_EXPR_CHARS = 128             # [ours] whitelisted arithmetic, after LaTeX rewriting
MAX_LATEX_CHARS = 512            # [ours] answers longer than this are only compared as strings
MAX_PAREN_DEPTH = 8              # [ours]
MAX_POWER_BITS = 16_384          # [ours] bit size of base * |exponent| for any power
MAX_OCR_CHARS = 16_384           # [ours]
MAX_BOXES = 100                  # [ours]
DEFAULT_TIMEOUT = 1.5            # [ours] seconds per reward call
STARTUP_TIMEOUT = 60.0           # [ours] seconds for a worker to become ready
WORKER_MEMORY_BYTES = 4 << 30    # [ours] RLIMIT_AS of a worker
REPEAT_WINDOW, REPEAT_MIN = 50, 10          # [code] detect_repeat defaults
MIX_MIN_CHINESE, MIX_MIN_ENGLISH = 50, 200  # [code] detect_long_paragraph_mixing defaults


# ============================================================================== format gate and extraction
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


def _gate(response: Any, box: bool = True) -> tuple[bool, str | None]:
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
        return _gate(response, True)[0]
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


# ============================================================================================ penalties
_ZH_RE = re.compile(r"[\u4e00-\u9fff]")
_EN_WORD_RE = re.compile(r"\b[a-zA-Z]{2,}\b")
_PARAGRAPH_RE = re.compile(r"\n{2,}")
_TABLE_RULE_RE = re.compile(r"\|[-]+\|")
_FORMAT_RUNS_RE = [re.compile(re.escape(ch) + "{3,}") for ch in ("=", "|", "-", "~", "_", "#", "*", ".", "%",
                                                                  "－", "█", " ", "─")]


def has_language_mix(text: str, min_chinese_chars: int = MIX_MIN_CHINESE,
                     min_english_words: int = MIX_MIN_ENGLISH) -> bool:
    """[code ``detect_long_paragraph_mixing``] True iff ``text`` has both a long Chinese paragraph (>=
    ``min_chinese_chars`` characters in U+4E00..U+9FFF, > 80% of the paragraph's characters) and a long
    English one (>= ``min_english_words`` words of >= 2 ASCII letters, > 70% of its whitespace tokens);
    paragraphs are separated by blank lines."""
    zh = en = False
    for para in _PARAGRAPH_RE.split(text):
        para = para.strip()
        if not para:
            continue
        n_zh = sum(1 for _ in _ZH_RE.finditer(para))
        if n_zh >= min_chinese_chars and n_zh / len(para) > 0.8:
            zh = True
        n_en = sum(1 for _ in _EN_WORD_RE.finditer(para))
        if n_en >= min_english_words and n_en / (len(para.split()) + 1e-5) > 0.7:
            en = True
        if zh and en:
            return True
    return False


def has_repetition(text: str, window: int = REPEAT_WINDOW, min_repetition: int = REPEAT_MIN) -> bool:
    """[code ``detect_repeat``] True iff some ``window``-character substring occurs at least
    ``min_repetition`` times (overlaps count), after table rules and runs of >= 3 formatting characters
    (``= | - ~ _ # * . % － █ ─`` and spaces) are removed."""
    text = _TABLE_RULE_RE.sub("|", text)
    for pat in _FORMAT_RUNS_RE:
        text = pat.sub("", text)
    n = len(text)
    if n < window + min_repetition - 1:
        return False
    times: dict[int, int] = {}
    for i in range(window, n + 1):
        h = hash(text[i - window:i])
        c = times.get(h, 0) + 1
        if c >= min_repetition:
            return True
        times[h] = c
    return False


# ============================================================================================ math verifier
_SPACING_RE = re.compile(r"\\(?:[,;:! ]|q?quad\b)")
_TEXT_CMD_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textrm|mbox)\{([^{}]*)\}")
_ASSIGN_RE = re.compile(r"^[A-Za-z]=(?!=)")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ARITH_RE = re.compile(r"[0-9+\-*/().]+")
_UNICODE_OPS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "*", "\u22c5": "*", "\u00b7": "*",
                              "\u00f7": "/", "\u2044": "/"})


class _Reject(Exception):
    """An answer that is not a number this verifier accepts."""


def _normalize_math(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).translate(_UNICODE_OPS).strip()
    s = s.strip("$").strip()
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2]
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = _TEXT_CMD_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\u00b0", "")
    s = "".join(s.split())
    s = s.replace("\\%", "%").replace("{,}", "")
    s = _ASSIGN_RE.sub("", s)
    return s.rstrip(".")


def _latex_arg(s: str, j: int) -> tuple[str, int] | None:
    if j >= len(s):
        return None
    if s[j] == "{":
        depth = 0
        for k in range(j, len(s)):
            if s[k] == "{":
                depth += 1
            elif s[k] == "}":
                depth -= 1
                if depth == 0:
                    return s[j + 1:k], k + 1
        return None
    if s[j] in "0123456789":
        return s[j], j + 1
    return None


def _expand_frac(s: str) -> str | None:
    """``\\frac{A}{B}`` (and ``\\frac12``) -> ``((A)/(B))``, innermost last; ``None`` when malformed."""
    for _ in range(16):
        i = s.find("\\frac")
        if i < 0:
            return s
        num = _latex_arg(s, i + 5)
        if num is None:
            return None
        den = _latex_arg(s, num[1])
        if den is None:
            return None
        s = s[:i] + "((" + num[0] + ")/(" + den[0] + "))" + s[den[1]:]
    return None


def _to_arith(s: str) -> str | None:
    """Normalised LaTeX -> a whitelisted plain-arithmetic string, or ``None``."""
    if len(s) > MAX_LATEX_CHARS:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = _expand_frac(s)
    if s is None:
        return None
    for a, b in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("^", "**"), ("{", "("), ("}", ")")):
        s = s.replace(a, b)
    if not s or len(s) > MAX_EXPR_CHARS or not _ARITH_RE.fullmatch(s) or "//" in s or "***" in s:
        return None
    depth = 0
    for ch in s:
        if ch == "(":
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                return None
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return None
    return s if depth == 0 else None


def _bits(q) -> int:
    return max(int(q.p).bit_length(), int(q.q).bit_length())


def _safe_value(e, depth: int = 0):
    """Evaluate an unevaluated sympy tree of numbers, ``Add``, ``Mul`` and ``Pow`` bottom-up, refusing any power
    whose result could exceed :data:`MAX_POWER_BITS` bits before computing it."""
    import sympy

    if depth > 64:
        raise _Reject("too deep")
    if e.is_Rational:
        if _bits(e) > MAX_POWER_BITS:
            raise _Reject("number too large")
        return e
    args = [_safe_value(a, depth + 1) for a in e.args]
    if e.is_Add:
        v = sympy.Add(*args)
    elif e.is_Mul:
        v = sympy.Mul(*args)
    elif e.is_Pow:
        base, ex = args
        if not (ex.is_Rational and base.is_Rational):
            raise _Reject("power with a non-rational base or exponent")
        if ex.q > 64 or _bits(base) * abs(ex) > MAX_POWER_BITS:
            raise _Reject("power too large")
        v = sympy.Pow(base, ex)
    else:
        raise _Reject(f"unsupported node {type(e).__name__}")
    if v.is_Rational and _bits(v) > 4 * MAX_POWER_BITS:
        raise _Reject("number too large")
    return v


_PARSE_GLOBALS: dict | None = None


def _parse_number(expr: str):
    """Whitelisted arithmetic string -> a sympy number, via ``parse_expr(evaluate=False)`` and
    :func:`_safe_value`."""
    global _PARSE_GLOBALS
    from sympy.parsing.sympy_parser import auto_number, parse_expr, rationalize

    if _PARSE_GLOBALS is None:
        from sympy import Add, Float, Integer, Mul, Pow, Rational

        _PARSE_GLOBALS = {"Integer": Integer, "Rational": Rational, "Float": Float, "Add": Add, "Mul": Mul,
                          "Pow": Pow}
    if not _ARITH_RE.fullmatch(expr) or len(expr) > MAX_EXPR_CHARS:  # never reached with untrusted text
        raise _Reject("not whitelisted")
    tree = parse_expr(expr, local_dict={}, global_dict={**_PARSE_GLOBALS, "__builtins__": {}},
                      transformations=(auto_number, rationalize), evaluate=False)
    return _safe_value(tree)


def _numeric_values(s: str) -> list:
    """Candidate values of a normalised answer: one, or two for a trailing ``%`` (x/100 and x)."""
    percent = s.endswith("%")
    core = s[:-1] if percent else s
    expr = _to_arith(core)
    if expr is None:
        return []
    try:
        v = _parse_number(expr)
    except Exception:
        return []
    return [v / 100, v] if percent else [v]


def _close(a, b, tol: float) -> bool:
    import sympy

    if a.is_Rational and b.is_Rational:
        return bool(abs(a - b) < sympy.Rational(tol) * (abs(b) + sympy.Rational(1, 10**6)))
    fa, fb = sympy.N(a, 50), sympy.N(b, 50)
    if not (fa.is_Float and fb.is_Float):  # complex, infinite or nan
        return False
    return bool(abs(fa - fb) < tol * (abs(fb) + 1e-6))


def _gt_string(gt: Any) -> str | None:
    if isinstance(gt, bool) or gt is None:
        return None
    if isinstance(gt, str):
        return gt
    if isinstance(gt, Fraction):
        return f"{gt.numerator}/{gt.denominator}"
    if isinstance(gt, int):
        return str(gt)
    if isinstance(gt, float):
        return repr(gt) if math.isfinite(gt) else None
    try:
        import numbers

        if isinstance(gt, numbers.Integral):
            return str(int(gt))
        if isinstance(gt, numbers.Real):
            return repr(float(gt))
    except Exception:
        pass
    return None


def verify_math(answer: str, ground_truth: Any, *, tolerance: float = MATH_TOLERANCE) -> float:
    """Math verifier on an extracted answer: 1.0 for an exact match after normalisation or a numeric match within
    relative ``tolerance`` (``|a - b| / (|b| + 1e-6) < tolerance``), else 0.0. Runs in the caller: use
    :func:`math_reward` or :func:`reward` for the gated, time-bounded path."""
    if not isinstance(answer, str):
        return 0.0
    gt = _gt_string(ground_truth)
    if gt is None:
        return 0.0
    a, b = _normalize_math(answer), _normalize_math(gt)
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    va = _numeric_values(a)
    if not va:
        return 0.0
    vb = _numeric_values(b)
    return 1.0 if any(_close(x, y, float(tolerance)) for x in va for y in vb) else 0.0


# ======================================================================================== counting verifier
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


# ============================================================================================= OCR verifier
def _levenshtein(a: str, b: str) -> int:
    """Levenshtein distance, Hyyrö's bit-parallel algorithm with Python ints as bit vectors:
    O(len(long) * len(short) / word) instead of the O(n * m) table."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def verify_ocr(answer: str, ground_truth: Any, *, ignore_case: bool = False) -> float:
    """OCR verifier [code]: ``1 - edit_distance / max(len)`` after removing spaces and newlines (and lowercasing
    with ``ignore_case``); 0.0 for two empty texts or a text longer than :data:`MAX_OCR_CHARS`."""
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
    return max(0.0, 1.0 - _levenshtein(a, b) / n)


# ======================================================================================= grounding verifier
_NUM = r"[+-]?(?:\d{1,7}(?:\.\d{0,7})?|\.\d{1,7})"
_BOX4_RE = re.compile(rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\])]")


def _parse_boxes(x: Any, limit: int = MAX_BOXES) -> list[tuple[float, float, float, float]]:
    """Boxes from a string (every ``[x1, y1, x2, y2]`` or ``(…)`` group) or from a box / list of boxes; at most
    ``limit + 1`` are returned (so callers can tell "too many")."""
    if isinstance(x, str):
        return [tuple(float(v) for v in m.groups())
                for m in itertools.islice(_BOX4_RE.finditer(x), limit + 1)]

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) or type(v).__name__.startswith(
            ("int", "float"))

    if isinstance(x, Sequence) and len(x) == 4 and all(is_num(v) for v in x):
        return [tuple(float(v) for v in x)]
    out = []
    if isinstance(x, Sequence):
        for item in itertools.islice(x, limit + 1):
            if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 4 and all(
                    is_num(v) for v in item):
                out.append(tuple(float(v) for v in item))
            else:
                return []
    return out


def _valid_box(b) -> bool:
    x1, y1, x2, y2 = b
    return all(math.isfinite(v) and 0.0 <= v <= 1000.0 for v in b) and x2 > x1 and y2 > y1


def box_iou(a, b) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes; 0.0 if either is invalid (outside 0..1000 or empty)."""
    if not (_valid_box(a) and _valid_box(b)):
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _max_matching(adj: list[list[int]], n_right: int) -> int:
    """Maximum bipartite matching (Kuhn's augmenting paths); ``adj[i]`` lists the right nodes of left node i."""
    match_right = [-1] * n_right

    def augment(i: int, seen: list[bool]) -> bool:
        for j in adj[i]:
            if not seen[j]:
                seen[j] = True
                if match_right[j] < 0 or augment(match_right[j], seen):
                    match_right[j] = i
                    return True
        return False

    return sum(augment(i, [False] * n_right) for i in range(len(adj)))


def verify_grounding(answer: str, ground_truth: Any, *, iou_threshold: float = IOU_THRESHOLD) -> float:
    """Grounding verifier: predicted boxes matched one to one with ground-truth boxes at IoU > ``iou_threshold``;
    reward = matches / max(#predicted, #truth). ``ground_truth`` is one box, a list of boxes or a string."""
    if not isinstance(answer, str):
        return 0.0
    preds = _parse_boxes(answer)
    gts = _parse_boxes(ground_truth)
    if not preds or not gts or len(preds) > MAX_BOXES or len(gts) > MAX_BOXES:
        return 0.0
    adj = [[j for j, g in enumerate(gts) if box_iou(p, g) > iou_threshold] for p in preds]
    return _max_matching(adj, len(gts)) / max(len(preds), len(gts))


_BUILTINS: dict[str, Callable[..., float]] = {
    "math": verify_math, "counting": verify_count, "ocr": verify_ocr, "grounding": verify_grounding}


# ========================================================================================= one evaluation
def _evaluate(fn: Callable[..., float], kwargs: Mapping[str, Any], box: bool, language_mix: bool,
              repetition: bool, response: Any, ground_truth: Any) -> dict:
    """The whole pipeline for one response (runs inside a worker)."""
    out = {"reward": MIN_REWARD, "language_mix": False, "repetition": False, "error": None}
    try:
        ok, answer = _gate(response, box)
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


# ================================================================================================ workers
_HEADER = struct.Struct(">Q")
_BOOT = ("import sys, importlib.util as u\n"
         "s = u.spec_from_file_location('_glmv_reward_worker', sys.argv[1])\n"
         "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
         "m._worker_main()\n")


def _read_exact(f, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _worker_main() -> None:  # pragma: no cover - runs in the worker process
    """Entry point of a worker: serve length-prefixed pickled requests on stdin, JSON replies on stdout."""
    warnings.simplefilter("ignore")
    parent = os.getppid()

    def watchdog():  # die with the parent, even in the middle of a computation (PR_SET_PDEATHSIG would fire
        while True:  # when the parent's spawning *thread* ends, so it cannot be used here)
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, name="glmv-reward-watchdog", daemon=True).start()
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, hard))
    except Exception:
        pass
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    os.dup2(2, 1)  # stray prints of verifiers go to stderr, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = sys.stderr
    # warm up: import sympy and walk every verifier once
    verify_math("\\frac{1}{2}", "0.5")
    verify_math("2**(1/2)", "1.4142135623730951", tolerance=1e-9)
    verify_math("0.1+0.2", "0.3")
    verify_math("(-8)**(1/3)", "-2")
    verify_ocr("abc", "abd")
    verify_grounding("[1,2,3,4]", [1, 2, 3, 4])
    _reply(proto_out, {"ready": True, "pid": os.getpid()})
    fns: dict[bytes, Callable] = {}
    while True:
        header = _read_exact(proto_in, _HEADER.size)
        if header is None:
            break
        payload = _read_exact(proto_in, _HEADER.unpack(header)[0])
        if payload is None:
            break
        try:
            req = pickle.loads(payload)
            if req["builtin"] is not None:
                fn = _BUILTINS[req["builtin"]]
            else:
                fn = fns.get(req["fn"])
                if fn is None:
                    try:
                        if req.get("sys_path"):
                            sys.path[:] = [p for p in req["sys_path"] if isinstance(p, str)]
                        fn = pickle.loads(req["fn"])
                    except Exception as e:
                        _reply(proto_out, {"reward": MIN_REWARD, "unpicklable": True,
                                           "error": f"cannot load the verifier in a worker: {e!r}"[:300]})
                        continue
                    fns[req["fn"]] = fn
            out = _evaluate(fn, req["kwargs"], req["box"], req["language_mix"], req["repetition"],
                            req["response"], req["ground_truth"])
        except BaseException as e:  # noqa: BLE001
            out = {"reward": MIN_REWARD, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        _reply(proto_out, out)


def _reply(f, obj: dict) -> None:  # pragma: no cover - runs in the worker process
    data = json.dumps(obj).encode()
    f.write(_HEADER.pack(len(data)) + data)


class _Worker:
    """One worker process and its two pipes (the parent's end)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_", "TF_"))}
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, bufsize=0, close_fds=True, env=env, start_new_session=True)
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        os.set_blocking(self.wfd, False)
        self.buf = bytearray()

    def send(self, payload: bytes, deadline: float) -> bool:
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                _, w, _ = select.select([], [self.wfd], [], remaining)
                if not w:
                    continue
                n = os.write(self.wfd, data)
            except BlockingIOError:
                continue
            except OSError:
                return False
            data = data[n:]
        return True

    def recv(self, deadline: float) -> bytes | None:
        """One reply, or ``None`` on timeout or end of file."""
        while True:
            if len(self.buf) >= _HEADER.size:
                n = _HEADER.unpack(self.buf[:_HEADER.size])[0]
                if len(self.buf) >= _HEADER.size + n:
                    msg = bytes(self.buf[_HEADER.size:_HEADER.size + n])
                    del self.buf[:_HEADER.size + n]
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                r, _, _ = select.select([self.rfd], [], [], remaining)
                if not r:
                    continue
                chunk = os.read(self.rfd, 1 << 16)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass


class _Pool:
    """A fixed number of warm workers; a killed or dead worker is replaced in the background."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.idle: list[_Worker] = []
        self.all: set[_Worker] = set()
        self.starting = 0
        self.failures = 0
        self.broken = False
        self.closed = False
        for _ in range(size):
            self._spawn_async()

    def _spawn_async(self) -> None:
        with self.cond:
            if self.closed or self.broken:
                return
            self.starting += 1
        threading.Thread(target=self._spawn, name="glmv-reward-spawn", daemon=True).start()

    def _spawn(self) -> None:
        w = None
        ok = False
        try:
            w = _Worker()
            reply = w.recv(time.monotonic() + STARTUP_TIMEOUT)
            ok = reply is not None and json.loads(reply).get("ready") is True
        except Exception:
            ok = False
        retry = False
        with self.cond:
            self.starting -= 1
            if ok and not self.closed:
                self.idle.append(w)
                self.all.add(w)
                self.failures = 0
            else:
                if not self.closed:
                    self.failures += 1
                    if self.failures >= 3:
                        self.broken = True
                    else:
                        retry = True
            self.cond.notify_all()
        if not ok and w is not None:
            w.kill()
        elif ok and self.closed:
            w.kill()
        if retry:
            self._spawn_async()

    def wait_ready(self, timeout: float, all_workers: bool = False) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not self.broken:
                if (len(self.all) >= self.size) if all_workers else (self.all or self.starting == 0):
                    break
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            return bool(self.all) and not self.broken

    def acquire(self, deadline: float) -> _Worker | None:
        with self.cond:
            while True:
                if self.idle:
                    return self.idle.pop()
                if self.broken or self.closed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def release(self, w: _Worker) -> None:
        with self.cond:
            if self.closed:
                self.all.discard(w)
            else:
                self.idle.append(w)
                self.cond.notify()
                return
        w.kill()

    def discard(self, w: _Worker) -> None:
        with self.cond:
            self.all.discard(w)
        w.kill()
        self._spawn_async()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            workers = list(self.all)
            self.all.clear()
            self.idle.clear()
            self.cond.notify_all()
        if os.getpid() == self.pid:
            for w in workers:
                w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _pool_size() -> int:
    try:
        return max(1, int(os.environ.get("GLMV_REWARD_WORKERS", "0"))) if os.environ.get(
            "GLMV_REWARD_WORKERS") else max(1, min(4, os.cpu_count() or 1))
    except ValueError:
        return max(1, min(4, os.cpu_count() or 1))


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _get_pool() -> _Pool | None:
    """The process's worker pool, started (and waited for) on first use; ``None`` if workers cannot run."""
    global _POOL
    pool = _POOL
    if pool is not None and pool.pid == os.getpid() and not pool.broken:
        return pool
    with _POOL_LOCK:
        pool = _POOL
        if pool is None or pool.pid != os.getpid():
            if not sys.executable:
                _warn_once("noexe", "glmv_jax.rl.rewards: no Python executable for reward workers; verifiers "
                                    "run in threads of the caller (time-bounded, but not killable)")
                return None
            pool = _POOL = _Pool(_pool_size())
    pool.wait_ready(STARTUP_TIMEOUT)
    if pool.broken or not pool.all:
        _warn_once("broken", "glmv_jax.rl.rewards: reward workers failed to start; verifiers run in threads of "
                             "the caller (time-bounded, but not killable)")
        return None
    return pool


def warmup(all_workers: bool = True) -> bool:
    """Start the worker pool now (it otherwise starts on the first reward call) and wait until the workers are
    ready; returns whether worker processes are available."""
    pool = _get_pool()
    if pool is None:
        return False
    if all_workers:
        pool.wait_ready(STARTUP_TIMEOUT, all_workers=True)
    return True


def shutdown() -> None:
    """Stop the worker processes (a later call starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


def _after_fork_in_child() -> None:  # pragma: no cover
    global _POOL_LOCK, _POOL
    _POOL_LOCK = threading.Lock()
    _POOL = None  # the parent's workers belong to the parent


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# =============================================================================================== registry
@dataclass
class _Spec:
    verifier: str | Callable[..., float]
    kwargs: dict = field(default_factory=dict)
    box: bool = True
    language_mix: bool = True
    repetition: bool = True
    timeout: float | None = None
    pickled: bytes | None = None      # custom verifiers that pickle by reference
    in_thread: bool = False           # custom verifiers that cannot run in a worker


_REGISTRY: dict[str, _Spec] = {}


def _make_spec(verifier, kwargs, box, language_mix, repetition, timeout) -> _Spec:
    if isinstance(verifier, str):
        if verifier not in _BUILTINS:
            raise ValueError(f"unknown built-in verifier {verifier!r}; expected one of {sorted(_BUILTINS)} or a "
                             f"callable(answer, ground_truth, **kwargs) -> float")
    elif callable(verifier):
        for name, fn in _BUILTINS.items():
            if verifier is fn:
                verifier = name
                break
    else:
        raise TypeError(f"verifier must be a callable or a built-in name, got {type(verifier).__name__}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    spec = _Spec(verifier, dict(kwargs), bool(box), bool(language_mix), bool(repetition), timeout)
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
    e.g. ``register("chart", "math", tolerance=2.5e-2)``. Module-level functions run in the worker processes
    (they are pickled by reference); lambdas and closures run in a thread of the caller.
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


def _result(reward: float = MIN_REWARD, error: str | None = None, **extra) -> dict:
    out = {"reward": reward, "language_mix": False, "repetition": False, "error": error, "timed_out": False}
    out.update(extra)
    return out


def _run_in_thread(spec: _Spec, response: Any, gt: Any, deadline: float) -> dict:
    fn = _BUILTINS[spec.verifier] if isinstance(spec.verifier, str) else spec.verifier
    box: dict = {}

    def target():
        box["out"] = _evaluate(fn, spec.kwargs, spec.box, spec.language_mix, spec.repetition, response, gt)

    t = threading.Thread(target=target, name="glmv-reward-thread", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        return _result(error="timeout (thread; the verifier keeps running)", timed_out=True)
    out = box.get("out") or _result(error="verifier thread failed")
    out.setdefault("timed_out", False)
    return out


def _run(spec: _Spec, response: Any, gt: Any, timeout: float | None) -> dict:
    """Evaluate one response under the spec's time bound; never raises."""
    try:
        if not isinstance(response, str):
            return _result(error="response is not a string")
        if len(response) > MAX_RESPONSE_CHARS:
            return _result(error=f"response longer than {MAX_RESPONSE_CHARS} characters")
        limit = float(timeout if timeout is not None else spec.timeout if spec.timeout is not None
                      else DEFAULT_TIMEOUT)
        pool = None if spec.in_thread else _get_pool()
        deadline = time.monotonic() + limit
        if pool is None:
            return _run_in_thread(spec, response, gt, deadline)
        req = {"builtin": spec.verifier if isinstance(spec.verifier, str) else None, "fn": spec.pickled,
               "sys_path": None if isinstance(spec.verifier, str) else list(sys.path), "kwargs": spec.kwargs,
               "box": spec.box, "language_mix": spec.language_mix, "repetition": spec.repetition,
               "response": response, "ground_truth": gt}
        try:
            payload = pickle.dumps(req)
        except Exception:
            return _run_in_thread(spec, response, gt, deadline)
        while True:
            w = pool.acquire(deadline)
            if w is None:
                if pool.broken:
                    return _run_in_thread(spec, response, gt, deadline)
                return _result(error="no reward worker free before the deadline", timed_out=True)
            if not w.send(payload, deadline):
                if time.monotonic() >= deadline:
                    pool.discard(w)
                    return _result(error="timeout while sending", timed_out=True)
                pool.discard(w)  # a worker that died while idle: try another one
                continue
            reply = w.recv(deadline)
            if reply is None:
                timed_out = time.monotonic() >= deadline
                pool.discard(w)
                return _result(error=f"timeout after {limit:g} s" if timed_out else "worker died",
                               timed_out=timed_out)
            pool.release(w)
            out = json.loads(reply)
            if out.get("unpicklable"):
                spec.in_thread = True
                _warn_once(f"unpicklable:{id(spec)}", f"glmv_jax.rl.rewards: {out.get('error')}; this verifier "
                                                      f"now runs in a thread of the caller")
                return _run_in_thread(spec, response, gt, deadline)
            out.setdefault("timed_out", False)
            r = out.get("reward")
            out["reward"] = float(r) if isinstance(r, (int, float)) and math.isfinite(r) else MIN_REWARD
            out["reward"] = min(1.0, max(0.0, out["reward"]))
            return out
    except Exception as e:  # pragma: no cover - defensive
        return _result(error=f"{type(e).__name__}: {e}"[:300])


def _spec_of(domain: str) -> _Spec:
    try:
        return _REGISTRY[domain]
    except KeyError:
        raise KeyError(f"no verifier registered for domain {domain!r}; registered: {domains()}") from None


def reward(domain: str, response: Any, ground_truth: Any, *, timeout: float | None = None) -> float:
    """The reward in [0, 1] of ``response`` for an example of ``domain`` with ``ground_truth``. Raises
    ``KeyError`` only for an unregistered domain (a programming error); never for any response."""
    return _run(_spec_of(domain), response, ground_truth, timeout)["reward"]


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
    out = _run(spec, response, example.get("ground_truth"), timeout)
    ok, answer = _gate(response, spec.box)
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
    pool = _get_pool()
    n = pool.size if pool is not None else 1
    if n == 1 or len(examples) == 1:
        return [score(e, r, timeout=timeout) for e, r in zip(examples, responses)]
    with ThreadPoolExecutor(max_workers=min(n, len(examples))) as ex:
        return list(ex.map(lambda er: score(er[0], er[1], timeout=timeout), zip(examples, responses)))


# ===================================================================================== public reward functions
_MATH, _COUNT, _OCR, _GROUND = (_Spec("math"), _Spec("counting"), _Spec("ocr"), _Spec("grounding"))


def _with(spec: _Spec, **kwargs) -> _Spec:
    return _Spec(spec.verifier, kwargs, spec.box, spec.language_mix, spec.repetition, spec.timeout)


def math_reward(response: Any, ground_truth: Any, *, tolerance: float = MATH_TOLERANCE,
                timeout: float | None = None) -> float:
    """Math reward of a whole response: format gate, box, gates, then :func:`verify_math`. In [0, 1]; never
    raises; returns within ``timeout`` (default :data:`DEFAULT_TIMEOUT`)."""
    try:
        tol = float(tolerance)
    except Exception:
        return MIN_REWARD
    return _run(_with(_MATH, tolerance=tol), response, ground_truth, timeout)["reward"]


def counting_reward(response: Any, ground_truth: Any, *, timeout: float | None = None) -> float:
    """Counting reward of a whole response (exact integer, :func:`verify_count`)."""
    return _run(_COUNT, response, ground_truth, timeout)["reward"]


def ocr_reward(response: Any, ground_truth: Any, *, ignore_case: bool = False,
               timeout: float | None = None) -> float:
    """OCR reward of a whole response (``1 - edit distance / max length``, :func:`verify_ocr`)."""
    return _run(_with(_OCR, ignore_case=bool(ignore_case)), response, ground_truth, timeout)["reward"]


def grounding_reward(response: Any, boxes: Any, *, iou_threshold: float = IOU_THRESHOLD,
                     timeout: float | None = None) -> float:
    """Grounding reward of a whole response against ``boxes`` (one ``[x1, y1, x2, y2]`` or a list of them, on
    the 0..1000 scale): matched boxes / max(#predicted, #truth), :func:`verify_grounding`."""
    try:
        tau = float(iou_threshold)
    except Exception:
        return MIN_REWARD
    return _run(_with(_GROUND, iou_threshold=tau), response, boxes, timeout)["reward"]


# The synthetic domains of glmv_jax.data.synthetic.
register("counting", "counting")
register("arithmetic", "math")
register("ocr", "ocr")
register("grounding", "grounding")

__all__ = ["BOX_BEGIN", "BOX_END", "DEFAULT_TIMEOUT", "IOU_THRESHOLD", "MATH_TOLERANCE", "MAX_RESPONSE_CHARS",
           "MIN_REWARD", "box_iou", "counting_reward", "domains", "extract_boxed", "format_ok",
           "grounding_reward", "has_language_mix", "has_repetition", "math_reward", "ocr_reward", "register",
           "reward", "score", "score_batch", "shutdown", "unregister", "verify_count", "verify_grounding",
           "verify_math", "verify_ocr", "warmup"]
