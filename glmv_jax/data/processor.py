"""GLM-4.1V image and video pre-processing with numpy and PIL (no torch).

Images are exact to transformers 5.x `Glm4vImageProcessorPil` (the PIL backend): same RGB
conversion, `smart_resize`, PIL bicubic resize, rescale/normalise arithmetic and patch layout.
Videos reproduce `Glm4vVideoProcessor`'s frame sampling, grid and timestamps exactly; their pixels
differ slightly because the reference resizes videos with torchvision (see `VideoProcessor`).

Output rows (both): `C * T * P * P = 3 * 2 * 14 * 14 = 1176` floats per row, ordered (c, t, ph, pw)
inside a row. Rows of one temporal slice follow the 2x2 merge-window order (block row, block col,
row in window, col in window); temporal slices follow one another. A grid row is (t, h, w) in
patches: `rows = t * h * w`, merged tokens `= rows / merge_size**2`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from glmv_jax.config import VisionConfig
from glmv_jax.errors import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ProcessorError(DataError):
    """An input the processors cannot turn into patch rows (missing or corrupt file, bad size...)."""


# ----------------------------------------------------------------------------------------------
# Sizes


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2,
                 factor: int = 28, min_pixels: int = 112 * 112,
                 max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144) -> tuple[int, int]:
    """Target (height, width), multiples of `factor`, as transformers 5.x computes them.

    Sides below `factor` are first scaled up by `max(factor/H, factor/W)` (int truncation). Then
    each side is rounded to a multiple of `factor` (Python `round`: half to even) and, if the clip
    `t * h * w` (t = num_frames rounded to `temporal_factor`) leaves [min_pixels, max_pixels],
    both sides are rescaled by a common factor (floored when too big, ceiled when too small).
    `min_pixels`/`max_pixels` are pixel counts of the whole clip, not edge lengths.

    Raises ValueError when num_frames < temporal_factor, a side is not positive, or the aspect
    ratio (after the upscale) exceeds 200.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got {height}x{width} (height x width)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    aspect = max(height, width) / min(height, width)
    if aspect > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {aspect}")

    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(grid_thw, merge_size: int = 2):
    """Merged `<|image|>` tokens of a grid: `t * h * w // merge_size**2`.

    `grid_thw` of shape (3,) gives an int; shape (n, 3) gives an int64 array (n,).
    """
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.shape[-1:] != (3,):
        raise ValueError(f"grid_thw must have shape (3,) or (n, 3), got {grid.shape}")
    tokens = grid.prod(axis=-1) // merge_size**2
    return int(tokens) if tokens.ndim == 0 else tokens


# ----------------------------------------------------------------------------------------------
# Decoding and RGB conversion


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file the way transformers' `load_image` does: EXIF transpose, then RGB.

    PIL's decompression-bomb guard stays on. Note that the reference drops alpha here with a
    plain `convert("RGB")` (no white compositing, unlike an already-open RGBA image).

    Raises ProcessorError naming the file when it is missing, undecodable, truncated or too big.
    """
    path = Path(path)
    if not path.is_file():
        raise ProcessorError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as e:
        raise ProcessorError(f"image file {path} is too large to decode safely: {e}") from e
    except Exception as e:  # PIL decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise ProcessorError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, converted like transformers' `convert_to_rgb`.

    Images with an alpha band ("A" in the bands, e.g. RGBA, LA, PA) or a `transparency` entry
    (palette/tRNS) are composited onto white; every other mode (L, P, I, I;16, F, 1, CMYK, ...)
    goes through PIL's `convert("RGB")`.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.array(image.convert("RGB"))
    except ValueError as e:
        raise ProcessorError(f"cannot convert a mode {image.mode!r} image to RGB: {e}") from e


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with PIL's bicubic (a = -0.5, antialiased)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


# ----------------------------------------------------------------------------------------------
# Normalisation and patch rows


def normalize_pil(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., 3) -> float32, as the PIL backend: `f32(x * (1/255) in f64)`, then (x-m)/s in f32."""
    scaled = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize_fused(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., 3) -> float32, as the torchvision backend: `(x - 255 m) / (255 s)` in f32."""
    mean255 = np.asarray(mean, np.float32) * np.float32(255.0)
    std255 = np.asarray(std, np.float32) * np.float32(255.0)
    return (rgb.astype(np.float32) - mean255) / std255


def pad_frames(frames: np.ndarray, multiple: int) -> np.ndarray:
    """(F, ...) -> (F', ...) with F' a multiple of `multiple`, repeating the last frame."""
    pad = -frames.shape[0] % multiple
    if pad == 0:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)


def patchify(frames: np.ndarray, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(F, H, W, C) float32 -> rows (t*gh*gw, C*T*P*P) and grid (t, gh, gw).

    F must be a multiple of `temporal_patch_size`, H and W multiples of `patch_size * merge_size`.
    Rows follow (t, block row, block col, row in window, col in window); a row is (c, t, ph, pw).
    """
    f, h, w, c = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    gt, gh, gw = f // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    # axes: 0 t, 1 tp, 2 bh, 3 mh, 4 ph, 5 bw, 6 mw, 7 pw, 8 c  ->  (t, bh, bw, mh, mw, c, tp, ph, pw)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


# ----------------------------------------------------------------------------------------------
# Images


class ImageProcessor:
    """Images -> `pixel_values` (N, 1176) float32 and `image_grid_thw` (n_images, 3) int64.

    Exact to transformers' `Glm4vImageProcessorPil` built with the same `size`. The defaults
    `min_pixels=12544`, `max_pixels=9633792` are the published GLM-4.1V-9B-Thinking
    `preprocessor_config.json` values (`size.shortest_edge` / `size.longest_edge`; the transformers
    class default longest_edge is 28*28*15000). They count the pixels of the two-frame image (each
    image is duplicated to `temporal_patch_size` frames), so one image gets at most
    `max_pixels / 2` pixels = 6144 merged tokens.
    """

    def __init__(self, min_pixels: int = 12544, max_pixels: int = 9633792, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.merge_size = merge_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def geometry(self) -> VisionConfig:
        """The vision tower's patch geometry these pixels follow (patch, temporal patch and merge sizes, RGB;
        the other fields default): ``.patch_dim`` is the length of a ``pixel_values`` row (1176 for GLM-4.1V),
        and ``data/visual_layout`` lays the pixels out by it."""
        return VisionConfig(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                            spatial_merge_size=self.merge_size, in_channels=3)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) of an image of this size (ValueError as `smart_resize`)."""
        return smart_resize(self.temporal_patch_size, height, width,
                            temporal_factor=self.temporal_patch_size,
                            factor=self.patch_size * self.merge_size,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def __call__(self, images) -> dict[str, np.ndarray]:
        """`images`: a PIL image, a file path (str / PathLike), or a list/tuple of them.

        Returns {"pixel_values": float32 (sum of t*h*w, 1176), "image_grid_thw": int64 (n, 3)}.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ProcessorError("no images given")
        rows, grids = [], []
        for i, item in enumerate(items):
            rgb, name = self._to_rgb(item, i)
            image_rows, grid = self.process_rgb(rgb, name)
            rows.append(image_rows)
            grids.append(grid)
        return {"pixel_values": np.concatenate(rows, axis=0),
                "image_grid_thw": np.asarray(grids, dtype=np.int64)}

    def process_rgb(self, rgb: np.ndarray, name: str = "image") -> tuple[np.ndarray, tuple]:
        """(H, W, 3) uint8 -> rows (gh*gw, 1176) float32 and grid (1, gh, gw)."""
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            raise ProcessorError(f"{name}: image is empty ({width}x{height} pixels)")
        try:
            new_h, new_w = self.target_size(height, width)
        except ValueError as e:
            raise ProcessorError(f"{name} ({width}x{height} pixels): {e}") from e
        image = normalize_pil(resize_bicubic(rgb, new_h, new_w), self.image_mean, self.image_std)
        frames = np.broadcast_to(image, (self.temporal_patch_size, *image.shape))
        return patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)

    @staticmethod
    def _to_rgb(item, index: int) -> tuple[np.ndarray, str]:
        if isinstance(item, Image.Image):
            return pil_to_rgb(item), f"image {index}"
        if isinstance(item, (str, os.PathLike)):
            return pil_to_rgb(load_image(item)), f"image file {item}"
        raise TypeError(f"image {index}: expected a PIL image or a file path, got {type(item).__name__}")


# ----------------------------------------------------------------------------------------------
# Videos


class VideoProcessor:
    """Video frames -> `pixel_values_videos` (N, 1176), `video_grid_thw` (1, 3), `timestamps`.

    Mirrors transformers' `Glm4vVideoProcessor` (defaults: sample `fps=2` frames per second,
    `max_duration=300` s, `min_pixels=12544`, `max_pixels=28*28*2*30000 = 47_040_000`, pixel
    counts for the whole sampled clip `T * h * w`). Frame sampling, the grid and the timestamps are
    exact. Pixels are not bit-exact: the reference resizes videos with torchvision (antialiased
    bicubic on uint8 tensors), which cannot run here, while this resizes each frame with PIL's
    bicubic (uint8), so values differ slightly near edges. Normalisation uses the reference's fused
    torchvision arithmetic `(x - 255 mean) / (255 std)`.
    """

    def __init__(self, fps: float = 2, max_duration: int = 300, min_pixels: int = 112 * 112,
                 max_pixels: int = 28 * 28 * 2 * 30000, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD):
        self.fps, self.max_duration = fps, max_duration
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.merge_size = merge_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def sample_frame_indices(self, total_frames: int, video_fps: float,
                             duration: float | None = None) -> np.ndarray:
        """Indices (even count, int64) of the frames to keep, as the reference samples them.

        `duration` defaults to `total_frames / video_fps`, what the reference's video decoders
        report. Up to `max_duration` s: `floor(duration * fps)` (at least 1) frames at
        `ceil(i * video_fps / fps)`; longer: `max_duration * fps` frames at `ceil(t * video_fps)`
        for t in linspace(0, duration) (or every frame if there are not more than that). Indices
        are clamped to the last frame, de-duplicated in order, and an odd count repeats the last.
        """
        if total_frames < 1:
            raise ProcessorError(f"a video needs at least one frame, got {total_frames}")
        _check_fps(video_fps)
        max_idx = total_frames - 1
        duration = total_frames / video_fps if duration is None else duration
        duration = duration or round(max_idx / video_fps) + 1
        if duration <= self.max_duration:
            n = max(int(math.floor(duration * self.fps)), 1)
            indices = [min(max_idx, int(math.ceil(i * video_fps / self.fps))) for i in range(n)]
        else:
            num_samples = int(self.max_duration * self.fps)
            if num_samples >= total_frames:
                indices = list(range(total_frames))
            else:
                seconds = np.linspace(0, duration, num_samples, endpoint=True)
                indices = [min(max_idx, int(math.ceil(t * video_fps))) for t in seconds]
        unique = list(dict.fromkeys(indices))
        if len(unique) % 2:
            unique.append(unique[-1])
        return np.asarray(unique, dtype=np.int64)

    def __call__(self, frames, video_fps: float,
                 frame_indices: Sequence[int] | None = None) -> dict:
        """Process one video.

        `frames`: a decoded video (F, H, W, 3) uint8, sampled here with `sample_frame_indices`;
        or a list of PIL images already sampled (kept as they are, converted like images), whose
        original frame indices are `frame_indices` (default 0..F-1).
        `video_fps`: frame rate of the original video; timestamps are `index / video_fps`.

        Returns {"pixel_values_videos": float32 (T/2 * h/14 * w/14, 1176),
        "video_grid_thw": int64 (1, 3) = [[T/2, h/14, w/14]] (an odd T is padded with its last
        frame), "timestamps": one int per frame pair, `int(index / video_fps)` of its first frame,
        "frame_timestamps": seconds of every sampled frame (what `chat.encode(video_timestamps=...)` takes)}.
        """
        _check_fps(video_fps)
        if isinstance(frames, np.ndarray):
            if frame_indices is not None:
                raise ProcessorError("frame_indices is only for a list of already-sampled frames")
            rgb = _check_video_array(frames)
            indices = self.sample_frame_indices(len(rgb), video_fps)
            rgb = rgb[indices]
        elif isinstance(frames, (list, tuple)):
            rgb = _stack_pil_frames(frames)
            indices = np.arange(len(rgb)) if frame_indices is None else np.asarray(frame_indices)
            if len(indices) != len(rgb):
                raise ProcessorError(f"{len(indices)} frame_indices for {len(rgb)} frames")
        else:
            raise TypeError(f"frames must be a (F, H, W, 3) uint8 array or a list of PIL images, "
                            f"got {type(frames).__name__}")
        rows, grid = self.process_rgb_frames(rgb)
        return {"pixel_values_videos": rows,
                "video_grid_thw": np.asarray([grid], dtype=np.int64),
                "timestamps": frame_pair_timestamps(indices, video_fps, grid[0]),
                "frame_timestamps": [float(i) / video_fps for i in indices]}

    def process_rgb_frames(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Sampled frames (T, H, W, 3) uint8 -> rows (T/2 * gh * gw, 1176) and grid (T/2, gh, gw)."""
        num_frames, height, width = rgb.shape[:3]
        try:
            new_h, new_w = smart_resize(num_frames, height, width,
                                        temporal_factor=self.temporal_patch_size,
                                        factor=self.patch_size * self.merge_size,
                                        min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise ProcessorError(f"video of {num_frames} frames of {width}x{height}: {e}") from e
        resized = np.stack([resize_bicubic(frame, new_h, new_w) for frame in rgb])
        video = pad_frames(normalize_fused(resized, self.image_mean, self.image_std),
                           self.temporal_patch_size)
        return patchify(video, self.patch_size, self.merge_size, self.temporal_patch_size)


def frame_pair_timestamps(frame_indices: Sequence[int], video_fps: float, grid_t: int) -> list[int]:
    """`int(index / video_fps)` of every second frame, cut or padded (last value) to `grid_t`."""
    stamps = [idx / video_fps for idx in frame_indices][::2][:grid_t]
    while len(stamps) < grid_t:
        stamps.append(stamps[-1] if stamps else 0)
    return [int(s) for s in stamps]


def _check_fps(video_fps: float) -> None:
    if not (isinstance(video_fps, (int, float, np.number)) and math.isfinite(video_fps)
            and video_fps > 0):
        raise ProcessorError(f"video_fps must be a positive number, got {video_fps!r}")


def _check_video_array(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ProcessorError(f"a video array must be (F, H, W, 3) uint8, got {frames.shape} "
                             f"{frames.dtype}")
    if min(frames.shape[:3]) == 0:
        raise ProcessorError(f"video is empty: shape {frames.shape}")
    return frames


def _stack_pil_frames(frames: Sequence[Image.Image]) -> np.ndarray:
    if not frames:
        raise ProcessorError("a video needs at least one frame, got an empty list")
    if not all(isinstance(f, Image.Image) for f in frames):
        raise TypeError("a list of video frames must hold PIL images only")
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ProcessorError(f"all video frames must have one size, got {sorted(sizes)}")
    if 0 in frames[0].size:
        raise ProcessorError(f"video frames are empty ({frames[0].size[0]}x{frames[0].size[1]})")
    return np.stack([pil_to_rgb(f) for f in frames])
