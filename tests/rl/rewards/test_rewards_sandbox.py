"""The time-bounded sandbox: verifiers run in worker processes that import no jax, a runaway verifier is killed
at its deadline and the pool recovers, the thread fallback keeps the deadline, and a call is cheap."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from glmv_jax.rl import rewards as R
from glmv_jax.rl.rewards import sandbox
from reward_helpers import resp, timed, timed_reward

GT2 = [[100, 100, 300, 300], [600, 600, 800, 800]]


def test_workers_import_the_package_without_jax():
    """Each worker imported the verifiers through this copy of the package, and no jax (nor flax)."""
    import jax  # noqa: F401 - the caller may hold jax; its workers still must not

    R.warmup()
    workers = list(sandbox._POOL.all)
    assert workers
    for w in workers:
        assert w.info["ready"] is True and w.info["pid"] == w.proc.pid
        assert w.info["jax"] is False and w.info["flax"] is False, w.info
        assert w.info["package"] == os.path.dirname(os.path.abspath(R.__file__))


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
        pool = sandbox._POOL
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
    monkeypatch.setattr(sandbox, "get_pool", lambda: None)
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
