"""Video files (mp4, webm, mov, mkv, avi: whatever container FFmpeg opens) through PyAV.

`read_video_file(path)` decodes only the frames GLM-4.1V samples and returns a `VideoClip`
(sampled frames as PIL images, their frame indices, the source fps), which `VideoProcessor` takes:
`VideoProcessor()(clip.frames, video_fps=clip.fps, frame_indices=clip.frame_indices)`;
`process_video_file(path, processor)` does both with one processor (its fps and max_duration sample).

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
- Timestamps, the numbers written after each frame pair's image tokens in the prompt
  (`Glm4vProcessor.replace_video_token`): `int(index / video_fps)` of the first frame of every pair,
  cut or padded (last value) to the grid's `t`. `VideoProcessor` computes them from the indices.

Where this differs, on purpose:

- transformers' PyAV reader keeps a repeated last index's frame once (so `t` odd), while its array
  path, its default torchcodec reader and `VideoProcessor` keep one frame per index. Here: one frame
  per index (the pixel rows are the same: patchify repeats the last frame either way; only
  `smart_resize` sees `T + 1` instead of `T` frames, which matters only at the clip's pixel budget,
  and a clip shorter than a second no longer fails with "t:1 must be larger than 2").
- Containers without a frame count in their header (webm, mkv: `stream.frames == 0`) make the
  reference sample index -1 and fail; here the frames are counted by demuxing the stream's packets
  (no decoding), which is the count the header would hold.
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
from pathlib import Path

import av
import numpy as np
from PIL import Image

from glmv_jax.data.processor import VideoProcessor
from glmv_jax.errors import DataError

# File suffixes to send here rather than to the frame-folder / animated-image reader.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg",
                            ".ts", ".m2ts", ".3gp", ".flv", ".ogv", ".wmv"})
MAX_FRAME_PIXELS = 7680 * 4320        # one frame: 8K UHD
MAX_SAMPLED_PIXELS = 1_500_000_000    # all sampled frames together (4.5 GB as uint8 RGB)
MAX_DECODED_FRAMES = 200_000          # frames walked through (counted or decoded) per file


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


def read_video_file(path, sampler: VideoProcessor | None = None, *,
                    max_frame_pixels: int = MAX_FRAME_PIXELS,
                    max_sampled_pixels: int = MAX_SAMPLED_PIXELS,
                    max_decoded_frames: int = MAX_DECODED_FRAMES) -> VideoClip:
    """Decode the frames of `path` that `sampler` (default `VideoProcessor()`: 2 fps, 300 s) picks.

    Raises DataError (one line, naming the file) when the file is missing, not a video, corrupt or
    truncated, or when a frame, the sampled frames or the frames to walk through exceed the limits.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"video file not found: {path}")
    sampler = sampler or VideoProcessor()
    header = _read_header(path, max_decoded_frames)
    if header.height * header.width > max_frame_pixels:
        raise DataError(f"video file {path}: frames of {header.width}x{header.height} pixels exceed "
                        f"the limit of {max_frame_pixels} pixels a frame")
    indices = _sample(sampler, header, path)
    _check_budget(path, header, indices, max_sampled_pixels, max_decoded_frames)
    frames, decoded = _decode(path, indices, header)
    if frames is None and decoded >= 1 and header.total_frames - decoded <= max(1, math.ceil(header.rate)):
        header = _Header(decoded, header.rate, header.height, header.width)  # header overstated its count
        indices = _sample(sampler, header, path)
        frames, decoded = _decode(path, indices, header)
    if frames is None:
        raise DataError(f"video file {path} is truncated or corrupt: its header promises "
                        f"{header.total_frames} frames, only {decoded} decode")
    return VideoClip(path=str(path), frames=frames, frame_indices=indices, fps=float(header.rate),
                     total_frames=header.total_frames, duration=header.duration)


def process_video_file(path, processor: VideoProcessor | None = None, **limits) -> dict:
    """`processor`'s output for the video file `path`, sampled with the same processor's settings.

    Returns the dict of `VideoProcessor.__call__` ("pixel_values_videos", "video_grid_thw",
    "timestamps", "frame_timestamps"); `limits` go to `read_video_file`. Raises DataError.
    """
    processor = processor or VideoProcessor()
    clip = read_video_file(path, processor, **limits)
    return processor(clip.frames, video_fps=clip.fps, frame_indices=clip.frame_indices)


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
    """A counted stream more than a second shorter than the duration its header states is cut."""
    if stream.duration and stream.time_base:
        stated = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        stated = container.duration / av.time_base
    else:
        return
    found = float(frames / rate)
    if found + 1 < stated:
        raise DataError(f"video file {path} is truncated: its header says {stated:.2f} s, "
                        f"its frames cover {found:.2f} s")


def _sample(sampler: VideoProcessor, header: _Header, path: Path) -> np.ndarray:
    try:
        return sampler.sample_frame_indices(header.total_frames, float(header.rate), header.duration)
    except DataError as e:
        raise DataError(f"video file {path}: {e}") from e


def _check_budget(path: Path, header: _Header, indices: np.ndarray, max_sampled_pixels: int,
                  max_decoded_frames: int) -> None:
    walked = int(indices[-1]) + 1
    if walked > max_decoded_frames:
        raise DataError(f"video file {path}: sampling it means decoding {walked} frames, over the "
                        f"limit of {max_decoded_frames}")
    pixels = len(indices) * header.height * header.width
    if pixels > max_sampled_pixels:
        raise DataError(f"video file {path}: {len(indices)} sampled frames of {header.width}x"
                        f"{header.height} are {pixels} pixels, over the limit of {max_sampled_pixels}")


def _decode(path: Path, indices: np.ndarray, header: _Header) -> tuple[list[Image.Image] | None, int]:
    """(one PIL image per index, frames decoded), or (None, frames decoded) when the stream ends early.

    Walks the decoder from the first frame to the last sampled one, converting only the sampled
    frames (`to_ndarray(format="rgb24")`, as the reference).
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
            decoded += 1
            if decoded > last:
                break
    if decoded <= last:
        return None, decoded
    images = {i: Image.fromarray(a) for i, a in rgb.items()}
    return [images[int(i)] for i in indices], decoded
