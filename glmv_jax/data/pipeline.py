"""Grain pipelines: examples -> packed, fixed-shape GLM-4.1V training batches (numpy, one dict per host batch).

Steps (``make_pipeline``)::

    source (len + __getitem__)  -> host shard [i::n] -> seeded shuffle (new order every epoch) -> repeat
      -> map: example -> record   (format -> decode image -> ImageProcessor -> chat.encode)
      -> to_iter_dataset (ordered thread prefetch)
      -> PackIterDataset: best-fit packing over a lookahead buffer into ``batch_size`` rows of ``seq_len``
      -> [mp_prefetch worker processes]
      -> PipelineIterDataset: pops the per-batch counters into ``iterator.stats`` (PipelineStats)

Batch contract (every batch, every array always present, so a jitted step sees one structure per bucket):

==================== ============ ==================================================================
key                  dtype/shape  meaning
==================== ============ ==================================================================
``input_ids``        int32 (B,T)  packed token ids, 0 on padding
``segment_ids``      int32 (B,T)  1..k for the k examples packed in a row (left to right), 0 = padding
``mm_token_type_ids``int32 (B,T)  0 text, 1 image token, 2 video token (0 on padding)
``targets``          int32 (B,T)  ``input_ids[t+1]`` when t+1 is in the same segment, else 0
``loss_mask``        f32   (B,T)  1 where ``targets[t]`` is trained (token t+1 is in the trained span of
                                  the same segment), else 0; never across a boundary, never on padding
``pixel_values``     f32 (N,1176) the images' patch rows, batch-major in placeholder order, zero-padded to
                                  ``N = round_up(bucket(real_rows), 4)``; no image -> N = 64 zero rows
``image_grid_thw``   int32 (G,3)  one (t,h,w) row per image in the same order, zero rows up to
                                  ``G = pow2(images)``; no image -> G = 1 zero row
==================== ============ ==================================================================

``B = batch_size`` is per host (see :func:`per_host_batch_size`); ``T = seq_len`` always. Images appear in
the order of their ``<|image|>`` placeholders in the flattened (B, T) ``input_ids``, which is the order the
model's ``get_rope_index`` / embedding merge consumes them. At the end of a finite stream the last batch may
hold fully padded rows (all-zero segment ids). Videos are not produced by this pipeline.

Per-batch numbers that are not arrays (padding fraction, skip counters) live in :class:`PipelineStats`,
``iterator.stats`` of the iterator returned by ``iter(make_pipeline(...))`` (or :func:`find_stats` when the
iterator is wrapped). Counters are carried inside the batches to the last stage, so they are exact also with
worker processes, and they are part of the checkpointed state.

Bad data never crashes the pipeline: an example whose image is corrupt/undecodable/missing (``bad_image``,
``missing_image``), whose reply is empty (``empty_target``), whose tokens exceed ``seq_len`` (``too_long``)
or that fails in any other way (``bad_example``) is dropped, counted in ``stats.skipped[reason]`` and logged
as a warning (the first 10 of each reason, then every 1000th).

Checkpointing: every stage is a grain ``DatasetIterator`` with a JSON-serialisable ``get_state``/
``set_state``; the packer stores the parent state before its oldest buffered example plus which of the
examples read since then are still buffered, and replays them on restore, so a restored iterator yields
exactly the same batches. With orbax use ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` (handler ``grain.checkpoint.CheckpointHandler``), or the orbax v1
``save``/``load`` methods every grain ``DatasetIterator`` has.
"""
from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageOps

from glmv_jax.data import chat
from glmv_jax.data.processor import ImageProcessor, ProcessorError, load_image
from glmv_jax.shapes import bucket, pow2, round_up
from glmv_jax.errors import DataError

logger = logging.getLogger(__name__)

PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch
SKIP_KEY = "__skip__"
STATS_KEY = "_stats"
BATCH_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "targets", "loss_mask", "pixel_values",
              "image_grid_thw")
RECORD_KEYS = ("input_ids", "mm_token_type_ids", "loss_mask", "pixel_values", "image_grid_thw")


class SkipExample(DataError):
    """An example that cannot become a training record; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------- formats
# A format turns one example into (messages for chat.encode, the raw images of its image parts in order).
Format = Callable[[Mapping[str, Any]], "tuple[list[dict], list[Any]]"]


def _images_of(example: Mapping[str, Any]) -> list[Any]:
    image = example.get("image", example.get("images"))
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]


def _reply(text: Any, what: str) -> str:
    if text is None or not str(text).strip():
        raise SkipExample("empty_target", f"the {what} is empty")
    return str(text)


def caption_format(example: Mapping[str, Any], instruction: str | None = None) -> tuple[list[dict], list[Any]]:
    """Pretraining caption: user turn = the image(s) (plus ``instruction`` if given), assistant reply = the
    whole caption (``caption``, else ``target``), so the loss covers every caption token and the end token.
    Bind an instruction with ``functools.partial(caption_format, instruction="Describe the image.")``."""
    caption = example.get("caption") or example.get("target")
    caption = _reply(caption, "caption")
    images = _images_of(example)
    content: list[dict] = [{"type": "image"} for _ in images]
    if instruction:
        content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": caption}], images


def sft_format(example: Mapping[str, Any]) -> tuple[list[dict], list[Any]]:
    """SFT: user turn = image(s) + ``question``, assistant reply = ``target`` (loss on the reply only). An
    example without an image is a text-only example (unless ``require_image``)."""
    target = _reply(example.get("target"), "target")
    images = _images_of(example)
    content: list[dict] = [{"type": "image"} for _ in images]
    question = example.get("question") or ""
    if question:
        content.append({"type": "text", "text": str(question)})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": target}], images


def llava_format(example: Mapping[str, Any]) -> tuple[list[dict], list[Any]]:
    """LLaVA-style ``{"image": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``.

    ``<image>`` in a human turn becomes an image part (if no turn has one, the images go in front of the first
    human turn). chat.encode trains the final reply only; earlier replies are history.
    """
    turns = example.get("conversations") or []
    images = _images_of(example)
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages: list[dict] = []
    placed = any("<image>" in str(t.get("value", "")) for t in turns)
    for turn in turns:
        role = roles.get(turn.get("from", turn.get("role")))
        if role is None:
            raise SkipExample("bad_example", f"unknown conversation role {turn.get('from')!r}")
        text = str(turn.get("value", turn.get("content", "")))
        if role != "user":
            messages.append({"role": role, "content": text})
            continue
        content: list[dict] = []
        if not placed:
            content += [{"type": "image"} for _ in images]
            placed = True
        has_tag = "<image>" in text
        for k, piece in enumerate(text.split("<image>")):
            if k:
                content.append({"type": "image"})
            piece = piece.strip("\n") if has_tag else piece  # "<image>\nquestion" -> image, "question"
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise SkipExample("empty_target", "the conversation does not end with an assistant reply")
    _reply(messages[-1]["content"], "final reply")
    return messages, images


FORMATS: dict[str, Format] = {"caption": caption_format, "sft": sft_format, "llava": llava_format}


def resolve_format(mode: str | Format) -> Format:
    if callable(mode):
        return mode
    try:
        return FORMATS[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(FORMATS)} or a callable") from None


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


# ------------------------------------------------------------------------------------------ records
def example_to_record(example: Mapping[str, Any], tokenizer, mode: str | Format = "sft",
                      processor: ImageProcessor | None = None, *, require_image: bool | None = None,
                      max_len: int | None = None) -> dict[str, np.ndarray]:
    """One example -> ``{"input_ids", "mm_token_type_ids", "loss_mask", "pixel_values", "image_grid_thw"}``.

    ``input_ids``/``mm_token_type_ids``/``loss_mask`` are int32 (L,), the image placeholder expanded to
    ``t*h*w/4`` ``<|image|>`` tokens per image. The record's ``loss_mask`` marks the tokens that are trained
    *as labels* (chat.encode's mask: the reply and its ``<|endoftext|>``); packing shifts it onto the
    predicting positions. ``pixel_values`` float32 (rows, 1176) and ``image_grid_thw`` int32 (images, 3),
    (0, 1176) / (0, 3) for a text-only example.

    ``require_image`` (default: True for ``mode="caption"``, else False) skips examples without an image.
    Raises :class:`SkipExample` for bad data (``max_len`` given: ``too_long`` when longer).
    """
    formatter = resolve_format(mode)
    if require_image is None:
        require_image = mode == "caption" or getattr(formatter, "func", formatter) is caption_format
    messages, raw_images = formatter(example)
    if any(x is None for x in raw_images):
        raise SkipExample("missing_image", "an image entry is None")
    if require_image and not raw_images:
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
        pixel_values = np.zeros((0, PATCH_DIM), np.float32)
        grids = np.zeros((0, 3), np.int32)
    enc = chat.encode(messages, tokenizer, image_grids=grids, merge_size=processor.merge_size)
    record = {
        "input_ids": np.asarray(enc["input_ids"], np.int32),
        "mm_token_type_ids": np.asarray(enc["mm_token_type_ids"], np.int32),
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


# ------------------------------------------------------------------------------------------ packing
def _fill_rows(buffer: list, refill: Callable[[], None], num_rows: int, seq_len: int,
               length: Callable[[Any], int]) -> list[list]:
    """Fill ``num_rows`` rows of ``seq_len`` from ``buffer`` (taken in place), deterministic best fit.

    Buffered items are visited oldest first; each goes to the row with the least free space that still
    holds it (lowest row on ties) or stays buffered for a later batch. ``refill()`` tops the buffer up after
    every placement, so the scan looks ``pack_buffer`` items ahead. Any item fits an empty row, so the oldest
    item is always placed and nothing waits forever.
    """
    rows: list[list] = [[] for _ in range(num_rows)]
    space = [seq_len] * num_rows
    i = 0
    while True:
        refill()
        if i >= len(buffer):
            return rows
        n = length(buffer[i])
        best = -1
        for r in range(num_rows):
            if n <= space[r] and (best < 0 or space[r] < space[best]):
                best = r
        if best < 0:
            i += 1
            continue
        rows[best].append(buffer.pop(i))
        space[best] -= n


def collate_rows(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], seq_len: int,
                 merge_size: int = 2) -> dict[str, np.ndarray]:
    """Records already assigned to rows (each row's total length <= seq_len) -> one batch (module doc)."""
    b = len(rows)
    input_ids = np.zeros((b, seq_len), np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    types = np.zeros((b, seq_len), np.int32)
    targets = np.zeros((b, seq_len), np.int32)
    loss_mask = np.zeros((b, seq_len), np.float32)
    pixels: list[np.ndarray] = []
    grids: list[np.ndarray] = []
    for r, row in enumerate(rows):
        pos = 0
        for k, rec in enumerate(row, start=1):
            ids = np.asarray(rec["input_ids"], np.int32)
            n = len(ids)
            if pos + n > seq_len:
                raise ValueError(f"row {r} holds {pos + n} tokens > seq_len {seq_len}")
            end = pos + n
            input_ids[r, pos:end] = ids
            segment_ids[r, pos:end] = k
            types[r, pos:end] = rec["mm_token_type_ids"]
            targets[r, pos:end - 1] = ids[1:]
            loss_mask[r, pos:end - 1] = np.asarray(rec["loss_mask"][1:], np.float32)
            pos = end
            grid = rec.get("image_grid_thw")
            if grid is not None and len(grid):
                grids.append(np.asarray(grid, np.int32).reshape(-1, 3))
                pixels.append(np.asarray(rec["pixel_values"], np.float32))
    real = sum(len(p) for p in pixels)
    n_rows = round_up(bucket(real), merge_size * merge_size)
    pixel_values = np.zeros((n_rows, PATCH_DIM), np.float32)
    if pixels:
        pixel_values[:real] = np.concatenate(pixels, axis=0)
    grid_rows = np.concatenate(grids, axis=0) if grids else np.zeros((0, 3), np.int32)
    image_grid_thw = np.zeros((pow2(len(grid_rows)), 3), np.int32)
    image_grid_thw[:len(grid_rows)] = grid_rows
    return {"input_ids": input_ids, "segment_ids": segment_ids, "mm_token_type_ids": types, "targets": targets,
            "loss_mask": loss_mask, "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}


def pack_examples(records: Sequence[Mapping[str, np.ndarray]], seq_len: int, batch_size: int = 1, *,
                  pack_buffer: int = 16, merge_size: int = 2) -> list[dict[str, np.ndarray]]:
    """Pack ``records`` (in order) into batches of ``batch_size`` rows exactly as the pipeline does.

    Returns the list of batches (the last one may hold empty rows). Raises ``ValueError`` for a record longer
    than ``seq_len`` (the pipeline drops those as ``too_long`` instead).
    """
    if seq_len < 1 or batch_size < 1 or pack_buffer < 1:
        raise ValueError("seq_len, batch_size and pack_buffer must be positive")
    source = iter(records)
    buffer: list = []

    def refill():
        while len(buffer) < pack_buffer:
            try:
                rec = next(source)
            except StopIteration:
                return
            if len(rec["input_ids"]) > seq_len:
                raise ValueError(f"a record of {len(rec['input_ids'])} tokens does not fit seq_len {seq_len}")
            buffer.append(rec)

    batches = []
    while True:
        refill()
        if not buffer:
            return batches
        rows = _fill_rows(buffer, refill, batch_size, seq_len, lambda rec: len(rec["input_ids"]))
        batches.append(collate_rows(rows, seq_len, merge_size))


@dataclass
class _Buffered:
    rel: int            # index among the parent elements read since the anchor state
    state: Any          # parent state just before this element was read
    record: dict
    length: int


class _LogLimiter:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def warn(self, reason: str, example_id: str, message: str):
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= 10 or n % 1000 == 0:
            logger.warning("skipping example %s (%s, #%d of this kind in this process): %s",
                           example_id, reason, n, message)


def _new_counts() -> dict[str, Any]:
    return {"examples": 0, "skipped": {}}


class PackIterDataset(grain.IterDataset):
    """Records (or skip markers) -> packed batches of ``batch_size`` rows of ``seq_len`` tokens.

    Each batch carries its counters under ``"_stats"`` (popped by :class:`PipelineIterDataset`).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, pack_buffer: int = 16,
                 merge_size: int = 2):
        super().__init__(parent)
        if seq_len < 1 or batch_size < 1 or pack_buffer < 1:
            raise ValueError("seq_len, batch_size and pack_buffer must be positive")
        self.seq_len, self.batch_size, self.pack_buffer, self.merge_size = seq_len, batch_size, pack_buffer, merge_size

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), seq_len=self.seq_len, batch_size=self.batch_size,
                            pack_buffer=self.pack_buffer, merge_size=self.merge_size)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.seq_len}, batch_size={self.batch_size}, buffer={self.pack_buffer})"


class PackIterator(grain.DatasetIterator):
    """State: ``{"anchor": parent state before the oldest buffered record, "num_read": elements read since,
    "buffered": which of them (relative indices) are still buffered}``; ``set_state`` re-reads them."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, batch_size: int, pack_buffer: int,
                 merge_size: int):
        super().__init__(parent)
        self._seq_len, self._batch_size, self._pack_buffer, self._merge = seq_len, batch_size, pack_buffer, merge_size
        self._log = _LogLimiter()
        self._reset(copy.deepcopy(self._parent.get_state()))

    def _reset(self, anchor):
        self._anchor = anchor
        self._num_read = 0
        self._buffer: list[_Buffered] = []
        self._exhausted = False
        self._pending = _new_counts()

    def _read_one(self):
        state = copy.deepcopy(self._parent.get_state())
        try:
            item = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return
        rel = self._num_read
        self._num_read += 1
        self._pending["examples"] += 1
        if SKIP_KEY in item:
            self._skip(item[SKIP_KEY], item.get("id", "?"), item.get("message", ""))
            return
        n = len(item["input_ids"])
        if n > self._seq_len:
            self._skip("too_long", "?", f"{n} tokens > seq_len {self._seq_len}")
            return
        self._buffer.append(_Buffered(rel, state, item, n))

    def _skip(self, reason: str, example_id: str, message: str):
        skipped = self._pending["skipped"]
        skipped[reason] = skipped.get(reason, 0) + 1
        self._log.warn(reason, example_id, message)

    def _refill(self):
        while len(self._buffer) < self._pack_buffer and not self._exhausted:
            self._read_one()

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        self._refill()
        if not self._buffer:
            raise StopIteration
        rows = _fill_rows(self._buffer, self._refill, self._batch_size, self._seq_len, lambda x: x.length)
        batch = collate_rows([[x.record for x in row] for row in rows], self._seq_len, self._merge)
        batch[STATS_KEY] = self._pending
        self._pending = _new_counts()
        # re-anchor at the oldest record still buffered (or here), so the replay on restore stays short
        if self._buffer:
            base = self._buffer[0].rel
            self._anchor = self._buffer[0].state
            self._num_read -= base
            for x in self._buffer:
                x.rel -= base
        else:
            self._anchor = copy.deepcopy(self._parent.get_state())
            self._num_read = 0
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"anchor": copy.deepcopy(self._anchor), "num_read": self._num_read,
                "buffered": [x.rel for x in self._buffer]}

    def set_state(self, state: dict[str, Any]) -> None:
        anchor = copy.deepcopy(state["anchor"])
        self._parent.set_state(anchor)
        self._reset(anchor)
        keep = {int(i) for i in state["buffered"]}
        for rel in range(int(state["num_read"])):
            before = copy.deepcopy(self._parent.get_state())
            try:
                item = next(self._parent)
            except StopIteration:
                raise ValueError("checkpoint does not match the data: the source ended during the replay of "
                                 "the packing buffer") from None
            if rel in keep:
                if SKIP_KEY in item:
                    raise ValueError("checkpoint does not match the data: a buffered example is now skipped")
                self._buffer.append(_Buffered(rel, before, item, len(item["input_ids"])))
        self._num_read = int(state["num_read"])

    def __str__(self) -> str:
        return f"PackIterator(seq_len={self._seq_len}, batch_size={self._batch_size})"


# -------------------------------------------------------------------------------------------- stats
@dataclass
class PipelineStats:
    """Counters of one pipeline iterator (updated as batches leave it; restored with its state)."""

    examples: int = 0            # examples read from the source (packed + skipped + still buffered)
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    packed_examples: int = 0
    batches: int = 0
    sequences: int = 0
    empty_sequences: int = 0     # fully padded rows (end of a finite stream)
    token_positions: int = 0
    padding_tokens: int = 0
    trained_tokens: int = 0
    images: int = 0
    patches: int = 0             # real pixel rows
    pixel_rows: int = 0          # pixel rows after bucketing
    last_padding_fraction: float = 0.0   # of the last batch

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def padding_fraction(self) -> float:
        """Share of all token positions so far that are padding."""
        return self.padding_tokens / self.token_positions if self.token_positions else 0.0

    def update(self, batch: Mapping[str, np.ndarray], counts: Mapping[str, Any] | None) -> None:
        if counts:
            self.examples += int(counts.get("examples", 0))
            for reason, n in counts.get("skipped", {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
        seg = batch["segment_ids"]
        pad = int((seg == 0).sum())
        self.batches += 1
        self.sequences += seg.shape[0]
        self.empty_sequences += int((seg.max(axis=1) == 0).sum())
        self.packed_examples += int(seg.max(axis=1).sum())
        self.token_positions += seg.size
        self.padding_tokens += pad
        self.trained_tokens += int(batch["loss_mask"].sum())
        patches = np.prod(batch["image_grid_thw"].astype(np.int64), axis=1)
        self.images += int((patches > 0).sum())
        self.patches += int(patches.sum())
        self.pixel_rows += int(batch["pixel_values"].shape[0])
        self.last_padding_fraction = pad / seg.size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = dict(self.skipped)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineStats:
        return cls(**{**d, "skipped": dict(d.get("skipped", {}))})

    def summary(self) -> dict[str, Any]:
        """Flat dict for logging."""
        return {**{k: v for k, v in self.to_dict().items() if k != "skipped"},
                **{f"skipped_{k}": v for k, v in sorted(self.skipped.items())},
                "skipped_total": self.skipped_total, "padding_fraction": self.padding_fraction}


class PipelineIterDataset(grain.IterDataset):
    """Last stage: pops each batch's counters into ``iterator.stats``."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "PipelineIterDataset"


class PipelineIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.stats = PipelineStats()

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = dict(next(self._parent))
        counts = batch.pop(STATS_KEY, None)
        self.stats.update(batch, counts)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "stats": self.stats.to_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.stats = PipelineStats.from_dict(state["stats"])

    def __str__(self) -> str:
        return "PipelineIterator"


def find_stats(iterator: grain.DatasetIterator) -> PipelineStats:
    """The :class:`PipelineStats` of a pipeline iterator, also when later stages wrap it."""
    todo = [iterator]
    while todo:
        it = todo.pop(0)
        if isinstance(it, PipelineIterator):
            return it.stats
        todo.extend(getattr(it, "_parents", ()))
    raise ValueError(f"{iterator} is not (and does not wrap) a glmv_jax pipeline iterator")


# --------------------------------------------------------------------------------------- the pipeline
def per_host_batch_size(global_batch_size: int, shard_count: int | None = None) -> int:
    """``global_batch_size / shard_count`` (default: jax.process_count()); raises when it does not divide."""
    if shard_count is None:
        import jax

        shard_count = jax.process_count()
    if global_batch_size % shard_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {shard_count} hosts")
    return global_batch_size // shard_count


def _allow_unparsed_grain_flags() -> None:
    """grain 0.2.x reads the absl flag ``grain_enable_multiprocess_worker_profiling`` when an mp_prefetch iterator
    starts, which raises ``UnparsedFlagAccessError`` in programs that never parse absl flags once jax is loaded
    (google/grain#1355, fixed upstream by falling back to the default). Mark just that flag as given (its default
    value stays), as grain itself does for its debug flags in worker processes."""
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


def make_pipeline(source, *, tokenizer, mode: str | Format = "sft", seq_len: int, batch_size: int, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None, shard_index: int | None = None,
                  shard_count: int | None = None, processor: ImageProcessor | None = None, pack_buffer: int = 16,
                  require_image: bool | None = None, even_shards: bool = True, read_threads: int = 2,
                  read_buffer: int = 32, worker_count: int = 0, worker_buffer: int = 2) -> grain.IterDataset:
    """A grain ``IterDataset`` of packed host batches (module doc); ``iter()`` gives a checkpointable iterator
    with ``.stats``.

    Args:
      source: random-access examples (``len`` + ``__getitem__``, e.g. a list, a grain data source or a
        ``grain.MapDataset``), each a dict as the format of ``mode`` reads it.
      tokenizer: a :class:`glmv_jax.data.tokenizer.Tokenizer`.
      mode: ``"caption"``, ``"sft"``, ``"llava"`` or a format callable ``example -> (messages, images)``.
      seq_len, batch_size: every batch is ``batch_size`` (per host) rows of exactly ``seq_len`` tokens.
      seed, shuffle: seeded global shuffle of this host's shard, a different order every epoch.
      num_epochs: ``None`` repeats forever (use this for multi-host training and count steps).
      shard_index, shard_count: this host reads examples ``shard_index::shard_count`` (default
        ``jax.process_index()`` / ``jax.process_count()``); ``even_shards`` first drops the last
        ``len % shard_count`` examples so every host has the same number.
      processor: the :class:`ImageProcessor` (default: the GLM-4.1V settings).
      pack_buffer: lookahead of the best-fit packer, in examples.
      require_image: skip examples without an image (default: only in caption mode).
      read_threads, read_buffer: grain ``ReadOptions`` of the example -> record map (ordered, deterministic).
      worker_count, worker_buffer: if > 0, run everything up to packing in that many processes
        (``mp_prefetch``); deterministic for a fixed worker count, but the batches differ between counts.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    if even_shards and shard_count > 1:
        ds = ds[: len(ds) // shard_count * shard_count]
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of a source of {len(source)} examples is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(RecordFn(tokenizer, mode, processor, require_image, max_len=seq_len))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer))
    merge = (processor or ImageProcessor()).merge_size
    ds = PackIterDataset(ds, seq_len=seq_len, batch_size=batch_size, pack_buffer=pack_buffer, merge_size=merge)
    if worker_count > 0:
        _allow_unparsed_grain_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer))
    return PipelineIterDataset(ds)


__all__ = ["BATCH_KEYS", "FORMATS", "PackIterDataset", "PipelineIterDataset", "PipelineIterator", "PipelineStats",
           "RECORD_KEYS", "RecordFn", "SkipExample", "caption_format", "collate_rows", "decode_image",
           "example_to_record", "find_stats", "llava_format", "make_pipeline", "pack_examples",
           "per_host_batch_size", "resolve_format", "sft_format"]
