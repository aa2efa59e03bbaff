"""Helpers of the reward tests: well-formed and raw replies, and calls checked against the 2 s bound."""
from __future__ import annotations

import time

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
