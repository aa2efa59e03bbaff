"""A streaming safetensors reader and writer over numpy (bfloat16 through ml_dtypes), no pickle anywhere.

Reading memory-maps each file and hands out one tensor at a time; writing lays out the header from
the shapes first, then writes tensors one by one, so neither ever holds a whole model in memory.
Headers are untrusted: sizes, dtypes and offsets are checked before any data is touched.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from glmv_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(CheckpointError):
    """A safetensors file that is malformed, truncated or not what was expected."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: `header[key] = (dtype, shape)`, `tensor(key)` memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{self.path}: header length {n} is larger than the file allows")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self.header: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: bad header entry for {key!r}: {info}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has offsets {begin}..{end} that do not fit "
                                       f"its shape {shape} {info['dtype']} or the file size {size} (truncated?)")
            self.header[key] = (dtype, shape)
            self._offsets[key] = (begin, end)
        self._map = None

    def tensor(self, key: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (no copy)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        dtype, shape = self.header[key]
        begin, end = self._offsets[key]
        return self._map[self._data_start + begin:self._data_start + end].view(dtype).reshape(shape)


def write_safetensors(path: str | Path, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors named in `specs` (key, dtype, shape), calling `produce(key)` for each one in turn."""
    specs = list(specs)
    header, offset = {}, 0
    for key, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, dtype, shape in specs:
            array = np.ascontiguousarray(produce(key), dtype=dtype)
            if array.shape != tuple(shape):
                raise SafetensorsError(f"{key}: produced shape {array.shape}, header says {tuple(shape)}")
            f.write(array.tobytes())
    tmp.replace(path)
