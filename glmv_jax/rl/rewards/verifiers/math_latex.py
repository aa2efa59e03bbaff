"""LaTeX answers through ``math-verify`` (latex2sympy2-extended): parsing under caps, and the comparison.

math-verify parses LaTeX with an ANTLR grammar into *unevaluated* sympy trees (nothing is ``eval``-ed; its
``ExprExtractionConfig``, which goes through sympy's ``parse_expr``, is not used), then compares them:
string/structural equality, sets order-free, intervals with their open/closed ends, tuples in order, equations
and inequalities, symbolic equality through ``simplify``. Parsing and comparing can still cost time and memory
(sympy evaluates ``9^{9^{9^9}}`` when compared; the parser is super-linear in nesting depth and in ``|``), so
[ours] every text passes :func:`too_complex` before it is parsed and every parsed tree passes :func:`check_tree`
before it is compared:

* text: at most :data:`MAX_CHARS` characters, printable ASCII only, none of ``' " ` ; ? @ # & ~ $``, no ``**``,
  brackets nested at most :data:`MAX_DEPTH` deep, at most :data:`MAX_BARS` ``|`` and :data:`MAX_RELATIONS`
  relation signs, digit runs of at most :data:`MAX_DIGITS`, and only the LaTeX commands of :data:`COMMANDS`
  (no ``\\sum``, ``\\int``, ``\\lim``, ``\\binom``, ``\\det``, ``\\gcd``: some of these are evaluated while parsing);
* tree: at most :data:`MAX_NODES` nodes of the classes of :data:`_ALLOWED` (numbers, symbols, arithmetic,
  elementary functions, relations, sets, intervals, tuples, small matrices); a numeric exponent must be a
  literal (``2^{2^{64}}`` is refused), the product of the exponents above any number at most
  :data:`MAX_EXPONENT` (:data:`MAX_SYMBOLIC_EXPONENT` above an expression in variables, which ``simplify``
  expands) and the bits it can reach at most :data:`MAX_POWER_BITS`; ``n!`` only for ``n <=``
  :data:`MAX_FACTORIAL`.

math-verify's own timeout uses ``signal.alarm`` with whole seconds; it is switched off and replaced by
:func:`soft_deadline` (``setitimer``, :data:`SOFT_DEADLINE` seconds for the parse and compare of one call),
armed only in a process's main thread when nobody else uses ``SIGALRM`` (the reward worker's case), raising an
exception that math-verify does not catch. The worker's process-level time bound stays the hard limit.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading

MAX_CHARS = 200                  # [ours] longer answers are compared as strings only
MAX_DEPTH = 6                    # [ours] nesting of ( [ { (the parser's time grows ~30 ms per level)
MAX_BARS = 4                     # [ours] "|" (absolute values parse in exponential time: 100 "|x|" took 18 s)
MAX_RELATIONS = 4                # [ours] = < > signs
MAX_DIGITS = 50                  # [ours] per digit run
MAX_NODES = 300                  # [ours] nodes of a parsed tree
MAX_EXPONENT = 4096              # [ours] product of the numeric exponents above any node
MAX_SYMBOLIC_EXPONENT = 64        # [ours] the same above a power of an expression in variables
MAX_POWER_BITS = 65_536          # [ours] bits of an integer times the exponents above it
MAX_FACTORIAL = 1000             # [ours]
SOFT_DEADLINE = 1.0              # [ours] seconds for parsing and comparing one pair (DEFAULT_TIMEOUT is 1.5 s)

COMMANDS = frozenset("""
frac dfrac tfrac sqrt pi cdot times div pm mp left right big Big bigl bigr text mathrm mathbf textbf mbox
textrm mathit displaystyle log ln lg exp sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh infty
cup cap setminus le leq ge geq lt gt ne neq in mathbb emptyset varnothing circ degree quad qquad dots ldots
cdots lfloor rfloor lceil rceil vert lvert rvert mid begin end pmatrix bmatrix matrix alpha beta gamma delta
epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau upsilon phi varphi chi
psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega
""".split())

_CMD_RE = re.compile(r"\\([A-Za-z]+)")
_BAD_CHARS_RE = re.compile(r"[^\x20-\x7e]|['\"`;?@#&~$]")
_DIGITS_RE = re.compile(r"\d{%d,}" % (MAX_DIGITS + 1))
_RELATION_RE = re.compile(r"[=<>]|\\(?:le|leq|ge|geq|lt|gt|ne|neq)(?![A-Za-z])")
_ENV_RE = re.compile(r"\\(?:begin|end)\{([^{}]*)\}")

logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice: ours replaces it


class Deadline(BaseException):
    """Raised by :func:`soft_deadline` (a BaseException, so that math-verify's ``except Exception`` lets it pass)."""


def too_complex(s: str) -> bool:
    """True iff the text ``s`` breaks one of the caps above (then it is not parsed)."""
    if len(s) > MAX_CHARS or _BAD_CHARS_RE.search(s) or "**" in s or _DIGITS_RE.search(s):
        return True
    if s.count("|") > MAX_BARS or len(_RELATION_RE.findall(s)) > MAX_RELATIONS:
        return True
    if any(c not in COMMANDS for c in _CMD_RE.findall(s)):
        return True
    if any(env not in ("pmatrix", "bmatrix", "matrix") for env in _ENV_RE.findall(s)):
        return True
    depth = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif ch in ")]}":
            depth -= 1
    return False


@contextlib.contextmanager
def soft_deadline(seconds: float = SOFT_DEADLINE):
    """Raise :class:`Deadline` in the block after ``seconds`` (``setitimer``), where that is safe: in the main
    thread, when no other ``SIGALRM`` handler or timer is set; elsewhere a no-op."""
    armed = False
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        if signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0:
            def _raise(signum, frame):
                raise Deadline(f"over {seconds:g} s")

            signal.signal(signal.SIGALRM, _raise)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            armed = True
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)


_MV: tuple | None = None


def _math_verify():
    """``(parse, verify, extraction config, sympy)``, imported on first use."""
    global _MV
    if _MV is None:
        import sympy
        from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
        from math_verify import LatexExtractionConfig, parse, verify

        # units=False [ours]: "7 apples" is not 7 (math-verify's default would drop known unit words)
        norm = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True,
                                   boxed="all", equations=False)
        _MV = (parse, verify, [LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm)], sympy)
        _build_allowed(sympy)
    return _MV


def parse_latex(s: str):
    """The sympy object of the LaTeX answer ``s`` through math-verify, or ``None`` (refused by the caps, not
    parsed, or a tree that :func:`check_tree` refuses). Call under :func:`soft_deadline`."""
    if too_complex(s):
        return None
    parse, _, config, _ = _math_verify()
    out = parse("$" + s + "$", config, fallback_mode="no_fallback", extraction_mode="first_match",
                parsing_timeout=None)
    if len(out) != 1 or isinstance(out[0], str) or not check_tree(out[0]):
        return None
    return out[0]


def equal(gold, pred) -> bool:
    """math-verify's comparison of two parsed answers (``gold`` the ground truth); sets are order-free, intervals
    compare their ends, tuples their elements in order, floats inside them at 6 decimals (math-verify's
    ``float_rounding``). Call under :func:`soft_deadline`."""
    _, verify, _, _ = _math_verify()
    return bool(verify(gold, pred, timeout_seconds=None))


# ----------------------------------------------------------------------------------------- the tree caps
_ALLOWED: tuple = ()


def _build_allowed(sympy) -> None:
    global _ALLOWED
    from sympy.core.function import AppliedUndef
    from sympy.functions.elementary.hyperbolic import HyperbolicFunction
    from sympy.functions.elementary.trigonometric import InverseTrigonometricFunction, TrigonometricFunction

    _ALLOWED = (sympy.Add, sympy.Mul, sympy.exp, sympy.log, TrigonometricFunction, InverseTrigonometricFunction,
                HyperbolicFunction, sympy.Abs, sympy.floor, sympy.ceiling, sympy.sign, sympy.Max, sympy.Min,
                sympy.UnevaluatedExpr, sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.FiniteSet,
                sympy.Interval, sympy.Union, sympy.Intersection, sympy.Complement, sympy.Tuple, AppliedUndef)


def _literal_exponent(x):
    """A numeric exponent as a literal number (``-k`` allowed), else ``None``."""
    if x.is_Number:
        return x
    if x.is_Mul and len(x.args) == 2 and x.args[0] == -1 and x.args[1].is_Number:
        return x.args[1]
    return None


def check_tree(e) -> bool:
    """True iff the parsed tree ``e`` stays within the caps (node count, classes, powers, factorials)."""
    _, _, _, sympy = _math_verify()
    nodes = [0]

    def walk(e, mult: int) -> bool:
        nodes[0] += 1
        if nodes[0] > MAX_NODES:
            return False
        if isinstance(e, sympy.MatrixBase):
            return e.rows * e.cols <= 64 and all(walk(x, mult) for x in e)
        if not isinstance(e, sympy.Basic):
            return False
        if e.is_Atom:
            if e.is_Rational:
                return max(abs(int(e.p)).bit_length(), int(e.q).bit_length()) * mult <= MAX_POWER_BITS
            return True
        if isinstance(e, sympy.Pow):
            base, x = e.args
            if not x.free_symbols:
                k = _literal_exponent(x)
                if k is None or not k.is_finite or (k.is_Rational and k.q > 64):
                    return False
                m = mult * max(1, math.ceil(abs(float(k))))
                limit = MAX_SYMBOLIC_EXPONENT if base.free_symbols else MAX_EXPONENT
                return m <= limit and walk(base, m)
            return walk(base, mult) and walk(x, mult)
        if isinstance(e, sympy.factorial):
            n = e.args[0]
            return (n.is_Integer and 0 <= n <= MAX_FACTORIAL
                    and int(n) * max(1, int(n).bit_length()) * mult <= MAX_POWER_BITS)
        return isinstance(e, _ALLOWED) and all(walk(a, mult) for a in e.args)

    try:
        return walk(e, 1)
    except RecursionError:
        return False


def as_number(e):
    """The value of a parsed answer that is a plain number (an assignment ``x = v`` counts as ``v``), as a
    sympy number (exact where possible), else ``None``."""
    _, _, _, sympy = _math_verify()
    if isinstance(e, sympy.Eq) and isinstance(e.lhs, sympy.Symbol):
        e = e.rhs
    if not isinstance(e, sympy.Expr) or isinstance(e, sympy.MatrixBase) or e.free_symbols:
        return None
    e = e.doit()
    return e if isinstance(e, sympy.Expr) and e.is_number else None
