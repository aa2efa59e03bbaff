"""Hostile inputs in every domain (code that would run if evaluated, megabyte strings, broken unicode, odd
ground truths): every call returns a float in [0, 1], runs nothing and finishes within 2 s."""
from __future__ import annotations

import os
import random
import time

import pytest

from glmv_jax.rl import rewards as R
from glmv_jax.rl.rewards.verifiers import ocr
from reward_helpers import PAYLOAD, PWNED, B, E, raw, resp, timed, timed_reward


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
    a = "".join(rng.choice("abcdef") for _ in range(ocr.MAX_OCR_CHARS))
    b = a[:5000] + "x" + a[5001:]
    assert timed_reward(R.ocr_reward, resp(a), b) == pytest.approx(1 - 1 / ocr.MAX_OCR_CHARS)


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
