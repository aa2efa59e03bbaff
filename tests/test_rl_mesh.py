"""RLCS on 8 devices (fsdp x tensor) equals RLCS on one: the same rollouts, rewards, advantages and losses.

conftest.py gives this process 8 simulated CPU devices; the one-device run uses the first of them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from glmv_jax.errors import ConfigError
from glmv_jax.rl import loop as rl_loop
from glmv_jax.rl import rlcs
from glmv_jax.train.config import MeshConfig
from glmv_jax.train.metrics import read_jsonl
from test_rl_loop import rl_config, sft_folder  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow
SCORE_BATCH = rlcs.rewards.score_batch   # the real functions, captured before any test wraps them
GROUP_ADVANTAGES = rlcs.group_advantages


def run(cfg, workdir, monkeypatch) -> tuple[list, list[dict]]:
    """Run RLCS; returns each iteration's (rewards, advantages) (a spy on `rlcs.group_advantages`) and metrics.

    A random model earns no verifier reward, so every advantage would be 0 and every loss 0: the rewards are
    the real scores plus a stand-in that reads the sampled text (the parity of its characters' sum), so groups
    have a spread and the updates move the policy."""
    seen = []

    def text_reward(examples, texts):
        scores = SCORE_BATCH(examples, texts)
        return [{**s, "reward": s["reward"] + sum(map(ord, t)) % 2} for s, t in zip(scores, texts)]

    def spy(rewards_, *args):
        out = GROUP_ADVANTAGES(rewards_, *args)
        seen.append((np.array(rewards_), np.array(out)))
        return out

    monkeypatch.setattr(rlcs, "group_advantages", spy)
    monkeypatch.setattr(rlcs.rewards, "score_batch", text_reward)
    rl_loop.train_rl(cfg, workdir)
    return seen, read_jsonl(workdir / "metrics.jsonl")


def test_rl_on_8_devices_equals_one_device(sft_folder, tmp_path, monkeypatch):  # noqa: F811
    cfg = rl_config(sft_folder, iterations=2, groups=2, group_size=4, max_new_tokens=10, eval_every=2, eval_prompts=2)
    one, one_metrics = run(cfg, tmp_path / "one", monkeypatch)
    many, many_metrics = run(dataclasses.replace(cfg, mesh=MeshConfig(fsdp=4, tensor=2)), tmp_path / "eight",
                             monkeypatch)
    assert len(one) == len(many) == 2
    for (r1, a1), (r8, a8) in zip(one, many):
        np.testing.assert_array_equal(r8, r1)
        np.testing.assert_allclose(a8, a1, atol=1e-6)
    assert any(np.abs(a).sum() > 0 for _, a in one)   # some group had a reward spread: the updates did something
    for m1, m8 in zip(one_metrics[1:], many_metrics[1:]):
        for key in ("reward", "response_length", "clip_fraction", "eval_reward"):
            assert m8.get(key) == m1.get(key), key
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
        assert m8["logp_gap_max"] <= 1e-5 and m1["logp_gap_max"] <= 1e-5


def test_minibatches_that_do_not_divide_the_mesh_are_refused(sft_folder, tmp_path):  # noqa: F811
    cfg = dataclasses.replace(rl_config(sft_folder, groups=3, group_size=2), mesh=MeshConfig(fsdp=4, tensor=2))
    with pytest.raises(ConfigError, match="data x fsdp"):
        rl_loop.train_rl(cfg, tmp_path / "rl")
