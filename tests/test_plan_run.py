"""`glmv plan --train-config`: the plan's parameter and optimizer bytes are those of the arrays `glmv train` builds
from the same YAML, and accumulation's gradient buffer shows in it."""
from __future__ import annotations

import math

import jax
import numpy as np

from glmv_jax.checkpoint.state import TrainCheckpointer
from glmv_jax.config import load_config
from glmv_jax.train import loop
from glmv_jax.train.config import load_train_config
from glmv_jax.train.plan import plan_run, report

OVERRIDES = ["train.steps=1", "train.eval_every=0", "checkpoint.every=1", "data.seq_len=64", "data.batch_size=2",
             "data.n_train=200", "data.n_eval=0", "optimizer.accumulate=2", "data.pixel_rows=256",
             "data.max_images=8"]


def _bytes(tree) -> int:
    """Bytes of every array (or orbax array metadata) leaf of `tree`."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves if hasattr(x, "shape"))


def test_plan_bytes_equal_the_arrays_glmv_train_builds(tmp_path):
    cfg = load_train_config("configs/tiny_pretrain.yaml", OVERRIDES)
    loop.train(cfg, tmp_path)
    with TrainCheckpointer(tmp_path, read_only=True) as saved:
        meta = saved._manager.item_metadata(1)
        params, opt_state = _bytes(meta["params"]), _bytes(meta["train"]["opt_state"])
    model = load_config(str(tmp_path))  # the model glmv train built (its tokenizer's vocabulary)
    planned = plan_run(cfg, devices=1, model=model)
    assert planned.accumulate == 2
    assert planned.bytes_params == params and planned.bytes_opt_state == opt_state
    assert planned.bytes_accumulation == params > 0
    assert "accumulation buffer" in report(planned) and "= 2 per micro-batch x 2" in report(planned)

    single = plan_run(load_train_config("configs/tiny_pretrain.yaml", OVERRIDES + ["optimizer.accumulate=1"]),
                      devices=1, model=model)
    assert single.bytes_accumulation == 0 and "accumulation buffer" not in report(single)
    assert single.bytes_params == params and single.bytes_opt_state == opt_state
    # the peak holds params, optimizer state and the f32 gradient sum at once
    assert planned.bytes_total >= params + opt_state + planned.bytes_accumulation
