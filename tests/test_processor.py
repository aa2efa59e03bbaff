"""Pre-processing parity with transformers 5.x GLM-4.1V processors.

Images: `Glm4vImageProcessorPil` (PIL backend) built with the published size budget; grids must be
identical and pixel_values within 1e-4. Videos: `Glm4vVideoProcessor` cannot run here (it needs
torchvision), so frame sampling goes through its own `_decode_and_sample_videos`/`sample_frames`,
timestamps through `Glm4vProcessor.replace_video_token`, the grid through
`get_num_of_video_patches` and the row order through its (torch-only) `patchify`.
No scikit-image in the venv, so images are synthetic with structure (gradients, waves, noise, edges).
"""
from __future__ import annotations

import io
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import torch
from PIL import Image
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as ref_smart_resize
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

from glmv_jax.data.processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessor,
    ProcessorError,
    VideoProcessor,
    normalize_fused,
    num_image_tokens,
    resize_bicubic,
    smart_resize,
)

MIN_PIXELS, MAX_PIXELS = 12544, 9633792  # published GLM-4.1V preprocessor_config.json
TOL = 1e-4


@pytest.fixture(scope="module")
def ref_images():
    return Glm4vImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


@pytest.fixture(scope="module")
def ours():
    return ImageProcessor()


def structured_rgb(h: int, w: int, seed: int = 0, noise: bool = True) -> np.ndarray:
    """(h, w, 3) uint8: colour gradients, a 2D wave, optional noise and a sharp-edged block."""
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 255 * x
    img[..., 1] = 255 * y
    img[..., 2] = 127.5 * (1 + np.sin(12 * np.pi * x) * np.cos(8 * np.pi * y))
    if noise:
        img += np.random.default_rng(seed).normal(0, 12, (h, w, 3)).astype(np.float32)
    img[h // 4: h // 2 + 1, w // 4: w // 2 + 1] = (250, 20, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def assert_same(out: dict, ref) -> float:
    """Identical grids, same shapes/dtypes, pixel_values within TOL; returns the max abs error."""
    ref_pv, ref_grid = np.asarray(ref["pixel_values"]), np.asarray(ref["image_grid_thw"])
    np.testing.assert_array_equal(out["image_grid_thw"], ref_grid)
    assert out["image_grid_thw"].dtype == np.int64
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == ref_pv.shape
    err = float(np.abs(out["pixel_values"] - ref_pv).max())
    assert err <= TOL, err
    return err


# ---------------------------------------------------------------------------------------------
# smart_resize


def test_smart_resize_matches_reference_on_many_sizes():
    rng = np.random.default_rng(1)
    sizes = [(h, w) for h in (1, 2, 3, 9, 10, 13, 14, 27, 28, 29, 41, 42, 43, 56, 70)
             for w in (1, 5, 28, 40, 42, 99, 1000, 2000, 5600, 5601)]
    sizes += [tuple(s) for s in rng.integers(1, 9000, (1500, 2))]
    sizes += [tuple(s) for s in rng.integers(1, 80, (500, 2))]
    budgets = [(2, MIN_PIXELS, MAX_PIXELS), (2, 112 * 112, 28 * 28 * 15000),
               (8, 112 * 112, 28 * 28 * 2 * 30000), (600, 112 * 112, 28 * 28 * 2 * 30000),
               (3, 112 * 112, 28 * 28 * 2 * 30000)]
    for t, lo, hi in budgets:
        for h, w in sizes:
            h, w = int(h), int(w)
            try:
                expected = ref_smart_resize(t, h, w, min_pixels=lo, max_pixels=hi)
            except ValueError as e:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(t, h, w, min_pixels=lo, max_pixels=hi)
                assert "aspect ratio" in str(e)
                continue
            assert smart_resize(t, h, w, min_pixels=lo, max_pixels=hi) == expected, (t, h, w)


def test_smart_resize_documented_examples():
    kw = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert smart_resize(2, 768, 1024, **kw) == (756, 1036)
    assert smart_resize(2, 336, 336, **kw) == (336, 336)
    assert smart_resize(2, 4000, 6000, **kw) == (1792, 2688)
    assert smart_resize(2, 50, 60, **kw) == (84, 112)
    assert smart_resize(2, 70, 1000, **kw) == (56, 1008)  # 70/28 = 2.5 -> 2 (half to even)
    assert smart_resize(2, 154, 1000, **kw) == (168, 1008)  # 5.5 -> 6 (half to even)
    assert smart_resize(2, 70, 70, **kw) == (84, 84)  # 2.5 -> 2, then below min_pixels -> ceil
    assert smart_resize(2, 126, 1000, **kw) == (112, 1008)  # 126/28 = 4.5 -> 4 (half to even)
    with pytest.raises(ValueError, match="temporal_factor"):
        smart_resize(1, 100, 100)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(2, 28, 5601)


def test_num_image_tokens():
    assert num_image_tokens([1, 54, 74]) == 999
    assert num_image_tokens(np.array([1, 128, 192])) == 6144
    np.testing.assert_array_equal(num_image_tokens([[1, 24, 24], [3, 4, 6]]), [144, 18])
    assert num_image_tokens([1, 24, 24], merge_size=1) == 576
    with pytest.raises(ValueError):
        num_image_tokens([1, 2])


# ---------------------------------------------------------------------------------------------
# Images: parity with Glm4vImageProcessorPil


SIZES = [(10, 40), (40, 10), (28, 28), (50, 60), (1, 1), (3, 17), (13, 900), (27, 28), (29, 31),
         (70, 70), (126, 1000), (224, 224), (336, 336), (480, 640), (768, 1024), (97, 1001),
         (1000, 97), (1111, 777), (2048, 1536)]


@pytest.mark.parametrize("h,w", SIZES)
def test_image_parity_sizes(ref_images, ours, h, w):
    image = Image.fromarray(structured_rgb(h, w, seed=h * 7 + w))
    assert_same(ours(image), ref_images(image))


def test_huge_image_lands_on_budget(ref_images, ours):
    image = Image.fromarray(structured_rgb(4000, 6000, noise=False))
    out = ours(image)
    assert out["image_grid_thw"].tolist() == [[1, 128, 192]]
    assert num_image_tokens(out["image_grid_thw"][0]) == 6144 == MAX_PIXELS // (2 * 28 * 28)
    assert 2 * (128 * 14) * (192 * 14) == MAX_PIXELS
    assert_same(out, ref_images(image))


@pytest.mark.parametrize("h,w", [(28, 5500), (5500, 28), (28, 5600), (1, 200), (10, 2000), (60, 11990)])
def test_aspect_ratio_up_to_200_accepted(ref_images, ours, h, w):
    image = Image.fromarray(structured_rgb(h, w, seed=3))
    out = ours(image)
    assert_same(out, ref_images(image))
    if (h, w) == (60, 11990):
        # the limit is on the input's ratio; rounding to 28 can push the grid past 200:1 (214:1)
        assert out["image_grid_thw"].tolist() == [[1, 4, 856]]


@pytest.mark.parametrize("h,w", [(28, 5601), (5601, 28), (1, 201), (10, 2001), (60, 12001)])
def test_aspect_ratio_over_200_raises_in_both(ref_images, ours, h, w):
    image = Image.new("RGB", (w, h), (10, 20, 30))
    with pytest.raises(ValueError, match="aspect ratio"):
        ref_images(image)
    with pytest.raises(ProcessorError, match="aspect ratio") as info:
        ours(image)
    assert isinstance(info.value, ValueError)


def _mode_images() -> dict[str, Image.Image]:
    rgb = structured_rgb(90, 130, seed=5)
    base = Image.fromarray(rgb)
    alpha = np.tile(np.linspace(0, 255, 130, dtype=np.float32), (90, 1)).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    la = Image.merge("LA", (base.convert("L"), Image.fromarray(alpha)))
    palette = base.quantize(colors=64)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    rgb_t = base.copy()
    rgb_t.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
    i16 = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257 // 200).astype(np.uint16))
    assert i16.mode == "I;16"
    return {
        "L": base.convert("L"), "RGBA": rgba, "LA": la, "P": palette, "P+transparency": palette_t,
        "PA": rgba.convert("PA"), "RGB+transparency": rgb_t, "I;16": i16,
        "I": Image.fromarray(rgb[..., 1].astype(np.int32) * 3), "F": base.convert("F"),
        "1": base.convert("1"), "CMYK": base.convert("CMYK"), "YCbCr": base.convert("YCbCr"),
        "RGBa": rgba.convert("RGBa"), "RGBX": base.convert("RGBX"), "HSV": base.convert("HSV"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_image_parity_modes(ref_images, ours, mode):
    image = _mode_images()[mode]
    assert_same(ours(image), ref_images(image))


def test_alpha_is_composited_on_white(ours):
    transparent = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    white = Image.new("RGB", (56, 56), (255, 255, 255))
    np.testing.assert_array_equal(ours(transparent)["pixel_values"], ours(white)["pixel_values"])


def test_multiple_images_in_one_call(ref_images, ours):
    images = [Image.fromarray(structured_rgb(300, 500, seed=1)), _mode_images()["RGBA"],
              Image.fromarray(structured_rgb(20, 33, seed=2)).convert("L")]
    out = ours(images)
    assert_same(out, ref_images(images))
    singles = [ours(im) for im in images]
    np.testing.assert_array_equal(out["pixel_values"],
                                  np.concatenate([s["pixel_values"] for s in singles]))
    np.testing.assert_array_equal(out["image_grid_thw"],
                                  np.concatenate([s["image_grid_thw"] for s in singles]))
    assert ours(tuple(images))["pixel_values"].shape == out["pixel_values"].shape


def test_row_layout_duplicated_frame_and_merge_windows(ours):
    """Each row is (c, t, ph, pw) with t = 0 and 1 identical; rows walk 2x2 merge windows."""
    rgb = np.zeros((84, 112, 3), np.uint8)  # already a valid size: the resize is a copy
    for r in range(6):
        for c in range(8):
            rgb[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = (10 * r, 10 * c, 200)
    out = ours(Image.fromarray(rgb))
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]
    rows = out["pixel_values"].reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])
    order = [(2 * bh + mh, 2 * bw + mw) for bh in range(3) for bw in range(4)
             for mh in range(2) for mw in range(2)]
    assert len(order) == len(rows)
    for row, (r, c) in zip(rows, order):
        expected = (np.array([10 * r, 10 * c, 200]) / 255 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD
        np.testing.assert_allclose(row[:, 0], np.broadcast_to(expected[:, None, None], (3, 14, 14)),
                                   atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Images from files and bad input


def test_file_paths_match_reference(ref_images, ours, tmp_path):
    rgba = _mode_images()["RGBA"]
    png = tmp_path / "alpha.png"
    rgba.save(png)
    jpg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(structured_rgb(60, 150, seed=9)).save(jpg, exif=exif, quality=90)
    for path in (png, jpg):
        out = ours(str(path))
        assert_same(out, ref_images(str(path)))
        np.testing.assert_array_equal(ours(Path(path))["pixel_values"], out["pixel_values"])
    # EXIF transpose: the 150 x 60 (w x h) picture is processed upright, i.e. 60 wide, 150 tall
    h, w = ours.target_size(150, 60)
    assert h > w and ours(str(jpg))["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    # surprising but exact: a path drops alpha (convert("RGB")), an open RGBA image is put on white
    assert np.abs(ours(str(png))["pixel_values"] - ours(rgba)["pixel_values"]).max() > 0.5
    mixed = ours([str(png), rgba])
    assert mixed["image_grid_thw"].shape == (2, 3)


def test_missing_file(ours, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ProcessorError, match="not found.*nope.png"):
        ours(str(missing))
    with pytest.raises(ProcessorError, match="nope.png"):
        ours([Image.new("RGB", (40, 40)), missing])


def test_corrupt_file(ours, tmp_path):
    bad = tmp_path / "random.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ProcessorError, match="cannot decode.*random.png"):
        ours(bad)
    buffer = io.BytesIO()
    Image.fromarray(structured_rgb(200, 200, seed=4)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ProcessorError, match="cannot decode.*truncated.png"):
        ours(str(truncated))


def test_decompression_bomb_guard_is_on(ours, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 px > 2 * limit -> PIL refuses
    with pytest.raises(ProcessorError, match="big.png.*too large"):
        ours(str(path))


def test_tiny_and_empty_images(ref_images, ours):
    # 5.x upscales sides below 28 (4.57.1 raised); parity holds down to a single pixel.
    for w, h in [(1, 1), (1, 7), (5, 3), (27, 1)]:
        image = Image.fromarray(structured_rgb(h, w, seed=w + h))
        out = ours(image)
        assert_same(out, ref_images(image))
        assert out["image_grid_thw"][0, 0] == 1 and min(out["image_grid_thw"][0, 1:]) >= 2
    # An image with a zero side is below any usable size: the reference divides by zero.
    empty = Image.new("RGB", (0, 30))
    with pytest.raises(ZeroDivisionError):
        ref_images(empty)
    with pytest.raises(ProcessorError, match="empty"):
        ours(empty)


def test_bad_arguments(ours):
    with pytest.raises(ProcessorError, match="no images"):
        ours([])
    with pytest.raises(TypeError, match="PIL image or a file path"):
        ours(np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(ProcessorError, match="La"):
        ours(Image.new("La", (40, 40)))


# ---------------------------------------------------------------------------------------------
# Videos


@pytest.fixture(scope="module")
def ref_video():
    return Glm4vVideoProcessor()


def reference_sampling(ref_video, total: int, fps: float) -> tuple[np.ndarray, list[int]]:
    """Frame indices and prompt timestamps exactly as transformers computes them."""
    video = np.zeros((total, 1, 1, 3), np.uint8)
    metadata = {"total_num_frames": total, "fps": fps, "duration": total / fps}  # as the decoders
    _, (md,) = ref_video._decode_and_sample_videos(
        video, video_metadata=metadata, do_sample_frames=True,
        sample_indices_fn=partial(ref_video.sample_frames))
    grid_t = len(md.frames_indices) // 2 + len(md.frames_indices) % 2
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="<|image|>")
    fake.replace_frame_token_id = partial(Glm4vProcessor.replace_frame_token_id, fake)
    prompt = Glm4vProcessor.replace_video_token(
        fake, {"video_grid_thw": [np.array([grid_t, 2, 2])], "video_metadata": [md]}, 0)
    stamps = [int(s) for s in re.findall(r"<\|end_of_image\|>(\d+)", prompt)]
    assert len(stamps) == grid_t
    return np.asarray(md.frames_indices), stamps


VIDEO_CASES = [(100, 30.0), (1, 30.0), (2, 1.0), (3, 25.0), (7, 2.0), (45, 0.5), (61, 29.97),
               (240, 24.0), (1000, 60.0), (9000, 30.0), (9030, 30.0), (20000, 30.0),
               (18001, 60.0), (700, 2.0), (500, 1.5), (601, 2.0), (100000, 25.0)]


@pytest.mark.parametrize("total,fps", VIDEO_CASES)
def test_video_sampling_and_timestamps(ref_video, total, fps):
    ref_indices, ref_stamps = reference_sampling(ref_video, total, fps)
    processor = VideoProcessor()
    indices = processor.sample_frame_indices(total, fps)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, ref_indices)
    assert len(indices) % 2 == 0
    if total / fps > 300:
        assert len(indices) <= 600
    # the full call on a cheap (broadcast) video gives the same timestamps and grid_t
    frames = np.broadcast_to(np.zeros((1, 28, 28, 3), np.uint8), (total, 28, 28, 3))
    out = processor(frames, video_fps=fps)
    assert out["timestamps"] == ref_stamps
    assert out["video_grid_thw"][0, 0] == len(indices) // 2


def test_video_constant_frames_layout():
    """Frame k is the constant colour (10k+5, 100+10k, 200-10k): check which frames land where."""
    total, fps = 9, 4.0  # 2.25 s -> 4 samples at ceil(i * 4 / 2) = 0, 2, 4, 6
    colours = np.array([(10 * k + 5, 100 + 10 * k, 200 - 10 * k) for k in range(total)], np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (total, 56, 84, 3)).copy()
    out = VideoProcessor()(frames, video_fps=fps)
    assert out["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert out["video_grid_thw"].dtype == np.int64
    assert out["timestamps"] == [0, 1]  # frames 0 and 4 at 4 fps
    pv = out["pixel_values_videos"]
    assert pv.shape == (2 * 4 * 6, 1176) and pv.dtype == np.float32
    expected = (colours.astype(np.float64) - 255 * np.array(OPENAI_CLIP_MEAN)) / (
        255 * np.array(OPENAI_CLIP_STD))
    sampled = [0, 2, 4, 6]
    for r, row in enumerate(pv.reshape(-1, 3, 2, 14, 14)):
        t = r // 24
        for tp in range(2):
            for c in range(3):
                np.testing.assert_allclose(row[c, tp], expected[sampled[2 * t + tp], c], atol=1e-6)


def test_video_presampled_pil_frames_odd_count():
    frames = [Image.new("RGB", (84, 56), (10 * k, 50, 90)) for k in range(3)]
    out = VideoProcessor()(frames, video_fps=2.0)
    assert out["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert out["timestamps"] == [0, 1]  # indices 0 and 2 at 2 fps
    rows = out["pixel_values_videos"].reshape(2, 24, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[1, :, :, 0], rows[1, :, :, 1])  # last frame repeated
    assert not np.array_equal(rows[0, :, :, 0], rows[0, :, :, 1])
    out = VideoProcessor()(frames[:2] + [frames[2].convert("L")], video_fps=1.0,
                           frame_indices=[4, 10, 30])
    assert out["timestamps"] == [4, 30]


def test_video_patch_order_matches_reference_patchify(ref_video):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 70, 100, 3), dtype=np.uint8)
    processor = VideoProcessor()
    out = processor(frames, video_fps=2.0)  # 3 s -> all 6 frames
    h, w = smart_resize(6, 70, 100)
    resized = np.stack([resize_bicubic(f, h, w) for f in frames])
    video = torch.from_numpy(normalize_fused(resized, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    video = video.permute(0, 3, 1, 2)[None].contiguous()  # (B, T, C, H, W)
    ref_rows, gt, gh, gw = Glm4vVideoProcessor.patchify(ref_video, video, 14, 2, 2)
    assert out["video_grid_thw"].tolist() == [[gt, gh, gw]]
    np.testing.assert_array_equal(out["pixel_values_videos"], ref_rows[0].numpy())


@pytest.mark.parametrize("frames,height,width,max_pixels", [
    (40, 112, 168, 28 * 28 * 40 * 6), (600, 1080, 1920, 28 * 28 * 2 * 30000),
    (64, 720, 1280, 28 * 28 * 2 * 30000), (2, 20, 3000, 28 * 28 * 2 * 30000),
    (10, 300, 300, 28 * 28 * 10 * 3)])
def test_video_grid_matches_reference_budget(ref_video, frames, height, width, max_pixels):
    size = {"shortest_edge": 112 * 112, "longest_edge": max_pixels}
    ref_patches = ref_video.get_num_of_video_patches(frames, height, width, {"size": size})
    processor = VideoProcessor(max_pixels=max_pixels)
    h, w = smart_resize(frames, height, width, min_pixels=112 * 112, max_pixels=max_pixels)
    assert (frames // 2) * (h // 14) * (w // 14) == ref_patches
    if frames * height * width <= 40 * 112 * 168:  # run the cheap ones end to end
        video = np.broadcast_to(np.full((1, height, width, 3), 77, np.uint8),
                                (frames, height, width, 3))
        out = processor(video, video_fps=2.0)  # 2 fps -> every frame is sampled
        assert out["video_grid_thw"].tolist() == [[frames // 2, h // 14, w // 14]]
        assert len(out["pixel_values_videos"]) == ref_patches


def test_video_bad_input():
    processor = VideoProcessor()
    with pytest.raises(ProcessorError, match="uint8"):
        processor(np.zeros((4, 28, 28, 3), np.float32), video_fps=2.0)
    with pytest.raises(ProcessorError, match=r"\(F, H, W, 3\)"):
        processor(np.zeros((4, 28, 28), np.uint8), video_fps=2.0)
    with pytest.raises(ProcessorError, match="video_fps"):
        processor(np.zeros((4, 28, 28, 3), np.uint8), video_fps=0)
    with pytest.raises(ProcessorError, match="empty"):
        processor(np.zeros((0, 28, 28, 3), np.uint8), video_fps=2.0)
    with pytest.raises(ProcessorError, match="temporal_factor"):  # one frame: the reference raises too
        processor([Image.new("RGB", (56, 56))], video_fps=2.0)
    with pytest.raises(ProcessorError, match="one size"):
        processor([Image.new("RGB", (56, 56)), Image.new("RGB", (28, 56))], video_fps=2.0)
    with pytest.raises(ProcessorError, match="aspect ratio"):
        processor(np.zeros((2, 28, 5601, 3), np.uint8), video_fps=2.0)
    with pytest.raises(ProcessorError, match="frame_indices"):
        processor([Image.new("RGB", (56, 56))] * 2, video_fps=2.0, frame_indices=[0])
