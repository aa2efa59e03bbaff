"""The math verifier (:func:`verify_math`) on an extracted answer; text is parsed, never evaluated as code.

In order, the first step that decides gives the reward:

1. **Exact** string match after normalisation (NFKC, ``$``/``\\(\\)`` wrappers, spacing commands,
   ``\\left``/``\\right``, ``\\text{}``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, degree marks, whitespace, a trailing
   period) -> 1 [code: exact first]. So a 2000-digit integer equals itself without being parsed.
2. **Choice letters** [ours]: a ground truth that is one capital letter (``B``, ``(B)``, ``\\text{B}``) is a
   multiple-choice key; the answer gets 1 iff it is the same letter in any of these forms (case-insensitive:
   ``b`` counts), else 0 (``(B)`` vs ``C``).
3. **Plain numbers** (the fast path, no LaTeX parser): both sides rewritten to whitelisted arithmetic
   (decimals, ``\\frac``, ``\\cdot``/``\\times``/``\\div``, ``^``/``**`` with rational exponents, thousands
   separators ``1,000`` = 1000, a leading ``x=``) and evaluated exactly by :func:`_safe_value`; 1 iff ``|a - b|
   / (|b| + 1e-6) < tolerance`` [code formula], ``tolerance`` = :data:`MATH_TOLERANCE` = 1e-6 [code
   ``full_config.yaml`` for math; chart data uses 2.5e-2]. So ``43`` == ``43.0``, ``\\frac{1}{2}`` == ``0.5``,
   ``0.6667`` != ``2/3`` (relative error 5e-5) unless a looser tolerance is given.
   This path is kept beside math-verify [ours] because it is exact for decimals (rationals, not 15-digit
   floats), reads ``**`` (math-verify's only route for that is sympy's ``parse_expr``, which evaluates code)
   and costs ~0.1 ms where a LaTeX parse costs 10-100 ms, for the most common answers.
4. **LaTeX through math-verify** (:mod:`.math_latex`, latex2sympy2-extended; under its caps and soft deadline):
   when both sides are numbers (surds, ``\\pi``, ``e``, logarithms, trig values, ``x = v``) the same relative
   tolerance decides, so ``\\sqrt{2}`` == 1.41421356 (1.7e-9) and ``2\\pi`` == 6.2831853 but ``\\pi`` != 3.14
   (5e-4) and ``\\sqrt{2}`` != 1.414 (1.5e-4): the official relative rule, not math-verify's rounding to 6
   decimals (which would take 1e-8 for 2e-8 and refuse 1000000.5 for 1000000). Otherwise math-verify's
   comparison decides: expressions in variables (``x^2+1`` == ``1+x^2``), equations (``y=2x+1`` == ``y=1+2x``,
   ``x=5`` == 5, but ``x=2x+1`` != ``y=2x+1``), sets order-free (``\\{1,2\\}`` == ``\\{2,1\\}`` !=
   ``\\{1,2,3\\}``), intervals with their ends (``[0,1)`` != ``[0,1]``), tuples in order; numbers inside those
   compare at math-verify's 6 decimals.

A trailing ``%`` on one side [ours]: either reading (``50%`` as 50 or as 0.5) may match a number. Units are not
dropped [ours]: ``7 apples`` != 7 (the official code sends such answers to an LLM judge, not reproduced here);
non-numeric answers that math-verify cannot parse get 0 [ours: no LLM fallback].

*Never evaluated as code* [ours]: step 3 passes only ``[0-9+\\-*/().]`` (at most :data:`MAX_EXPR_CHARS`
characters, parentheses nested at most :data:`MAX_PAREN_DEPTH` deep, no ``//``) to sympy's ``parse_expr``
(``evaluate=False``, only the number transformations, a global namespace holding just the six sympy number
classes and no builtins); :func:`_safe_value` then allows only numbers, ``+``, ``*`` and powers with a rational
exponent (denominator <= 64) whose result stays under :data:`MAX_POWER_BITS` bits, so ``9**9**9**9`` is refused
before any arithmetic. Step 4 uses math-verify's LaTeX grammar only (an ANTLR parser building sympy objects; not
its ``parse_expr`` path) behind the text and tree caps of :mod:`.math_latex`. (The official verifier calls
``sympify`` on raw model text, which evaluates it.) sympy and math-verify are imported on first use.
"""
from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction
from typing import Any

import glmv_jax.rl.rewards.verifiers.math_latex as latex

MATH_TOLERANCE = 1e-6            # [code] full_config.yaml, math
MAX_EXPR_CHARS = 128             # [ours] whitelisted arithmetic, after LaTeX rewriting
MAX_LATEX_CHARS = 512            # [ours] answers longer than this are only compared as strings
MAX_PAREN_DEPTH = 8              # [ours]
MAX_POWER_BITS = 16_384          # [ours] bit size of base * |exponent| for any power


_SPACING_RE = re.compile(r"(?<!\\)\\(?:[,;:! ]|q?quad\b)")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_TEXT_CMD_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textrm|mbox)\{([^{}]*)\}")
_ASSIGN_RE = re.compile(r"^[A-Za-z]=(?!=)")
_CHOICE_RE = re.compile(r"\(?([A-Za-z])\)?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ARITH_RE = re.compile(r"[0-9+\-*/().]+")
_UNICODE_OPS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "*", "\u22c5": "*", "\u00b7": "*",
                              "\u00f7": "/", "\u2044": "/"})


class _Reject(Exception):
    """An answer that is not a number this verifier accepts."""


def _light(s: str) -> str:
    """Normalisation that keeps LaTeX parseable (whitespace and ``\\text{}`` stay): for math-verify."""
    s = unicodedata.normalize("NFKC", s).translate(_UNICODE_OPS).strip()
    s = s.strip("$").strip()
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2]
    s = _SPACING_RE.sub(" ", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\u00b0", "")
    s = s.replace("\\%", "%").replace("{,}", "")
    return s.strip().rstrip(".").strip()


def _compact(light: str) -> str:
    """The full normalisation (``\\text{}`` unwrapped, no whitespace) of a :func:`_light` string: for the exact
    match, choice letters and plain numbers."""
    return "".join(_TEXT_CMD_RE.sub(r"\1", light).split()).rstrip(".")


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
    """Candidate values of a compact answer as plain arithmetic (a leading ``x=`` dropped): one, or two for a
    trailing ``%`` (x/100 and x); ``[]`` when it is not plain arithmetic."""
    s = _ASSIGN_RE.sub("", s)
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


def _real(v):
    """``v`` as an exact rational or a 50-digit real float; ``None`` if complex, infinite or nan."""
    import sympy

    if v.is_Rational:
        return v
    f = sympy.N(v, 50)
    return f if f.is_Float and f.is_finite else None


def _close(a, b, tol: float) -> bool:
    """[code] ``|a - b| / (|b| + 1e-6) < tol`` for two reals from :func:`_real` (exact for two rationals)."""
    import sympy

    if a.is_Rational and b.is_Rational:
        return bool(abs(a - b) < sympy.Rational(tol) * (abs(b) + sympy.Rational(1, 10**6)))
    fa, fb = sympy.Float(a, 50), sympy.Float(b, 50)
    return bool(abs(fa - fb) < tol * (abs(fb) + 1e-6))


def _numbers_close(va: list, vb: list, tol: float) -> bool | None:
    """Whether some candidate of ``va`` is within ``tol`` of some candidate of ``vb``; ``None`` when a candidate
    is not real (then the caller asks math-verify)."""
    ra, rb = [_real(v) for v in va], [_real(v) for v in vb]
    if any(x is None for x in ra + rb):
        return None
    return any(_close(x, y, tol) for x in ra for y in rb)


def _latex_side(light: str, numbers: list):
    """``(numbers, parsed)`` of one side for step 4: its candidate values if it is a number (from the fast path
    when that succeeded) and its math-verify tree (``None`` if refused)."""
    percent = light.endswith("%")
    parsed = latex.parse_latex(light[:-1].strip() if percent else light)
    if numbers or parsed is None:
        return numbers, parsed
    v = latex.as_number(parsed)
    if v is None:
        return [], None if percent else parsed
    return ([v / 100, v] if percent else [v]), parsed


def _latex_equal(la: str, lb: str, va: list, vb: list, tol: float) -> bool:
    """Step 4 (see the module docstring) for the light-normalised answer ``la`` and ground truth ``lb``."""
    try:
        with latex.soft_deadline():
            na, pa = _latex_side(la, va)
            nb, pb = _latex_side(lb, vb)
            if na and nb:
                close = _numbers_close(na, nb, tol)
                if close is not None:
                    return close
            return pa is not None and pb is not None and latex.equal(pb, pa)
    except (Exception, latex.Deadline):
        return False


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
    """Math verifier on an extracted answer: 1.0 iff the answer equals ``ground_truth`` by the first deciding step
    of the module docstring (exact, choice letter, plain numbers within relative ``tolerance``, math-verify),
    else 0.0. Runs in the caller: use :func:`math_reward` or :func:`reward` for the gated, time-bounded path."""
    if not isinstance(answer, str):
        return 0.0
    gt = _gt_string(ground_truth)
    if gt is None:
        return 0.0
    la, lb = _light(answer), _light(gt)
    a, b = _compact(la), _compact(lb)
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    key = _CHOICE_RE.fullmatch(b)
    if key is not None and key.group(1).isupper():
        mine = _CHOICE_RE.fullmatch(a)
        return 1.0 if mine is not None and mine.group(1).upper() == key.group(1) else 0.0
    tol = float(tolerance)
    va = _numeric_values(a)
    vb = _numeric_values(b)
    if va and vb:
        close = _numbers_close(va, vb, tol)
        if close is not None:
            return 1.0 if close else 0.0
    return 1.0 if _latex_equal(la, lb, va, vb, tol) else 0.0
