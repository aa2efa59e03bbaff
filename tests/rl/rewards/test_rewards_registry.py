"""The registry: the synthetic domains score their SFT targets 1, custom verifiers (in workers, in threads,
without a box), batches in order."""
from __future__ import annotations

import operator

import pytest

from glmv_jax.data import synthetic
from glmv_jax.data.chat import format_answer
from glmv_jax.rl import rewards as R
from reward_helpers import raw, resp, timed


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
