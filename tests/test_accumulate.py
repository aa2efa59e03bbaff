"""Gradient accumulation: N micro-batches of b rows, fed one at a time, give the loss, gradient and update of one batch of N*b rows."""
from __future__ import annotations

import jax
import numpy as np
import optax

from glmv_jax import load_config
from glmv_jax.model.glmv import init_params
from glmv_jax.train.steps import accumulate_step, apply_accumulated, batch_loss, init_accumulator, init_state

N, B, T = 3, 2, 32


def rows(config, count: int, seed: int = 0):
    """`count` packed rows of T tokens (text, some with one image of 2x4 or 4x4 patches), each row's pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids, pixels, grids = [int(x) for x in rng.integers(0, 290, int(rng.integers(3, 8)))], [], []
        if rng.random() < 0.7:
            h, w = [(2, 4), (4, 4)][int(rng.integers(2))]
            ids += [config.image_start_token_id] + [config.image_token_id] * (h * w // 4) + [config.image_end_token_id]
            pixels.append(rng.standard_normal((h * w, config.vision.patch_dim)).astype(np.float32))
            grids.append((1, h, w))
        ids += [int(x) for x in rng.integers(0, 290, int(rng.integers(2, 6)))]
        out.append((ids, pixels, grids))
    return out


def packed(config, examples, pixel_rows: int):
    """A batch of the rows `examples` with their pixels (padded to `pixel_rows`) and grids (padded to 8)."""
    from glmv_jax.model.rope import token_types

    ids = np.zeros((len(examples), T), np.int32)
    for r, (row, _, _) in enumerate(examples):
        ids[r, :len(row)] = row
    seg = (np.arange(T)[None] < np.array([len(e[0]) for e in examples])[:, None]).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((len(examples), 1), np.int32)], axis=1)
    loss_mask = np.concatenate([seg[:, 1:], np.zeros((len(examples), 1), np.int32)], axis=1).astype(np.float32)
    pixels = [p for e in examples for p in e[1]]
    grids = [g for e in examples for g in e[2]]
    pv = np.zeros((pixel_rows, config.vision.patch_dim), np.float32)
    if pixels:
        pv[:sum(len(p) for p in pixels)] = np.concatenate(pixels)
    g = np.zeros((8, 3), np.int32)
    g[:len(grids)] = grids
    return {"input_ids": ids, "segment_ids": seg, "mm_token_type_ids": np.asarray(token_types(config, ids)) * seg,
            "targets": targets, "loss_mask": loss_mask * (targets > 0), "pixel_values": pv, "image_grid_thw": g}


def test_micro_batches_equal_one_batch_in_loss_gradient_and_update():
    config = load_config("tiny")
    params = init_params(config, 0)
    examples = rows(config, N * B)
    whole = packed(config, examples, 128)
    micro = [packed(config, examples[i * B:(i + 1) * B], 64) for i in range(N)]
    counts = [float(m["loss_mask"].sum()) for m in micro]
    assert len(set(counts)) > 1 and all(m["image_grid_thw"].any() for m in micro)  # unequal token counts, images

    (loss, count), grads = jax.jit(jax.value_and_grad(lambda p: batch_loss(p, config, whole), has_aux=True))(params)
    micro_step = jax.jit(lambda a, p, b: accumulate_step(a, p, b, config=config))
    acc = init_accumulator(params)
    for m in micro:  # one micro-batch at a time, as glmv train feeds them
        acc = micro_step(acc, params, m)
    assert float(acc["count"]) == float(count) == sum(counts)
    np.testing.assert_allclose(float(acc["total"] / acc["count"]), float(loss), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(acc["grads"]), jax.tree.leaves(grads)):
        # f32, summed in another order: within 1e-5 of the leaf's largest gradient (the modules' parity bound)
        np.testing.assert_allclose(np.asarray(a) / float(count), np.asarray(b), rtol=0,
                                   atol=1e-5 * float(np.abs(b).max()), err_msg=jax.tree_util.keystr(path))
    # the mean of the micro-batches' own mean losses is not the batch's loss: the token weighting matters
    micro_loss = jax.jit(lambda p, m: batch_loss(p, config, m)[0])
    means = [float(micro_loss(params, m)) for m in micro]
    assert abs(np.mean(means) - float(loss)) > 1e-4

    tx = optax.sgd(1.0)  # the update is minus the gradient: any error in it shows
    new, metrics = jax.jit(lambda s, a: apply_accumulated(s, a, tx=tx))(init_state(params, tx), acc)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-5)
    assert int(new["step"]) == 1
    for (path, a), p, g in zip(jax.tree_util.tree_leaves_with_path(new["params"]), jax.tree.leaves(params),
                               jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(p - g), rtol=0, atol=1e-5 * float(np.abs(g).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))
