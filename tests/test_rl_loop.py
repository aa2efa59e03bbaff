"""The RLCS loop (`glmv train` with an `rl:` section) across a crash and a resume: the loop's state is saved in
the orbax step it belongs to, and metrics.jsonl (keyed by iteration) holds every iteration once."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from glmv_jax import init_params, load_config
from glmv_jax.checkpoint.convert import save_orbax_params
from glmv_jax.checkpoint.state import TrainCheckpointer
from glmv_jax.data import synthetic
from glmv_jax.rl import loop as rl_loop
from glmv_jax.rl.config import RLConfig  # noqa: F401  (registers the `rl:` section)
from glmv_jax.train.config import from_dict
from glmv_jax.train.metrics import read_jsonl
from glmv_jax.train.setup import model_for_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    """An orbax params folder of a random tiny model with the synthetic-task tokenizer beside it (as an SFT
    workdir would hold), for `train.init_from`."""
    folder = tmp_path_factory.mktemp("sft")
    tokenizer = synthetic.build_tokenizer(tmp_path_factory.mktemp("tok") / "tok", n=400, vocab_size=700)
    shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
    model = model_for_tokenizer(load_config("tiny"), tokenizer)
    save_orbax_params(folder, model, init_params(model, seed=0))
    return folder


def rl_config(init_from, **rl):
    return from_dict({
        "model": "tiny",
        "data": {"source": "synthetic", "mode": "sft", "tokenizer": "synthetic", "seed": 2,
                 "min_pixels": 1568, "max_pixels": 3136},
        "train": {"seed": 0, "init_from": str(init_from)},
        "rl": {"iterations": 3, "groups": 2, "group_size": 2, "max_new_tokens": 8, "minibatches": 2,
               "prompt_pool": 8, "eval_prompts": 2, "eval_every": 3, "offline_k": 0, **rl},
        "optimizer": {"learning_rate": 1e-4, "warmup_steps": 1, "total_steps": 10, "weight_decay": 0.0},
        "checkpoint": {"every": 2, "keep": 5},
    })


def test_crash_and_resume_keep_metrics_and_curriculum_in_step(sft_folder, tmp_path, monkeypatch):
    workdir = tmp_path / "rl"
    saved_loops = {}
    save = TrainCheckpointer.save

    def save_or_crash(self, step, state, data_iterator=None, *, loop_state=None):
        if loop_state["iteration"] == 3:   # (the optimizer step depends on how many groups were informative)
            raise RuntimeError("simulated crash before iteration 3's checkpoint")
        saved_loops[step] = loop_state
        return save(self, step, state, data_iterator, loop_state=loop_state)

    monkeypatch.setattr(TrainCheckpointer, "save", save_or_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rl_loop.train_rl(rl_config(sft_folder), workdir)
    monkeypatch.setattr(TrainCheckpointer, "save", save)
    # iteration 3's metrics were written, its checkpoint was not: the run resumes after iteration 2
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")] == [0, 1, 2, 3]
    ck = TrainCheckpointer(workdir, read_only=True)
    (key,) = ck.all_steps()
    assert saved_loops[key]["iteration"] == 2
    assert ck.restore_loop_state(key) == saved_loops[key]                   # the curriculum saved with that step
    assert saved_loops[key]["curriculum"]["iteration"] == 2
    assert rl_loop.finished_iterations(workdir) == 2

    last = rl_loop.train_rl(rl_config(sft_folder), workdir)
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]                      # iteration 3 once, from the resumed run
    assert last["step"] == 3 and np.isfinite(last["eval_reward"])
    assert records[-1]["eval_reward"] == last["eval_reward"]
    ck = TrainCheckpointer(workdir, read_only=True)
    steps = ck.all_steps()
    assert len(steps) == 2 and steps[0] == key and rl_loop.finished_iterations(workdir) == 3
    assert ck.restore_loop_state(key) == saved_loops[key]
    assert ck.restore_loop_state(steps[1])["curriculum"]["iteration"] == 3
    # the loop state lives inside the orbax steps: no loose JSON beside them
    assert sorted(p.name for p in workdir.glob("*.json")) == ["config.json"]
