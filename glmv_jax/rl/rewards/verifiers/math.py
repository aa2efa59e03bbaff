"""The math verifier (:func:`verify_math`) on an extracted answer; numbers are parsed, never evaluated as code.

Exact string match after normalisation (NFKC, ``$``/``\\(\\)`` wrappers, spacing commands,
``\\left``/``\\right``, ``\\text{}``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, degree marks, whitespace, a trailing period, a
leading ``x=``) -> 1 [code: exact first]; otherwise both sides as numbers and 1 iff ``|a - b| / (|b| + 1e-6) <
tolerance`` [code formula], ``tolerance`` = :data:`MATH_TOLERANCE` = 1e-6 [code ``full_config.yaml`` for math; chart
data uses 2.5e-2]. So ``43`` == ``43.0`` and ``\\frac{1}{2}`` == ``0.5`` (both exact: decimals are read as exact
rationals), but ``0.6667`` != ``2/3`` (relative error 5e-5) unless a looser tolerance is given. Non-numeric,
non-identical answers get 0 (the official LLM-judge fallback is not reproduced) [ours]. A trailing ``%`` on one side
[ours]: either reading (``50%`` as 50 or as 0.5) may match.

*Numbers are parsed, never evaluated as code* [ours]: LaTeX is rewritten to plain arithmetic, which must match the
whitelist ``[0-9+\\-*/().]`` (at most :data:`MAX_EXPR_CHARS` characters, parentheses nested at most
:data:`MAX_PAREN_DEPTH` deep, no ``//``) before sympy's ``parse_expr`` sees it (``evaluate=False``, only the number
transformations, a global namespace holding just the six sympy number classes and no builtins). The tree is then
evaluated bottom-up by :func:`_safe_value`, which allows only numbers, ``+``, ``*`` and powers with a rational
exponent (denominator <= 64) whose result stays under :data:`MAX_POWER_BITS` bits, so ``9**9**9**9`` is refused
before any arithmetic. (The official verifier calls ``sympify`` on raw model text, which evaluates it.) sympy is
imported on first use.
"""
from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction
from typing import Any

MATH_TOLERANCE = 1e-6            # [code] full_config.yaml, math
MAX_EXPR_CHARS = 128             # [ours] whitelisted arithmetic, after LaTeX rewriting
MAX_LATEX_CHARS = 512            # [ours] answers longer than this are only compared as strings
MAX_PAREN_DEPTH = 8              # [ours]
MAX_POWER_BITS = 16_384          # [ours] bit size of base * |exponent| for any power


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
