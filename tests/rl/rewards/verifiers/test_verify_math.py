"""The math verifier: hand-written cases, the tolerance, and hostile expressions refused quickly."""
from __future__ import annotations

import os

import pytest

from glmv_jax.rl import rewards as R
from reward_helpers import PAYLOAD, PWNED, resp, timed_reward


@pytest.mark.parametrize("answer,gt,expected", [
    ("\\frac{1}{2}", "0.5", 1.0), ("0.5", "\\frac{1}{2}", 1.0), ("\\dfrac{1}{2}", 0.5, 1.0),
    ("\\tfrac12", "1/2", 1.0), ("43", "43.0", 1.0), ("43.0", 43, 1.0), ("43", 43, 1.0), ("44", 43, 0.0),
    ("4/3", "4/3", 1.0), ("12/9", "4/3", 1.0), ("\\frac{12}{9}", "4/3", 1.0), ("1.3333333333", "4/3", 1.0),
    ("1.33", "4/3", 0.0), ("-3", -3, 1.0), ("−3", -3, 1.0), ("3", -3, 0.0), ("$\\frac{-7}{2}$", "-7/2", 1.0),
    ("\\left(\\frac{1}{2}\\right)", "0.5", 1.0), ("x = 5", 5, 1.0), ("5.", 5, 1.0), ("1,000", 1000, 1.0),
    ("1{,}000", "1000", 1.0), ("１２", 12, 1.0), ("2^{10}", 1024, 1.0), ("2^10", 1024, 1.0),
    ("3 \\times 4", 12, 1.0), ("3\\cdot4", 12, 1.0), ("12 \\div 4", 3, 1.0), ("50\\%", "0.5", 1.0),
    ("50%", 50, 1.0), ("50%", "0.05", 0.0), ("90^\\circ", 90, 1.0), ("0.1+0.2", "0.3", 1.0),
    ("0", 0, 1.0), ("0.000001", 0, 0.0), ("\\frac{\\frac{1}{2}}{2}", "0.25", 1.0),
    ("\\sqrt{2}", "1.41421356", 1.0),          # LaTeX through math-verify, then the relative tolerance
    ("seven", 7, 0.0), ("7 apples", 7, 0.0), ("", 0, 0.0), ("1/0", "1/0", 1.0),   # identical strings
    ("1/0", 1, 0.0), ("0/0", 0, 0.0), ("2**(1/2)", "1.4142135623730951", 1.0), ("(-8)**(1/3)", -2, 0.0),
])
def test_math_cases(answer, gt, expected):
    assert timed_reward(R.math_reward, resp(answer), gt) == expected
    assert R.verify_math(answer, gt) == expected


def test_math_tolerance():
    """[code] 1 iff |a - b| / (|b| + 1e-6) < tol; tol = 1e-6 for math, so 0.6667 is not 2/3 (rel. error 5e-5)
    unless a looser tolerance (the chart domain's 2.5e-2, or 1e-3 here) is asked for."""
    assert R.MATH_TOLERANCE == 1e-6
    assert timed_reward(R.math_reward, resp("0.6667"), "2/3") == 0.0
    assert timed_reward(R.math_reward, resp("0.6667"), "2/3", tolerance=1e-3) == 1.0
    assert timed_reward(R.math_reward, resp("0.667"), "2/3", tolerance=1e-3) == 1.0   # 5e-4 < 1e-3
    assert timed_reward(R.math_reward, resp("0.67"), "2/3", tolerance=1e-3) == 0.0    # 5e-3
    assert timed_reward(R.math_reward, resp("0.6666667"), "2/3") == 1.0               # 5e-8
    assert timed_reward(R.math_reward, resp("1000002"), "1000000") == 0.0             # 2e-6
    assert timed_reward(R.math_reward, resp("1000000.5"), "1000000") == 1.0           # 5e-7


HOSTILE_MATH = [
    PAYLOAD, f"1+{PAYLOAD}", "eval('1')", "exec('import os')", "lambda: 1", "().__class__.__bases__[0]",
    "9**9**9**9", "9^9^9^9", "9^{9^{9^{9}}}", "10**10**10", "2**(2**64)", "(2**64)**(2**64)",
    "((((9**9)**9)**9)**9)**9", "2**10000000", "1.0000001**99999999999", "10**-10**10", "0.5**(10**9)",
    "(x+1)**100000", "factorial(100000)", "x" * 100,
    "(" * 50_000 + "1" + ")" * 50_000, "(" * 50 + "1" + ")" * 50, "-" * 100_000 + "1", "1" + "+1" * 60_000,
    "\\frac{" * 5000 + "1" + "}{2}" * 5000, "1/" * 50_000 + "1", "9" * 100_000, "1e999999999",
    "\u202e3\u202c", "\x00", "\ud800", "𝟗𝟗", "٣", "∞", "nan", "inf", "-0",
    # LaTeX for math-verify: towers, huge powers and factorials, deep nesting, many bars, commands that compute
    "9^{9^{9^{9}}}", "2^{2^{64}}", "2^{10000000}", "10^{-10^{10}}", "\\exp(10^{10^{10}})", "100000!", "(10^{9})!",
    "((2^{1000})^{1000})^{1000}", "(x+1)^{100000}", "(1+\\sqrt{2})^{10^{6}}", "\\sqrt[99999999]{8}",
    "{" * 60 + "1" + "}" * 60, "\\frac{" * 40 + "1" + "}{2}" * 40, "|x|" * 100, "a=b=" * 40 + "1",
    "\\sum_{i=1}^{10^{9}} i", "\\prod_{i=1}^{100000} i", "\\int_0^1 x^{x} dx", "\\lim_{x \\to 0} x",
    "\\binom{100000}{50000}", "\\det\\begin{vmatrix}1&2\\\\3&4\\end{vmatrix}", "\\frac{d}{dx} x^{2}",
    "\\{" + ",".join(str(i) for i in range(400)) + "\\}", "x" * 5000, "1" * 60 + "^{2}",
    "\\text{" + "a" * 100_000 + "}", "\\sin(" * 200 + "1" + ")" * 200, "\\mathrm{__import__('os')}",
    "\\begin{pmatrix}" + "&".join(["1"] * 500) + "\\end{pmatrix}",
]


@pytest.mark.parametrize("i", range(len(HOSTILE_MATH)))
def test_math_hostile_inputs_are_refused_quickly(i):
    answer = HOSTILE_MATH[i]
    assert timed_reward(R.math_reward, resp(answer), 1) == 0.0
    # hostile ground truths are just as harmless
    timed_reward(R.math_reward, resp("1"), answer)
    assert not os.path.exists(PWNED)
