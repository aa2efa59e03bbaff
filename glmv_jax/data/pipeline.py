"""Grain pipelines: examples -> packed, fixed-shape GLM-4.1V training batches (numpy, one dict per host batch).

Steps (``make_pipeline``)::

    source (len + __getitem__)  -> host shard [i::n] -> seeded shuffle (new order every epoch) -> repeat
      -> map: example -> record   (data/records: data/formats -> decode image -> ImageProcessor -> chat.encode)
      -> to_iter_dataset (ordered thread prefetch)
      -> PackIterDataset (data/packing): best-fit packing over a lookahead buffer into ``batch_size`` rows of
         ``seq_len``; images in data/visual_layout's flat bucketed layout (``VisualBudgets()``, nothing fixed)
      -> [mp_prefetch worker processes]
      -> PipelineIterDataset: pops the per-batch counters into ``iterator.stats`` (PipelineStats)

Batch contract (every batch, every array always present, so a jitted step sees one structure per bucket):

==================== ============ ==================================================================
key                  dtype/shape  meaning
==================== ============ ==================================================================
``input_ids``        int32 (B,T)  packed token ids, 0 on padding
``segment_ids``      int32 (B,T)  1..k for the k examples packed in a row (left to right), 0 = padding
``mm_token_type_ids``int32 (B,T)  0 text, 1 image or video token (0 on padding; see below)
``targets``          int32 (B,T)  ``input_ids[t+1]`` when t+1 is in the same segment, else 0
``loss_mask``        f32   (B,T)  1 where ``targets[t]`` is trained (token t+1 is in the trained span of
                                  the same segment), else 0; never across a boundary, never on padding
``pixel_values``     f32 (N,D)    the images' patch rows, batch-major in placeholder order, zero-padded to
                                  ``N = round_up(bucket(real_rows), merge_size**2)``; no image -> N = 64 zero rows;
                                  ``D`` = the processor's patch_dim (1176 for GLM-4.1V)
``image_grid_thw``   int32 (G,3)  one (t,h,w) row per image in the same order, zero rows up to
                                  ``G = pow2(images)``; no image -> G = 1 zero row
==================== ============ ==================================================================

``B = batch_size`` is per host (see :func:`per_host_batch_size`); ``T = seq_len`` always. Images appear in
the order of their ``<|image|>`` placeholders in the flattened (B, T) ``input_ids``, which is the order the
model's ``get_rope_index`` / embedding merge consumes them. At the end of a finite stream the last batch may
hold fully padded rows (all-zero segment ids).

Videos (``video``/``videos`` file paths, decoded through PyAV by ``data/video``, sampled and timestamped as the
reference processor does) ride in ``pixel_values``/``image_grid_thw`` like images: one grid row ``(t, h, w)``
per video (t frame pairs), in placeholder order among the images, its ``<|image|>`` tokens typed 1 (the model
computes the same as from separate video inputs: ``data/records``' module doc). A video that cannot be
decoded is skipped as ``bad_video`` (``missing_video`` for a path that is not a file).

Per-batch numbers that are not arrays (padding fraction, skip counters) live in :class:`PipelineStats`,
``iterator.stats`` of the iterator returned by ``iter(make_pipeline(...))`` (or :func:`find_stats` when the
iterator is wrapped). Counters are carried inside the batches to the last stage, so they are exact also with
worker processes, and they are part of the checkpointed state.

Bad data never crashes the pipeline: an example whose image is corrupt/undecodable/missing (``bad_image``,
``missing_image``), whose reply is empty (``empty_target``), whose tokens exceed ``seq_len`` (``too_long``)
or whose video is corrupt/unsupported/missing (``bad_video``, ``missing_video``), or that fails in any other
way (``bad_example``) is dropped, counted in ``stats.skipped[reason]`` and logged
as a warning (the first 10 of each reason, then every 1000th).

Checkpointing: every stage is a grain ``DatasetIterator`` with a JSON-serialisable ``get_state``/
``set_state``; the packer stores the parent state before its oldest buffered example plus which of the
examples read since then are still buffered, and replays them on restore, so a restored iterator yields
exactly the same batches. With orbax use ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` (handler ``grain.checkpoint.CheckpointHandler``), or the orbax v1
``save``/``load`` methods every grain ``DatasetIterator`` has.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import grain
import numpy as np

from glmv_jax.data.formats import Format
from glmv_jax.data.packing import STATS_KEY, PackIterDataset
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.records import RecordFn


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
    vision = (processor or ImageProcessor()).geometry()
    ds = PackIterDataset(ds, seq_len=seq_len, batch_size=batch_size, pack_buffer=pack_buffer, vision=vision)
    if worker_count > 0:
        _allow_unparsed_grain_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer))
    return PipelineIterDataset(ds)


__all__ = ["PipelineIterDataset", "PipelineIterator", "PipelineStats", "find_stats", "make_pipeline",
           "per_host_batch_size"]
