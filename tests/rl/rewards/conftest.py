"""Shared by the reward tests: the worker pool is started (and must start) before each module's tests, and no
test may leave the file that a payload in the model text would create."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # reward_helpers, for the tests of this folder and below

from glmv_jax.rl import rewards as R  # noqa: E402
from reward_helpers import PWNED  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _pool():
    if os.path.exists(PWNED):
        os.remove(PWNED)
    assert R.warmup(), "reward worker processes failed to start"
    yield
    assert not os.path.exists(PWNED), "a reward call executed model text"
