"""Shared set-up for benchmarks: the same random weights in transformers and in glmv-jax, timing helpers."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def paired_models(config_name: str = "small", seed: int = 0):
    """(config, torch model in eval mode, our params) holding the same random float32 weights."""
    import torch
    import transformers

    from glmv_jax import load_config, load_hf_checkpoint
    from glmv_jax.config import to_hf_dict

    config = load_config(config_name)
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig.from_dict(to_hf_dict(config))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        _, params = load_hf_checkpoint(Path(tmp))
    return config, model, params


def image_prompt(config, batch: int, image_side: int = 448, text_tokens: int = 256, seed: int = 0) -> dict:
    """Each row: [gMASK]-like text, one image of image_side^2 pixels, more text; numpy arrays as transformers takes them."""
    rng = np.random.default_rng(seed)
    v = config.vision
    grid = image_side // v.patch_size
    n_image = grid * grid // v.spatial_merge_size ** 2
    row = (rng.integers(0, 1000, text_tokens // 2).tolist() + [config.image_start_token_id]
           + [config.image_token_id] * n_image + [config.image_end_token_id]
           + rng.integers(0, 1000, text_tokens - text_tokens // 2).tolist())
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
