"""The language-mix and repetition gates, alone and inside the reward."""
from __future__ import annotations

import random

from glmv_jax.data import synthetic
from glmv_jax.rl import rewards as R
from reward_helpers import resp, timed, timed_reward

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
