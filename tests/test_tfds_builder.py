"""TFDS builders written as array_record and read back through data sources, without TensorFlow."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glmv_jax.data import synthetic
from glmv_jax.data import tfds_builder as tb

TEXT_KEYS = ("id", "domain", "question", "caption", "thinking", "answer", "target")


def test_no_tensorflow_needed():
    assert "tensorflow" not in sys.modules  # tfds is used without TF (it is not installed here)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tb.prepare_synthetic(data_dir, n_train=40, n_val=8, seed=0)
    return data_dir, builder


def _record_matches_example(rec: dict, ex: dict) -> None:
    for k in TEXT_KEYS:
        assert rec[k].decode() == ex[k], k
    assert json.loads(rec["ground_truth"]) == ex["ground_truth"]
    assert int(rec["difficulty"]) == ex["difficulty_hint"]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (ex["image"].height, ex["image"].width, 3)
    assert np.array_equal(rec["image"], np.asarray(ex["image"]))  # PNG is lossless


def test_synthetic_round_trip_equals_make_example(synth_dir):
    data_dir, builder = synth_dir
    version_dir = data_dir / "synthetic_tasks" / "n40_8_8_s0" / "1.0.0"
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        f"synthetic_tasks-{s}.array_record-00000-of-00001" for s in ("test", "train", "validation")]
    assert {s: builder.info.splits[s].num_examples for s in tb.SPLITS} == {"train": 40, "validation": 8, "test": 8}
    for split, n in (("train", 40), ("validation", 8), ("test", 8)):
        src = tb.load_split(data_dir, "synthetic_tasks", split)
        assert len(src) == n
        seed = tb.split_seed(0, split)
        for i in range(n):  # record i is example i of the split's seed: order is kept (no write-time shuffle)
            ex = synthetic.example_at(i, seed)
            assert ex["id"] == synthetic.make_example(ex["domain"], synthetic.example_seed(seed, i))["id"]
            _record_matches_example(src[i], ex)
    assert [src[i]["domain"].decode() for i in range(8)] == [synthetic.DOMAINS[i % 4] for i in range(8)]


def test_splits_are_disjoint(synth_dir):
    data_dir, _ = synth_dir
    ids, images = {}, {}
    for split in tb.SPLITS:
        src = tb.load_split(data_dir, "synthetic_tasks", split, decode_images=False)
        ids[split] = {src[i]["id"] for i in range(len(src))}
        images[split] = {hashlib.sha256(src[i]["image"]).hexdigest() for i in range(len(src))}
        assert len(ids[split]) == len(images[split]) == len(src)
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[a] & ids[b] and not images[a] & images[b], (a, b)
    assert len({tb.split_seed(s, split) for s in range(3) for split in tb.SPLITS}) == 9


def test_data_source_options_and_grain(synth_dir, tmp_path):
    import grain

    data_dir, builder = synth_dir
    raw = tb.load_split(data_dir, "synthetic_tasks", "validation", decode_images=False)
    dec = tb.load_split(data_dir, "synthetic_tasks/n40_8_8_s0/1.0.0", "validation")
    png = raw[3]["image"]
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), dec[3]["image"])
    assert len(tb.load_split(data_dir, "synthetic_tasks", "train[:5]")) == 5
    ds = grain.MapDataset.source(dec).map(lambda r: (r["domain"].decode(), r["image"].shape[-1]))
    assert list(ds) == [(synthetic.DOMAINS[i % 4], 3) for i in range(8)]
    # a second prepare reuses the files
    files = sorted(Path(builder.data_dir).glob("*.array_record*"))
    assert len(files) == 3
    stamps = [p.stat().st_mtime_ns for p in files]
    tb.prepare_synthetic(data_dir, n_train=40, n_val=8, seed=0)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    # a second config next to the first: names must then pick one
    tb.prepare_synthetic(data_dir, n_train=8, n_val=4, seed=1)
    with pytest.raises(ValueError, match="n40_8_8_s0"):
        tb.load_split(data_dir, "synthetic_tasks", "train")
    other = tb.load_split(data_dir, "synthetic_tasks/n8_4_4_s1", "train")
    assert len(other) == 8
    assert not {other[i]["id"] for i in range(8)} & {dec[i]["id"] for i in range(8)}
    with pytest.raises(FileNotFoundError):
        tb.load_split(tmp_path, "synthetic_tasks", "train")


# ------------------------------------------------------------------------------------ local conversations
def _save(img: Image.Image, path: Path, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path.read_bytes()


def _write_jsonl(path: Path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _conv(q: str, a: str):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


@pytest.fixture()
def local_files(tmp_path):
    root = tmp_path / "images"
    ex = [synthetic.make_example(d, 7) for d in synthetic.DOMAINS]
    _save(ex[0]["image"], root / "a" / "one.png", "PNG")                    # relative path, RGB PNG
    _save(ex[1]["image"], root / "two.jpg", "JPEG")                          # relative path, RGB JPEG
    abs_path = tmp_path / "elsewhere" / "three.png"
    _save(ex[2]["image"].convert("P"), abs_path, "PNG")                      # absolute path, palette PNG
    good = _save(ex[3]["image"], root / "bad.png", "PNG")
    (root / "bad.png").write_bytes(good[: len(good) // 2])                   # truncated: opens, fails to decode
    records = [
        {"id": "r1", "image": "a/one.png", "conversations": _conv("How many?", ex[0]["answer"])},
        {"id": "r2", "image": "missing/nope.jpg", "conversations": _conv("What?", "x")},
        {"id": "r3", "images": ["two.jpg"], "conversations": _conv("Compute.", ex[1]["answer"])},
        {"id": "r4", "image": "bad.png", "conversations": _conv("Where?", "y")},
        {"id": "r5", "image": str(abs_path), "conversations": _conv("Read it.", ex[2]["answer"])},
    ]
    jsonl = tmp_path / "My Data.jsonl"
    _write_jsonl(jsonl, records)
    expect = {"r1": [root / "a" / "one.png"], "r3": [root / "two.jpg"], "r5": [abs_path]}
    return tmp_path / "tfds", jsonl, root, records, expect


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_local_jsonl_skips_missing_and_corrupt_images(local_files, caplog):
    data_dir, jsonl, root, records, expect = local_files
    with caplog.at_level(logging.WARNING, logger="glmv_jax.data.tfds_builder"):
        builder = tb.prepare_local(data_dir, jsonl, root)
    assert builder.info.splits["train"].num_examples == 3
    assert dict(builder.skipped["train"]) == {"missing_image": 1, "corrupt_image": 1}
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and "skipped 2 of 5 records" in summary[0], summary
    per_record = [r.getMessage() for r in caplog.records if "skipping record" in r.getMessage()]
    assert len(per_record) == 2 and "nope.jpg" in per_record[0] and "bad.png" in per_record[1]
    # the counts are also stored with the dataset
    assert tb.skipped_counts(data_dir, "local_conversations") == {"train": {"missing_image": 1, "corrupt_image": 1}}

    src = tb.load_split(data_dir, "local_conversations", "train")
    assert len(src) == 3
    by_id = {r["id"]: r for r in records}
    for i, want_id in enumerate(("r1", "r3", "r5")):  # file order is kept
        rec = src[i]
        assert rec["id"].decode() == want_id
        assert json.loads(rec["conversations"]) == by_id[want_id]["conversations"]
        assert [p.decode() for p in rec["image_paths"]] == [
            str(p) if Path(p).is_absolute() else p
            for p in ([by_id[want_id]["image"]] if "image" in by_id[want_id] else by_id[want_id]["images"])]
        assert len(rec["images"]) == len(expect[want_id])
        for arr, path in zip(rec["images"], expect[want_id]):
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3
            assert np.array_equal(arr, _rgb(path))  # JPEG bytes are stored as they are: same decode
    raw = tb.load_split(data_dir, "local_conversations/my_data", "train", decode_images=False)
    assert raw[1]["images"][0] == (root / "two.jpg").read_bytes()  # the original JPEG, not re-encoded


def test_config_names_of_predefined_configs_are_accepted(local_files):
    data_dir, jsonl, root, _, _ = local_files
    default = tb.SyntheticTasks.BUILDER_CONFIGS[0]
    assert tb._config_arg(tb.SyntheticTasks, tb.synthetic_config(2000, 200, 200, 0)) == default.name
    with pytest.raises(ValueError, match="taken"):
        tb._config_arg(tb.SyntheticTasks, tb.SyntheticTasksConfig(name=default.name, n_train=3))
    builder = tb.prepare_local(data_dir, jsonl, root, name="default")  # no predefined local config
    assert builder.info.splits["train"].num_examples == 3
    assert (data_dir / "local_conversations" / "default" / "1.0.0" / "dataset_info.json").is_file()


def test_local_jsonl_rebuilds_when_the_file_changes(local_files, caplog):
    data_dir, jsonl, root, records, expect = local_files
    tb.prepare_local(data_dir, jsonl, root)
    files = sorted((data_dir / "local_conversations" / "my_data" / "1.0.0").glob("*.array_record*"))
    stamps = [p.stat().st_mtime_ns for p in files]
    tb.prepare_local(data_dir, jsonl, root)  # unchanged: reused
    assert [p.stat().st_mtime_ns for p in files] == stamps
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    _write_jsonl(jsonl, records + [
        "{not json",
        {"id": "t1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "g1", "image": "garbage.jpg", "conversations": _conv("?", "!")},
        {"id": "n1", "image": "a/one.png"},
        {"id": "m1", "images": ["a/one.png", "two.jpg"], "conversations": _conv("Both?", "yes")},
    ])
    with caplog.at_level(logging.WARNING, logger="glmv_jax.data.tfds_builder"):
        builder = tb.prepare_local(data_dir, jsonl, root)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert dict(builder.skipped["train"]) == {"missing_image": 1, "corrupt_image": 2, "bad_record": 2}
    src = tb.load_split(data_dir, "local_conversations", "train")
    assert [src[i]["id"].decode() for i in range(len(src))] == ["r1", "r3", "r5", "t1", "m1"]
    assert len(src[3]["images"]) == 0 and int(src[3]["line"]) == 7  # a text-only record is kept
    assert [a.shape for a in src[4]["images"]] == [_rgb(root / "a" / "one.png").shape, _rgb(root / "two.jpg").shape]
