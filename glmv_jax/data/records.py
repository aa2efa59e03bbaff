"""Records: one example -> the arrays of one training example (tokens, trained-label mask, image patches).

:func:`example_to_record` formats an example (``data/formats``), decodes its images (:func:`decode_image`),
runs the :class:`ImageProcessor` and ``chat.encode``; :class:`RecordFn` is its never-raising, picklable form for
grain's ``map``, which returns a skip marker (``SKIP_KEY``) for bad data.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from glmv_jax.data import chat
from glmv_jax.data.formats import Format, SkipExample, caption_format, resolve_format
from glmv_jax.data.processor import ImageProcessor, ProcessorError, VideoProcessor, load_image
from glmv_jax.errors import DataError

SKIP_KEY = "__skip__"
RECORD_KEYS = ("input_ids", "mm_token_type_ids", "loss_mask", "pixel_values", "image_grid_thw")


# ------------------------------------------------------------------------------------------- images
def decode_image(image: Any) -> Image.Image:
    """A PIL image from a PIL image, encoded bytes (PNG/JPEG/...), a file path, an HF-datasets style
    ``{"bytes": ..., "path": ...}`` dict, or a uint8 array (H, W[, C]). Raises ``SkipExample("bad_image")``
    (``"missing_image"`` for a path that is not a file).

    Bytes are opened like files (and transformers' ``load_image``): EXIF transpose, then ``convert("RGB")``.
    PIL images are returned as they are (the processor composites alpha onto white, like transformers).
    """
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                return decode_image(image["bytes"])
            if image.get("path"):
                return decode_image(image["path"])
            raise SkipExample("bad_image", "image dict without bytes or path")
        if isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) == 0:
                raise SkipExample("bad_image", "empty image bytes")
            with Image.open(io.BytesIO(bytes(image))) as im:
                im.load()
                return ImageOps.exif_transpose(im).convert("RGB")
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise SkipExample("missing_image", f"image file not found: {image}")
            return load_image(image)
        if isinstance(image, np.ndarray):
            channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
            if image.dtype != np.uint8 or not channels_ok:
                raise SkipExample("bad_image", f"array image must be uint8 (H, W[, 1|3|4]), got {image.dtype} "
                                               f"{image.shape}")
            return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    except SkipExample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipExample("bad_image", f"image too large to decode safely: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError...; ProcessorError for paths
        raise SkipExample("bad_image", f"cannot decode image: {type(e).__name__}: {e}") from e
    raise SkipExample("bad_image", f"unsupported image type {type(image).__name__}")


# ------------------------------------------------------------------------------------------- videos
def video_processor_for(processor: ImageProcessor) -> VideoProcessor:
    """The VideoProcessor with ``processor``'s patch geometry and normalisation (the reference's other defaults)."""
    return VideoProcessor(patch_size=processor.patch_size, temporal_patch_size=processor.temporal_patch_size,
                          merge_size=processor.merge_size, image_mean=processor.image_mean,
                          image_std=processor.image_std)


def decode_video(video: Any, processor: ImageProcessor) -> dict:
    """``process_video_file`` of a video file path (``{"path": ...}`` dicts too), sampled as the reference does,
    with ``processor``'s patch geometry. Raises ``SkipExample("missing_video")`` for a path that is not a file,
    ``"bad_video"`` for a corrupt, truncated or unsupported one, and for a frame larger than the largest image
    ``processor`` makes (which the trainer's framed layout, sized for images, would not hold)."""
    from glmv_jax.data.video import process_video_file

    if isinstance(video, Mapping) and video.get("path"):
        video = video["path"]
    if not isinstance(video, (str, os.PathLike)):
        raise SkipExample("bad_video", f"a video must be a file path, got {type(video).__name__}")
    if not os.path.isfile(video):
        raise SkipExample("missing_video", f"video file not found: {video}")
    try:
        out = process_video_file(video, video_processor_for(processor))
    except (DataError, ProcessorError, ValueError, OSError) as e:
        raise SkipExample("bad_video", str(e)) from e
    _, h, w = (int(x) for x in out["video_grid_thw"][0])
    largest = processor.max_pixels // (processor.temporal_patch_size * processor.patch_size ** 2)
    if h * w > largest:
        raise SkipExample("bad_video", f"{video}: frames of {h}x{w} patches exceed the largest image's "
                                       f"{largest} patches (max_pixels)")
    return out


def _visual_kinds(messages) -> list[str]:
    """"image" / "video" for each media part of the conversation, in order (chat.encode's reading of parts)."""
    kinds = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, (list, tuple)) else ():
            if isinstance(part, Mapping):
                if part.get("type") == "video" or "video" in part:
                    kinds.append("video")
                elif part.get("type") == "image" or "image" in part:
                    kinds.append("image")
    return kinds


def _in_placeholder_order(kinds: list[str], image_pixels, image_grids, videos: list[dict]):
    """(pixel rows, grids) of the images and videos interleaved as their placeholders are."""
    sizes = np.prod(image_grids, axis=1) if len(image_grids) else np.zeros(0, np.int64)
    images = list(zip(np.split(image_pixels, np.cumsum(sizes)[:-1]), image_grids)) if len(image_grids) else []
    video_items = [(np.asarray(v["pixel_values_videos"], np.float32), np.asarray(v["video_grid_thw"][0]))
                   for v in videos]
    queue = {"image": iter(images), "video": iter(video_items)}
    ordered = [next(queue[k]) for k in kinds]
    return (np.concatenate([p for p, _ in ordered]).astype(np.float32),
            np.stack([g for _, g in ordered]).astype(np.int32))


# ------------------------------------------------------------------------------------------ records
def example_to_record(example: Mapping[str, Any], tokenizer, mode: str | Format = "sft",
                      processor: ImageProcessor | None = None, *, require_image: bool | None = None,
                      max_len: int | None = None) -> dict[str, np.ndarray]:
    """One example -> ``{"input_ids", "mm_token_type_ids", "loss_mask", "pixel_values", "image_grid_thw"}``.

    ``input_ids``/``mm_token_type_ids``/``loss_mask`` are int32 (L,), the image placeholder expanded to
    ``t*h*w/4`` ``<|image|>`` tokens per image. The record's ``loss_mask`` marks the tokens that are trained
    *as labels* (chat.encode's mask: the reply and its ``<|endoftext|>``); packing shifts it onto the
    predicting positions. ``pixel_values`` float32 (rows, patch_dim) and ``image_grid_thw`` int32 (images, 3),
    (0, patch_dim) / (0, 3) for a text-only example; ``patch_dim`` is the processor's (1176 for GLM-4.1V).
    Videos are in these arrays too, in placeholder order (module doc), their tokens typed 1.

    ``require_image`` (default: True for ``mode="caption"``, else False) skips examples without an image or
    video. Raises :class:`SkipExample` for bad data (``max_len`` given: ``too_long`` when longer).
    """
    formatter = resolve_format(mode)
    if require_image is None:
        require_image = mode == "caption" or getattr(formatter, "func", formatter) is caption_format
    formatted = formatter(example)
    messages, raw_images = formatted[0], formatted[1]
    raw_videos = list(formatted[2]) if len(formatted) > 2 else []
    if any(x is None for x in raw_images):
        raise SkipExample("missing_image", "an image entry is None")
    if any(x is None for x in raw_videos):
        raise SkipExample("missing_video", "a video entry is None")
    if require_image and not raw_images and not raw_videos:
        raise SkipExample("missing_image", "the example has no image")
    processor = processor or ImageProcessor()
    if raw_images:
        images = [decode_image(x) for x in raw_images]
        try:
            out = processor(images)
        except (ProcessorError, ValueError, OSError) as e:
            raise SkipExample("bad_image", str(e)) from e
        pixel_values = np.asarray(out["pixel_values"], np.float32)
        grids = np.asarray(out["image_grid_thw"], np.int32)
    else:
        pixel_values = np.zeros((0, processor.geometry().patch_dim), np.float32)
        grids = np.zeros((0, 3), np.int32)
    videos = [decode_video(v, processor) for v in raw_videos]
    enc = chat.encode(messages, tokenizer, image_grids=grids, merge_size=processor.merge_size,
                      video_grids=[v["video_grid_thw"][0] for v in videos],
                      video_timestamps=[v["frame_timestamps"] for v in videos])
    types = np.asarray(enc["mm_token_type_ids"], np.int32)
    if videos:
        pixel_values, grids = _in_placeholder_order(_visual_kinds(messages), pixel_values, grids, videos)
        types = np.minimum(types, 1)  # a video's tokens read pixel_values like an image's (module doc)
    record = {
        "input_ids": np.asarray(enc["input_ids"], np.int32),
        "mm_token_type_ids": types,
        "loss_mask": np.asarray(enc["loss_mask"], np.int32),
        "pixel_values": pixel_values,
        "image_grid_thw": grids,
    }
    if not record["loss_mask"].any():
        raise SkipExample("empty_target", "no trained token")
    if max_len is not None and len(record["input_ids"]) > max_len:
        raise SkipExample("too_long", f"{len(record['input_ids'])} tokens > seq_len {max_len}")
    return record


class RecordFn:
    """Picklable ``example -> record or skip marker`` for ``MapDataset.map`` (never raises on bad data)."""

    def __init__(self, tokenizer, mode: str | Format = "sft", processor: ImageProcessor | None = None,
                 require_image: bool | None = None, max_len: int | None = None):
        self.tokenizer, self.mode = tokenizer, mode
        self.processor = processor or ImageProcessor()
        self.require_image, self.max_len = require_image, max_len

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return example_to_record(example, self.tokenizer, self.mode, self.processor,
                                     require_image=self.require_image, max_len=self.max_len)
        except SkipExample as e:
            return {SKIP_KEY: e.reason, "message": e.message, "id": _example_id(example)}
        except Exception as e:  # a broken example must not stop training; it is counted and logged
            return {SKIP_KEY: "bad_example", "message": f"{type(e).__name__}: {e}", "id": _example_id(example)}


def _example_id(example: Any) -> str:
    if isinstance(example, Mapping):
        for key in ("id", "key", "uid", "index"):
            if key in example:
                return str(example[key])[:100]
    return "?"


__all__ = ["RECORD_KEYS", "RecordFn", "SKIP_KEY", "decode_image", "decode_video", "example_to_record",
           "video_processor_for"]
