"""Grain training pipeline: example -> record -> packed batches, with a real sentencepiece tokenizer trained here
and synthetic examples (random images of varied sizes as PIL images, PNG and JPEG bytes)."""
from __future__ import annotations

import io
import json
import logging
import random

import grain
import numpy as np
import pytest
from PIL import Image

from glmv_jax.data import formats, packing, pipeline as P, records
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.tokenizer import train_sentencepiece
from glmv_jax.shapes import bucket, pow2, round_up

WORDS = ("the a one two three red blue green square circle triangle cat dog how many are there in image picture "
         "left right top bottom answer is count shapes of color which larger smaller than first second look at "
         "describe what happens item shows near far big small").split()
SEQ_LEN = 512
# small images keep the test fast: 64..144 patches (16..36 <|image|> tokens) per image
PROC = ImageProcessor(max_pixels=2 * 28 * 28 * 36)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, 3, 14) + rng.choice([".", "?", ","]) + f" {rng.randint(0, 999)}" for _ in range(400)]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "sp", vocab_size=600)


def encode_image(arr: np.ndarray, kind: int):
    if kind == 0:
        return Image.fromarray(arr)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG" if kind == 1 else "JPEG")
    return buf.getvalue()


def make_examples(n: int, seed: int = 0, reply: tuple[int, int] = (2, 60)) -> list[dict]:
    """Examples whose target/caption starts with a unique "item {i}:" so a packed segment names its example."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.randint(24, 170), rng.randint(24, 170)
        arr = nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append({"id": i, "image": encode_image(arr, i % 3), "question": sentence(rng, 2, 20) + "?",
                    "target": f"item {i}: " + sentence(rng, *reply) + ".",
                    "caption": f"item {i}: " + sentence(rng, *reply) + "."})
    return out


@pytest.fixture(scope="module")
def examples():
    return make_examples(120, seed=1)


def pipeline(examples, tok, **kw):
    args = dict(tokenizer=tok, mode="sft", seq_len=SEQ_LEN, batch_size=2, seed=0, shard_index=0, shard_count=1,
                processor=PROC)
    args.update(kw)
    return P.make_pipeline(examples, **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y) == sorted(packing.BATCH_KEYS)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def segments(batch):
    """(row, segment id, start, end) of every packed example."""
    seg = batch["segment_ids"]
    for r in range(seg.shape[0]):
        for s in range(1, int(seg[r].max()) + 1):
            where = np.flatnonzero(seg[r] == s)
            assert len(where) and np.array_equal(where, np.arange(where[0], where[-1] + 1)), "segment not contiguous"
            yield r, s, int(where[0]), int(where[-1]) + 1


def check_batch(batch, tok, examples, mode="sft", seen=None):
    """Every structural rule of the batch contract, and each segment against the example it came from."""
    ids, seg, types = batch["input_ids"], batch["segment_ids"], batch["mm_token_type_ids"]
    tgt, lm = batch["targets"], batch["loss_mask"]
    assert ids.dtype == seg.dtype == types.dtype == tgt.dtype == np.int32 and lm.dtype == np.float32
    assert batch["pixel_values"].dtype == np.float32 and batch["image_grid_thw"].dtype == np.int32
    B, T = ids.shape
    assert T == SEQ_LEN and seg.shape == types.shape == tgt.shape == lm.shape == (B, T)
    # padding: all zero, and only at the end of a row
    pad = seg == 0
    for k in ("input_ids", "mm_token_type_ids", "targets", "loss_mask"):
        assert not batch[k][pad].any(), k
    assert (np.diff(pad.astype(int), axis=1) >= 0).all(), "padding inside a row"
    # targets / loss mask never cross a segment boundary
    same = np.zeros((B, T), bool)
    same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(tgt[:, :-1][same[:, :-1]], ids[:, 1:][same[:, :-1]])
    assert not tgt[~same].any() and not lm[~same].any()
    assert set(np.unique(lm)) <= {0.0, 1.0}
    # images: placeholders in flattened order consume grid rows in order; pixel rows match that image
    image_id = tok.token_id("<|image|>")
    assert ((ids == image_id) == (types == 1)).all()
    grid = batch["image_grid_thw"]
    n_img = int((grid.prod(axis=1) > 0).sum())
    assert (grid[n_img:] == 0).all() and grid.shape[0] == pow2(n_img)
    real = int(grid.prod(axis=1).sum())
    assert int((ids == image_id).sum()) == real // 4
    assert batch["pixel_values"].shape == (round_up(bucket(real), 4), 1176)
    assert not batch["pixel_values"][real:].any()
    by_reply = {}
    img, row0 = 0, 0
    end_id, gmask = tok.token_id("<|endoftext|>"), tok.token_id("[gMASK]")
    for r, s, a, b in segments(batch):
        assert ids[r, a] == gmask and ids[r, b - 1] == end_id, "an example was cut"
        trained = tok.decode(tgt[r, a:b][lm[r, a:b] > 0])
        assert trained.endswith("<|endoftext|>")
        index = int(trained.split(":", 1)[0].removeprefix("item "))
        ex = examples[index]
        reply = ex["caption"] if mode == "caption" else ex["target"]
        assert trained == reply + "<|endoftext|>", "loss is not exactly on the reply"
        # the trained positions are one contiguous span ending at the token before <|endoftext|>
        pos = np.flatnonzero(lm[r, a:b])
        assert np.array_equal(pos, np.arange(pos[0], b - a - 1))
        prompt = tok.decode(ids[r, a:a + pos[0] + 1])
        assert prompt.endswith("<|assistant|>\n")
        if mode == "sft":
            assert ex["question"] in prompt
        else:
            assert prompt.split("<|user|>\n", 1)[1] == "<|begin_of_image|>" + "<|image|>" * int(
                (ids[r, a:b] == image_id).sum()) + "<|end_of_image|><|assistant|>\n"
        if seen is not None:
            seen.append(index)
        # its one image: the next grid row and the next pixel rows, equal to processing the example's image
        expect = PROC(records.decode_image(ex["image"]))
        n = int(expect["image_grid_thw"].prod())
        np.testing.assert_array_equal(grid[img], expect["image_grid_thw"][0])
        assert int((ids[r, a:b] == image_id).sum()) == n // 4
        np.testing.assert_array_equal(batch["pixel_values"][row0:row0 + n], expect["pixel_values"])
        img, row0 = img + 1, row0 + n
        by_reply[index] = (r, s)
    assert img == n_img and row0 == real
    return by_reply


# ------------------------------------------------------------------------------------------------ records
def test_example_to_record(tok, examples):
    ex = examples[4]
    rec = records.example_to_record(ex, tok, "sft", PROC)
    assert set(rec) == set(records.RECORD_KEYS)
    ids, mask = rec["input_ids"], rec["loss_mask"]
    assert ids.dtype == np.int32 and rec["image_grid_thw"].dtype == np.int32 and rec["image_grid_thw"].shape == (1, 3)
    assert tok.decode(ids[mask > 0]) == ex["target"] + "<|endoftext|>"
    n = int(rec["image_grid_thw"].prod())
    assert rec["pixel_values"].shape == (n, 1176)
    assert int((ids == tok.token_id("<|image|>")).sum()) == n // 4 == int((rec["mm_token_type_ids"] == 1).sum())
    cap = records.example_to_record(ex, tok, "caption", PROC)
    assert tok.decode(cap["input_ids"][cap["loss_mask"] > 0]) == ex["caption"] + "<|endoftext|>"
    assert ex["question"] not in tok.decode(cap["input_ids"])
    # llava conversations
    conv = {"image": ex["image"], "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                    {"from": "gpt", "value": "A dog."}]}
    rec = records.example_to_record(conv, tok, "llava", PROC)
    text = tok.decode(rec["input_ids"])
    assert "<|user|>\n<|begin_of_image|><|image|>" in text and "<|end_of_image|>What is it?<|assistant|>\n" in text
    assert tok.decode(rec["input_ids"][rec["loss_mask"] > 0]) == "A dog.<|endoftext|>"
    # text-only SFT example: allowed, empty image arrays; caption mode requires an image
    rec = records.example_to_record({"question": "two plus two", "target": "four"}, tok, "sft", PROC)
    assert rec["pixel_values"].shape == (0, 1176) and rec["image_grid_thw"].shape == (0, 3)
    with pytest.raises(formats.SkipExample) as e:
        records.example_to_record({"caption": "a dog"}, tok, "caption", PROC)
    assert e.value.reason == "missing_image"


# ----------------------------------------------------------------------------------------------- packing
def _rec(n, trained, images=(), base=0):
    """A hand-made record: ids base+1..base+n, the last `trained` tokens trained, each image (marker, tokens)
    as `tokens` <|image|> ids (99) right after the first token with pixel rows filled with `marker`."""
    ids = list(range(base + 1, base + n + 1))
    types = [0] * n
    pixels, grids, k = [], [], 1
    for marker, tokens in images:
        for j in range(tokens):
            ids[k + j], types[k + j] = 99, 1
        k += tokens
        pixels.append(np.full((4 * tokens, 1176), marker, np.float32))
        grids.append((1, 2, 2 * tokens))
    return {"input_ids": np.array(ids, np.int32), "mm_token_type_ids": np.array(types, np.int32),
            "loss_mask": np.array([0] * (n - trained) + [1] * trained, np.int32),
            "pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, 1176), np.float32),
            "image_grid_thw": np.array(grids, np.int32).reshape(-1, 3)}


def test_pack_examples_hand_checked():
    # A (6 tokens, 1 image of 1 token), B (6, an image of 2 tokens), C (3, an image of 1 token), seq_len 10, 2 rows.
    # Best fit: A -> row 0 (4 left); B does not fit row 0 -> row 1 (4 left); C fits both, tie -> row 0.
    A = _rec(6, 2, [(1.0, 1)], base=10)
    B = _rec(6, 3, [(2.0, 2)], base=20)
    C = _rec(3, 2, [(3.0, 1)], base=30)
    (batch,) = packing.pack_examples([A, B, C], seq_len=10, batch_size=2)
    np.testing.assert_array_equal(batch["input_ids"], [[11, 99, 13, 14, 15, 16, 31, 99, 33, 0],
                                                       [21, 99, 99, 24, 25, 26, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1, 1, 2, 2, 2, 0],
                                                         [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["mm_token_type_ids"], [[0, 1, 0, 0, 0, 0, 0, 1, 0, 0],
                                                               [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[99, 13, 14, 15, 16, 0, 99, 33, 0, 0],
                                                     [99, 99, 24, 25, 26, 0, 0, 0, 0, 0]])
    # A trains its last 2 tokens (15, 16): predicted at positions 3, 4; C trains 99, 33: positions 6, 7;
    # B trains 24, 25, 26: positions 1, 2, 3 of row 1. Nothing at a segment's last token or on padding.
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 1, 1, 0, 1, 1, 0, 0],
                                                       [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]])
    assert batch["loss_mask"].dtype == np.float32
    # images in placeholder order (row 0: A, C; row 1: B), not input order; 16 real rows -> bucket 64
    np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 2, 2], [1, 2, 2], [1, 2, 4], [0, 0, 0]])
    pv = batch["pixel_values"]
    assert pv.shape == (64, 1176)
    np.testing.assert_array_equal(pv[:, 0], [1.0] * 4 + [3.0] * 4 + [2.0] * 8 + [0.0] * 48)
    # text-only rows: fixed structure with 64 zero pixel rows and one zero grid row
    (batch,) = packing.pack_examples([_rec(4, 1)], seq_len=8, batch_size=2)
    assert batch["pixel_values"].shape == (64, 1176) and not batch["pixel_values"].any()
    np.testing.assert_array_equal(batch["image_grid_thw"], [[0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 0, 0, 0, 0], [0] * 8])
    # an example never split: too long for seq_len is an error here (the pipeline skips it instead)
    with pytest.raises(ValueError):
        packing.pack_examples([_rec(9, 1)], seq_len=8)
    # several examples per row, best fit over the buffer
    recs = [_rec(n, 1, base=100 * i) for i, n in enumerate([5, 3, 7, 2, 6, 4, 1, 8, 2, 3])]
    batches = packing.pack_examples(recs, seq_len=10, batch_size=2, pack_buffer=4)
    seg = np.concatenate([b["segment_ids"] for b in batches])
    assert sum(int(s.max()) for s in seg) == 10 and (seg > 0).sum() == 41
    assert max(int(s.max()) for s in seg) >= 3


# ------------------------------------------------------------------------------------------- pipelines
def test_sft_pipeline_batches(tok, examples):
    it = iter(pipeline(examples, tok, num_epochs=1, shuffle=True))
    seen: list[int] = []
    batches = list(it)
    for batch in batches:
        check_batch(batch, tok, examples, "sft", seen)
    # every example exactly once (nothing split, dropped or duplicated), several per sequence
    assert sorted(seen) == list(range(len(examples)))
    st = it.stats
    assert st.packed_examples == st.examples == len(examples) and st.skipped_total == 0
    assert st.packed_examples / st.sequences >= 3
    assert st.images == len(examples) and st.batches == len(batches)
    assert seen != sorted(seen), "not shuffled"


def test_caption_pipeline_batches(tok, examples):
    it = iter(pipeline(examples[:40], tok, mode="caption", num_epochs=1, batch_size=3))
    seen: list[int] = []
    for batch in it:
        check_batch(batch, tok, examples, "caption", seen)
    assert sorted(seen) == list(range(40))


def test_padding_fraction_realistic_stream(tok):
    # varied lengths: 16..36 image tokens, questions of 2..20 words, replies of 2..120 words
    exs = make_examples(200, seed=7, reply=(2, 120))
    it = iter(pipeline(exs, tok, seq_len=1024, batch_size=4, seed=3))
    for _ in range(12):
        next(it)
    st = it.stats
    print(f"\npadding fraction over {st.batches} batches of 4 x 1024: {st.padding_fraction:.4f} "
          f"({st.packed_examples / st.sequences:.1f} examples per sequence)")
    assert st.padding_fraction < 0.10
    assert 0 <= st.last_padding_fraction < 0.10


def test_deterministic(tok, examples):
    a = take(iter(pipeline(examples, tok, seed=5)), 6)
    b = take(iter(pipeline(examples, tok, seed=5, read_threads=0)), 6)
    assert_same_batches(a, b)
    c = take(iter(pipeline(examples, tok, seed=6)), 1)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def test_checkpoint_restore(tok, examples, tmp_path):
    # 40 examples, about 8 per batch: the stream crosses several epoch boundaries (reshuffled each epoch)
    ds = pipeline(examples[:40], tok, seed=2, pack_buffer=8)
    it = iter(ds)
    states, batches = [], []
    for _ in range(14):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    for k in (1, 4, 7, 11):
        it2 = iter(ds)
        it2.set_state(states[k])
        assert_same_batches(take(it2, 14 - k), batches[k:])
    # the restored counters continue exactly
    it3 = iter(ds)
    it3.set_state(states[5])
    take(it3, 9)
    assert it3.stats == it.stats

    # the orbax path: grain's CheckpointHandler through a CheckpointManager, mid-stream
    import orbax.checkpoint as ocp

    it = iter(ds)
    take(it, 3)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = take(it, 4)
    restored = iter(ds)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 4), want)
    mngr.close()


def test_bad_examples_skipped_and_counted(tok, examples, caplog):
    good = examples[:12]
    bad = [
        {"id": "corrupt", "image": b"\x89PNG\r\n\x1a\n not really a png", "question": "q?", "target": "item 0: x"},
        {"id": "truncated", "image": good[1]["image"][:60], "question": "q?", "target": "item 0: x"},
        {"id": "empty", "image": good[2]["image"], "question": "q?", "target": "  "},
        {"id": "none-target", "image": good[2]["image"], "question": "q?", "target": None},
        {"id": "long", "image": good[3]["image"], "question": "q?", "target": "item 0: " + "count " * 600},
        {"id": "wrong-type", "image": 12345, "question": "q?", "target": "item 0: x"},
        {"id": "no-image-caption", "caption": "item 0: x"},
        {"id": "missing-file", "image": "/nonexistent/image.png", "question": "q?", "target": "item 0: x"},
    ]
    mixed = good[:4] + bad[:4] + good[4:8] + bad[4:] + good[8:]
    assert isinstance(good[1]["image"], bytes)
    caplog.set_level(logging.WARNING, logger="glmv_jax.data.packing")
    it = iter(pipeline(mixed, tok, num_epochs=1, shuffle=False, read_threads=0))
    seen: list[int] = []
    for batch in it:
        check_batch(batch, tok, examples, "sft", seen)
    assert sorted(seen) == list(range(12))
    st = it.stats
    # sft mode: the caption-only example has no target, so it is an empty_target
    assert st.skipped == {"bad_image": 3, "empty_target": 3, "too_long": 1, "missing_image": 1}, st.skipped
    assert st.examples == len(mixed) and st.packed_examples == 12 and st.skipped_total == 8
    msgs = " ".join(r.getMessage() for r in caplog.records)
    for reason in ("bad_image", "empty_target", "too_long", "missing_image"):
        assert reason in msgs
    assert "corrupt" in msgs

    # caption mode: an example without an image is skipped as missing_image
    cap = [{"id": "noimg", "caption": "item 0: a dog."}] + [dict(g) for g in good[:3]]
    it = iter(pipeline(cap, tok, mode="caption", num_epochs=1, shuffle=False))
    list(it)
    assert it.stats.skipped == {"missing_image": 1} and it.stats.packed_examples == 3


def test_host_shards_are_disjoint(tok, examples):
    data = examples[:41]
    got = []
    for shard in range(2):
        it = iter(pipeline(data, tok, num_epochs=1, shard_index=shard, shard_count=2))
        seen: list[int] = []
        for batch in it:
            check_batch(batch, tok, examples, "sft", seen)
        got.append(set(seen))
        assert len(seen) == 20  # even shards: the 41st example is dropped
    assert not got[0] & got[1] and len(got[0] | got[1]) == 40
    assert P.per_host_batch_size(32, 4) == 8
    with pytest.raises(ValueError):
        P.per_host_batch_size(30, 4)


def test_worker_processes_match(tok, examples):
    # one worker process reads the same slice as in-process reading, so the batches are identical
    ds = pipeline(examples[:40], tok, seed=4, worker_count=1)
    it = iter(ds)
    a = take(it, 3)
    state = it.get_state()
    b = take(it, 2)
    assert_same_batches(a + b, take(iter(pipeline(examples[:40], tok, seed=4)), 5))
    assert P.find_stats(it).batches == 5
    it.close()
    it2 = iter(ds)
    it2.set_state(state)
    assert_same_batches(take(it2, 2), b)
    it2.close()


def test_shards_iterator_concatenates_and_restores(tok, examples):
    """Two data shards read as one host batch: rows of shard 0 then shard 1, images unpadded in placeholder order;
    its state restores both shards' positions."""
    shards = [pipeline(examples[:40], tok, seed=2, pack_buffer=8, shard_index=i, shard_count=2) for i in range(2)]
    it = P.shards_iterator(shards)
    parts = [iter(ds) for ds in shards]
    take(it, 2)
    take(parts[0], 2), take(parts[1], 2)
    state = json.loads(json.dumps(it.get_state()))
    want = [P.concat_batches([next(p) for p in parts]) for _ in range(3)]
    got = take(it, 3)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    batch = got[0]
    assert batch["input_ids"].shape[0] == 4
    real = int(np.prod(batch["image_grid_thw"], axis=1).sum())
    assert batch["pixel_values"].shape[0] == real and (np.prod(batch["image_grid_thw"], axis=1) > 0).all()
    assert (batch["mm_token_type_ids"] == 1).sum() == real // 4
    again = P.shards_iterator(shards)
    again.set_state(state)
    for a, b in zip(take(again, 3), want):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert again.stats.batches == it.stats.batches == 10
