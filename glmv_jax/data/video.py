"""Video files (mp4, webm, mov, mkv, avi: whatever container FFmpeg opens) through PyAV.

`read_video_file(path)` decodes only the frames GLM-4.1V samples and returns a `VideoClip`
(sampled frames as PIL images, their frame indices, the source fps), which `VideoProcessor` takes:
`VideoProcessor()(clip.frames, video_fps=clip.fps, frame_indices=clip.frame_indices)`;
`process_video_file(path, processor)` does both with one processor (its fps and max_duration
sample), resizing each frame as it is decoded. `read_frames(path, fps)` reads what is not a video file: a
folder of frame images or an animated GIF/WebP/TIFF.

What the reference does (transformers 5.x `Glm4vVideoProcessor.sample_frames` on the metadata of
`video_utils.read_video_pyav`, the PyAV reader of `load_video`):

- Metadata: `total = stream.frames` (the container's frame count), `fps = float(stream.average_rate)`,
  `duration = float(total / average_rate)` (exact fraction, then rounded once).
- Indices, with the processor's `fps = 2` and `max_duration = 300`: if `duration <= 300` s,
  `n = max(floor(duration * 2), 1)` frames at `min(total - 1, ceil(i * video_fps / 2))`, i < n, i.e.
  one frame every half second from frame 0 (a 2.5 s clip at 10 fps: 0, 5, 10, 15, 20, and 20 again);
  if longer, `600` frames at `ceil(t * video_fps)` for t in `linspace(0, duration, 600)` (the first
  and, clamped, the last frame included), or every frame if the clip has no more than 600.
  Repeated indices are dropped (order kept) and an odd count repeats the last index.
- Frames are decoded in order from the start, frame k being the k-th frame the decoder returns.
- transformers' default reader (torchcodec, not installed here) scans the file for the frame count,
  fps and duration; for a constant-rate file whose header is right these are the same numbers.
- Timestamps, the numbers written after each frame pair's image tokens in the prompt
  (`Glm4vProcessor.replace_video_token`): `int(index / video_fps)` of the first frame of every pair,
  cut or padded (last value) to the grid's `t`. `VideoProcessor` computes them from the indices.

Where this differs, on purpose:

- transformers' PyAV reader keeps a repeated last index's frame once (so `t` odd), while its array
  path, its default torchcodec reader and `VideoProcessor` keep one frame per index. Here: one frame
  per index (the pixel rows are the same: patchify repeats the last frame either way; only
  `smart_resize` sees `T + 1` instead of `T` frames, which can change the size only near the
  clip's pixel budget, and a clip shorter than a second no longer fails with "t:1 must be larger
  than temporal_factor:2").
- Containers without a frame count in their header (webm, mkv: `stream.frames == 0`) make the
  reference sample index -1 and fail; here the frames are counted by demuxing the stream's packets
  (no decoding), which is the count the header would hold; a count that covers more than a second
  less than the stream's stated duration is a truncated file.
- A header that promises more frames than decode: if the missing frames are within one second of
  the end, the frames that do decode are counted and sampling is redone on that count (the
  reference silently returns fewer frames than indices); further short is a truncated file.
- Missing, unreadable, truncated, corrupt or non-video files, and files over the size limits below
  (untrusted input), raise one `DataError` naming the file and the cause, never a PyAV traceback.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageSequence

from glmv_jax.data.processor import ProcessorError, VideoProcessor, load_image, resize_bicubic, smart_resize
from glmv_jax.errors import DataError

# File suffixes to send here rather than to the frame-folder / animated-image reader.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg",
                            ".ts", ".m2ts", ".3gp", ".flv", ".ogv", ".wmv"})
MAX_FRAME_PIXELS = 7680 * 4320        # one frame: 8K UHD
MAX_SAMPLED_PIXELS = 1_500_000_000    # all sampled frames together (4.5 GB as uint8 RGB)
MAX_DECODED_FRAMES = 200_000          # frames walked through (counted or decoded) per file


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on what one (untrusted) file may cost: pixels of a frame, pixels of all sampled frames
    as they are kept (resized ones in `process_video_file`), frames walked through (counted or
    decoded) up to the last sampled one."""

    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_sampled_pixels: int = MAX_SAMPLED_PIXELS
    max_decoded_frames: int = MAX_DECODED_FRAMES


@dataclass(frozen=True)
class VideoClip:
    """The sampled frames of one video file.

    frames: one RGB PIL image per entry of `frame_indices` (the last one repeated when the count
    was odd); frame_indices: int64 (T,), T even, indices into the decoded stream; fps: frames per
    second of the file; total_frames, duration: the metadata the indices were sampled from.
    """

    path: str
    frames: list[Image.Image]
    frame_indices: np.ndarray
    fps: float
    total_frames: int
    duration: float

    @property
    def timestamps(self) -> list[float]:
        """Seconds of every sampled frame, `index / fps` (what `chat.encode(video_timestamps=...)` takes)."""
        return [int(i) / self.fps for i in self.frame_indices]


@dataclass(frozen=True)
class _Header:
    total_frames: int
    rate: Fraction
    height: int
    width: int

    @property
    def duration(self) -> float:
        return float(Fraction(self.total_frames) / self.rate)


def is_video_file(path) -> bool:
    """Whether `path` names a video container by its suffix (see VIDEO_SUFFIXES)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_video_file(path, sampler: VideoProcessor | None = None,
                    limits: VideoLimits = VideoLimits()) -> VideoClip:
    """Decode the frames of `path` that `sampler` (default `VideoProcessor()`: 2 fps, 300 s) picks,
    at their size in the file.

    Raises DataError (one line, naming the file) when the file is missing, not a video, corrupt or
    truncated, or when a frame, the sampled frames or the frames to walk through exceed `limits`.
    """
    path = Path(path)
    header, indices, frames = _sample_and_decode(path, sampler or VideoProcessor(), limits,
                                                 lambda num_frames, height, width: None)
    images = {id(a): Image.fromarray(a) for a in frames}  # a repeated frame stays one image
    return VideoClip(path=str(path), frames=[images[id(a)] for a in frames], frame_indices=indices,
                     fps=float(header.rate), total_frames=header.total_frames, duration=header.duration)


def read_frames(path, fps: float | None = None) -> tuple[np.ndarray, float]:
    """A video that is not a video file, as (frames (F, H, W, 3) uint8, fps): a folder of frame images sorted by
    name (at `fps`, default 2) or an animated GIF/WebP/TIFF (fps from its frame duration unless given)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ProcessorError(f"{p}: no frame images (png/jpg/webp/bmp) in this folder")
        return np.stack([np.asarray(load_image(f)) for f in files]), fps or 2.0
    if not p.is_file():
        raise ProcessorError(f"video file not found: {p}")
    try:
        with Image.open(p) as clip:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(clip)]
            duration_ms = clip.info.get("duration") or 500
    except Exception as e:  # PIL decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise ProcessorError(f"cannot decode video file {p}: {type(e).__name__}: {e}") from e
    if len({f.shape for f in frames}) != 1:
        raise ProcessorError(f"{p}: frames of different sizes")
    return np.stack(frames), fps or 1000.0 / duration_ms


def process_video_file(path, processor: VideoProcessor | None = None,
                       limits: VideoLimits = VideoLimits()) -> dict:
    """`processor(...)` of the video file `path`, sampled with the same processor's fps and duration.

    Returns the dict of `VideoProcessor.__call__`: "pixel_values_videos" float32 (T/2 * h/14 * w/14,
    1176), "video_grid_thw" int64 (1, 3), "timestamps" (one int a frame pair, for the prompt),
    "frame_timestamps" (seconds of every sampled frame). Equal to `processor(clip.frames, ...)` of
    `read_video_file`, but each frame is resized to the processor's size as it is decoded, so only
    the resized frames are held (a 4K clip costs its resized size, not 600 full frames). Raises
    DataError.
    """
    processor = processor or VideoProcessor()
    header, indices, frames = _sample_and_decode(Path(path), processor, limits,
                                                 partial(_resized_size, processor))
    return processor([Image.fromarray(a) for a in frames], video_fps=float(header.rate),
                     frame_indices=indices)


def _resized_size(processor: VideoProcessor, num_frames: int, height: int,
                  width: int) -> tuple[int, int] | None:
    """The (height, width) `processor` resizes these frames to, when resizing them to it first
    changes nothing (the size is a fixed point of `smart_resize`, as it is but in degenerate cases);
    else None (resize later, at full size)."""
    def size(h: int, w: int) -> tuple[int, int] | None:
        try:
            return smart_resize(num_frames, h, w, temporal_factor=processor.temporal_patch_size,
                                factor=processor.patch_size * processor.merge_size,
                                min_pixels=processor.min_pixels, max_pixels=processor.max_pixels)
        except ValueError:
            return None
    target = size(height, width)
    return target if target is not None and size(*target) == target else None


def _sample_and_decode(path: Path, sampler: VideoProcessor, limits: VideoLimits, size_for
                       ) -> tuple[_Header, np.ndarray, list[np.ndarray]]:
    """(header, indices, one (h, w, 3) uint8 frame per index), resized to `size_for(T, H, W)`
    unless that is None. A header that overstates its frame count by at most a second is
    corrected to the frames that decode and sampled again; by more, the file is truncated."""
    if not path.is_file():
        raise DataError(f"video file not found: {path}")
    header = _read_header(path, limits.max_decoded_frames)
    if header.height * header.width > limits.max_frame_pixels:
        raise DataError(f"video file {path}: frames of {header.width}x{header.height} pixels exceed "
                        f"the limit of {limits.max_frame_pixels} pixels a frame")
    promised = header.total_frames
    for _ in range(2):
        indices = _sample(sampler, header, path)
        size = size_for(len(indices), header.height, header.width)
        _check_budget(path, (header.height, header.width) if size is None else size, indices, limits)
        frames, decoded = _decode(path, indices, header, size)
        if frames is not None:
            return header, indices, frames
        if decoded < 1 or promised - decoded > max(1, math.ceil(header.rate)):
            break
        header = _Header(decoded, header.rate, header.height, header.width)
    raise DataError(f"video file {path} is truncated or corrupt: its header promises {promised} "
                    f"frames, only {decoded} decode")


# ----------------------------------------------------------------------------------------------
# Reading


@contextmanager
def _reading(path: Path, doing: str) -> Iterator[None]:
    """Turn what PyAV / FFmpeg raise into one DataError line naming the file."""
    try:
        yield
    except DataError:
        raise
    except av.FFmpegError as e:
        reason = e.strerror or type(e).__name__
        raise DataError(f"cannot {doing} video file {path}: {_one_line(reason)} "
                        f"(corrupt, truncated or not a video FFmpeg can read)") from e
    except (OSError, EOFError, ValueError, UnicodeError) as e:
        raise DataError(f"cannot {doing} video file {path}: {type(e).__name__}: {_one_line(e)}") from e


def _one_line(reason) -> str:
    return " ".join(str(reason).split())


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise DataError(f"video file {path} has no video stream")
    return container.streams.video[0]


def _read_header(path: Path, max_frames: int) -> _Header:
    """Frame count, frame rate and frame size as the reference reads them (see the module doc)."""
    with _reading(path, "open"), av.open(str(path)) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise DataError(f"video file {path} does not say its frame rate")
        if not stream.height or not stream.width:
            raise DataError(f"video file {path}: its video stream has no frame size")
        header = _Header(int(stream.frames), Fraction(rate), int(stream.height), int(stream.width))
        if header.total_frames <= 0:
            total = _count_packets(container, stream, path, max_frames)
            _check_not_cut(container, stream, total, header.rate, path)
            header = _Header(total, header.rate, header.height, header.width)
    if header.total_frames <= 0:
        raise DataError(f"video file {path} holds no video frames")
    return header


def _count_packets(container, stream, path: Path, max_frames: int) -> int:
    """Frames of a stream whose header has no count: its non-empty packets, demuxed, not decoded."""
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
            if count > max_frames:
                raise DataError(f"video file {path} has more than {max_frames} frames (the limit)")
    return count


def _check_not_cut(container, stream, frames: int, rate: Fraction, path: Path) -> None:
    """A counted stream more than a second shorter than the duration its header states is cut.

    The stated duration: the stream's own, else its Matroska DURATION tag, else the container's
    when the stream is its only one."""
    stated = _stated_seconds(container, stream)
    found = float(frames / rate)
    if stated is not None and found + 1 < stated:
        raise DataError(f"video file {path} is truncated: its header says {stated:.2f} s, "
                        f"its frames cover {found:.2f} s")


def _stated_seconds(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION", "")  # "HH:MM:SS.nnnnnnnnn"
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        pass
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _sample(sampler: VideoProcessor, header: _Header, path: Path) -> np.ndarray:
    try:
        return sampler.sample_frame_indices(header.total_frames, float(header.rate), header.duration)
    except DataError as e:
        raise DataError(f"video file {path}: {e}") from e


def _check_budget(path: Path, size: tuple[int, int], indices: np.ndarray, limits: VideoLimits) -> None:
    walked = int(indices[-1]) + 1
    if walked > limits.max_decoded_frames:
        raise DataError(f"video file {path}: sampling it means decoding {walked} frames, over the "
                        f"limit of {limits.max_decoded_frames}")
    pixels = len(indices) * size[0] * size[1]
    if pixels > limits.max_sampled_pixels:
        raise DataError(f"video file {path}: {len(indices)} sampled frames of {size[1]}x{size[0]} "
                        f"are {pixels} pixels, over the limit of {limits.max_sampled_pixels}")


def _decode(path: Path, indices: np.ndarray, header: _Header, size: tuple[int, int] | None
            ) -> tuple[list[np.ndarray] | None, int]:
    """(one (h, w, 3) uint8 frame per index, frames decoded), or (None, frames decoded) when the
    stream ends before the last index.

    Walks the decoder from the first frame to the last sampled one, converting only the sampled
    frames (`to_ndarray(format="rgb24")`, as the reference), each resized to `size` if given.
    """
    wanted, last = set(int(i) for i in indices), int(indices[-1])
    rgb: dict[int, np.ndarray] = {}
    decoded = 0
    with _reading(path, "decode"), av.open(str(path)) as container:
        for frame in container.decode(_video_stream(container, path)):
            if decoded in wanted:
                if (frame.height, frame.width) != (header.height, header.width):
                    raise DataError(f"video file {path}: frame {decoded} is {frame.width}x{frame.height}, "
                                    f"the stream says {header.width}x{header.height}")
                rgb[decoded] = frame.to_ndarray(format="rgb24")
                if size is not None and size != (header.height, header.width):
                    rgb[decoded] = resize_bicubic(rgb[decoded], *size)
            decoded += 1
            if decoded > last:
                break
    if decoded <= last:
        return None, decoded
    return [rgb[int(i)] for i in indices], decoded
