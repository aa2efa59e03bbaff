"""Video files through PyAV (`glmv_jax.data.video`) against transformers 5.x on videos written here.

The ground truth is transformers' own PyAV reader, `video_utils.load_video(path, backend="pyav")`,
sampling with `Glm4vVideoProcessor.sample_frames` (torchcodec, decord and torchvision are not
installed): its metadata, frame indices and decoded frames, and the prompt timestamps of
`Glm4vProcessor.replace_video_token`. Pixels: the reference's resize and normalise need
torchvision, so a clip whose size `smart_resize` keeps (no resize) goes through the reference's
fused normalisation written out in torch and its own `patchify`, and must equal ours bit for bit.
Webm and mkv carry no frame count, where transformers' reader fails; there its sampling function
runs on the counted metadata and the frames are checked against a full decode.
"""
from __future__ import annotations

import re
from fractions import Fraction
from functools import partial
from types import SimpleNamespace

import av
import numpy as np
import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import torch
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
from transformers.video_utils import VideoMetadata, load_video

from glmv_jax.data.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VideoProcessor, smart_resize
from glmv_jax.data.video import (
    VideoClip,
    VideoLimits,
    is_video_file,
    process_video_file,
    read_video_file,
)
from glmv_jax.errors import DataError
from video_files import cut_in_half, frame_rgb, write_video


@pytest.fixture(scope="module")
def ref():
    return Glm4vVideoProcessor()


def all_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def prompt_timestamps(metadata: VideoMetadata, grid_t: int) -> list[int]:
    """The seconds Glm4vProcessor writes after each frame pair's image tokens."""
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="<|image|>")
    fake.replace_frame_token_id = partial(Glm4vProcessor.replace_frame_token_id, fake)
    prompt = Glm4vProcessor.replace_video_token(
        fake, {"video_grid_thw": [np.array([grid_t, 2, 2])], "video_metadata": [metadata]}, 0)
    return [int(s) for s in re.findall(r"<\|end_of_image\|>(\d+)", prompt)]


def process(clip: VideoClip) -> dict:
    return VideoProcessor()(clip.frames, video_fps=clip.fps, frame_indices=clip.frame_indices)


def assert_frames_at(clip: VideoClip, decoded: np.ndarray) -> None:
    """Every sampled frame is the decoded frame at its index, pixel for pixel."""
    assert len(clip.frames) == len(clip.frame_indices)
    for image, index in zip(clip.frames, clip.frame_indices):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), decoded[index])


# ---------------------------------------------------------------------------------------------
# Against transformers' PyAV reader

CASES = [  # (frames, fps, codec, container suffix)
    (25, 10, "mpeg4", ".mp4"),                   # 2.5 s: 0 5 10 15 20, odd -> 20 repeated
    (30, 10, "libx264", ".mp4"),                 # 3 s: 0 5 10 15 20 25
    (24, 8, "mpeg4", ".mov"),                    # 3 s at 8 fps: ceil(i * 4)
    (21, 7, "mjpeg", ".avi"),                    # odd rate: ceil(i * 3.5)
    (90, Fraction(30000, 1001), "mpeg4", ".mp4"),  # NTSC rate, 3.003 s
    (7, 10, "mpeg4", ".mp4"),                    # 0.7 s: one sample, 0 twice
    (610, 2, "mpeg4", ".mp4"),                   # 305 s > max_duration: 600 of 610 by linspace
]


@pytest.mark.parametrize("frames,fps,codec,suffix", CASES)
def test_matches_transformers_pyav_reader(ref, tmp_path, frames, fps, codec, suffix):
    pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    path = write_video(tmp_path / f"clip{suffix}", frames, fps, codec=codec, pix_fmt=pix_fmt)
    ref_video, md = load_video(path, backend="pyav", sample_indices_fn=partial(ref.sample_frames))
    clip = read_video_file(path)

    assert (clip.total_frames, clip.fps, clip.duration) == (md.total_num_frames, md.fps, md.duration)
    assert clip.total_frames == frames
    assert clip.frame_indices.dtype == np.int64 and len(clip.frame_indices) % 2 == 0
    np.testing.assert_array_equal(clip.frame_indices, md.frames_indices)
    if frames == 610:
        assert len(clip.frame_indices) == 600 and clip.frame_indices[-1] == frames - 1
    # the reader returns each index's frame once; ours one frame per index (last one repeated)
    unique = list(dict.fromkeys(clip.frame_indices.tolist()))
    np.testing.assert_array_equal(np.stack([np.asarray(clip.frames[clip.frame_indices.tolist().index(i)])
                                            for i in unique]), ref_video)
    assert_frames_at(clip, all_frames(path))
    assert clip.timestamps == pytest.approx(md.timestamps, abs=0)

    out = process(clip)
    grid_t = int(out["video_grid_thw"][0, 0])
    assert grid_t == len(clip.frame_indices) // 2
    assert out["timestamps"] == prompt_timestamps(md, grid_t)
    assert out["frame_timestamps"] == md.timestamps


def test_documented_indices(tmp_path):
    """The module docstring's example: 2.5 s at 10 fps samples 0, 5, 10, 15, 20, 20."""
    clip = read_video_file(write_video(tmp_path / "c.mp4", 25, 10))
    assert clip.frame_indices.tolist() == [0, 5, 10, 15, 20, 20]
    assert process(clip)["timestamps"] == [0, 1, 2]
    clip = read_video_file(write_video(tmp_path / "s.mp4", 7, 10))
    assert clip.frame_indices.tolist() == [0, 0] and len(clip.frames) == 2


def test_pixels_match_reference_processing(ref, tmp_path):
    """A 56x112 clip keeps its size; reference: its decode, fused normalise, its patchify."""
    height, width = 56, 112
    path = write_video(tmp_path / "p.mp4", 25, 10, height=height, width=width)
    ref_video, md = load_video(path, backend="pyav", sample_indices_fn=partial(ref.sample_frames))
    assert smart_resize(len(md.frames_indices), height, width) == (height, width)
    mean, std, _ = ref._fuse_mean_std_and_rescale_factor(
        do_normalize=True, image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD),
        do_rescale=True, rescale_factor=1 / 255, device=torch.device("cpu"))
    video = torch.from_numpy(ref_video).permute(0, 3, 1, 2).to(torch.float32)  # (T, C, H, W)
    video = (video - mean[:, None, None]) / std[:, None, None]  # torchvision's normalize
    ref_rows, gt, gh, gw = Glm4vVideoProcessor.patchify(ref, video[None], 14, 2, 2)

    out = process_video_file(path)
    assert out["video_grid_thw"].tolist() == [[gt, gh, gw]] == [[3, 4, 8]]
    np.testing.assert_array_equal(out["pixel_values_videos"], ref_rows[0].numpy())
    assert out["timestamps"] == prompt_timestamps(md, gt) == [0, 1, 2]


@pytest.mark.parametrize("codec,suffix", [("libvpx", ".webm"), ("libvpx-vp9", ".webm"),
                                          ("libx264", ".mkv")])
def test_containers_without_frame_count(ref, tmp_path, codec, suffix):
    path = write_video(tmp_path / f"clip{suffix}", 30, 10, codec=codec)
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0  # what makes transformers' reader fail
    decoded = all_frames(path)
    clip = read_video_file(path)
    assert clip.total_frames == len(decoded) == 30
    md = VideoMetadata(total_num_frames=len(decoded), fps=10.0, duration=3.0)
    np.testing.assert_array_equal(clip.frame_indices, ref.sample_frames(md))
    assert clip.frame_indices.tolist() == [0, 5, 10, 15, 20, 25]
    assert_frames_at(clip, decoded)
    md.frames_indices = clip.frame_indices
    out = process(clip)
    assert out["timestamps"] == prompt_timestamps(md, 3) == [0, 1, 2]


def test_sampler_settings_are_used(tmp_path):
    path = write_video(tmp_path / "c.mp4", 40, 10)
    clip = read_video_file(path, VideoProcessor(fps=1))
    assert clip.frame_indices.tolist() == [0, 10, 20, 30]
    clip = read_video_file(path, VideoProcessor(fps=4, max_duration=2))  # 4 s > 2: linspace, 8 of 40
    assert clip.frame_indices.tolist() == [0, 6, 12, 18, 23, 29, 35, 39]
    out = process_video_file(path, VideoProcessor(fps=1, max_pixels=4 * 28 * 56))
    # 4 frames of 48x64 over a 6272-pixel budget: beta = 1.4, sides floor to 28 x 28
    assert smart_resize(4, 48, 64, max_pixels=4 * 28 * 56) == (28, 28)
    assert out["video_grid_thw"].tolist() == [[2, 2, 2]] and out["timestamps"] == [0, 2]
    with pytest.raises(DataError, match="decoding 36 frames"):  # 2 fps: last index 35
        process_video_file(path, limits=VideoLimits(max_decoded_frames=30))


@pytest.mark.parametrize("height,width,max_pixels", [
    (48, 64, 28 * 28 * 2 * 30000),     # upscaled: 56 x 56
    (120, 200, 28 * 28 * 2 * 30000),   # rounded: 112 x 196
    (120, 200, 6 * 56 * 84),           # over the clip budget: floored to 28 x 84
    (30, 1800, 28 * 28 * 2 * 30000),   # a strip: 28 x 1792
    (28, 5600, 6 * 28 * 1000)])        # 28 x 2352, itself resized again: kept full size
def test_process_resizes_while_decoding(tmp_path, height, width, max_pixels):
    """process_video_file (frames resized as decoded) equals the processor on the full frames."""
    path = write_video(tmp_path / "c.mp4", 30, 10, height=height, width=width)
    processor = VideoProcessor(max_pixels=max_pixels)
    clip = read_video_file(path)
    expected = processor(clip.frames, video_fps=clip.fps, frame_indices=clip.frame_indices)
    out = process_video_file(path, processor)
    assert out["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
    np.testing.assert_array_equal(out["pixel_values_videos"], expected["pixel_values_videos"])
    assert out["timestamps"] == expected["timestamps"] == [0, 1, 2]
    assert out["frame_timestamps"] == expected["frame_timestamps"]


def test_process_holds_only_resized_frames(tmp_path):
    path = write_video(tmp_path / "c.mp4", 30, 10, height=240, width=320)
    processor = VideoProcessor(max_pixels=6 * 56 * 84)  # beta = 4.04: 240 x 320 -> 56 x 56
    limits = VideoLimits(max_sampled_pixels=6 * 56 * 56)
    assert "sampled frames of 320x240" in one_line_error(path, max_sampled_pixels=6 * 56 * 56)
    assert process_video_file(path, processor, limits)["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert "sampled frames of 56x56" in str(pytest.raises(
        DataError, process_video_file, path, processor, VideoLimits(max_sampled_pixels=6 * 56 * 56 - 1)).value)


def test_is_video_file():
    assert is_video_file("a/b.MP4") and is_video_file("x.webm") and is_video_file("x.mkv")
    assert not is_video_file("x.gif") and not is_video_file("frames") and not is_video_file("x.webp")


# ---------------------------------------------------------------------------------------------
# Bad files: one DataError line naming the file


def one_line_error(path, **limits) -> str:
    with pytest.raises(DataError) as info:
        read_video_file(path, limits=VideoLimits(**limits))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_mp4(tmp_path):
    path = write_video(tmp_path / "t.mp4", 30, 10, codec="libx264")
    assert "corrupt, truncated" in one_line_error(cut_in_half(path))  # index (moov) at the end
    path = write_video(tmp_path / "f.mp4", 30, 10, codec="libx264", movflags="faststart")
    message = one_line_error(cut_in_half(path))  # index first: the frame data runs out
    assert "cannot decode" in message or "truncated" in message


def test_truncated_webm(tmp_path):
    path = write_video(tmp_path / "t.webm", 30, 10, codec="libvpx")
    assert "is truncated" in one_line_error(cut_in_half(path))


def test_truncated_mkv_with_sound(tmp_path):
    """Two streams: the video's own DURATION tag tells the cut (the container's is the longer one)."""
    path = str(tmp_path / "s.mkv")
    with av.open(path, "w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        for k in range(30):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame_rgb(k, 48, 64), format="rgb24")))
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            sound.sample_rate, sound.pts = 8000, 800 * k
            container.mux(audio.encode(sound))
        container.mux(video.encode())
        container.mux(audio.encode())
    clip = read_video_file(path)
    assert clip.total_frames == 30 and clip.frame_indices.tolist() == [0, 5, 10, 15, 20, 25]
    assert_frames_at(clip, all_frames(path))
    assert "is truncated" in one_line_error(cut_in_half(path))


def test_not_a_video(tmp_path):
    for name, data in [("text.mp4", b"not a video at all\n" * 50), ("empty.mkv", b""),
                       ("noise.webm", np.random.default_rng(0).bytes(4096))]:
        (tmp_path / name).write_bytes(data)
        one_line_error(tmp_path / name)
    assert "not found" in one_line_error(tmp_path / "missing.mp4")
    one_line_error(tmp_path)  # a folder


def test_audio_only_file(tmp_path):
    path = tmp_path / "a.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert "no video stream" in one_line_error(path)


def test_limits(tmp_path):
    path = write_video(tmp_path / "c.mp4", 30, 10)
    assert "a frame" in one_line_error(path, max_frame_pixels=48 * 64 - 1)
    assert "sampled frames" in one_line_error(path, max_sampled_pixels=6 * 48 * 64 - 1)
    assert "decoding 26 frames" in one_line_error(path, max_decoded_frames=25)
    limits = VideoLimits(max_frame_pixels=48 * 64, max_sampled_pixels=6 * 48 * 64, max_decoded_frames=26)
    assert len(read_video_file(path, limits=limits).frames) == 6
    webm = write_video(tmp_path / "c.webm", 30, 10, codec="libvpx")
    assert "more than 29 frames" in one_line_error(webm, max_decoded_frames=29)


def test_header_overstating_its_frame_count(tmp_path, monkeypatch):
    """Short by at most a second: resampled on the frames that decode; by more: truncated."""
    import glmv_jax.data.video as video

    path = write_video(tmp_path / "c.mp4", 610, 2)  # > 300 s: the last sampled frame is the last
    real = video._read_header
    for extra, ok in [(2, True), (3, False)]:
        def overstated(p, max_frames, extra=extra):
            header = real(p, max_frames)
            return video._Header(header.total_frames + extra, header.rate, header.height, header.width)
        monkeypatch.setattr(video, "_read_header", overstated)
        if ok:
            clip = read_video_file(path)
            assert clip.total_frames == 610 and clip.frame_indices[-1] == 609
            assert_frames_at(clip, all_frames(path))
        else:
            assert "promises 613 frames, only 610 decode" in one_line_error(path)
