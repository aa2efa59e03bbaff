"""Training metrics: `metrics.jsonl`, TensorBoard scalars and a progress bar on stderr.

* `JsonlWriter`: one JSON object per logged step (`{"step": 10, "loss": ..., ...}`), flushed at once. On a
  resume from step k, records of steps > k (written after the checkpoint the run restarts from) and any
  torn last line are dropped first, so the file holds every logged step once.
* `TensorBoardWriter`: scalar summaries in a TensorBoard event file (`WORKDIR/tb/events.out.tfevents.*`),
  written here in pure Python: TensorFlow (which `flax.metrics.tensorboard` needs) is not installed and
  neither is `tensorboardX`. The file is a TFRecord stream (length, masked CRC-32C, payload, masked CRC-32C)
  of `Event` protocol buffers ({wall_time, step, summary {value {tag, simple_value}}}), hand-encoded; the
  format is TensorBoard's own and stable. `read_events` reads such a file back (tests, notebooks).
* `Progress`: tqdm on a terminal, else (CI logs, pipes) one plain line per logged step.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# --------------------------------------------------------------------------------------------- JSONL
class JsonlWriter:
    """Appends one JSON object per logged step to `path`; `resume_step` drops records after it first."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_jsonl(self.path) if self.path.exists() else []
        keep = [r for r in records if resume_step is not None and r.get("step", 0) <= resume_step]
        if self.path.exists() and (len(keep) != len(records) or _torn(self.path)):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a crash mid-write) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _torn(path: Path) -> bool:
    text = path.read_bytes()
    return bool(text) and not text.endswith(b"\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------- TensorBoard
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """An `Event` proto: wall_time (1, double), step (2, int64), file_version (3), summary (5)."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
                           for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


def tfrecord(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


class TensorBoardWriter:
    """Scalars into a new event file under `logdir` (one file per run; TensorBoard merges them)."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.glmv"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(encode_event(0, time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        scalars = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if scalars:
            self._file.write(tfrecord(encode_event(int(step), time.time(), scalars)))
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path) -> Iterator[dict]:
    """Decode an event file written by `TensorBoardWriter` (CRCs checked): {"step", "wall_time", "scalars"}."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if crc != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + length]
        (crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if crc != _masked_crc(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        pos += 16 + length
        yield _decode_event(payload)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def _decode_event(buf: bytes) -> dict:
    event: dict[str, Any] = {"step": 0, "wall_time": 0.0, "scalars": {}}
    for number, value in _fields(buf):
        if number == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            event["step"] = value
        elif number == 3:
            event["file_version"] = value.decode()
        elif number == 5:
            for n, item in _fields(value):
                if n == 1:
                    parts = dict(_fields(item))
                    if 1 in parts and 2 in parts:
                        event["scalars"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
    return event


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """A progress bar on stderr: tqdm on a terminal; elsewhere a plain line at each `log` call."""

    def __init__(self, total: int, initial: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.n = total, initial
        self._bar = None
        if self.stream.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True,
                                 mininterval=0.5)
            except ImportError:
                pass
        self._start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def log(self, record: Mapping[str, Any]) -> None:
        shown = {k: record[k] for k in ("loss", "eval_loss", "grad_norm", "lr", "tokens_per_s") if k in record}
        text = " ".join(f"{k}={_short(v)}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        else:
            elapsed = time.perf_counter() - self._start
            print(f"step {self.n}/{self.total} {text} [{elapsed:.0f}s]", file=self.stream, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsWriter:
    """metrics.jsonl + TensorBoard scalars behind one `write(record)`."""

    def __init__(self, workdir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        workdir = Path(workdir)
        self.jsonl = JsonlWriter(workdir / METRICS_FILE, resume_step)
        self.tb = TensorBoardWriter(workdir / TB_DIR) if tensorboard else None

    def write(self, record: Mapping[str, Any]) -> None:
        self.jsonl.write(record)
        if self.tb is not None:
            self.tb.scalars(int(record["step"]), {k: _plain(v) for k, v in record.items()})

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["JsonlWriter", "METRICS_FILE", "MetricsWriter", "Progress", "TB_DIR", "TensorBoardWriter", "crc32c",
           "read_events", "read_jsonl"]
