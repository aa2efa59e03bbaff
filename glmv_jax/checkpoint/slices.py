"""Reading one device's block of a parameter straight from a safetensors file, slicing before transposing.

A loader that fills a sharded parameter asks, per local device, for the block `index` (a tuple of slices of
our leaf, as `jax.make_array_from_callback` passes it). The HF tensor behind it is row-major with its output
dimension first (`(out, in...)`), ours has its input dims first and splits the flat dims (`out = heads *
head_dim` becomes `(heads, head_dim)`). `read_block` reads only the rows of the HF tensor the block needs
(one contiguous byte range per run of rows, with `os.pread` into a fresh buffer: no memory map, so no page of
the file stays resident in the process), then cuts the input dims and transposes that slice alone. The
transient memory of a block is its rows at full input width: 1/tensor of one layer's weight for a
heads/MLP-sharded kernel, and never a whole-tensor copy per device.

Headers are checked by the safetensors library first (`hf.Shard`); this module trusts the offsets it read.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from glmv_jax.errors import CheckpointError

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                "BOOL": np.bool_}
CHUNK_BYTES = 32 << 20  # rows read at once by `read_block`


class TensorFile:
    """A safetensors file read by byte ranges: `rows(key, runs)` gives the rows of tensor `key` (dim 0) in the
    half-open `runs` [(start, stop), ...], concatenated, as a numpy array (R, *shape[1:])."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries = {k: (np.dtype(NUMPY_DTYPES[v["dtype"]]).newbyteorder("<"), tuple(v["shape"]),
                            int(v["data_offsets"][0])) for k, v in header.items()}

    def chunks(self, key: str, runs: list[tuple[int, int]], max_rows: int):
        """(first row's place in the concatenated runs, rows) for `runs` read at most `max_rows` rows at a time."""
        at = 0
        for start, stop in runs:
            for first in range(start, stop, max_rows):
                rows = self.rows(key, [(first, min(first + max_rows, stop))])
                yield at, rows
                at += len(rows)

    def rows(self, key: str, runs: list[tuple[int, int]]) -> np.ndarray:
        dtype, shape, offset = self.entries[key]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        total = sum(stop - start for start, stop in runs)
        out = np.empty((total, *shape[1:]), dtype)
        flat = out.reshape(-1).view(np.uint8) if out.size else np.empty(0, np.uint8)
        at = 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, stop in runs:
                want = (stop - start) * row_bytes
                view = memoryview(flat[at:at + want])
                got = 0
                while got < want:
                    n = os.preadv(fd, [view[got:]], self._base + offset + start * row_bytes + got)
                    if n <= 0:
                        raise CheckpointError(f"{self.path}: tensor {key!r} ends early (truncated file?)")
                    got += n
                at += want
        finally:
            os.close(fd)
        return out


def normalize(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`index` (slices, possibly open or shorter than `shape`) as explicit step-1 slices, one per dim."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided block {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def flat_runs(shape: tuple[int, ...], index: tuple[slice, ...]) -> list[tuple[int, int]]:
    """The half-open runs of flat (row-major) positions of `shape` that the block `index` covers, in order and
    merged where adjacent: (h, hd) cut on h is one run; (2, ti) cut on ti is two."""
    index = normalize(index, shape)
    cut = max((d for d, (s, n) in enumerate(zip(index, shape)) if (s.start, s.stop) != (0, n)), default=-1)
    inner = math.prod(shape[cut + 1:])
    if cut < 0:
        return [(0, inner)] if inner else []
    runs: list[tuple[int, int]] = []
    for outer in np.ndindex(*[s.stop - s.start for s in index[:cut]]):
        base = sum((s.start + i) * math.prod(shape[d + 1:]) for d, (s, i) in enumerate(zip(index[:cut], outer)))
        start, stop = base + index[cut].start * inner, base + index[cut].stop * inner
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        elif stop > start:
            runs.append((start, stop))
    return runs


def split_at(shape: tuple[int, ...], size: int, *, leading: bool) -> int:
    """The k for which prod(shape[:k]) == size (leading) or prod(shape[k:]) == size (trailing)."""
    for k in range(len(shape) + 1):
        if math.prod(shape[:k] if leading else shape[k:]) == size:
            return k
    raise ValueError(f"no split of {shape} has {size} elements {'first' if leading else 'last'}")


def read_block(file: TensorFile, key: str, kind: str, shape: tuple[int, ...], index: tuple, dtype=None,
               chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Block `index` of our leaf `shape` (one layer) from HF tensor `key` of `file`, in `dtype` (default: the
    file's); `kind` as `hf.Tensor.kind`:

    kernel      HF (out, in...) -> ours (*in_dims, *out_dims): rows of the out dims, then in dims cut, transposed;
    downsample  HF (out, c, m, m) -> ours (m*m*c, out), rows ordered (mh, mw, c);
    copy        HF (a, rest...) -> ours, a reshape: rows of ours' leading dims whose product is a.

    The rows are read `chunk_bytes` at a time, each chunk cut and written into the block before the next is
    read: the transient memory is one chunk, whatever the tensor's size.
    """
    file_dtype, hf_shape, _ = file.entries[key]
    dtype = file_dtype if dtype is None else np.dtype(dtype)
    index = normalize(index, shape)
    sizes = tuple(s.stop - s.start for s in index)
    row_bytes = math.prod(hf_shape[1:]) * file_dtype.itemsize
    max_rows = max(1, chunk_bytes // max(row_bytes, 1))
    if kind == "copy":
        k = split_at(shape, hf_shape[0], leading=True)
        out = np.empty((math.prod(sizes[:k]),) + sizes[k:], dtype)
        for at, rows in file.chunks(key, flat_runs(shape[:k], index[:k]), max_rows):
            out[at:at + len(rows)] = rows.reshape((len(rows),) + tuple(shape[k:]))[(slice(None),) + index[k:]]
        return out.reshape(sizes)
    k = split_at(shape, hf_shape[0], leading=False)  # ours[k:] are the out dims
    picked = _flat_in(shape[:k], index[:k])
    out = np.empty((math.prod(sizes[:k]), math.prod(sizes[k:])), dtype)
    for at, rows in file.chunks(key, flat_runs(shape[k:], index[k:]), max_rows):
        if kind == "downsample":
            rows = rows.transpose(0, 2, 3, 1)
        out[:, at:at + len(rows)] = rows.reshape(len(rows), -1)[:, picked].T
    return out.reshape(sizes)


def _flat_in(shape: tuple[int, ...], index: tuple[slice, ...]):
    """Flat positions of the block `index` in the row-major `shape` (a slice when it is one run)."""
    runs = flat_runs(shape, index)
    if len(runs) == 1:
        return slice(*runs[0])
    return np.concatenate([np.arange(a, b) for a, b in runs]) if runs else slice(0, 0)
