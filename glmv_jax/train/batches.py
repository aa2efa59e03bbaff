"""The trainer's batches on one or many hosts: which rows and data shards a process reads, its pipelines, the
visual blocks its rows' images are laid out in, and the global arrays they become.

One global batch of `data.batch_size` rows, split over the mesh's data x fsdp axes; a process holds the rows of
its devices (`distributed.host_rows`) and reads the data shards of those rows (`distributed.data_shards`:
`data.shards` pipelines make up the global batch, one per host by default). Each batch shard of rows (one per
data x fsdp position) has its own *visual block* (`data/visual_layout.layout_blocks`): its images' pixels and
grids, padded to fixed per-block budgets, so a host lays out only its own blocks and the global batch means
what it means on one process. `place` turns a host batch into global arrays (make_array_from_process_local_data).

    host batch (this process's rows; images flat)   --layout_blocks-->   (S_local, N, D) pixels, (S_local, G, 3) grids
      --make_array_from_process_local_data-->   tokens (B, T) over batch x length, pixels (S, N, D) over
                                                 visual_blocks x block_patches, grids (S, G, 3) over visual_blocks
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import jax
import numpy as np

from glmv_jax import sharding as mesh_lib
from glmv_jax.data import visual_layout
from glmv_jax.errors import ConfigError
from glmv_jax.train import distributed

TOKEN_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "targets", "loss_mask")
BATCH_SPECS: dict[str, tuple] = {**{k: ("batch", "length") for k in TOKEN_KEYS},
                                 "pixel_values": ("visual_blocks", "block_patches"),
                                 "image_grid_thw": ("visual_blocks", None, None)}
IMAGE = 1


def block_budgets(data, mesh, vision) -> visual_layout.VisualBudgets:
    """Per-block budgets: `data.pixel_rows` / `data.max_images` (of the global batch) split evenly over the
    data x fsdp blocks; strict (an overflow is a DataError) when several processes train, where every host must
    pad to the same shapes, which needs budgets set (a ConfigError otherwise)."""
    blocks = mesh_lib.axis_size(mesh, mesh_lib.BATCH)
    strict = jax.process_count() > 1
    if strict and not (data.max_images and (data.pixel_rows or data.frame_patches)):
        raise ConfigError("several processes train: set data.max_images and data.pixel_rows (or data.frame_patches) "
                          "so every host pads its images to the same shapes")
    budgets = visual_layout.VisualBudgets(max_images=math.ceil(data.max_images / blocks),
                                          pixel_rows=math.ceil(data.pixel_rows / blocks),
                                          frame_patches=data.frame_patches, row_multiple=mesh.shape["context"],
                                          strict=strict)
    budgets.validate(vision, data.max_pixels)
    return budgets


@dataclass
class HostData:
    """What this process reads: its rows [start, stop) of the global batch, its data shards (of `shard_count`),
    its visual blocks (`local_blocks` of `blocks`)."""

    rows: tuple[int, int]
    shards: list[int]
    shard_count: int
    blocks: int
    local_blocks: int

    @classmethod
    def of(cls, data, mesh) -> HostData:
        rows = distributed.host_rows(mesh, data.batch_size)
        shards, count = distributed.data_shards(data.batch_size, rows, data.shards)
        blocks = mesh_lib.axis_size(mesh, mesh_lib.BATCH)
        return cls(rows, shards, count, blocks, blocks * (rows[1] - rows[0]) // data.batch_size)

    def pipelines(self, source, data, **kwargs) -> list:
        """One pipeline (data/pipeline.make_pipeline) per data shard of this process."""
        from glmv_jax.data.pipeline import make_pipeline

        return [make_pipeline(source, batch_size=data.batch_size // self.shard_count, shard_index=i,
                              shard_count=self.shard_count, **kwargs) for i in self.shards]


class Placer:
    """Host batch -> global batch on the mesh: visual blocks laid out, arrays placed; the first batch's shapes are
    checked against every other process's."""

    def __init__(self, mesh, vision, budgets: visual_layout.VisualBudgets, local_blocks: int):
        self.mesh, self.vision, self.budgets, self.local_blocks = mesh, vision, budgets, local_blocks
        self._checked = False
        self._warned: set[str] = set()

    def layout(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This host's part of the global batch as numpy: tokens and its visual blocks."""
        pixels, grids, overflow = visual_layout.layout_blocks(
            batch["pixel_values"], batch["image_grid_thw"], (batch["mm_token_type_ids"] == IMAGE).sum(axis=1),
            self.local_blocks, self.vision, self.budgets)
        for budget, message in overflow.items():
            if budget not in self._warned:
                self._warned.add(budget)
                print(f"glmv train: warning: {message}", file=sys.stderr)
        return {**{k: batch[k] for k in TOKEN_KEYS}, "pixel_values": pixels, "image_grid_thw": grids}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        local = self.layout(batch)
        if not self._checked:
            distributed.check_same_shapes(local)
            self._checked = True
        return distributed.place(local, self.mesh, BATCH_SPECS)


def eval_batches(datasets: list) -> list[dict[str, np.ndarray]]:
    """Every batch of this host's eval shards (finite pipelines), as many on every process: shards with fewer
    batches are topped up with empty ones (no trained token: they add nothing to the loss), so every host runs
    the same number of eval steps."""
    from glmv_jax.data.pipeline import concat_batches

    per_shard = [list(ds) for ds in datasets]
    count = int(distributed.allgather([max(len(b) for b in per_shard)]).max())
    for batches in per_shard:
        template = batches[0] if batches else per_shard[0][0]
        batches.extend(_empty(template) for _ in range(count - len(batches)))
    if len(per_shard) == 1:
        return per_shard[0]
    return [concat_batches(list(step)) for step in zip(*per_shard)]


def _empty(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of the same rows and length holding nothing (all padding, no image)."""
    out = {k: np.zeros_like(batch[k]) for k in TOKEN_KEYS}
    out["pixel_values"] = np.zeros((0, batch["pixel_values"].shape[-1]), batch["pixel_values"].dtype)
    out["image_grid_thw"] = np.zeros((0, 3), np.int32)
    return out


__all__ = ["BATCH_SPECS", "HostData", "Placer", "TOKEN_KEYS", "block_budgets", "eval_batches"]
