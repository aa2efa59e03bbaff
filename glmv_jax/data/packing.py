"""Packing: records -> host batches of ``batch_size`` rows of exactly ``seq_len`` tokens (the batch contract
is in ``data/pipeline``'s module doc).

A deterministic best fit over a lookahead buffer places whole records in rows (:func:`_fill_rows`);
:func:`collate_rows` writes the rows' token arrays with segment ids and shifted targets/loss masks, and lays the
images out with ``data/visual_layout`` (flat, nothing fixed: bucketed rows). :func:`pack_examples` packs a
list eagerly; :class:`PackIterDataset` is the checkpointable grain stage that skips and counts bad records.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from glmv_jax.config import VisionConfig
from glmv_jax.data import visual_layout
from glmv_jax.data.records import SKIP_KEY

logger = logging.getLogger(__name__)

STATS_KEY = "_stats"
BATCH_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "targets", "loss_mask", "pixel_values",
              "image_grid_thw")


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
                 vision: VisionConfig | None = None) -> dict[str, np.ndarray]:
    """Records already assigned to rows (each row's total length <= seq_len) -> one batch (``data/pipeline``'s
    module doc); the images in ``visual_layout``'s flat bucketed layout for ``vision``'s patch geometry (default:
    GLM-4.1V's, patch_dim 1176, merge 2)."""
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
    vision = vision or VisionConfig()
    pixel_rows = np.concatenate(pixels, axis=0) if pixels else np.zeros((0, vision.patch_dim), np.float32)
    grid_rows = np.concatenate(grids, axis=0) if grids else np.zeros((0, 3), np.int32)
    pixel_values, image_grid_thw, _ = visual_layout.layout(pixel_rows, grid_rows, vision,
                                                           visual_layout.VisualBudgets())
    return {"input_ids": input_ids, "segment_ids": segment_ids, "mm_token_type_ids": types, "targets": targets,
            "loss_mask": loss_mask, "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}


def pack_examples(records: Sequence[Mapping[str, np.ndarray]], seq_len: int, batch_size: int = 1, *,
                  pack_buffer: int = 16, vision: VisionConfig | None = None) -> list[dict[str, np.ndarray]]:
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
        batches.append(collate_rows(rows, seq_len, vision))


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
                 vision: VisionConfig | None = None):
        super().__init__(parent)
        if seq_len < 1 or batch_size < 1 or pack_buffer < 1:
            raise ValueError("seq_len, batch_size and pack_buffer must be positive")
        self.seq_len, self.batch_size, self.pack_buffer, self.vision = seq_len, batch_size, pack_buffer, vision

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), seq_len=self.seq_len, batch_size=self.batch_size,
                            pack_buffer=self.pack_buffer, vision=self.vision)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.seq_len}, batch_size={self.batch_size}, buffer={self.pack_buffer})"


class PackIterator(grain.DatasetIterator):
    """State: ``{"anchor": parent state before the oldest buffered record, "num_read": elements read since,
    "buffered": which of them (relative indices) are still buffered}``; ``set_state`` re-reads them."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, batch_size: int, pack_buffer: int,
                 vision: VisionConfig | None):
        super().__init__(parent)
        self._seq_len, self._batch_size, self._pack_buffer, self._vision = seq_len, batch_size, pack_buffer, vision
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
        batch = collate_rows([[x.record for x in row] for row in rows], self._seq_len, self._vision)
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


__all__ = ["BATCH_KEYS", "PackIterDataset", "PackIterator", "STATS_KEY", "collate_rows", "pack_examples"]
