"""The math verifier on hand-written tables of equivalent and non-equivalent answers (math-verify for LaTeX, the
official relative tolerance for numbers), each graded through the public API on a whole response within 2 s;
the LaTeX caps and the soft deadline (hostile LaTeX is in test_verify_math's HOSTILE_MATH)."""
from __future__ import annotations

import random
import threading
import time

import pytest

from glmv_jax.rl import rewards as R
from glmv_jax.rl.rewards import sandbox
from glmv_jax.rl.rewards.verifiers import math_latex
from reward_helpers import resp, timed, timed_reward

_RNG = random.Random(3)
DIGITS_2000 = "".join(_RNG.choice("0123456789") for _ in range(1999)) + "7"
DIGITS_2000 = "1" + DIGITS_2000[1:]

# (answer in the box, ground truth): graded 1
EQUIVALENT = [
    # the cases of the issue
    ("\\sqrt{2}", "1.41421356"), ("2\\pi", "6.2831853"), ("x^2+1", "1+x^2"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("3\\sqrt{2}", "\\sqrt{18}"), ("\\log_2 8", "3"), (DIGITS_2000, int(DIGITS_2000)),
    # surds, pi, e, logarithms, trig values: numbers within the relative tolerance 1e-6
    ("\\frac{2}{\\sqrt{2}}", "\\sqrt{2}"), ("\\sqrt[3]{27}", "3"), ("\\frac{\\pi}{2}", "1.5707963"),
    ("\\pi", "3.14159"),                      # |pi - 3.14159| / 3.14159 = 8.4e-7 < 1e-6
    ("e", "2.718281828"), ("e^{2}", "7.3890561"), ("\\ln e^{3}", "3"),
    ("\\frac{\\sqrt{3}}{2}", "\\sin\\frac{\\pi}{3}"), ("x = \\sqrt{2}", "1.41421356"),
    # fractions, decimals, percentages, thousands separators (the fast path)
    ("\\dfrac{3}{4}", "0.75"), ("0.75", "\\frac{3}{4}"), ("2^{-1}", "0.5"), ("1.0000001", "1"),
    ("50\\%", "0.5"), ("50%", "50"), ("12.5\\%", "\\frac{1}{8}"),   # either reading of a percentage
    ("1,000", "1000"), ("1{,}000", 1000), ("1,234,567", "1234567"),
    ("12345678901", "12345678902"),           # relative 8e-11: the official rule for large numbers too
    # expressions in variables, equations
    ("(x+1)^2", "x^2+2x+1"), ("\\frac{x^2-1}{x-1}", "x+1"), ("2(a+b)", "2a+2b"),
    ("y = 2x+1", "y=1+2x"), ("x = 5", "5"), ("x = \\frac{1}{2}", "0.5"),
    # sets (order-free), intervals, tuples
    ("\\{3, 1, 2\\}", "\\{1,2,3\\}"), ("x = \\pm 1", "\\{-1, 1\\}"), ("\\{\\sqrt{2}, 1\\}", "\\{1.41421356, 1\\}"),
    ("\\left[0, 1\\right)", "[0,1)"), ("(-\\infty, 2]", "(-\\infty,2]"), ("(2, \\infty)", "x > 2"),
    ("(\\frac{1}{2}, 3)", "(0.5, 3)"),
    # multiple-choice letters
    ("(B)", "B"), ("\\text{B}", "B"), ("B", "(B)"), ("\\textbf{C}", "C"), ("B.", "B"), ("b", "B"),
]

# graded 0: near misses first
NOT_EQUIVALENT = [
    ("\\pi", "3.14"), ("\\pi", "3.1416"), ("\\sqrt{2}", "1.414"), ("e", "2.718"), ("\\frac{1}{3}", "0.3333"),
    ("10^{-6}", "0"), ("2\\pi", "6.28"), ("\\sqrt{2}", "2"), ("\\log_2 8", "\\log_2 9"),
    ("x^2+1", "x^2-1"), ("2x", "x^2"), ("x", "y"), ("(x+1)^2", "x^2+1"),
    ("x = 2x+1", "y = 2x+1"), ("y = 2x+1", "y = 2x-1"),
    ("\\{1,2\\}", "\\{1,2,3\\}"), ("\\{1,2\\}", "\\{1,3\\}"), ("[0,1)", "[0,1]"), ("[1,2]", "(1,2)"),
    ("(1,2)", "(2,1)"), ("(1,2,3)", "(1,2,4)"),
    ("(B)", "C"), ("B", "\\text{C}"), ("AB", "A"), ("B", "1"),
    ("50\\%", "0.05"), ("1,000", "1"), ("7 apples", "7"), ("seven", "7"), ("\\infty", "1"),
    (DIGITS_2000[:-1], int(DIGITS_2000)),     # one digit fewer: 10x off
]


def _ids(pairs):
    return [f"{a[:24]}~{str(g)[:24]}" for a, g in pairs]


@pytest.mark.parametrize("answer,gt", EQUIVALENT, ids=_ids(EQUIVALENT))
def test_equivalent_answers(answer, gt):
    assert timed_reward(R.math_reward, resp(answer), gt) == 1.0


@pytest.mark.parametrize("answer,gt", NOT_EQUIVALENT, ids=_ids(NOT_EQUIVALENT))
def test_non_equivalent_answers(answer, gt):
    assert timed_reward(R.math_reward, resp(answer), gt) == 0.0


def test_2000_digit_integers():
    """Long integers are compared as strings first (never parsed); beyond MAX_LATEX_CHARS only the exact string
    counts. A long run of one digit is a different matter: the repetition gate [code detect_repeat] refuses the
    whole response before the verifier runs."""
    big = 10 ** 1999
    assert R.verify_math(str(big), big) == 1.0
    assert R.verify_math(str(big), big + 1) == 0.0 and R.verify_math(str(big), big * 10) == 0.0
    assert R.has_repetition(resp(str(big)))
    assert timed_reward(R.math_reward, resp(str(big)), big) == 0.0


def test_tolerance_applies_to_latex_numbers():
    """The domain's tolerance (here the chart domain's 2.5e-2) also decides for LaTeX numbers."""
    assert timed_reward(R.math_reward, resp("\\pi"), "3.14") == 0.0
    assert timed_reward(R.math_reward, resp("\\pi"), "3.14", tolerance=2.5e-2) == 1.0
    assert timed_reward(R.math_reward, resp("\\sqrt{2}"), "1.5", tolerance=2.5e-2) == 0.0   # 5.7e-2


def test_caps_refuse_before_parsing():
    for text in ("{" * 7 + "1" + "}" * 7, "|x|" * 3, "1" * 51, "x" * 201, "2**3", "\\sum_{i=1}^{3} i", "a'", "é"):
        assert math_latex.too_complex(text), text
    for text in ("{" * 6 + "1" + "}" * 6, "|x|+|y|", "\\frac{\\sqrt{3}}{2}", "\\{1,2\\}", "[0,1)", "y = 2x+1"):
        assert not math_latex.too_complex(text), text
    assert math_latex.parse_latex("9^{9^{9}}") is None                 # a tower: the exponent is not a literal
    assert math_latex.parse_latex("(2^{10})^{100}") is not None        # exponents multiply: 1000
    assert math_latex.parse_latex("(2^{100})^{100}") is None           # 10^4 > MAX_EXPONENT
    assert math_latex.parse_latex("(x+1)^{64}") is not None and math_latex.parse_latex("(x+1)^{65}") is None
    assert math_latex.parse_latex("1000!") is not None and math_latex.parse_latex("1001!") is None


def test_soft_deadline():
    """setitimer interrupts pure-Python work in the main thread, restores SIGALRM, and is a no-op elsewhere."""
    import signal

    t0 = time.perf_counter()
    with pytest.raises(math_latex.Deadline):
        with math_latex.soft_deadline(0.2):
            while True:
                pass
    assert 0.15 < time.perf_counter() - t0 < 1.0
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    out = {}

    def in_thread():
        with math_latex.soft_deadline(0.05):
            time.sleep(0.2)
        out["done"] = True

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert out == {"done": True}


def test_slow_comparison_stops_at_the_soft_deadline_in_the_worker():
    """A legal but slow symbolic comparison ends at the soft deadline with 0, and the worker is not killed."""
    pool = sandbox._POOL
    before = {w.proc.pid for w in pool.all}
    t0 = time.perf_counter()
    out = R.score({"domain": "arithmetic", "ground_truth": "(x+y+z+2)^{20}"}, resp("(x+y+z+1)^{20}"), timeout=5.0)
    dt = time.perf_counter() - t0
    assert out["reward"] == 0.0 and not out["timed_out"] and out["error"] is None, out
    assert math_latex.SOFT_DEADLINE * 0.9 < dt < math_latex.SOFT_DEADLINE + 1.0, dt
    assert {w.proc.pid for w in pool.all} == before
    assert timed(R.math_reward, resp("x^2+1"), "1+x^2") == 1.0
