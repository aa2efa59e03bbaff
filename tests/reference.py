"""The numerical ground truth: transformers' Glm4vForConditionalGeneration on tiny random models.

Helpers shared by the parity tests: a random float32 HF model saved to disk and loaded into ours
through the real HF loader, prompt builders for images and videos, and the error measure.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import transformers

from glmv_jax.config import GlmvConfig, to_hf_dict
from glmv_jax.model.rope import token_types


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| over all entries (float64)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def hf_model(config: GlmvConfig, seed: int = 0, layout: str = "5.x", dtype=torch.float32):
    """A transformers model of our config with every parameter random (norms around 1, biases non-zero)."""
    hf_config = transformers.Glm4vConfig.from_dict(to_hf_dict(config, layout=layout))
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name or "position_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5 * (1.0 if p.ndim > 1 else 0.1))
    return model.to(dtype)


def save_hf(model, path, layout: str = "5.x") -> None:
    """save_pretrained, optionally rewriting config.json in the transformers 4.5x layout."""
    model.save_pretrained(path)
    if layout == "4.5x":
        from glmv_jax.config import from_hf_dict
        cfg = from_hf_dict(json.loads((path / "config.json").read_text()))
        (path / "config.json").write_text(json.dumps(to_hf_dict(cfg, layout="4.5x")))


class Prompt:
    """Builds input_ids with GLM's image / video markers, and the matching random pixels and grids."""

    def __init__(self, config: GlmvConfig, seed: int = 0):
        self.cfg = config
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.images: list[np.ndarray] = []
        self.image_grids: list[tuple[int, int, int]] = []
        self.videos: list[np.ndarray] = []
        self.video_grids: list[tuple[int, int, int]] = []

    def text(self, n: int) -> "Prompt":
        self.ids += self.rng.integers(0, 290, n).tolist()
        return self

    def _pixels(self, t, h, w):
        return self.rng.normal(size=(t * h * w, self.cfg.vision.patch_dim)).astype(np.float32)

    def image(self, h: int, w: int) -> "Prompt":
        c, m = self.cfg, self.cfg.vision.spatial_merge_size
        self.ids += [c.image_start_token_id] + [c.image_token_id] * (h * w // m // m) + [c.image_end_token_id]
        self.images.append(self._pixels(1, h, w))
        self.image_grids.append((1, h, w))
        return self

    def video(self, t: int, h: int, w: int, timestamps=None) -> "Prompt":
        c, m = self.cfg, self.cfg.vision.spatial_merge_size
        self.ids.append(c.video_start_token_id)
        for k in range(t):
            self.ids += [c.image_start_token_id] + [c.image_token_id] * (h * w // m // m) + [c.image_end_token_id]
            self.ids += self.rng.integers(0, 290, 1 if timestamps is None else timestamps).tolist()
        self.ids.append(c.video_end_token_id)
        self.videos.append(self._pixels(t, h, w))
        self.video_grids.append((t, h, w))
        return self


def batch(config: GlmvConfig, prompts: list[Prompt], pad_id: int = 299) -> dict[str, np.ndarray | None]:
    """Left-padded numpy batch: input_ids, attention_mask, mm_token_type_ids, pixels and grids."""
    length = max(len(p.ids) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, p in enumerate(prompts):
        ids[row, length - len(p.ids):] = p.ids
        mask[row, length - len(p.ids):] = 1
    images = [x for p in prompts for x in p.images]
    videos = [x for p in prompts for x in p.videos]
    return {
        "input_ids": ids, "attention_mask": mask,
        "mm_token_type_ids": np.asarray(token_types(config, ids)) * mask,
        "pixel_values": np.concatenate(images) if images else None,
        "image_grid_thw": np.array([g for p in prompts for g in p.image_grids], np.int64) if images else None,
        "pixel_values_videos": np.concatenate(videos) if videos else None,
        "video_grid_thw": np.array([g for p in prompts for g in p.video_grids], np.int64) if videos else None,
    }


def hf_logits(model, inputs: dict, position_ids=None) -> np.ndarray:
    """Logits of the HF model on a numpy batch (float32 numpy)."""
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
    dtype = next(model.parameters()).dtype
    for key in ("pixel_values", "pixel_values_videos"):
        if key in kwargs:
            kwargs[key] = kwargs[key].to(dtype)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()
