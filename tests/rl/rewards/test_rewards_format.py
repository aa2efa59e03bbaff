"""The format gate and strict box extraction, on hand-written replies (reward 0 whenever the gate fails)."""
from __future__ import annotations

import pytest

from glmv_jax.data.chat import format_answer
from glmv_jax.rl import rewards as R
from reward_helpers import B, E, raw, resp, timed, timed_reward

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
