"""The settings and command-line options of `glmv bench` (benchmarks/bench.py), kept apart from the benchmark
so that `glmv --help` builds its parser without importing numpy, jax or torch."""
from __future__ import annotations

import argparse
import dataclasses
import os

SECTIONS = ("prefill", "forward", "train", "decode")
DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "f32", "bfloat16": "bf16"}


@dataclasses.dataclass
class Settings:
    config: str = "small"
    sections: tuple[str, ...] = SECTIONS
    dtypes: tuple[str, ...] = DTYPES
    repeats: int = 3
    train_repeats: int | None = None     # default: repeats
    prefill_batches: tuple[int, ...] = (1, 4)
    train_batch: int = 4
    scan_layers: bool = False            # ours: decoder layers unrolled in the train step (train.scan_layers)
    decode_batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 128
    image_side: int = 448
    text_tokens: int = 256
    matmul_size: int = 2048
    bandwidth_mib: int = 1024
    threads: int = os.cpu_count() or 1
    seed: int = 0



def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `glmv bench` (shared by the `glmv` console script and `python -m benchmarks.bench`)."""
    parser.add_argument("--config", default="small", help="model config (preset name or YAML)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections among {','.join(SECTIONS)} (limits always run)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, among float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=Settings.repeats, help="timed runs per figure (median)")
    parser.add_argument("--train-repeats", type=int, default=None, help="timed train steps (default: --repeats)")
    parser.add_argument("--prefill-batch", type=int, nargs="+", default=list(Settings.prefill_batches))
    parser.add_argument("--train-batch", type=int, default=Settings.train_batch)
    parser.add_argument("--scan-layers", action="store_true", help="our train step with the decoder layers scanned")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=list(Settings.decode_batches))
    parser.add_argument("--new-tokens", type=int, default=Settings.new_tokens)
    parser.add_argument("--image-side", type=int, default=Settings.image_side)
    parser.add_argument("--text-tokens", type=int, default=Settings.text_tokens)
    parser.add_argument("--threads", type=int, default=Settings.threads, help="torch threads (XLA uses every core)")
    parser.add_argument("--backend", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: ours vs transformers on CUDA, bf16, a ~1B model (benchmarks/gpu.py)")
    parser.add_argument("--dry-run", action="store_true", help="with --backend gpu: tiny config and inputs")
    parser.add_argument("--json", default="runs/bench/bench.json")
    parser.add_argument("--png", default="runs/bench/bench.png")
    return parser
