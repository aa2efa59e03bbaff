"""JSONL `video` fields through the training pipeline: an mp4 written here -> packed batch -> train step.

The batch carries the video in `pixel_values`/`image_grid_thw` (typed 1, data/records' module doc); the test
checks its tokens, grid and pixels against the processor and `chat.encode` on the same file, that the training
loss on the batch equals the loss of the model's forward with the separate video inputs (`glmv generate`'s
path), that one train step gives a finite loss, and that a truncated mp4 is skipped and counted as bad_video.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from PIL import Image
from test_cli_generate import model_dir  # noqa: F401  (the tiny model folder + tokenizer fixture)
from video_files import cut_in_half, write_video

from glmv_jax import init_params
from glmv_jax.data import chat
from glmv_jax.data import pipeline as P
from glmv_jax.data import visual_layout
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.records import example_to_record, video_processor_for
from glmv_jax.data.sources import JsonlSource, sft_or_conversations
from glmv_jax.data.video import process_video_file
from glmv_jax.model.glmv import forward
from glmv_jax.train.steps import batch_loss, init_state, train_step

PROC = ImageProcessor(max_pixels=2 * 28 * 28 * 36)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A JSONL with an image + video line, a video-only LLaVA line and a line whose mp4 is cut in half."""
    root = tmp_path_factory.mktemp("jsonl_video")
    write_video(root / "clip.mp4", frames=20, fps=10, height=56, width=84)
    cut = cut_in_half(write_video(root / "cut.mp4", frames=30, fps=10, codec="libx264"))
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "red.png")
    lines = [{"id": "both", "image": "red.png", "video": "clip.mp4", "question": "how many red circles",
              "target": "two red circles"},
             {"id": "cut", "video": cut.rsplit("/", 1)[1], "question": "what happens", "target": "one"},
             {"id": "llava", "videos": ["clip.mp4"],
              "conversations": [{"from": "human", "value": "<video>\nwhat happens"},
                                {"from": "gpt", "value": "the blue square moves"}]}]
    (root / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def test_video_line_matches_the_processor_and_chat_encoding(model_dir, bench):  # noqa: F811
    _, config, tokenizer = model_dir
    example = JsonlSource(bench / "data.jsonl", bench)[0]
    record = example_to_record(example, tokenizer, "sft", PROC)
    video = process_video_file(bench / "clip.mp4", video_processor_for(PROC))
    image = PROC([Image.open(bench / "red.png")])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "how many red circles"}]},
                {"role": "assistant", "content": "two red circles"}]
    expected = chat.encode(messages, tokenizer, image_grids=image["image_grid_thw"],
                           video_grids=video["video_grid_thw"], video_timestamps=[video["frame_timestamps"]])
    assert record["input_ids"].tolist() == expected["input_ids"]
    assert (video["video_grid_thw"][0, 0] > 1).all()   # several frame pairs: a t > 1 grid row
    np.testing.assert_array_equal(record["image_grid_thw"],
                                  np.concatenate([image["image_grid_thw"], video["video_grid_thw"]]))
    np.testing.assert_array_equal(record["pixel_values"],
                                  np.concatenate([image["pixel_values"], video["pixel_values_videos"]]))
    types = np.asarray(expected["mm_token_type_ids"])
    assert (types == 2).sum() == video["video_grid_thw"].prod() // 4 > 0
    np.testing.assert_array_equal(record["mm_token_type_ids"], np.minimum(types, 1))


def test_jsonl_video_batch_trains_and_a_cut_file_is_counted(model_dir, bench):  # noqa: F811
    _, config, tokenizer = model_dir
    source = JsonlSource(bench / "data.jsonl", bench)
    it = iter(P.make_pipeline(source, tokenizer=tokenizer, mode=sft_or_conversations, seq_len=256, batch_size=2, seed=0,
                              shard_index=0, shard_count=1, processor=PROC, num_epochs=1, shuffle=False))
    batch = next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert it.stats.skipped == {"bad_video": 1} and it.stats.packed_examples == 2
    grids = batch["image_grid_thw"][batch["image_grid_thw"].prod(axis=1) > 0]
    video_grid = process_video_file(bench / "clip.mp4", video_processor_for(PROC))["video_grid_thw"][0]
    assert [g.tolist() for g in grids if g[0] > 1] == [video_grid.tolist()] * 2

    params = init_params(config, seed=3)
    arrays = {k: v for k, v in batch.items() if not k.startswith("_")}
    loss, count = jax.jit(batch_loss, static_argnames="config")(params, config, arrays)
    assert np.isfinite(float(loss)) and int(count) == int(batch["loss_mask"].sum())

    # the same loss from the model's forward with the videos as separate inputs (type 2), segment by segment
    good = [source[0], source[2]]
    records = [example_to_record(example, tokenizer, sft_or_conversations, PROC)["input_ids"].tolist() for example in good]
    total, found = 0.0, []
    for row in range(2):
        for seg in range(1, 3):
            cols = np.flatnonzero(batch["segment_ids"][row] == seg)
            if len(cols):
                k = records.index(batch["input_ids"][row, cols].tolist())
                found.append(k)
                total += _forward_loss(params, config, good[k], batch, row, cols)
    assert sorted(found) == [0, 1]
    np.testing.assert_allclose(float(loss), total / int(count), rtol=1e-5)

    # the trainer's fixed budgets (framed: one frame pair a row, as train/loop's _place_batch lays it out)
    budgets = visual_layout.VisualBudgets(max_images=8, frame_patches=144)
    budgets.validate(config.vision, PROC.max_pixels)
    pixels, grid, overflow = visual_layout.layout(batch["pixel_values"], batch["image_grid_thw"], config.vision, budgets)
    assert pixels.shape == (8, 144, config.vision.patch_dim) and not overflow
    framed, _ = jax.jit(batch_loss, static_argnames="config")(params, config, {**arrays, "pixel_values": pixels,
                                                                                "image_grid_thw": grid})
    np.testing.assert_allclose(float(framed), float(loss), rtol=1e-5)

    state = init_state(params, optax.adam(1e-3))
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=optax.adam(1e-3)))
    state, metrics = step(state, arrays)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))


def _forward_loss(params, config, example, batch, row, cols) -> float:
    """Summed cross entropy of one packed segment through `forward` with separate image and video inputs."""
    ids = batch["input_ids"][row, cols]
    video = process_video_file(example.get("video") or example["videos"][0], video_processor_for(PROC))
    image = PROC([Image.open(example["image"])]) if "image" in example else {}
    types = np.asarray(chat.mm_token_type_ids(ids, config.image_token_id, config.video_start_token_id,
                                              config.video_end_token_id))
    logits = forward(params, config, ids[None], mm_token_type_ids=types[None],
                     pixel_values=image.get("pixel_values"), image_grid_thw=image.get("image_grid_thw"),
                     pixel_values_videos=video["pixel_values_videos"], video_grid_thw=video["video_grid_thw"])
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1), np.float64)
    mask = batch["loss_mask"][row, cols]
    targets = batch["targets"][row, cols]
    return float(-(np.take_along_axis(logp, targets[:, None], axis=-1)[:, 0] * mask).sum())
