"""The trainer end to end on the tiny model: loss falls, exact resume after SIGKILL, crash-safe saves, restore
onto another mesh, divergence detection, config errors, frozen parts.

Runs share one persistent XLA compilation cache (a session tmp folder), so a program compiled by one run is
loaded by the next; conftest.py gives this process (and the `glmv train` subprocesses) 8 CPU devices.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from glmv_jax import cli
from glmv_jax.checkpoint.state import TrainCheckpointer
from glmv_jax.config import ConfigError, load_config
from glmv_jax.train import batches, loop, setup
from glmv_jax.train.config import apply_overrides, from_dict, load_train_config
from glmv_jax.train.metrics import read_jsonl

MESH_A = {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
MESH_B = {"data": 1, "fsdp": 1, "context": 4, "tensor": 2}
BASE = {
    "model": "tiny",
    "data": {"source": "synthetic", "mode": "caption", "seq_len": 128, "batch_size": 4, "tokenizer": "synthetic",
             "vocab_size": 512, "n_train": 4000, "n_eval": 8, "seed": 0,
             "min_pixels": 1568, "max_pixels": 14112,      # images 28..84 px a side
             "pixel_rows": 512, "max_images": 32},          # fixed visual shapes: one program per mesh
    "train": {"steps": 60, "seed": 0, "log_every": 1, "eval_every": 0},
    "optimizer": {"learning_rate": 3.0e-3, "warmup_steps": 10, "total_steps": 100, "weight_decay": 0.01},
    "checkpoint": {"every": 20, "keep": 3},
    "mesh": MESH_A,
}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the module; JAX's previous setting is restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    path = tmp_path_factory.mktemp("xla_cache")
    yield str(path)
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def config(cache: str, **changes) -> dict:
    """BASE with `section={key: value}` changes merged in and the shared compilation cache."""
    raw = copy.deepcopy(BASE)
    raw["train"]["compile_cache"] = cache
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(Path(workdir) / "metrics.jsonl")}


# ------------------------------------------------------------------------------------- (a) loss falls
@pytest.fixture(scope="module")
def tiny_run(compile_cache, tmp_path_factory):
    """60 steps of caption pretraining on mesh data=2 x fsdp=2 x tensor=2, eval at the end."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    raw = config(compile_cache, train={"eval_every": 60})
    start = time.perf_counter()
    final = loop.train(from_dict(raw), workdir)
    return workdir, raw, final, time.perf_counter() - start


@pytest.mark.slow
def test_loss_falls(tiny_run):
    workdir, _, final, seconds = tiny_run
    curve = losses(workdir)
    assert sorted(curve) == list(range(1, 61))
    first, last = np.mean([curve[s] for s in range(1, 6)]), np.mean([curve[s] for s in range(56, 61)])
    print(f"\ntiny run: {seconds:.0f}s; loss " + ", ".join(f"{s}:{curve[s]:.3f}" for s in (1, 10, 20, 30, 40, 50, 60))
          + f"; eval_loss {final['eval_loss']:.3f}")
    assert last < 0.6 * first, (first, last)
    assert final["step"] == 60 and np.isfinite(final["eval_loss"]) and final["eval_loss"] < 0.7 * first
    record = read_jsonl(workdir / "metrics.jsonl")[-1]
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "padding_fraction", "skipped_total", "examples",
                "eval_loss"):
        assert key in record, key
    assert 0.0 <= record["padding_fraction"] < 0.5 and record["lr"] > 0 and record["tokens_per_s"] > 0
    # TensorBoard scalars, in TensorBoard's own record format (CRC-32C per record)
    events = [e for f in sorted((workdir / "tb").iterdir()) for e in read_events(f)]
    assert events[0].file_version == "brain.Event:2"
    tb_loss = {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == "loss"}
    assert sorted(tb_loss) == list(range(1, 61)) and tb_loss[60] == pytest.approx(curve[60], rel=1e-6)
    # checkpoints: every 20 steps, the last 3 kept; the workdir describes its model and tokenizer
    assert TrainCheckpointer(workdir, read_only=True).all_steps() == [20, 40, 60]
    assert load_config(workdir).text.vocab_size % 128 == 0 and (workdir / "tokenizer.model").is_file()


def read_events(path: Path):
    """The `Event` protos of a TensorBoard event file (a TFRecord stream: length, masked CRC-32C, payload, masked
    CRC-32C), read with tensorboardX's own protobuf classes; every CRC is checked."""
    import struct

    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, pos = path.read_bytes(), 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(header)
        payload = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(payload)
        pos += 16 + length
        yield Event.FromString(payload)


def test_metrics_writer_tensorboard_and_resume(tmp_path):
    """Scalars reach TensorBoard's event file; a resume from step 2 drops the JSONL records after it."""
    from glmv_jax.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0 / step, "lr": np.float32(0.5), "ok": True, "eval_loss": float("nan")})
    writer.close()
    events = [e for f in sorted((tmp_path / "tb").iterdir()) for e in read_events(f)]
    scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
    assert scalars == {(s, tag): pytest.approx(v) for s in (1, 2, 3) for tag, v in (("loss", 1.0 / s), ("lr", 0.5))}
    MetricsWriter(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["eval_loss"] is None


# ------------------------------------------------------------------------ (b) exact resume after SIGKILL
def _cli(config_path: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "glmv_jax.cli", "train", "--config", str(config_path), "--workdir", str(workdir)]


def _env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(compile_cache, tmp_path):
    raw = config(compile_cache, train={"steps": 24}, checkpoint={"every": 4, "keep": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))

    reference = tmp_path / "reference"
    done = subprocess.run(_cli(path, reference), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(path, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed mid-training"
            saved = [int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit()] \
                if (killed / "checkpoints").is_dir() else []
            logged = max(losses(killed), default=0) if (killed / "metrics.jsonl").exists() else 0
            if saved and logged >= 10:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = TrainCheckpointer(killed, read_only=True).latest_step()
    logged_before = max(losses(killed))
    assert before is not None and 4 <= before < 24 and logged_before < 24

    done = subprocess.run(_cli(path, killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / str(before)}" in done.stderr

    want, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 25))      # records written after the checkpoint were dropped, then redone
    mismatched = {s: (want[s], got[s]) for s in want if want[s] != got[s]}
    assert not mismatched, f"killed at step >= {logged_before}, resumed from {before}: {mismatched}"


# -------------------------------------------------------------------------- (c) a crash during a save
CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from glmv_jax.checkpoint.state import TrainCheckpointer

    def state(value):
        return {"step": jnp.int32(value), "params": {"w": jnp.full((4096, 2048), float(value))},
                "opt_state": {"mu": jnp.full((4096, 2048), -float(value))}, "rng": jnp.zeros(2, jnp.uint32)}

    ck = TrainCheckpointer(sys.argv[1], keep=3)
    ck.save(1, state(1))
    ck.wait()
    ck.save(2, state(2))                 # returns once the arrays are off the devices; files are written later
    import pathlib, time
    folder, deadline = pathlib.Path(sys.argv[1]) / "checkpoints", time.time() + 30
    while not any(p.name.startswith("2.orbax-checkpoint-tmp") for p in folder.iterdir()) and time.time() < deadline:
        time.sleep(0.001)                # the background thread has started writing step 2 once its tmp folder exists
    os.kill(os.getpid(), signal.SIGKILL)  # die while it writes
""")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(workdir)], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    # orbax wrote step 2 into a tmp folder that is renamed only when complete: the crash left it unfinished
    assert "1" in names and "2" not in names, names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names

    ck = TrainCheckpointer(workdir, keep=3)
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    abstract = {"step": jax.ShapeDtypeStruct((), np.int32), "rng": jax.ShapeDtypeStruct((2,), np.uint32),
                "params": {"w": jax.ShapeDtypeStruct((4096, 2048), np.float32)},
                "opt_state": {"mu": jax.ShapeDtypeStruct((4096, 2048), np.float32)}}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    restored = ck.restore(abstract)
    assert int(restored["step"]) == 1
    assert float(restored["params"]["w"].min()) == 1.0 == float(restored["params"]["w"].max())
    assert float(restored["opt_state"]["mu"].max()) == -1.0
    # the unfinished folder is cleaned up, and saving that step again works
    assert not any(p.name.startswith("2.orbax-checkpoint-tmp") for p in (workdir / "checkpoints").iterdir())
    ck.save(2, jax.tree.map(lambda x: x + 1 if x.dtype != np.uint32 else x, restored))
    ck.wait()
    assert ck.all_steps() == [1, 2]
    ck.close()


# ---------------------------------------------------------------------- (d) restore onto another mesh
@pytest.mark.slow
def test_restore_onto_other_mesh_continues_the_same(tiny_run, tmp_path):
    workdir, raw, _, _ = tiny_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(workdir, copy_dir)
    shutil.rmtree(copy_dir / "checkpoints" / "60")   # resume from step 40
    other = copy.deepcopy(raw)
    other["mesh"] = MESH_B                            # tensor=2 x context=4 instead of data=2 x fsdp=2 x tensor=2
    other["train"].update(steps=42, eval_every=0)
    loop.train(from_dict(other), copy_dir)
    want, got = losses(workdir), losses(copy_dir)
    assert sorted(got) == list(range(1, 43))
    # the next step's loss agrees to 1e-5; one step later the params themselves carry the other mesh's
    # reduction order (differences ~1e-7 relative), which the step after amplifies a little
    assert abs(got[41] - want[41]) <= 1e-5 * abs(want[41]), (got[41], want[41])
    assert abs(got[42] - want[42]) <= 1e-4 * abs(want[42]), (got[42], want[42])

    # the arrays are read straight into the new mesh's shardings
    from glmv_jax.model.glmv import init_params, param_shardings
    from glmv_jax.sharding import make_mesh

    model = load_config(workdir)
    mesh = make_mesh(**MESH_B)
    shardings = param_shardings(model, mesh)

    shapes = jax.eval_shape(lambda: init_params(model))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    params = TrainCheckpointer(workdir, read_only=True).restore_params(target, step=40)
    q = params["decoder"]["layers"]["q"]["kernel"]
    assert q.sharding == shardings["decoder"]["layers"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape[2] == q.shape[2] // 2  # heads split over tensor=2


# ------------------------------------------------------------------------------- (e) divergence detection
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(compile_cache, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    layout = batches.Placer.layout

    def poisoned(self, batch):  # step 8's images are NaN
        calls["n"] += 1
        if calls["n"] == 8:
            batch = {**batch, "pixel_values": np.full_like(batch["pixel_values"], np.nan)}
        return layout(self, batch)

    monkeypatch.setattr(batches.Placer, "layout", poisoned)
    # a frozen ViT, as in the freeze test below, so both run one compiled program
    raw = config(compile_cache, train={"steps": 20, "log_every": 5}, checkpoint={"every": 3, "keep": 5},
                 optimizer={"freeze": ["vision"]})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", str(path), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 3
    assert "training diverged at step 8: loss = nan" in err
    assert f"the last good checkpoint is step 6 in {workdir / 'checkpoints'}" in err
    ck = TrainCheckpointer(workdir, read_only=True)
    assert ck.all_steps() == [3, 6]  # the bad state (steps 8, 9) was not saved
    assert max(losses(workdir)) == 5 and all(np.isfinite(list(losses(workdir).values())))


# ----------------------------------------------------------------------------------- (f) config errors
def test_unknown_keys_and_overrides_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key train\.stpes; did you mean train\.steps\?"):
        from_dict({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key optimiser; did you mean optimizer\?"):
        from_dict({"optimiser": {}})
    with pytest.raises(ConfigError, match=r"model\.text\.num_layer"):
        from_dict({"model": {"text": {"num_layer": 2}}})
    with pytest.raises(ConfigError, match=r"override 'checkpoint\.evry=5': unknown config key checkpoint\.evry"):
        apply_overrides({}, ["checkpoint.evry=5"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer"):
        from_dict(apply_overrides({}, ["train.steps=many"]))
    with pytest.raises(ConfigError, match=r"train\.scan_layers must be true or false"):
        from_dict(apply_overrides({}, ["train.scan_layers=maybe"]))
    with pytest.raises(ConfigError, match=r"train\.attention_impl = 'flash' must be one of auto, cpu, xla"):
        from_dict(apply_overrides({}, ["train.attention_impl=flash"]))
    with pytest.raises(ConfigError, match=r"mesh\.data = 0"):
        from_dict(apply_overrides({}, ["mesh.data=0"]))
    with pytest.raises(ConfigError, match=r"data\.mode = 'chat' must be one of caption, sft"):
        from_dict(apply_overrides({}, ["data.mode=chat"]))

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_train_config(path, ["train.steps=300", "checkpoint.every=50", "mesh.data=2", "optimizer.learning_rate=1e-3",
                                   "model.text.num_layers=2", "optimizer.freeze=[vision]"])
    assert (cfg.train.steps, cfg.checkpoint.every, cfg.mesh.data, cfg.optimizer.learning_rate) == (300, 50, 2, 1e-3)
    assert cfg.base_model().text.num_layers == 2 and cfg.optimizer.freeze == ("vision",)
    assert cfg.optimizer.total_steps == 100  # given in the file; without it, it follows train.steps
    assert from_dict({"train": {"steps": 7}}).optimizer.total_steps == 7

    code = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "w"), "train.stpes=3"])
    assert code == 2 and "unknown config key train.stpes" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_shipped_configs_load():
    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("tiny_pretrain", "tiny_sft", "pretrain_9b", "longctx_9b"):
        cfg = load_train_config(root / f"{name}.yaml")
        cfg.base_model()
    big = load_train_config(root / "longctx_9b.yaml")
    assert (big.data.seq_len, big.mesh.tensor, big.mesh.context) == (32768, 2, 4)
    assert load_train_config(root / "pretrain_9b.yaml").mesh.sizes(256)["fsdp"] == 256


# --------------------------------------------------------------------------------- (g) freezing the ViT
@pytest.mark.slow
def test_frozen_vision_tower_does_not_move(compile_cache, tmp_path):
    from glmv_jax.model.glmv import init_params

    raw = config(compile_cache, train={"steps": 3}, checkpoint={"every": 3},
                 optimizer={"freeze": ["vision"]})
    workdir = tmp_path / "run"
    loop.train(from_dict(raw), workdir)
    model = load_config(workdir)
    from glmv_jax.model.glmv import param_shardings
    from glmv_jax.sharding import make_mesh

    shardings = param_shardings(model, make_mesh(**MESH_A))
    initial = jax.device_get(setup.init_sharded_params(model, 0, shardings))  # the run's own init
    shapes = jax.eval_shape(lambda: init_params(model))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), shapes)
    trained = jax.device_get(TrainCheckpointer(workdir, read_only=True).restore_params(target, step=3))
    for a, b in zip(jax.tree.leaves(initial["vision"]), jax.tree.leaves(trained["vision"])):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for part in ("projector", "decoder")
             for a, b in zip(jax.tree.leaves(initial[part]), jax.tree.leaves(trained[part]))]
    assert all(moved), moved


# ------------------------------------------------------------------------------------------- sources
def test_jsonl_and_tfds_sources_feed_the_pipeline(tmp_path):
    from PIL import Image

    from glmv_jax.data.pipeline import make_pipeline
    from glmv_jax.data.processor import ImageProcessor
    from glmv_jax.data.tfds_builder import prepare_synthetic
    from glmv_jax.train.config import DataConfig
    from glmv_jax.data.sources import example_format, make_sources, tokenizer_for_run

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "img" / "red.png")
    lines = [json.dumps({"image": "red.png", "question": "What colour?", "target": f"Red, number {i}."})
             for i in range(6)]
    lines[1] = "{not json"
    lines[2] = json.dumps({"image": "missing.png", "question": "?", "target": "x"})
    lines[3] = json.dumps({"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                 {"from": "gpt", "value": "Red."}]})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    data = DataConfig(source="jsonl", path=str(tmp_path / "data.jsonl"), image_root=str(tmp_path / "img"),
                      mode="sft", seq_len=64, batch_size=2, n_eval=1, vocab_size=400)
    train, evaluation = make_sources(data)
    assert (len(train), len(evaluation)) == (5, 1)
    tokenizer, trained = tokenizer_for_run(data, tmp_path, train)
    assert trained and (tmp_path / "tokenizer.model").is_file()
    it = iter(make_pipeline(train, tokenizer=tokenizer, mode=example_format("sft"), seq_len=64, batch_size=2, num_epochs=1,
                            shuffle=False, processor=ImageProcessor(min_pixels=1568, max_pixels=14112)))
    batches = list(it)
    assert it.stats.skipped == {"bad_example": 1, "missing_image": 1}
    assert it.stats.packed_examples == 3 and sum(int(b["loss_mask"].sum() > 0) for b in batches) >= 1

    prepare_synthetic(tmp_path / "tfds", n_train=6, n_val=3)
    data = DataConfig(source="tfds", data_dir=str(tmp_path / "tfds"), name="synthetic_tasks", n_train=4, n_eval=2)
    train, evaluation = make_sources(data)
    assert (len(train), len(evaluation)) == (4, 2)
    example = train[0]
    assert isinstance(example["question"], str) and example["image"].dtype == np.uint8
    assert example["target"].startswith("<think>")
