"""The demo's evaluation of one stage (`evaluate_stage`): `glmv_jax.evaluate` on the held-out prompts (greedy and
sampled accuracy with standard errors, pass@k, the image-swap check), and for the pretraining stage, which never
saw the reply format, the caption NLL with the true and with swapped images (`caption_nll`). `glmv_jax.demo`
calls it after every stage; the result is cached as `EVAL_FILE` in the stage's folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from glmv_jax.shapes import bucket

EVAL_FILE = "demo_eval.json"
VERSION = 3      # the layout of EVAL_FILE (an older file is evaluated again)
N_EXAMPLES = 3   # full answers kept for the report (held-out prompts 0..N_EXAMPLES-1)
SAMPLES = 4      # answers per held-out prompt in the sampled evaluation (at the RL temperature)


def _load_model(folder: Path):
    """(model config, params, tokenizer) of a stage's latest checkpoint."""
    import functools

    import jax

    from glmv_jax.checkpoint.state import TrainCheckpointer
    from glmv_jax.config import load_config
    from glmv_jax.data.tokenizer import Tokenizer
    from glmv_jax.model.glmv import init_params

    model = load_config(folder)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            jax.eval_shape(functools.partial(init_params, model, 0)))
    params = TrainCheckpointer(folder, read_only=True).restore_params(abstract)
    return model, params, Tokenizer.from_file(folder / "tokenizer.model")


def caption_nll(params, model, tokenizer, processor, examples: list[dict], batch: int = 16) -> np.ndarray:
    """(P,) mean NLL per caption token of each example's caption after its image, in the pretraining format
    (`data.formats.caption_format`: the image alone in the user turn, the caption as the reply)."""
    import jax.numpy as jnp

    from glmv_jax.data import chat
    from glmv_jax.data.visual_layout import pad_visual
    from glmv_jax.evaluate import token_nll

    out = []
    for start in range(0, len(examples), batch):
        part = examples[start:start + batch]
        part = part + [part[0]] * (batch - len(part))
        images = [processor([ex["image"]]) for ex in part]
        enc = [chat.encode([{"role": "user", "content": [{"type": "image"}]},
                            {"role": "assistant", "content": ex["caption"]}], tokenizer,
                           image_grids=im["image_grid_thw"], merge_size=model.vision.spatial_merge_size)
               for ex, im in zip(part, images)]
        length = bucket(max(len(e["input_ids"]) for e in enc), minimum=32)
        ids, seg, types, targets, mask = (np.zeros((batch, length), np.int32) for _ in range(5))
        for row, e in enumerate(enc):
            n = len(e["input_ids"])
            ids[row, :n], seg[row, :n], types[row, :n] = e["input_ids"], 1, e["mm_token_type_ids"]
            targets[row, :n - 1], mask[row, :n - 1] = e["input_ids"][1:], e["loss_mask"][1:]
        pixels, grid = pad_visual(np.concatenate([im["pixel_values"] for im in images]),
                                  np.concatenate([im["image_grid_thw"] for im in images]).astype(np.int32),
                                  model.vision)
        visual = {"pixel_values": pixels, "image_grid_thw": grid, "video_grid_thw": None}
        nll = np.asarray(token_nll(params, model, *map(jnp.asarray, (ids, seg, types, targets)), visual))
        out += list((nll * mask).sum(1) / np.maximum(mask.sum(1), 1))
    return np.asarray(out[:len(examples)], np.float64)


def swapped_examples(examples: list[dict]) -> list[dict]:
    """Each example with the image of another of its domain (`benchmark.swap_partners`' derangement)."""
    from glmv_jax.benchmark import items_from_examples, swap_partners

    partners = swap_partners(items_from_examples(examples))
    return [{**ex, "image": examples[j]["image"]} for ex, j in zip(examples, partners)]


def per_prompt_rewards(answers: list[dict], prompt_ids: list[str]) -> dict[str, list[float]]:
    """{"greedy": (P,) the greedy answer's reward, "sampled": (P,) the mean reward of the sampled answers}, in the
    order of `prompt_ids` (`evaluate.run`'s answers: sample -1 is the greedy one)."""
    greedy, sampled = {}, {}
    for a in answers:
        if a["sample"] < 0:
            greedy[a["prompt_id"]] = a["reward"]
        else:
            sampled.setdefault(a["prompt_id"], []).append(a["reward"])
    return {"greedy": [float(greedy[i]) for i in prompt_ids],
            "sampled": [float(np.mean(sampled[i])) for i in prompt_ids]}


def paired_gain(before: dict, after: dict) -> dict[str, tuple[float, float]]:
    """{"greedy" | "sampled": (mean, standard error) of after - before over the same prompts} of two stages'
    evaluations (their "per_prompt" rewards): paired, so the error is that of the per-prompt differences."""
    from glmv_jax.evaluate import mean_and_se

    return {k: mean_and_se(np.asarray(after["per_prompt"][k]) - np.asarray(before["per_prompt"][k]))
            for k in ("greedy", "sampled")}


def evaluate_stage(name: str, folder: Path, rl_cfg, examples: list[dict], step: int | None) -> dict:
    """The held-out evaluation of the stage in `folder`, cached in `folder/demo_eval.json`: through
    `glmv_jax.evaluate` (greedy and sampled accuracy with standard errors, pass@k, the image-swap check), plus
    the full answers of the first `N_EXAMPLES` prompts; for pretraining the caption NLL with the true and with
    swapped images (what pretraining teaches; it never saw the reply format)."""
    cache = folder / EVAL_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("n_prompts") == len(examples) and saved.get("step") == step and saved.get("version") == VERSION:
            return saved
    from glmv_jax import benchmark, evaluate
    from glmv_jax.train.setup import image_processor

    model, params, tokenizer = _load_model(folder)
    processor = image_processor(rl_cfg.data, model.vision)
    result = {"n_prompts": len(examples), "step": step, "version": VERSION, "answers": []}
    if name == "pretrain":
        true = caption_nll(params, model, tokenizer, processor, examples)
        swapped = caption_nll(params, model, tokenizer, processor, swapped_examples(examples))
        result["caption"] = {"nll_true": evaluate.mean_and_se(true), "nll_swapped": evaluate.mean_and_se(swapped),
                             "nll_gap": evaluate.mean_and_se(swapped - true)}
        cache.write_text(json.dumps(result, indent=1))
        return json.loads(cache.read_text())   # as a reused evaluation reads it (pairs as lists)
    r = rl_cfg.rl
    settings = evaluate.EvalSettings(r.max_new_tokens, r.thinking_budget, samples=SAMPLES, temperature=r.temperature,
                                     top_p=r.top_p, batch=32)
    items = benchmark.items_from_examples(examples)
    table, answers = evaluate.run(params, model, tokenizer, benchmark.encode_prompts(items, tokenizer, model,
                                                                                     processor), settings)
    swap = evaluate.swap_check(params, model, tokenizer, items, settings, processor, answers=answers)
    gaps = [x["greedy_true"] - x["greedy_swapped"] for x in swap["lines"]]
    result.update({"table": table, "swap": swap["table"], "swap_gap": evaluate.mean_and_se(gaps),
                   "per_prompt": per_prompt_rewards(answers, [ex["id"] for ex in examples])})
    greedy = {a["prompt_id"]: a for a in answers if a["sample"] < 0}
    for i, ex in enumerate(examples[:N_EXAMPLES]):
        a = greedy[ex["id"]]
        result["answers"].append({"index": i, "id": ex["id"], "domain": ex["domain"], "question": ex["question"],
                                  "response": a["text"], "ground_truth": ex["ground_truth"], "target": ex["target"],
                                  "reward": a["reward"], "format_ok": a["format_ok"], "forced": a["forced"]})
    cache.write_text(json.dumps(result, indent=1, default=str))
    return json.loads(cache.read_text())   # as a reused evaluation reads it (pairs as lists)


__all__ = ["EVAL_FILE", "N_EXAMPLES", "SAMPLES", "caption_nll", "evaluate_stage", "paired_gain", "per_prompt_rewards",
           "swapped_examples"]
