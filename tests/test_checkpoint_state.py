"""The loop's own state (RLCS: iteration and curriculum) is an item of the same orbax step as the train state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.checkpoint.state import TrainCheckpointer


def _state(value: float) -> dict:
    return {"step": jnp.int32(value), "params": {"w": jnp.full((4, 3), value)}, "opt_state": {"mu": jnp.zeros((4, 3))},
            "rng": jnp.zeros(2, jnp.uint32)}


def _target() -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: _state(0.0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def test_loop_state_is_restored_with_its_own_step(tmp_path):
    saved = {s: {"iteration": s, "curriculum": {"alpha": [1.0 + s, 2.0], "ids": [0, 1], "pending": []}} for s in (2, 4)}
    with TrainCheckpointer(tmp_path, keep=5) as ck:
        ck.save(1, _state(1.0))                               # a step without loop state (e.g. `glmv train`)
        for step, loop in saved.items():
            ck.save(step, _state(float(step)), loop_state=loop)
    ck = TrainCheckpointer(tmp_path, read_only=True)
    assert ck.all_steps() == [1, 2, 4]
    for step, loop in saved.items():
        restored = ck.restore(_target(), step=step)
        assert restored["loop"] == loop and int(restored["step"]) == step
        np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 3), float(step)))
        assert ck.restore_loop_state(step) == loop
    assert ck.restore_loop_state() == saved[4]                 # the latest by default
    assert "loop" not in ck.restore(_target(), step=1) and ck.restore_loop_state(1) is None
    # nothing is written beside the orbax steps: the loop state lives inside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "2").iterdir() if p.is_dir()) == ["loop", "params",
                                                                                               "train"]
