"""`glmv plan` of an rl: config (one RLCS iteration): the train state, the inference weights and the KV caches it
counts per device are those of the arrays glmv train (rl) builds and the sampler decodes over, on 2 devices."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from glmv_jax.errors import ConfigError
from glmv_jax.generate import sampler
from glmv_jax.generate.weights import prepare
import glmv_jax.rl.config  # noqa: F401  (registers the rl: section)
from glmv_jax.rl.plan import iteration_shapes, plan_rl, rollout_sampling
from glmv_jax.train import setup
from glmv_jax.train.config import load_train_config
from glmv_jax.train.plan import planned_model, report, smallest_slices
from glmv_jax.train.steps import init_state

OVERRIDES = ["mesh.fsdp=2", "train.init_from=null", "rl.kl_coef=0.1", "rl.groups=2", "rl.group_size=2",
             "rl.minibatches=2", "rl.max_new_tokens=8", "rl.thinking_budget=null"]


def _device_bytes(tree) -> int:
    """Bytes the first device holds of the arrays of `tree`."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def _part(plan, prefix: str) -> float:
    return next(size for label, size in plan.parts if label.startswith(prefix))


def test_rl_plan_bytes_equal_the_arrays_rlcs_builds(monkeypatch):
    cfg = load_train_config("configs/tiny_rl.yaml", OVERRIDES)
    model = planned_model(cfg)
    planned = plan_rl(cfg, devices=2, model=model, prompt_tokens=40)
    shapes = iteration_shapes(cfg, model, prompt_tokens=40)
    assert (shapes.prompts, shapes.rows, shapes.prompt_len, shapes.cache_size) == (8, 16, 40, 128)

    # the train state glmv train (rl) starts from, on the same mesh (train/setup.py restore_or_init, new run)
    mesh, _ = setup.run_mesh(cfg, devices=2)
    layout = setup.state_layout(model, cfg, mesh)
    params = setup.init_sharded_params(model, cfg.train.seed, layout.param_shardings)
    state = jax.jit(lambda p: init_state(p, layout.tx),
                    out_shardings={k: layout.shardings[k] for k in ("step", "params", "opt_state")})(params)
    assert planned.bytes_params == _device_bytes(state["params"]) > 0
    assert planned.bytes_opt_state == _device_bytes(state["opt_state"]) > 0
    assert _part(planned, "reference policy") == planned.bytes_params   # rl.kl_coef keeps the start policy

    # the rollout's weights, as rlcs.iteration prepares them, and the KV caches the sampler decodes over
    weights = prepare(state["params"], mesh=mesh, config=model, dtype=setup.compute_dtype_of(cfg))
    assert _part(planned, "inference weights") == _device_bytes(weights) > 0
    seen, decode = {}, sampler.decode

    def spy(weights, config, state, **kw):   # the real decode program; records the caches it is given
        seen["kv"] = _device_bytes(state["kv"])
        return decode(weights, config, state, **kw)

    monkeypatch.setattr(sampler, "decode", spy)
    ids = np.full((shapes.prompts, shapes.prompt_len), 7, np.int32)
    sampler.sample(weights, model, ids, sampling=rollout_sampling(cfg.rl, model), group_size=cfg.rl.group_size,
                   mesh=mesh)
    assert _part(planned, "KV caches (16 rows x 128 slots)") == seen["kv"] > 0

    # every phase holds at least what stays resident in it; the iteration's peak is the largest phase
    resident = planned.bytes_params + planned.bytes_opt_state + _part(planned, "reference policy")
    rollout, update = _part(planned, "rollout peak"), _part(planned, "update peak")
    assert rollout >= resident + _part(planned, "inference weights") + seen["kv"]
    assert update >= resident + _part(planned, "update: activations")
    assert planned.bytes_total == max(rollout, update, _part(planned, "log-prob forward peak"))
    text = report(planned)
    assert "iteration peak" in text and "rollout of 8 prompts x 2 = 16 rows" in text and "update: all-gather" in text
    assert smallest_slices(planned)


def test_a_prompt_shorter_than_its_image_is_refused():
    cfg = load_train_config("configs/tiny_rl.yaml", OVERRIDES)
    with pytest.raises(ConfigError, match="visual tokens"):
        plan_rl(cfg, devices=2, model=planned_model(cfg), prompt_tokens=2)
