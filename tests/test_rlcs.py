"""One RLCS iteration end to end on a tiny random model with a real synthetic-task tokenizer."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from glmv_jax import init_params, load_config
from glmv_jax.data import synthetic
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.rl import rlcs
from glmv_jax.rl.curriculum import Curriculum
from glmv_jax.train.setup import model_for_tokenizer
from glmv_jax.train.optimizer import OptimizerConfig, make_optimizer
from glmv_jax.train.steps import init_state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = synthetic.build_tokenizer(tmp_path_factory.mktemp("tok") / "tok", n=400, vocab_size=700)
    config = model_for_tokenizer(load_config("tiny"), tokenizer)
    params = init_params(config, seed=0)
    processor = ImageProcessor(max_pixels=28 * 28 * 2 * 16)  # small images keep the test fast
    return tokenizer, config, params, processor


def test_group_advantages():
    r = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = rlcs.group_advantages(r)
    np.testing.assert_allclose(adv[0], [1, -1, 1, -1], atol=1e-5)
    assert (adv[1] == 0).all()


def test_one_iteration(setup):
    tokenizer, config, params, processor = setup
    cfg = rlcs.RLConfig(groups=2, group_size=4, max_new_tokens=12, minibatches=2, thinking_budget=6)
    pool = {i: synthetic.make_example(synthetic.DOMAINS[i % 4], i) for i in range(16)}
    curriculum = Curriculum.from_pass_at_k(list(pool), [pool[i]["domain"] for i in pool], [0.5] * len(pool))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10), params)
    state = init_state(params, tx)
    step_fn = rlcs.make_policy_step(config, tx, cfg)
    before = jax.tree.map(np.asarray, state["params"])
    state, metrics = rlcs.iteration(state, step_fn, config, cfg, curriculum, pool, tokenizer, processor,
                                    np.random.default_rng(0), seed=0)
    for key in ("reward", "balanced_groups", "expansion", "response_length", "forced_answers", "clip_fraction",
                "rollout_tokens_per_s", "rollout_s", "update_s"):
        assert np.isfinite(metrics[key]), key
    assert metrics["prompts"] == 2 and int(state["step"]) == 2
    assert 0 < metrics["response_length"] <= 12
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state["params"]))
    assert any(changed)  # AdamW moved the params (weight decay at least)


def test_first_update_is_on_policy(setup):
    """The sampler's log-probs equal the teacher-forced ones of the same params: the ratio is 1."""
    tokenizer, config, params, processor = setup
    cfg = rlcs.RLConfig(max_new_tokens=10, temperature=0.8)
    examples = [synthetic.make_example(d, 7) for d in synthetic.DOMAINS]
    prompts = rlcs.make_prompts(examples, tokenizer, processor, tokenizer.eos_ids[0])
    rows = np.repeat(np.arange(4), 2)
    out = rlcs.rollout(params, config, prompts, rows, rlcs.sampling_config(cfg, tokenizer), seed=3)
    batch = rlcs.update_batch(prompts, rows, out, np.ones(8, np.float32), config)
    tx = make_optimizer(OptimizerConfig(learning_rate=0.0, weight_decay=0.0), params)
    _, metrics = rlcs.make_policy_step(config, tx, cfg)(init_state(params, tx), batch)
    assert abs(float(metrics["ratio"]) - 1.0) < 1e-4
    assert float(metrics["clip_fraction"]) == 0.0


def test_synthetic_pool_is_lazy_and_round_robin():
    from glmv_jax.data import synthetic
    from glmv_jax.rl.loop import SyntheticPool

    pool = SyntheticPool(1 << 16, seed=5)
    assert len(pool) == 65536 and pool.domains()[:5] == [*synthetic.DOMAINS, synthetic.DOMAINS[0]]
    assert pool[65535]["id"] == synthetic.example_at(65535, seed=5)["id"]
    assert pool[6]["domain"] == synthetic.DOMAINS[6 % 4]
    with pytest.raises(KeyError):
        pool[65536]
