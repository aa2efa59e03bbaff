"""One RLCS iteration end to end on a tiny random model with a real synthetic-task tokenizer."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from glmv_jax import init_params, load_config
from glmv_jax.data import synthetic
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.rl import rlcs
from glmv_jax.rl.config import RLConfig
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
    cfg = RLConfig(groups=2, group_size=4, max_new_tokens=12, minibatches=2, thinking_budget=6)
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
    assert metrics["prompts"] == 2
    assert 0 < metrics["response_length"] <= 12
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state["params"]))
    # groups with equal rewards are dropped, not used as filler: an update only when some group is informative
    assert metrics["updated_groups"] == round(metrics["balanced_groups"] * 2)
    assert int(state["step"]) == (2 if metrics["updated_groups"] else 0)
    assert any(changed) == bool(metrics["updated_groups"])


def test_minibatches_share_the_informative_rows():
    useful = np.array([True, False, True, False, False])
    parts = rlcs.minibatch_rows([0, 1, 2, 3], useful, 4, 2, np.random.default_rng(0))
    assert len(parts) == 2 and sorted(np.concatenate(parts).tolist()) == list(range(16))
    for part in parts:
        assert len(part) == 8 and sum(useful[r // 4] for r in part) == 4


def test_policy_tokens_mask_the_forced_answer_opening():
    sampling = rlcs.SamplingConfig(8, 1.0, 1.0, eos_ids=(9,), pad_id=9, thinking_budget=3, think_end_id=5,
                                   forced_answer_ids=(5, 6))
    out = {"tokens": np.array([[1, 2, 3, 5, 6, 7, 9, 9], [1, 5, 6, 7, 9, 9, 9, 9]]),
           "lengths": np.array([7, 5]), "forced": np.array([True, False])}
    mask = rlcs.policy_tokens(out, sampling)
    assert mask.tolist() == [[True, True, True, False, False, True, True, False],   # 5, 6 forced at the budget
                             [True, True, True, True, True, False, False, False]]   # sampled </think>: kept


def test_rows_without_loss_tokens_do_not_dilute_the_loss(setup):
    """A filler row (no loss tokens) leaves the loss and its gradient as they are without it."""
    tokenizer, config, params, processor = setup
    cfg = RLConfig(max_new_tokens=8, temperature=1.0)
    examples = [synthetic.make_example(d, 3) for d in synthetic.DOMAINS[:2]]
    prompts = rlcs.make_prompts(examples, tokenizer, processor, tokenizer.eos_ids[0])
    out = rlcs.rollout(params, config, prompts, [0, 0, 1, 1], rlcs.sampling_config(cfg, tokenizer), seed=1)
    adv = np.array([1.0, -1.0, 0.0, 0.0], np.float32)
    tokens = rlcs.policy_tokens(out, rlcs.sampling_config(cfg, tokenizer))
    tokens[2:] = False
    tx = make_optimizer(OptimizerConfig(learning_rate=0.0, weight_decay=0.0), params)
    step = rlcs.make_policy_step(config, tx, cfg)
    with_filler = rlcs.update_batch(prompts, [0, 0, 1, 1], out, adv, config, token_mask=tokens)
    alone = rlcs.update_batch(prompts, [0, 0], {k: v[:2] for k, v in out.items()}, adv[:2], config)
    fresh = lambda: init_state(jax.tree.map(np.array, params), tx)  # noqa: E731  (the step donates its state)
    _, a = step(fresh(), with_filler)
    _, b = step(fresh(), alone)
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-4)


def test_first_update_is_on_policy(setup):
    """The sampler's log-probs equal the teacher-forced ones of the same params: the ratio is 1."""
    tokenizer, config, params, processor = setup
    cfg = RLConfig(max_new_tokens=10, temperature=0.8)
    examples = [synthetic.make_example(d, 7) for d in synthetic.DOMAINS]
    prompts = rlcs.make_prompts(examples, tokenizer, processor, tokenizer.eos_ids[0])
    rows = np.repeat(np.arange(4), 2)
    out = rlcs.rollout(params, config, prompts, rows, rlcs.sampling_config(cfg, tokenizer), seed=3)
    batch = rlcs.update_batch(prompts, rows, out, np.ones(8, np.float32), config)
    tx = make_optimizer(OptimizerConfig(learning_rate=0.0, weight_decay=0.0), params)
    _, metrics = rlcs.make_policy_step(config, tx, cfg)(init_state(params, tx), batch)
    assert abs(float(metrics["ratio"]) - 1.0) < 1e-4
    assert float(metrics["clip_fraction"]) == 0.0


def test_on_policy_gap_is_float32_rounding(setup):
    """The iteration's on-policy figure: |sampler log-prob - training-forward log-prob| over the sampled tokens,
    under the parameters that sampled them. In float32 the two differ only by accumulation order (KV-cache decode
    against the full forward): measured mean 1.9e-7 and max 9.5e-7 here (2 ulps of a log-prob of about -7), bound
    at 1e-6 / 1e-5. A sampler on other parameters (one step of SGD away) is caught far above it."""
    tokenizer, config, _, processor = setup
    params = init_params(config, seed=0)   # fresh: the update steps of the tests above donate the fixture's
    cfg = RLConfig(max_new_tokens=24, temperature=1.0)
    examples = [synthetic.make_example(d, 7) for d in synthetic.DOMAINS]
    prompts = rlcs.make_prompts(examples, tokenizer, processor, tokenizer.eos_ids[0])
    out = rlcs.rollout(params, config, prompts, np.arange(4), rlcs.sampling_config(cfg, tokenizer), seed=3, group_size=4)
    batch = rlcs.update_batch(prompts, np.repeat(np.arange(4), 4), out, np.ones(16, np.float32), config)
    step = rlcs.make_policy_step(config, make_optimizer(OptimizerConfig(learning_rate=0.0), params), cfg)
    gap = rlcs.on_policy_gap(step, params, [batch])
    assert batch["loss_mask"].sum() > 100
    assert gap["logp_gap_mean"] <= 1e-6 and gap["logp_gap_max"] <= 1e-5, gap
    moved = jax.tree.map(lambda x: x * 1.01, params)
    assert rlcs.on_policy_gap(step, moved, [batch])["logp_gap_mean"] > 1e-4


def test_synthetic_pool_is_lazy_and_round_robin():
    from glmv_jax.data import synthetic
    from glmv_jax.rl.loop import SyntheticPool

    pool = SyntheticPool(1 << 16, seed=5)
    assert len(pool) == 65536 and pool.domains()[:5] == [*synthetic.DOMAINS, synthetic.DOMAINS[0]]
    assert pool[65535]["id"] == synthetic.example_at(65535, seed=5)["id"]
    assert pool[6]["domain"] == synthetic.DOMAINS[6 % 4]
    with pytest.raises(KeyError):
        pool[65536]


def _hand_made_batch(config, seed: int = 0) -> dict:
    """Two rows of 10 text tokens (no images), responses in the last 5 target places, row 1 shorter."""
    rng = np.random.default_rng(seed)
    s, t = 2, 10
    ids = rng.integers(0, 290, (s, t)).astype(np.int32)
    mask = np.zeros((s, t), np.float32)
    mask[0, 4:9] = 1
    mask[1, 4:7] = 1
    return {"input_ids": ids, "segment_ids": np.ones((s, t), np.int32), "mm_token_type_ids": np.zeros((s, t), np.int32),
            "targets": np.concatenate([ids[:, 1:], np.zeros((s, 1), np.int32)], axis=1), "loss_mask": mask,
            "old_logp": rng.normal(-6.0, 0.3, (s, t)).astype(np.float32),
            "advantages": np.array([1.0, -0.5], np.float32), "pixel_values": None, "image_grid_thw": None}


def _new_logp_and_entropy(params, config, batch, temperature):
    """The current policy's log-probs of the targets and its entropy, computed here from the model directly."""
    from glmv_jax.model.glmv import apply, token_inputs

    tokens = token_inputs(config, batch["input_ids"], batch["segment_ids"], batch["mm_token_type_ids"])
    logits = np.asarray(apply(params, config, tokens, {"pixel_values": None, "image_grid_thw": None}),
                        np.float64) / temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return picked, -(np.exp(logp) * logp).sum(-1)


def _per_sample_mean(values, mask):
    return float(np.mean((values * mask).sum(-1) / mask.sum(-1)))


def test_kl_and_entropy_coefficients_reach_the_loss():
    """rl.kl_coef adds kl_coef x the k3 estimate of KL(policy || start policy), rl.entropy_coef subtracts
    entropy_coef x the entropy, both averaged per sample over its response tokens; at 0 the loss is the
    GRPO loss alone, whatever the batch carries."""
    config = load_config("tiny")
    params = init_params(config, seed=0)
    batch = _hand_made_batch(config)
    new_logp, ent = _new_logp_and_entropy(params, config, batch, temperature=0.8)
    batch["ref_logp"] = (new_logp + np.random.default_rng(1).normal(0, 0.5, new_logp.shape)).astype(np.float32)
    tx = make_optimizer(OptimizerConfig(learning_rate=0.0, weight_decay=0.0), params)

    def loss(**coefs):
        cfg = RLConfig(temperature=0.8, **coefs)
        state = init_state(jax.tree.map(lambda x: x.copy(), params), tx)   # the step donates its state
        _, metrics = rlcs.make_policy_step(config, tx, cfg)(state, batch)
        return float(metrics["loss"]), metrics

    base, metrics = loss()
    assert "kl" not in metrics and "entropy" not in metrics
    delta = batch["ref_logp"] - new_logp
    k3 = np.exp(delta) - delta - 1.0
    with_kl, metrics = loss(kl_coef=0.1)
    np.testing.assert_allclose(with_kl - base, 0.1 * _per_sample_mean(k3, batch["loss_mask"]), rtol=1e-4, atol=1e-6)
    assert with_kl - base > 1e-3
    mask = batch["loss_mask"]
    np.testing.assert_allclose(float(metrics["kl"]), (k3 * mask).sum() / mask.sum(), rtol=1e-4)
    with_entropy, metrics = loss(entropy_coef=0.01)
    np.testing.assert_allclose(with_entropy - base, -0.01 * _per_sample_mean(ent, mask), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["entropy"]), (ent * mask).sum() / mask.sum(), rtol=1e-4)
    assert loss(kl_coef=0.0, entropy_coef=0.0)[0] == base


def test_kl_needs_the_start_policy():
    """An iteration with kl_coef > 0 but no reference policy is a config error, before any rollout."""
    from glmv_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="kl_coef"):
        rlcs.iteration({}, None, None, RLConfig(kl_coef=0.1), None, None, None, None, None, seed=0)
