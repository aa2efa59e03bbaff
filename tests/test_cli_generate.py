"""`glmv generate` end to end: a real tokenizer, real image and GIF files, a model folder, a subprocess."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glmv_jax import SamplingConfig, init_params, sample, save_hf_checkpoint
from glmv_jax.data import chat
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.tokenizer import train_sentencepiece

WORDS = "how many red blue circles squares are there in the picture answer think count one two three".split()


@pytest.fixture(scope="module")
def model_dir(tiny_config, tmp_path_factory):
    """A tiny random model whose special ids are those of a sentencepiece tokenizer trained here."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=8)) + f" {i}" for i in range(300)]
    folder = tmp_path_factory.mktemp("cli_model")
    tokenizer = train_sentencepiece(texts, folder / "tok", vocab_size=400)
    shutil.move(folder / "tok.model", folder / "tokenizer.model")
    ids = {name: tokenizer.token_id(token) for name, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"), ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"), ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"))}
    text = dataclasses.replace(tiny_config.text, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.eos_ids[0],
                               eos_token_id=tokenizer.eos_ids)
    config = dataclasses.replace(tiny_config, text=text, **ids).validate()
    save_hf_checkpoint(folder, config, init_params(config, seed=1))
    return folder, config, tokenizer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "glmv_jax.cli", "generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_with_an_image_matches_the_api(model_dir, tmp_path):
    folder, config, tokenizer = model_dir
    image = tmp_path / "shapes.png"
    pixels = np.zeros((70, 98, 3), np.uint8)
    pixels[10:40, 20:60] = (255, 0, 0)
    Image.fromarray(pixels).save(image)
    result = run_cli("--model", str(folder), "--image", str(image), "--prompt", "how many red squares",
                     "--max-new-tokens", "12", "--stream-every", "5")
    assert result.returncode == 0, result.stderr

    from glmv_jax.checkpoint.hf import load_hf_checkpoint
    _, params = load_hf_checkpoint(folder)
    processed = ImageProcessor()([image])
    encoded = chat.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                          "text": "how many red squares"}]}],
                          tokenizer, image_grids=processed["image_grid_thw"])
    out = sample(params, config, np.array([encoded["input_ids"]]), pixel_values=processed["pixel_values"],
                 image_grid_thw=processed["image_grid_thw"],
                 sampling=SamplingConfig(12, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.eos_ids[0]))
    n = int(out.lengths[0])
    tokens = [t for t in np.asarray(out.tokens)[0, :n].tolist() if t not in tokenizer.eos_ids]
    assert result.stdout == tokenizer.decode(tokens) + "\n"
    assert f"[{n} tokens" in result.stderr


def test_generate_with_a_gif_video_and_a_thinking_budget(model_dir, tmp_path):
    folder, _, _ = model_dir
    frames = [Image.fromarray(np.full((56, 84, 3), 40 * k, np.uint8)) for k in range(4)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=500, loop=0)
    result = run_cli("--model", str(folder), "--video", str(gif), "--prompt", "what happens",
                     "--max-new-tokens", "10", "--thinking-budget", "3", "--temperature", "0.7", "--top-p", "0.9")
    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stderr


def test_missing_image_is_a_clear_error(model_dir, tmp_path):
    folder, _, _ = model_dir
    result = run_cli("--model", str(folder), "--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert result.returncode == 2 and "nope.png" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_image_and_too_long_prompt_are_one_line_errors(model_dir, tmp_path):
    folder, _, _ = model_dir
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    result = run_cli("--model", str(folder), "--image", str(bad), "--prompt", "hi")
    assert result.returncode == 2 and "cannot decode image file" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip() == ""
    result = run_cli("--model", str(folder), "--prompt", "hi", "--max-new-tokens", "100000")
    assert result.returncode == 2 and "max_position_embeddings" in result.stderr and result.stdout.strip() == ""


def test_generate_with_an_mp4_matches_the_api_and_a_cut_file_is_one_line(model_dir, tmp_path):
    """An mp4 written here: `glmv generate --video` decodes it through PyAV and answers as the API does on the
    same processed video; the file cut in half is a one-line error."""
    from video_files import cut_in_half, write_video

    from glmv_jax.checkpoint.hf import load_hf_checkpoint
    from glmv_jax.data.processor import VideoProcessor
    from glmv_jax.data.video import process_video_file

    folder, config, tokenizer = model_dir
    clip = write_video(tmp_path / "clip.mp4", frames=20, fps=10, height=56, width=84)
    result = run_cli("--model", str(folder), "--video", clip, "--prompt", "what happens", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr

    video = process_video_file(clip, VideoProcessor())
    encoded = chat.encode([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens"}]}],
                          tokenizer, video_grids=video["video_grid_thw"], video_timestamps=[video["frame_timestamps"]],
                          merge_size=config.vision.spatial_merge_size)
    _, params = load_hf_checkpoint(folder)
    out = sample(params, config, np.array([encoded["input_ids"]]), pixel_values_videos=video["pixel_values_videos"],
                 video_grid_thw=video["video_grid_thw"],
                 sampling=SamplingConfig(8, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.eos_ids[0]))
    n = int(out.lengths[0])
    assert result.stdout == tokenizer.decode([t for t in np.asarray(out.tokens)[0, :n].tolist()
                                              if t not in tokenizer.eos_ids]) + "\n"

    result = run_cli("--model", str(folder), "--video", cut_in_half(clip), "--prompt", "hi")
    assert result.returncode == 2 and "clip" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip() == ""
