"""Training metrics: `metrics.jsonl`, TensorBoard scalars and a progress bar on stderr.

* `JsonlWriter`: one JSON object per logged step (`{"step": 10, "loss": ..., ...}`), flushed at once. On a
  resume from step k, records of steps > k (written after the checkpoint the run restarts from) and any
  torn last line are dropped first, so the file holds every logged step once.
* TensorBoard: scalar summaries through `tensorboardX.SummaryWriter` (`WORKDIR/tb/events.out.tfevents.*`);
  a resume from step k purges the events after k, as the JSONL does.
* `Progress`: tqdm on a terminal, else (CI logs, pipes) one plain line per logged step.

Paths go through `etils.epath`, so the workdir may be a URL (gs://...).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

from etils import epath

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# --------------------------------------------------------------------------------------------- JSONL
class JsonlWriter:
    """Appends one JSON object per logged step to `path`; `resume_step` drops records after it first. On a URL
    (object stores do not append) the file is rewritten whole at each record."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_jsonl(self.path) if self.path.exists() else []
        keep = [r for r in records if resume_step is not None and r.get("step", 0) <= resume_step]
        if self.path.exists() and (len(keep) != len(records) or _torn(self.path)):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            tmp.replace(self.path)
        self._text = "".join(json.dumps(r) + "\n" for r in keep)   # the file's content (used on a URL)
        self._file = None if "://" in str(self.path) else self.path.open("a")

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False) + "\n"
        if self._file is None:
            self._text += line
            self.path.write_text(self._text)
        else:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file; a torn last line (a crash mid-write) is skipped."""
    out = []
    for line in epath.Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _torn(path: epath.Path) -> bool:
    text = path.read_bytes()
    return bool(text) and not text.endswith(b"\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """A progress bar on stderr: tqdm on a terminal; elsewhere a plain line at each `log` call."""

    def __init__(self, total: int, initial: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.n = total, initial
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True,
                             mininterval=0.5)
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
    """metrics.jsonl + TensorBoard scalars behind one `write(record)`; records are keyed by `record["step"]`
    (an optimizer step, or an RLCS iteration), and `resume_step` is in the same unit."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True,
                 enabled: bool = True):
        """`enabled=False` writes nothing (every process of a multi-process job but process 0)."""
        workdir = epath.Path(workdir)
        self.jsonl = JsonlWriter(workdir / METRICS_FILE, resume_step) if enabled else None
        self.tb = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / TB_DIR), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(record)
        if self.tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                value = _plain(value)
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, float(value), step)
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["JsonlWriter", "METRICS_FILE", "MetricsWriter", "Progress", "TB_DIR", "read_jsonl"]
