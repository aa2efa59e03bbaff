"""The one policy that lays out a batch's images and videos as pixel blocks and grids.

A batch's visual inputs arrive as the processor gives them: ``pixels`` (sum of t*h*w patch rows, patch_dim)
and ``grids`` (n, 3) int (t, h, w) rows in placeholder order (zero grid rows, padding, are ignored). The vision
tower takes the pixels in either of two layouts, which compute the same features:

* flat   ``(N, patch_dim)``: the patch rows one after another, zero rows after them;
* framed ``(F, W, patch_dim)``: frame pair f (an image is one frame pair) in row f, W patches wide,
  zero-padded; attention runs per row, so no score crosses images.

and the grids padded with zero rows to G rows. ``patch_dim`` and the merge unit ``m*m`` come from the
:class:`VisionConfig` (``patch_dim = channels * temporal_patch_size * patch_size**2``); N and W are multiples
of ``m*m``. Those shapes are what jit compiles a program for, so the policy takes them from few values, in
one of two modes:

**bucket mode** (``budgets=None``; inference: ``forward``, ``generate``/``sample``, RL update batches, the bench):
``G = pow2(images)``; flat ``N = round_up(bucket(patches), m*m)``; framed ``F = pow2(frame pairs)``,
``W = round_up(pow2(max(largest frame, 16)), m*m)``. Framed is taken when there is more than one frame pair
and it saves cross-image attention scores without padding many more patches: a layout's estimated cost is
rows x (A + keys per query), A = 2 * hidden + 1.5 * intermediate being a patch's dense-layer FLOPs in units of
one key's attention FLOPs.

**fixed mode** (a :class:`VisualBudgets`; training, where the run's config fixes the shapes so every step, and
every host, runs one compiled program): each size is the larger of its budget and the bucket mode's size,
rounded up to ``row_multiple`` (the size of the mesh axes the pixel rows are split over):
``G = max(max_images, pow2(images))``; framed when ``frame_patches > 0``:
``F = round_up(max(max_images, pow2(frame pairs)), row_multiple)``, ``W = frame_patches``; else flat
``N = round_up(max(pixel_rows, round_up(bucket(patches), m*m)), lcm(row_multiple, m*m))``.
A zero budget is not fixed, so ``VisualBudgets()`` is the flat bucketed layout the data pipeline collates its
batches in (and the trainer's budgets then only pad those further). A batch above ``max_images`` or
``pixel_rows`` grows to its own size and :attr:`Layout.overflow` says so (the trainer warns once: another
program compiles); with ``strict=True`` that is a :class:`DataError` instead (the same shapes on every host).
A frame larger than ``frame_patches`` is always a DataError.

:func:`abstract_shapes` gives fixed mode's shapes from counts alone (the AOT plan), :func:`bucket_shapes` bucket mode's.

**blocks** (:func:`layout_blocks`; the trainer, on one or many hosts): a batch's rows are cut into S equal
groups, one per shard of the batch over the mesh's (data, fsdp) axes, and each group's images are laid out
on their own, in fixed mode, as a *block*: pixels (S, N, patch_dim) or framed (S, F, W, patch_dim), grids
(S, G, 3), every block padded to the same shapes. A block means to the model exactly what its rows' images
mean (``model/vision``, ``rope.get_rope_index`` and the scatter count visual tokens per block), so the
global batch means the same whether one process lays out every block or each host lays out its own, and
no grid or rank depends on another host's data. The budgets are then per block; the vision tower's
attention costs S x N^2 scores instead of (S N)^2 for one flat sequence of the whole batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from glmv_jax.config import VisionConfig
from glmv_jax.errors import ConfigError, DataError, InputError
from glmv_jax.shapes import bucket, pow2, round_up


@dataclass(frozen=True)
class VisualBudgets:
    """Fixed visual shapes of one (host) batch; a zero budget is not fixed (bucketed to the batch)."""

    max_images: int = 0      # image_grid_thw rows (and framed: frame rows)
    pixel_rows: int = 0      # flat: pixel_values rows
    frame_patches: int = 0   # > 0: the framed layout, rows of this many patches (one image per row)
    row_multiple: int = 1    # pixel (frame) rows divide by this: the size of the mesh's `patches` axes
    strict: bool = False     # a batch above max_images / pixel_rows is a DataError instead of growing

    def __post_init__(self):
        if min(self.max_images, self.pixel_rows, self.frame_patches) < 0 or self.row_multiple < 1:
            raise ConfigError(f"visual budgets must be non-negative and row_multiple positive, got {self}")

    def validate(self, vision: VisionConfig, max_pixels: int) -> None:
        """ConfigError unless ``frame_patches`` (when set) is a multiple of the merge unit and holds the largest
        image ``max_pixels`` (the processor's limit) allows."""
        unit = vision.spatial_merge_size ** 2
        largest = image_patches(vision, max_pixels)
        if self.frame_patches and (self.frame_patches < largest or self.frame_patches % unit):
            raise ConfigError(f"data.frame_patches = {self.frame_patches} must be a multiple of {unit} and hold the "
                              f"largest image data.max_pixels allows ({largest} patches)")


class Layout(NamedTuple):
    """A laid-out batch: ``pixels`` flat (N, patch_dim) or framed (F, W, patch_dim), ``grids`` int32 (G, 3)
    (the real rows, then zero rows), ``overflow`` {budget name: message} for each budget this batch exceeded."""

    pixels: np.ndarray
    grids: np.ndarray
    overflow: dict[str, str]


def image_patches(vision: VisionConfig, max_pixels: int) -> int:
    """Patches of the largest image the processor's ``max_pixels`` allows (it counts the pixels of the 2-frame
    clip, as transformers does)."""
    return max_pixels // (vision.temporal_patch_size * vision.patch_size ** 2)


def frame_sizes(grids) -> np.ndarray:
    """Patches per frame pair, in order: (sum of t,) int64 (zero grid rows give none)."""
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    return np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])


def flat_rows(patches: int, vision: VisionConfig) -> int:
    """Bucket mode's flat pixel rows for ``patches`` real patches: ``round_up(bucket(patches), m*m)``."""
    return round_up(bucket(patches), vision.spatial_merge_size ** 2)


def layout(pixels, grids, vision: VisionConfig, budgets: VisualBudgets | None = None) -> Layout:
    """Lay out ``pixels`` (patches, patch_dim) of ``grids`` (n, 3): bucket mode without ``budgets``, fixed mode
    with them (module doc). Pixel rows beyond the real patches (earlier padding) are kept as far as they fit."""
    pixels = np.asarray(pixels)
    grids = np.asarray(grids, np.int32).reshape(-1, 3)
    if pixels.ndim != 2 or pixels.shape[1] != vision.patch_dim:
        raise InputError(f"pixel values must have shape (patches, {vision.patch_dim}) for this vision config, got "
                         f"{pixels.shape}")
    real = grids[np.prod(grids, axis=1) > 0]
    if budgets is None:
        return _bucketed(pixels, real, vision)
    sizes = frame_sizes(real)
    shapes, overflow = _fixed_shapes(vision, budgets, images=len(real), frames=len(sizes),
                                     patches=int(sizes.sum()), widest=int(sizes.max(initial=0)))
    grids = _pad_grids(real, shapes["image_grid_thw"][0])
    if budgets.frame_patches:
        frames, width, _ = shapes["pixel_values"]
        return Layout(frame_pixels(pixels, grids, frames, width), grids, overflow)
    return Layout(_pad_rows(pixels, shapes["pixel_values"][0]), grids, overflow)


def split_blocks(pixels, grids, tokens_per_row, blocks: int, vision: VisionConfig) -> list[tuple[np.ndarray, ...]]:
    """Cut a batch's images into ``blocks`` groups of rows: [(pixels (n_s, patch_dim), grids (g_s, 3))] of the
    images whose placeholders lie in rows [s * B / S, (s + 1) * B / S). ``tokens_per_row`` (B,): each row's
    number of visual tokens of this modality; images come in placeholder order, so each block's images follow
    one another in ``pixels`` / ``grids`` (zero grid rows are padding, pixel rows past the real ones too)."""
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    grids = grids[np.prod(grids, axis=1) > 0]
    tokens_per_row = np.asarray(tokens_per_row, np.int64)
    if len(tokens_per_row) % blocks:
        raise InputError(f"{len(tokens_per_row)} rows cannot be cut into {blocks} equal visual blocks")
    patches = np.prod(grids, axis=1)
    token_ends = np.cumsum(patches // vision.spatial_merge_size ** 2)
    block_ends = np.cumsum(tokens_per_row.reshape(blocks, -1).sum(axis=1))
    if (token_ends[-1] if len(token_ends) else 0) != block_ends[-1]:
        raise InputError(f"the rows hold {block_ends[-1]} visual tokens but the grids give "
                         f"{token_ends[-1] if len(token_ends) else 0}")
    image_ends = np.searchsorted(token_ends, block_ends, side="right")
    if not np.array_equal(np.concatenate([[0], token_ends])[image_ends], block_ends):
        raise InputError("an image's placeholders straddle two visual blocks (rows)")
    pixel_ends = np.concatenate([[0], np.cumsum(patches)])
    image_starts = np.concatenate([[0], image_ends[:-1]])
    return [(np.asarray(pixels)[pixel_ends[a]:pixel_ends[b]], grids[a:b].astype(np.int32))
            for a, b in zip(image_starts, image_ends)]


def layout_blocks(pixels, grids, tokens_per_row, blocks: int, vision: VisionConfig,
                  budgets: VisualBudgets) -> Layout:
    """The blocks layout (module doc): each of the ``blocks`` row groups' images laid out in fixed mode with
    ``budgets`` (per block), all padded to the largest block's shapes: pixels (S, N, patch_dim) or framed
    (S, F, W, patch_dim), grids (S, G, 3)."""
    parts = split_blocks(pixels, grids, tokens_per_row, blocks, vision)
    shapes, overflow = [], {}
    for part_pixels, part_grids in parts:
        sizes = frame_sizes(part_grids)
        shape, over = _fixed_shapes(vision, budgets, images=len(part_grids), frames=len(sizes),
                                    patches=int(sizes.sum()), widest=int(sizes.max(initial=0)))
        shapes.append(shape)
        overflow.update(over)
    rows = max(shape["pixel_values"][0] for shape in shapes)
    images = max(shape["image_grid_thw"][0] for shape in shapes)
    common = (VisualBudgets(max(rows, images), 0, budgets.frame_patches, budgets.row_multiple) if budgets.frame_patches
              else VisualBudgets(images, rows, 0, budgets.row_multiple))
    laid = [layout(p, g, vision, common) for p, g in parts]
    return Layout(np.stack([x.pixels for x in laid]), np.stack([x.grids for x in laid]), overflow)


def pad_visual(pixels, grid, vision: VisionConfig):
    """Bucket mode for optional inputs (what forward, generate and RL updates call): (pixels, grids) laid out,
    or (None, None) when ``grid`` is None."""
    if grid is None:
        return None, None
    return layout(pixels, grid, vision)[:2]


def abstract_shapes(vision: VisionConfig, budgets: VisualBudgets, *, images: int, patches: int,
                    frames: int | None = None, widest: int = 0) -> dict[str, tuple[int, ...]]:
    """Fixed mode's ``{"pixel_values": shape, "image_grid_thw": shape}`` for a batch of ``images`` grids
    (``frames`` frame pairs, default one per image) holding ``patches`` patches, the largest frame ``widest``."""
    shapes, _ = _fixed_shapes(vision, budgets, images=images, frames=images if frames is None else frames,
                              patches=patches, widest=widest)
    return shapes


def frame_pixels(pixels: np.ndarray, grid: np.ndarray, frames: int, width: int) -> np.ndarray:
    """Flat pixel rows (N, patch_dim) of `grid` (zero rows allowed) -> the framed layout (frames, width, patch_dim):
    frame pair f of the grid order in row f, zero-padded. Raises InputError if they do not fit."""
    sizes = frame_sizes(grid)
    if len(sizes) > frames or (len(sizes) and sizes.max() > width):
        raise InputError(f"{len(sizes)} frames of up to {sizes.max() if len(sizes) else 0} patches do not fit "
                         f"a framed layout of {frames} x {width}")
    out = np.zeros((frames, width, pixels.shape[1]), pixels.dtype)
    for f, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
        out[f, :size] = pixels[start:start + size]
    return out


# ------------------------------------------------------------------------------------------- the modes
def bucket_shapes(vision: VisionConfig, sizes, images: int) -> dict[str, tuple[int, ...]]:
    """Bucket mode's ``{"pixel_values": shape, "image_grid_thw": shape}`` for ``images`` grids whose frame pairs
    hold ``sizes`` patches (in order): framed (F, W, patch_dim) when cheaper, else flat (N, patch_dim)."""
    unit = vision.spatial_merge_size ** 2
    sizes = np.asarray(sizes, np.int64)
    flat = flat_rows(int(sizes.sum()), vision)
    frames, width = pow2(len(sizes)), round_up(pow2(max(int(sizes.max(initial=0)), 16)), unit)
    per_patch = 2 * vision.hidden_size + 1.5 * vision.intermediate_size
    framed = len(sizes) > 1 and frames * width * (per_patch + width) < flat * (per_patch + flat)
    pixels = (frames, width, vision.patch_dim) if framed else (flat, vision.patch_dim)
    return {"pixel_values": pixels, "image_grid_thw": (pow2(images), 3)}


def _bucketed(pixels: np.ndarray, grid: np.ndarray, vision: VisionConfig) -> Layout:
    """Bucket mode: the cheaper of the two layouts, padded to shape buckets (module doc)."""
    shapes = bucket_shapes(vision, frame_sizes(grid), len(grid))
    grid = _pad_grids(grid, shapes["image_grid_thw"][0])
    if len(shapes["pixel_values"]) == 3:
        frames, width, _ = shapes["pixel_values"]
        return Layout(frame_pixels(pixels, grid, frames, width), grid, {})
    return Layout(_pad_rows(pixels, shapes["pixel_values"][0]), grid, {})


def _fixed_shapes(vision: VisionConfig, b: VisualBudgets, *, images: int, frames: int, patches: int,
                  widest: int) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Fixed mode's shapes and the budgets exceeded (raises DataError for a frame wider than frame_patches, and
    for any exceeded budget when strict)."""
    unit = vision.spatial_merge_size ** 2
    overflow = {}
    needed = max(pow2(images), pow2(frames) if b.frame_patches else 0)
    if b.max_images and needed > b.max_images:
        overflow["max_images"] = (f"a batch has {needed} image rows > data.max_images = {b.max_images}; it compiles "
                                  "another program (raise data.max_images)")
    shapes = {"image_grid_thw": (max(b.max_images, pow2(images)), 3)}
    if b.frame_patches:
        if widest > b.frame_patches:
            raise DataError(f"an image of {widest} patches does not fit a frame row of data.frame_patches = "
                            f"{b.frame_patches} (raise data.frame_patches or lower data.max_pixels)")
        frame_rows = round_up(max(b.max_images, pow2(frames)), b.row_multiple)
        shapes["pixel_values"] = (frame_rows, b.frame_patches, vision.patch_dim)
    else:
        bucketed = flat_rows(patches, vision)
        if b.pixel_rows and bucketed > b.pixel_rows:
            overflow["pixel_rows"] = (f"a batch has {bucketed} pixel rows > data.pixel_rows = {b.pixel_rows}; it is "
                                      "padded to its own bucket, which compiles another program (raise "
                                      "data.pixel_rows)")
        rows = round_up(max(b.pixel_rows, bucketed), math.lcm(b.row_multiple, unit))
        shapes["pixel_values"] = (rows, vision.patch_dim)
    if overflow and b.strict:
        raise DataError("the batch exceeds its fixed visual budgets: " + "; ".join(overflow.values()))
    return shapes, overflow


def _pad_grids(grids: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([grids, np.zeros((rows - len(grids), 3), np.int32)])


def _pad_rows(pixels: np.ndarray, rows: int) -> np.ndarray:
    """`pixels` zero-padded (or cut back to) `rows` rows; the array itself when it has them."""
    if len(pixels) == rows:
        return pixels
    out = np.zeros((rows, pixels.shape[1]), pixels.dtype)
    n = min(rows, len(pixels))
    out[:n] = pixels[:n]
    return out


__all__ = ["Layout", "VisualBudgets", "abstract_shapes", "bucket_shapes", "flat_rows", "frame_pixels", "frame_sizes",
           "image_patches", "layout", "layout_blocks", "pad_visual", "split_blocks"]
