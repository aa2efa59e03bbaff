"""Shared set-up for benchmarks: the same random weights in transformers and in glmv-jax, timing helpers."""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np


def paired_models(config_name: str = "small", seed: int = 0):
    """(config, torch model in eval mode, our params) holding the same random float32 weights."""
    config, model, params = model_pair(config_name, seed)
    return config, model, params["float32"]


def model_pair(config_name: str = "small", seed: int = 0, dtypes: tuple[str, ...] = ("float32",)):
    """(config, float32 torch model in eval mode, {dtype: our params}): one set of random weights, saved
    by transformers' `save_pretrained` and read back through our HF converter once per dtype."""
    import torch
    import transformers

    from glmv_jax import load_config, load_hf_checkpoint
    from glmv_jax.config import to_hf_dict

    config = load_config(config_name)
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig.from_dict(to_hf_dict(config))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        params = {dtype: load_hf_checkpoint(Path(tmp), dtype=dtype)[1] for dtype in dtypes}
    return config, model, params


def image_prompt(config, batch: int, image_side: int = 448, text_tokens: int = 256, seed: int = 0) -> dict:
    """Each row: [gMASK]-like text, one image of image_side^2 pixels, more text; numpy arrays as transformers takes them."""
    rng = np.random.default_rng(seed)
    v = config.vision
    grid = image_side // v.patch_size
    n_image = grid * grid // v.spatial_merge_size ** 2
    special = [config.image_token_id, config.video_token_id, config.image_start_token_id, config.image_end_token_id,
               config.video_start_token_id, config.video_end_token_id, config.text.pad_token_id,
               *np.atleast_1d(config.text.eos_token_id if config.text.eos_token_id is not None else [])]
    high = min([1000, config.text.vocab_size] + [int(i) for i in special if i is not None])  # plain text ids
    row = (rng.integers(0, high, text_tokens // 2).tolist() + [config.image_start_token_id]
           + [config.image_token_id] * n_image + [config.image_end_token_id]
           + rng.integers(0, high, text_tokens - text_tokens // 2).tolist())
    ids = np.array([row] * batch, np.int64)
    pixels = rng.normal(size=(batch * grid * grid, v.patch_dim)).astype(np.float32)
    types = (ids == config.image_token_id).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "mm_token_type_ids": types,
            "pixel_values": pixels, "image_grid_thw": np.array([[1, grid, grid]] * batch, np.int64)}


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn (a, b, a, b, ...) so machine drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_timings(runs: dict[str, Callable[[], dict[str, float] | None]], repeats: int) -> dict[str, dict]:
    """Like `interleaved_medians`, for callables that time parts of themselves: each returns a dict of seconds
    (or None); the result holds, per callable, the median of each part and of the whole call ("total")."""
    parts: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            timed = fn() or {}
            total = time.perf_counter() - start
            for key, seconds in {"total": total, **timed}.items():
                parts[name].setdefault(key, []).append(seconds)
    return {name: {k: statistics.median(v) for k, v in p.items()} for name, p in parts.items()}


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory() -> None:
    """Hand memory that malloc keeps after frees back to the OS (glibc `malloc_trim`; no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager sampling the process RSS every `period` s: `.growth` = peak - RSS at entry, in bytes.

    Free heap memory is returned to the OS at entry, so that re-used freed memory shows up again. Still a
    coarse measure; the sampling thread costs some CPU, so use it around a warm-up call, not a timed one.
    """

    def __init__(self, period: float = 0.002):
        self.period, self.base, self.peak = period, 0, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        release_free_memory()
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return max(self.peak - self.base, 0)
