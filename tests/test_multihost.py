"""Training across hosts means what it means on one process.

(a) The visual blocks: the same global image batch (images of different sizes) laid out per host, each host
    laying out its own rows' blocks, gives the loss and gradient of the single flat array of the whole batch;
    concatenating the hosts' flat pixels and grids (the old per-host placement) does not.
(b) `glmv train` as 2 real processes x 4 CPU devices (jax.distributed over gloo, launched by
    launch/local_multiprocess.sh) logs the losses of 1 process x 8 devices on the same global batches, and
    after both processes are killed with SIGKILL and started again it goes on with the same losses.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.sharding import NamedSharding

from glmv_jax import load_config, sharding as mesh_lib
from glmv_jax.data import visual_layout
from glmv_jax.data.packing import collate_rows
from glmv_jax.model.glmv import init_params
from glmv_jax.train import batches
from glmv_jax.train.steps import batch_loss

ROOT = Path(__file__).resolve().parent.parent
GRIDS = [(1, 2, 2), (1, 4, 6), (1, 6, 4), (1, 2, 8), (1, 4, 4), (1, 8, 2), (1, 6, 6), (1, 2, 4)]


# ------------------------------------------------------------------------------ (a) the visual blocks
def image_rows(config, rows: int = 8, length: int = 64, seed: int = 0) -> list[list[dict]]:
    """`rows` rows of records, each with text and 0-2 images of different sizes (GRIDS, in turn)."""
    rng = np.random.default_rng(seed)
    out, g = [], 0
    for r in range(rows):
        row = []
        for _ in range(1 + r % 2):
            grids = [GRIDS[(g + k) % len(GRIDS)] for k in range(r % 3)]
            g += len(grids)
            image_tokens = sum(h * w // 4 for _, h, w in grids)
            n = length // 2 - 2 if r % 2 else length - 4
            text = rng.integers(1, 300, n - image_tokens).astype(np.int32)
            ids = np.concatenate([np.full(image_tokens, config.image_token_id, np.int32), text])
            types = (ids == config.image_token_id).astype(np.int32)
            record = {"input_ids": ids, "mm_token_type_ids": types, "loss_mask": 1 - types}
            if grids:
                record["image_grid_thw"] = np.array(grids, np.int32)
                record["pixel_values"] = rng.normal(size=(sum(t * h * w for t, h, w in grids),
                                                          config.vision.patch_dim)).astype(np.float32)
            row.append(record)
        out.append(row)
    return out


def loss_and_grad(params, config, batch, mesh, specs):
    placed = {k: jax.device_put(v, NamedSharding(mesh, mesh_lib.spec(specs[k]))) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(lambda p, b: batch_loss(p, config, b)[0]))
        return jax.device_get(fn(params, placed))


def test_blocks_per_host_equal_the_single_array(tiny_config):
    config = tiny_config
    rows = image_rows(config)
    vision = config.vision
    params = init_params(config, 3)
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    token_specs = {k: ("batch", "length") for k in batches.TOKEN_KEYS}

    # one process: the whole batch's images as one flat array (what forward() does)
    whole = collate_rows(rows, 64, vision)
    pixels, grids = visual_layout.layout(whole["pixel_values"], whole["image_grid_thw"], vision)[:2]
    single = {**{k: whole[k] for k in batches.TOKEN_KEYS}, "pixel_values": pixels, "image_grid_thw": grids}
    want_loss, want_grad = loss_and_grad(params, config, single, mesh,
                                         {**token_specs, "pixel_values": ("patches", None),
                                          "image_grid_thw": (None, None)})

    # two hosts of 4 rows: each collates its rows and lays out its own 2 of the 4 blocks (the trainer's Placer)
    budgets = visual_layout.VisualBudgets(max_images=8, pixel_rows=256, row_multiple=1, strict=True)
    placer = batches.Placer(mesh, vision, budgets, local_blocks=2)
    hosts = [placer.layout(collate_rows(rows[h * 4:(h + 1) * 4], 64, vision)) for h in range(2)]
    assert hosts[0]["pixel_values"].shape == (2, 256, vision.patch_dim)   # (blocks, rows, patch_dim)
    assert not np.array_equal(hosts[0]["image_grid_thw"], hosts[1]["image_grid_thw"])
    blocked = {k: np.concatenate([h[k] for h in hosts]) for k in hosts[0]}
    got_loss, got_grad = loss_and_grad(params, config, blocked, mesh, batches.BATCH_SPECS)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss), (got_loss, want_loss)
    leaves = jax.tree_util.tree_leaves_with_path(want_grad)
    for (path, want), got in zip(leaves, jax.tree.leaves(got_grad)):
        scale = float(np.abs(want).max()) + 1e-12
        assert float(np.abs(got - want).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
    norm = lambda g: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))  # noqa: E731
    assert abs(norm(got_grad) - norm(want_grad)) <= 1e-5 * norm(want_grad)

    # the old per-host placement: every host's flat pixels and grids concatenated, grids read as one list
    flat = [collate_rows(rows[h * 4:(h + 1) * 4], 64, vision) for h in range(2)]
    naive = {**{k: whole[k] for k in batches.TOKEN_KEYS},
             "pixel_values": np.concatenate([f["pixel_values"] for f in flat]),
             "image_grid_thw": np.concatenate([f["image_grid_thw"] for f in flat])}
    bad_loss, bad_grad = loss_and_grad(params, config, naive, mesh,
                                       {**token_specs, "pixel_values": ("patches", None),
                                        "image_grid_thw": (None, None)})
    assert abs(bad_loss - want_loss) > 1e-4 * abs(want_loss) or abs(norm(bad_grad) - norm(want_grad)) > 1e-3


def test_block_split_keeps_each_rows_images():
    config = load_config("tiny")
    rows = image_rows(config)
    batch = collate_rows(rows, 64, config.vision)
    tokens = (batch["mm_token_type_ids"] == 1).sum(axis=1)
    parts = visual_layout.split_blocks(batch["pixel_values"], batch["image_grid_thw"], tokens, 4, config.vision)
    for s, (pixels, grids) in enumerate(parts):
        want = [rec for row in rows[2 * s:2 * s + 2] for rec in row if "image_grid_thw" in rec]
        assert grids.tolist() == [list(g) for rec in want for g in rec["image_grid_thw"]]
        expected = np.concatenate([rec["pixel_values"] for rec in want]) if want else np.zeros((0, pixels.shape[1]))
        np.testing.assert_array_equal(pixels, expected)
