"""The grounding verifier: one-to-one box matching at IoU > 0.5 on the 0..1000 scale."""
from __future__ import annotations

import pytest

from glmv_jax.rl import rewards as R
from glmv_jax.rl.rewards.verifiers import grounding
from reward_helpers import resp, timed_reward

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
    many = ",".join(f"[{i},{i},{i + 200},{i + 200}]" for i in range(100, 100 + grounding.MAX_BOXES + 1))
    assert not R.has_repetition(many)
    assert timed_reward(R.grounding_reward, resp(many), [100, 100, 300, 300]) == 0.0
    import numpy as np

    assert timed_reward(R.grounding_reward, resp("[1,2,3,4]"), np.array([1, 2, 3, 4]).tolist()) == 1.0
    assert timed_reward(R.grounding_reward, resp("[1,2,3,4]"), (np.int64(1), 2, 3, np.float32(4))) == 1.0
