"""Training across hosts means what it means on one process.

(a) The visual blocks: the same global image batch (images of different sizes) laid out per host, each host
    laying out its own rows' blocks (flat or framed), gives the loss and gradient of the single flat array of the whole batch;
    concatenating the hosts' flat pixels and grids (the old per-host placement) does not.
(b) `glmv train` as 2 real processes x 4 CPU devices (jax.distributed over gloo, launched by
    launch/local_multiprocess.sh) logs the losses of 1 process x 8 devices on the same global batches, and
    after both processes are killed with SIGKILL and started again it goes on with the same losses.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
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

    # two hosts of 4 rows: each collates its rows and lays out its own 2 of the 4 blocks (the trainer's Placer),
    # flat blocks and framed blocks (one image per row)
    norm = lambda g: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))  # noqa: E731
    for budgets, shape in ((visual_layout.VisualBudgets(max_images=8, pixel_rows=256, strict=True), (2, 256)),
                           (visual_layout.VisualBudgets(max_images=8, frame_patches=48, strict=True), (2, 8, 48))):
        placer = batches.Placer(mesh, vision, budgets, local_blocks=2)
        hosts = [placer.layout(collate_rows(rows[h * 4:(h + 1) * 4], 64, vision)) for h in range(2)]
        assert hosts[0]["pixel_values"].shape == (*shape, vision.patch_dim)   # (blocks, rows or frames x width, D)
        assert not np.array_equal(hosts[0]["image_grid_thw"], hosts[1]["image_grid_thw"])
        blocked = {k: np.concatenate([h[k] for h in hosts]) for k in hosts[0]}
        got_loss, got_grad = loss_and_grad(params, config, blocked, mesh, batches.BATCH_SPECS)
        assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss), (got_loss, want_loss)
        leaves = jax.tree_util.tree_leaves_with_path(want_grad)
        for (path, want), got in zip(leaves, jax.tree.leaves(got_grad)):
            scale = float(np.abs(want).max()) + 1e-12
            assert float(np.abs(got - want).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
        assert abs(norm(got_grad) - norm(want_grad)) <= 1e-5 * norm(want_grad)

    # the old per-host placement: every host's flat pixels and grids concatenated, grids read as one list
    flat = [collate_rows(rows[h * 4:(h + 1) * 4], 64, vision) for h in range(2)]
    naive = {**{k: whole[k] for k in batches.TOKEN_KEYS},
             "pixel_values": np.concatenate([f["pixel_values"] for f in flat]),
             "image_grid_thw": np.concatenate([f["image_grid_thw"] for f in flat])}
    specs = {**token_specs, "pixel_values": ("patches", None), "image_grid_thw": (None, None)}
    placed = {k: jax.device_put(v, NamedSharding(mesh, mesh_lib.spec(specs[k]))) for k, v in naive.items()}
    with jax.set_mesh(mesh):
        bad_loss = float(jax.jit(lambda p, b: batch_loss(p, config, b)[0])(params, placed))
    assert abs(bad_loss - want_loss) > 1e-4 * abs(want_loss), (bad_loss, want_loss)
    print(json.dumps({"single": [float(want_loss), norm(want_grad)], "blocks": [float(got_loss), norm(got_grad)],
                      "concatenated_loss": bad_loss}))

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


# ------------------------------------------------------------------ (b) glmv train as 2 real processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SFT = {"model": "tiny",
       "data": {"source": "synthetic", "mode": "sft", "seq_len": 128, "batch_size": 8, "tokenizer": "synthetic",
                "vocab_size": 512, "n_train": 400, "n_eval": 16, "seed": 1, "min_pixels": 1568, "max_pixels": 6272,
                "pixel_rows": 512, "max_images": 32, "shards": 2},
       "train": {"steps": 12, "log_every": 1, "eval_every": 6},
       "optimizer": {"learning_rate": 1.0e-3, "warmup_steps": 2},
       "checkpoint": {"every": 3, "keep": 5},
       "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}


def records(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def two_processes(config: Path, workdir: Path, log: Path) -> subprocess.Popen:
    """`glmv train` as 2 processes x 4 CPU devices through launch/local_multiprocess.sh (its own process group)."""
    env = {**os.environ, "PROCESSES": "2", "DEVICES_PER_PROCESS": "4", "PORT": str(free_port()),
           "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    command = ["bash", str(ROOT / "launch/local_multiprocess.sh"), sys.executable, "-m", "glmv_jax.cli", "train",
               "--config", str(config), "--workdir", str(workdir)]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_sigkill(tmp_path):
    config = tmp_path / "sft.yaml"
    raw = {**SFT, "train": {**SFT["train"], "compile_cache": str(tmp_path / "cache")}}
    config.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()

    # 1 process x 8 devices
    one = tmp_path / "one"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "glmv_jax.cli", "train", "--config", str(config), "--workdir", str(one)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    want = records(one)
    assert sorted(want) == list(range(1, 13))

    # 2 processes x 4 devices, killed with SIGKILL once the first checkpoint is on disk
    two = tmp_path / "two"
    job = two_processes(config, two, tmp_path / "first.log")
    checkpoints = two / "checkpoints"
    deadline = time.time() + 600
    while job.poll() is None and time.time() < deadline:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            os.killpg(job.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert job.wait(60) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 12   # killed mid-run

    # started again: resumes from the last checkpoint and runs to the end
    job = two_processes(config, two, tmp_path / "second.log")
    code = job.wait(600)
    log = (tmp_path / "second.log").read_text()
    assert code == 0, "\n".join(line for line in log.splitlines() if "rror" in line)[-3000:] + log[-2000:]
    assert f"resumed from {checkpoints}/{saved[-1]}" in log
    got = records(two)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):   # before the kill (first run) and after it (resumed)
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in want[step]:
                assert abs(got[step][key] - want[step][key]) <= 1e-5 * abs(want[step][key]), (step, key)
    figures = {"max_rel_loss_diff": max(abs(got[s]["loss"] - want[s]["loss"]) / want[s]["loss"] for s in want),
               "resumed_from": saved[-1], "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(figures))
