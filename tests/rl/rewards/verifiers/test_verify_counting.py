"""The counting verifier: exact integers and number words."""
from __future__ import annotations

import pytest

from glmv_jax.rl import rewards as R
from reward_helpers import resp, timed_reward


@pytest.mark.parametrize("answer,gt,expected", [
    ("3", 3, 1.0), ("three", 3, 1.0), ("Three", 3, 1.0), ("3.", 3, 1.0), ("03", 3, 1.0), ("0", 0, 1.0),
    ("zero", 0, 1.0), ("3", "3", 1.0), ("4", 3, 0.0), ("3.0", 3, 0.0), ("3 circles", 3, 0.0),
    ("-3", 3, 0.0), ("3/1", 3, 0.0), ("a correct number between 0 and 10", 3, 0.0), ("3 or 4", 3, 0.0),
    ("", 0, 0.0), ("１0", 10, 1.0), ("1" * 40, 1, 0.0),
])
def test_counting_cases(answer, gt, expected):
    assert timed_reward(R.counting_reward, resp(answer), gt) == expected
    assert timed_reward(R.reward, "counting", resp(answer), gt) == expected
