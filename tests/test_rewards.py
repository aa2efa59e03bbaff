"""Reward system: the format gate, strict box extraction, the four verifiers on hand-written cases, the
language-mix and repetition gates, the registry, and hostile inputs (code that would run if evaluated,
expressions that would take hours, megabyte strings, broken tags): every call returns a float in [0, 1], runs
nothing and finishes within 2 s; a runaway verifier is killed at its deadline and the pool recovers."""
from __future__ import annotations

import operator
import os
import random
import sys
import textwrap
import time

import pytest

from glmv_jax.data import synthetic
from glmv_jax.data.chat import format_answer
from glmv_jax.rl import rewards as R

LIMIT = 2.0  # seconds, for every single call
PWNED = "/tmp/pwned_glmv"
PAYLOAD = "__import__('os').system('touch /tmp/pwned_glmv')"
B, E = R.BOX_BEGIN, R.BOX_END


def resp(answer: str, think: str = "Let me work it out.\n") -> str:
    """A well-formed reply, exactly as the SFT model is taught to write it."""
    return format_answer(think, answer)


def raw(answer_part: str, think: str = "thinking") -> str:
    """``<think>…</think><answer>{answer_part}</answer>`` without any check on the parts."""
    return f"<think>{think}</think><answer>{answer_part}</answer>"


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    assert dt < LIMIT, f"{getattr(fn, '__name__', fn)} took {dt:.2f} s"
    return out


def timed_reward(fn, *args, **kwargs) -> float:
    r = timed(fn, *args, **kwargs)
    assert isinstance(r, float) and 0.0 <= r <= 1.0
    return r


@pytest.fixture(scope="module", autouse=True)
def _pool():
    if os.path.exists(PWNED):
        os.remove(PWNED)
    assert R.warmup(), "reward worker processes failed to start"
    yield
    assert not os.path.exists(PWNED), "a reward call executed model text"


# ------------------------------------------------------------------------------------ format gate, boxes
GOOD = [
    resp("43"),
    format_answer("t", "43", newlines=False),
    "  \n" + resp("43") + "\n\n",                                    # surrounding whitespace
    f"<think>t</think>  \n <answer>The answer is {B}43{E}.</answer>",  # text around the box
    f"<THINK>t</THINK><ANSWER>{B}43{E}</ANSWER>",                    # tags are case-insensitive [code]
    f"<think>draft {B}41{E}</think><answer>{B}43{E}</answer>",       # only the answer's boxes count [code]
]
BAD = [
    "", "   ", "43", f"{B}43{E}",
    f"<answer>{B}43{E}</answer>",                                     # no thinking
    "<think>t</think>",                                               # no answer
    raw(f"{B}43{E}{B}44{E}"),                                         # two boxes
    raw(f"{B}{B}43{E}{E}"),                                           # nested boxes
    raw(f"{B}43"), raw(f"43{E}"), raw(f"{E}43{B}"),                   # unbalanced / reversed box
    raw("43"),                                                        # no box
    raw("\\boxed{43}"), raw(f"\\boxed{{43}} {B}43{E}"),               # legacy \boxed [code]
    raw(f"{B}43{E}", think="a <think> b"),                            # nested think
    raw(f"<answer>{B}43{E}"),                                         # nested answer
    raw(f"{B}43{E}") + raw(f"{B}43{E}"),                              # duplicated
    f"<think>t</think>junk<answer>{B}43{E}</answer>",                 # text between the parts
    f"<think>t</think><answer>{B}43{E}</answer>trailing",             # text after the answer
    f"prefix<think>t</think><answer>{B}43{E}</answer>",               # text before the thinking
    f"<think>t<answer>{B}43{E}</answer>",                             # unclosed think
    f"<think>t</think><answer>{B}43{E}",                              # unclosed answer
    f"<answer>{B}43{E}</answer><think>t</think>",                     # swapped
    None, b"<think>t</think>", 43, ["<think>"],
]


@pytest.mark.parametrize("text", GOOD)
def test_format_gate_accepts(text):
    assert timed(R.format_ok, text) is True
    assert R.extract_boxed(text) == "43"
    assert timed_reward(R.math_reward, text, 43) == 1.0


@pytest.mark.parametrize("i", range(len(BAD)))
def test_format_gate_rejects(i):
    text = BAD[i]
    assert timed(R.format_ok, text) is False
    for fn, gt in ((R.math_reward, 43), (R.counting_reward, 43), (R.ocr_reward, "43"),
                   (R.grounding_reward, [1, 2, 3, 4])):
        assert timed_reward(fn, text, gt) == 0.0


def test_extract_boxed():
    assert R.extract_boxed(resp(" 12/9 ")) == "12/9"
    assert R.extract_boxed(f"{B}7{E}") == "7"                         # no tags: the whole text
    assert R.extract_boxed(f"<think>{B}1{E}</think>{B}2{E}") == "2"   # after </think>
    assert R.extract_boxed(raw(f"so {B}[1,2,3,4]{E}.")) == "[1,2,3,4]"
    assert R.extract_boxed(raw("\\boxed{\\frac{1}{2}}")) == "\\frac{1}{2}"   # legacy form, braces matched
    assert R.extract_boxed(raw("\\boxed{\\boxed{42}}")) == "\\boxed{42}"     # one top-level box [code]
    assert R.extract_boxed(raw(f"{B}{E}")) == ""
    for bad in (raw(f"{B}1{E} {B}2{E}"), raw("\\boxed{1} \\boxed{2}"), raw("\\boxed{1"), raw(f"{B}1"),
                raw(f"1{E}"), raw("no box"), "", None, 5, b"x"):
        assert R.extract_boxed(bad) is None, bad


def test_sft_targets_score_one():
    """The reply format the SFT model learns (chat.format_answer) gets the full reward in every domain."""
    examples = list(synthetic.generate(24, seed=5))
    assert {ex["domain"] for ex in examples} == set(synthetic.DOMAINS)
    for ex in examples:
        out = timed(R.score, ex, ex["target"])
        assert out["reward"] == 1.0, (ex["id"], ex["target"], out)
        assert out["format_ok"] and out["answer"] == ex["answer"] and out["domain"] == ex["domain"]
        assert out["id"] == ex["id"] and out["error"] is None and not out["timed_out"]
        compact = format_answer(ex["thinking"], ex["answer"], newlines=False)
        assert timed(R.reward, ex["domain"], compact, ex["ground_truth"]) == 1.0
    assert set(R.domains()) >= set(synthetic.DOMAINS)


def test_score_batch_keeps_order():
    examples = list(synthetic.generate(12, seed=8))
    responses = [ex["target"] if i % 3 else resp("") for i, ex in enumerate(examples)]
    out = timed(R.score_batch, examples, responses)
    assert [o["id"] for o in out] == [ex["id"] for ex in examples]
    assert [o["reward"] for o in out] == [1.0 if i % 3 else 0.0 for i in range(12)]
    with pytest.raises(ValueError):
        R.score_batch(examples, responses[:-1])


# ------------------------------------------------------------------------------------------------ math
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
    ("\\sqrt{2}", "1.41421356", 0.0),          # outside the whitelist: string match only
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
]


@pytest.mark.parametrize("i", range(len(HOSTILE_MATH)))
def test_math_hostile_inputs_are_refused_quickly(i):
    answer = HOSTILE_MATH[i]
    assert timed_reward(R.math_reward, resp(answer), 1) == 0.0
    # hostile ground truths are just as harmless
    timed_reward(R.math_reward, resp("1"), answer)
    assert not os.path.exists(PWNED)


def test_no_payload_runs_in_any_domain():
    for domain, gt in (("arithmetic", 1), ("counting", 1), ("ocr", "x"), ("grounding", [1, 2, 3, 4])):
        for text in (resp(PAYLOAD), raw(PAYLOAD), PAYLOAD, resp(PAYLOAD, think=PAYLOAD)):
            assert timed_reward(R.reward, domain, text, gt) == 0.0
        timed_reward(R.reward, domain, resp("1"), PAYLOAD)
    timed(R.extract_boxed, resp(PAYLOAD))
    timed(R.format_ok, resp(PAYLOAD))
    time.sleep(0.2)
    assert not os.path.exists(PWNED)


# ------------------------------------------------------------------------------------- megabyte strings
MB = 1 << 20


@pytest.mark.parametrize("text", [
    "<think>" * (MB // 7),
    "<think>" + "a" * MB + "</think><answer>" + f"{B}1{E}</answer>",
    resp("1" * MB),
    resp("9" * MB + "/" + "7" * MB),
    raw(f"{B}1{E}" * (MB // 32)),
    "</think><answer>" * (MB // 16),
    "\\boxed{" * (MB // 7),
    "{" * MB,
    "<think>" + "</think><answer>" * 60_000,
])
def test_megabyte_strings(text):
    assert len(text) >= 900_000
    assert timed(R.format_ok, text) is False
    timed(R.extract_boxed, text)
    for fn, gt in ((R.math_reward, 1), (R.counting_reward, 1), (R.ocr_reward, "1"),
                   (R.grounding_reward, [1, 2, 3, 4])):
        assert timed_reward(fn, text, gt) == 0.0


def test_long_answers_under_the_cap():
    """Just under MAX_RESPONSE_CHARS the text reaches the workers; every verifier still answers in time."""
    rng = random.Random(0)
    digits = "".join(rng.choice("0123456789") for _ in range(150_000))
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(150_000))
    boxes = ",".join(f"[{rng.randrange(500)},{rng.randrange(500)},{rng.randrange(500, 1000)},"
                     f"{rng.randrange(500, 1000)}]" for _ in range(8000))
    for answer in (digits, letters, boxes):
        text = resp(answer)
        assert len(text) < R.MAX_RESPONSE_CHARS
        assert timed(R.format_ok, text) is True
        assert timed_reward(R.math_reward, text, 1) == 0.0
        assert timed_reward(R.counting_reward, text, 1) == 0.0
        assert timed_reward(R.ocr_reward, text, "hello") == 0.0
        assert timed_reward(R.grounding_reward, text, [1, 2, 3, 4]) == 0.0
    # the longest OCR text accepted, against a long truth: bit-parallel edit distance keeps it fast
    a = "".join(rng.choice("abcdef") for _ in range(R.MAX_OCR_CHARS))
    b = a[:5000] + "x" + a[5001:]
    assert timed_reward(R.ocr_reward, resp(a), b) == pytest.approx(1 - 1 / R.MAX_OCR_CHARS)


@pytest.mark.parametrize("text", [
    resp("４３"), resp("🙂"), resp("٤٣"), resp("43", think="思考" * 10 + " ünïcödé \u200b\u2028\ufeff"),
    "\ufeff" + resp("43"), resp("\u0000"), resp("43\u0301"), "<think>\udcff</think><answer>" + f"{B}43{E}</answer>",
])
def test_unicode_never_raises(text):
    for fn, gt in ((R.math_reward, 43), (R.counting_reward, 43), (R.ocr_reward, "43"),
                   (R.grounding_reward, [1, 2, 3, 4])):
        timed_reward(fn, text, gt)
    timed(R.format_ok, text)
    timed(R.extract_boxed, text)


@pytest.mark.parametrize("gt", [None, object(), float("nan"), float("inf"), [], {}, b"43", True, "", [None] * 4])
def test_odd_ground_truths_never_raise(gt):
    for fn in (R.math_reward, R.counting_reward, R.ocr_reward, R.grounding_reward):
        assert timed_reward(fn, resp("43"), gt) == 0.0


# -------------------------------------------------------------------------------------------- counting
@pytest.mark.parametrize("answer,gt,expected", [
    ("3", 3, 1.0), ("three", 3, 1.0), ("Three", 3, 1.0), ("3.", 3, 1.0), ("03", 3, 1.0), ("0", 0, 1.0),
    ("zero", 0, 1.0), ("3", "3", 1.0), ("4", 3, 0.0), ("3.0", 3, 0.0), ("3 circles", 3, 0.0),
    ("-3", 3, 0.0), ("3/1", 3, 0.0), ("a correct number between 0 and 10", 3, 0.0), ("3 or 4", 3, 0.0),
    ("", 0, 0.0), ("１0", 10, 1.0), ("1" * 40, 1, 0.0),
])
def test_counting_cases(answer, gt, expected):
    assert timed_reward(R.counting_reward, resp(answer), gt) == expected
    assert timed_reward(R.reward, "counting", resp(answer), gt) == expected


# ------------------------------------------------------------------------------------------------- OCR
@pytest.mark.parametrize("answer,gt,expected", [
    ("hello", "hello", 1.0), ("hel1o", "hello", 0.8), ("helo", "hello", 0.8), ("hello!", "hello", 5 / 6),
    ("Hello World", "HelloWorld", 1.0), ("Hello\nWorld", "Hello World", 1.0), ("hello", "HELLO", 0.0),
    ("Café", "Cafe", 0.75), ("43", "43.0", 0.5), ("", "hello", 0.0), ("xyz", "hello", 0.0),
    ("kitten", "sitting", 1 - 3 / 7), ("日本語テキスト", "日本語テスト", 1 - 1 / 7),
])
def test_ocr_cases(answer, gt, expected):
    assert timed_reward(R.ocr_reward, resp(answer), gt) == pytest.approx(expected)


def test_ocr_ignore_case():
    assert timed_reward(R.ocr_reward, resp("hello WORLD"), "Hello World") == pytest.approx(1 - 5 / 10)
    assert timed_reward(R.ocr_reward, resp("hello WORLD"), "Hello World", ignore_case=True) == 1.0


def _dp_levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_levenshtein_matches_the_table():
    rng = random.Random(1)
    for _ in range(300):
        alphabet = rng.choice(("ab", "abc", "abcdefgh", "aé日🙂"))
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        assert R._levenshtein(a, b) == _dp_levenshtein(a, b), (a, b)


# ------------------------------------------------------------------------------------------- grounding
GT2 = [[100, 100, 300, 300], [600, 600, 800, 800]]


@pytest.mark.parametrize("answer,gt,expected", [
    ("[100,100,300,300]", [100, 100, 300, 300], 1.0),
    ("[[100,100,300,300]]", [100, 100, 300, 300], 1.0),
    ("[ 100.0 , 100 , 300 , 300 ]", [100, 100, 300, 300], 1.0),
    ("(100,100,300,300)", [100, 100, 300, 300], 1.0),
    ("The box is [100,100,300,300].", "[100,100,300,300]", 1.0),
    ("[[100,100,300,300],[600,600,800,800]]", GT2, 1.0),
    ("[[600,600,800,800],[100,100,300,300]]", GT2, 1.0),       # order does not matter
    ("[[100,100,300,300],[0,0,50,50]]", GT2, 0.5),              # one right, one wrong
    ("[100,100,300,300]", GT2, 0.5),                            # one missing
    ("[[100,100,300,300],[100,100,300,300]]", GT2, 0.5),       # a duplicate earns nothing
    ("[[100,100,300,300],[100,100,300,300]]", [[100, 100, 300, 300]], 0.5),
    ("[[100,100,300,300],[600,600,800,800],[0,0,10,10]]", GT2, 2 / 3),
    ("[100,100,300,350]", [100, 100, 300, 300], 1.0),           # IoU 0.8
    ("[100,100,300,500]", [100, 100, 300, 300], 0.0),           # IoU exactly 0.5 is not > 0.5
    ("[100,100,300,499]", [100, 100, 300, 300], 1.0),           # IoU 200/399 > 0.5
    ("[300,300,100,100]", [100, 100, 300, 300], 0.0),           # x2 < x1
    ("[100,100,300,1300]", [100, 100, 300, 300], 0.0),          # outside 0..1000
    ("[100,100,300]", [100, 100, 300, 300], 0.0),
    ("100,100,300,300", [100, 100, 300, 300], 0.0),            # no brackets
    ("", [100, 100, 300, 300], 0.0),
    ("[100,100,300,300]", [], 0.0),
])
def test_grounding_cases(answer, gt, expected):
    assert timed_reward(R.grounding_reward, resp(answer), gt) == pytest.approx(expected)


def test_grounding_iou_and_limits():
    assert R.box_iou([0, 0, 100, 100], [50, 0, 150, 100]) == pytest.approx(50 * 100 / (2 * 10000 - 5000))
    assert R.box_iou([0, 0, 100, 100], [100, 0, 200, 100]) == 0.0
    assert R.box_iou([0, 0, 100, 100], [0, 0, 100, 100]) == 1.0
    many = ",".join(f"[{i},{i},{i + 200},{i + 200}]" for i in range(100, 100 + R.MAX_BOXES + 1))
    assert not R.has_repetition(many)
    assert timed_reward(R.grounding_reward, resp(many), [100, 100, 300, 300]) == 0.0
    import numpy as np

    assert timed_reward(R.grounding_reward, resp("[1,2,3,4]"), np.array([1, 2, 3, 4]).tolist()) == 1.0
    assert timed_reward(R.grounding_reward, resp("[1,2,3,4]"), (np.int64(1), 2, 3, np.float32(4))) == 1.0


# ------------------------------------------------------------------------------------------- penalties
ZH_PARA = "这是一个很长的中文段落，用来检查语言混合的惩罚规则是否生效。" * 3
EN_PARA = " ".join(random.Random(0).choices(synthetic.WORDS, k=220))  # no 50-char window repeats


def test_language_mix_gate():
    assert R.has_language_mix(ZH_PARA + "\n\n" + EN_PARA)
    assert not R.has_language_mix(ZH_PARA + "\n\n" + ZH_PARA)
    assert not R.has_language_mix(EN_PARA)
    assert not R.has_language_mix(ZH_PARA + EN_PARA)           # one mixed paragraph is neither [code]
    mixed = resp("43", think=ZH_PARA + "\n\n" + EN_PARA + "\n")
    assert timed_reward(R.math_reward, mixed, 43) == 0.0
    out = timed(R.score, {"domain": "arithmetic", "ground_truth": 43}, mixed)
    assert out["language_mix"] and out["format_ok"] and out["reward"] == 0.0
    assert timed_reward(R.math_reward, resp("43", think=ZH_PARA + "\n"), 43) == 1.0
    assert timed_reward(R.math_reward, resp("43", think=EN_PARA + "\n"), 43) == 1.0


def test_repetition_gate():
    loop = "I should double check the count of the red circles. " * 12
    assert R.has_repetition(loop)
    assert not R.has_repetition("I should double check the count of the red circles. " * 2)
    assert not R.has_repetition("=" * 5000 + "\n" + "-" * 5000 + "." * 3000)   # formatting runs are ignored
    assert R.has_repetition("ab" * 40)                                         # 50-char window seen 10+ times
    out = timed(R.score, {"domain": "counting", "ground_truth": 3}, resp("3", think=loop))
    assert out["repetition"] and out["reward"] == 0.0
    ex = synthetic.make_example("counting", 12)
    assert not R.has_repetition(ex["target"])


# -------------------------------------------------------------------------------------------- registry
def test_register_custom_domains():
    try:
        R.register("echo", operator.eq)                    # a stdlib function: runs in the workers
        assert timed(R.reward, "echo", resp("abc"), "abc") == 1.0
        assert timed(R.reward, "echo", resp("abd"), "abc") == 0.0
        assert timed(R.reward, "echo", raw("abc"), "abc") == 0.0           # still gated: no box

        R.register("chart", "math", tolerance=2.5e-2)       # a built-in with other settings
        assert timed(R.reward, "chart", resp("0.67"), "2/3") == 1.0
        assert timed(R.reward, "arithmetic", resp("0.67"), "2/3") == 0.0

        R.register("closure", lambda answer, gt: 0.25 * len(answer))  # not picklable: runs in a thread
        assert timed(R.reward, "closure", resp("ab"), None) == 0.5
        assert timed(R.reward, "closure", resp("abcdefgh"), None) == 1.0   # clipped to 1

        R.register("open", lambda answer, gt: float(answer.startswith(gt)), box=False)
        assert timed(R.reward, "open", raw("yes, because"), "yes") == 1.0
        assert timed(R.reward, "open", resp("yes"), "yes") == 0.0  # a box in a non-verifiable answer [paper]

        def boom(answer, gt):
            raise RuntimeError("verifier bug")

        R.register("boom", boom)
        out = timed(R.score, {"domain": "boom", "ground_truth": 1}, resp("1"))
        assert out["reward"] == 0.0 and "verifier bug" in out["error"]
        R.register("nan", lambda answer, gt: float("nan"))
        assert timed(R.reward, "nan", resp("1"), 1) == 0.0
        with pytest.raises(KeyError):
            R.reward("no-such-domain", resp("1"), 1)
        with pytest.raises(ValueError):
            R.register("bad", "no-such-verifier")
        with pytest.raises(TypeError):
            R.register("bad", 42)
    finally:
        for d in ("echo", "chart", "closure", "open", "boom", "nan"):
            R.unregister(d)
    assert "echo" not in R.domains() and "arithmetic" in R.domains()


@pytest.fixture()
def helper_module(tmp_path, monkeypatch):
    (tmp_path / "glmv_reward_helpers.py").write_text(textwrap.dedent("""
        import os

        def spin(answer, gt):
            while True:  # a runaway computation that no thread could stop
                pass

        def other_process(answer, gt):
            return 1.0 if os.getpid() != gt else 0.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import glmv_reward_helpers

    yield glmv_reward_helpers
    sys.modules.pop("glmv_reward_helpers", None)


def test_runaway_verifier_is_killed_at_its_deadline(helper_module):
    try:
        R.register("own-process", helper_module.other_process)
        assert timed(R.reward, "own-process", resp("1"), os.getpid()) == 1.0   # verifiers run elsewhere

        R.register("spin", helper_module.spin, timeout=0.5)
        pool = R._POOL
        before = {w.proc.pid for w in pool.all}
        t0 = time.perf_counter()
        out = R.score({"domain": "spin", "ground_truth": 1}, resp("1"))
        dt = time.perf_counter() - t0
        assert out["reward"] == 0.0 and out["timed_out"] and 0.5 <= dt < 1.0, (dt, out)
        # the pool keeps serving while the killed worker is replaced
        assert timed_reward(R.math_reward, resp("\\frac{1}{2}"), 0.5) == 1.0
        assert R.reward("spin", resp("1"), 1, timeout=0.2) == 0.0
        deadline = time.monotonic() + 20
        while len(pool.all) < pool.size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pool.all) == pool.size
        killed = before - {w.proc.pid for w in pool.all}
        assert killed  # the runaway workers were killed (and reaped) and replaced
        for pid in killed:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        for _ in range(5):
            assert timed_reward(R.math_reward, resp("43.0"), 43) == 1.0
    finally:
        R.unregister("spin")
        R.unregister("own-process")


def test_thread_fallback_when_workers_are_unavailable(monkeypatch):
    """Without worker processes the verifiers run in a thread of the caller: same results, same deadline."""
    monkeypatch.setattr(R, "_get_pool", lambda: None)
    assert timed_reward(R.math_reward, resp("\\frac{1}{2}"), 0.5) == 1.0
    assert timed_reward(R.math_reward, resp("9**9**9**9"), 1) == 0.0
    assert timed_reward(R.grounding_reward, resp("[100,100,300,300]"), GT2) == 0.5
    try:
        R.register("sleepy", lambda answer, gt: time.sleep(2.5) or 1.0, timeout=0.3)
        t0 = time.perf_counter()
        out = R.score({"domain": "sleepy", "ground_truth": 1}, resp("1"))
        assert out["reward"] == 0.0 and out["timed_out"] and time.perf_counter() - t0 < 1.0
    finally:
        R.unregister("sleepy")


def test_per_call_overhead():
    """The worker round trip is cheap: report and bound the median wall time of a typical call."""
    text, samples = resp("\\frac{4}{3}"), []
    for _ in range(100):
        t0 = time.perf_counter()
        assert R.math_reward(text, "4/3") == 1.0
        samples.append(time.perf_counter() - t0)
    samples.sort()
    median = samples[len(samples) // 2]
    print(f"\nmath_reward median {median * 1e3:.2f} ms, p90 {samples[89] * 1e3:.2f} ms")
    assert median < 0.05
