"""The OCR verifier: 1 - edit distance / max length; the edit distance (editdistance) against the textbook table."""
from __future__ import annotations

import random

import editdistance
import pytest

from glmv_jax.rl import rewards as R
from glmv_jax.rl.rewards.verifiers.ocr import verify_ocr
from reward_helpers import resp, timed_reward


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


# (a, b, Levenshtein distance counted by hand, per code point)
PAIRS = [
    ("", "", 0), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("intention", "execution", 5), ("ab", "ba", 2), ("Café", "Cafe", 1), ("日本語テキスト", "日本語テスト", 1),
    ("🙂🙃", "🙃🙂", 2), ("🙂", "🙂🙂", 1), ("e\u0301", "\u00e9", 2), ("ａｂｃ", "abc", 3), ("naïve", "naive", 1),
    ("Ⅻ", "XII", 3), ("x" * 100, "y" * 100, 100), ("ab" * 60, "ba" * 60, 2),
]


@pytest.mark.parametrize("a,b,distance", PAIRS)
def test_edit_distance_table(a, b, distance):
    """The library's distance is the textbook one, per Unicode code point, and verify_ocr uses it unchanged."""
    assert _dp_levenshtein(a, b) == distance
    assert editdistance.eval(a, b) == distance
    n = max(len(a), len(b))
    assert verify_ocr(a, b) == (max(0.0, 1.0 - distance / n) if n else 0.0)


def test_levenshtein_matches_the_table():
    rng = random.Random(1)
    for _ in range(300):
        alphabet = rng.choice(("ab", "abc", "abcdefgh", "aé日🙂"))
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        assert editdistance.eval(a, b) == _dp_levenshtein(a, b), (a, b)
        n = max(len(a), len(b))
        assert verify_ocr(a, b) == (max(0.0, 1.0 - _dp_levenshtein(a, b) / n) if n else 0.0), (a, b)


@pytest.mark.parametrize("answer,gt,ignore_case,expected", [
    ("hello", "hello", False, 1.0), ("hel1o", "hello", False, 0.0), ("helo", "hello", False, 0.0),
    ("Hello World", "HelloWorld", False, 1.0), ("Hello\nWorld", "Hello World", False, 1.0),
    ("hello", "HELLO", False, 0.0), ("hello", "HELLO", True, 1.0), ("43", "43.0", False, 0.0),
    ("日本語テスト", "日本語テスト", False, 1.0), ("", "hello", False, 0.0), ("", "", False, 0.0),
])
def test_ocr_exact_mode(answer, gt, ignore_case, expected):
    """exact=True: 1 iff the texts are equal after the same normalisation, else 0 (no partial credit)."""
    assert verify_ocr(answer, gt, ignore_case=ignore_case, exact=True) == expected
    assert timed_reward(R.ocr_reward, resp(answer), gt, ignore_case=ignore_case, exact=True) == expected


def test_ocr_exact_domain():
    """The exact-match mode is chosen per domain: ``ocr_exact`` is registered by default, ``ocr`` keeps partial
    credit, and any domain can pick either."""
    assert "ocr_exact" in R.domains()
    assert timed_reward(R.reward, "ocr", resp("hel1o"), "hello") == pytest.approx(0.8)
    assert timed_reward(R.reward, "ocr_exact", resp("hel1o"), "hello") == 0.0
    assert timed_reward(R.reward, "ocr_exact", resp("hel lo"), "hello") == 1.0
    try:
        R.register("receipts", "ocr", exact=True, ignore_case=True)
        assert timed_reward(R.reward, "receipts", resp("TOTAL 12.50"), "total 12.50") == 1.0
        assert timed_reward(R.reward, "receipts", resp("TOTAL 12.5"), "total 12.50") == 0.0
    finally:
        R.unregister("receipts")
