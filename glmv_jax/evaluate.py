"""Evaluate a model on benchmark prompts: `glmv eval`, RL's held-out evaluation and the demo call this.

Answers follow the GLM-4.1V protocol RL trains (``<think>…</think><answer>…<|begin_of_box|>…<|end_of_box|>…``;
with a thinking budget the answer is forced after it: the RL rollout's ``rlcs.sampling_config`` and the
sampler's budget machinery) and are graded by the verifiers registered in ``glmv_jax.rl.rewards``.

API
---
Prompts (``glmv_jax.benchmark``): ``load_benchmark(path) -> [Item]`` (JSONL; every line checked first),
``items_from_examples(synthetic_examples) -> [Item]``, ``encode_prompts(items, tokenizer, config,
processor=None) -> [Prompt]``.

``EvalSettings(max_new_tokens=512, thinking_budget=None, samples=0, temperature=1.0, top_p=1.0, batch=8,
seed=0)``: one greedy answer per prompt, plus ``samples`` (K) sampled ones at ``temperature``/``top_p``.

``run(params, config, tokenizer, prompts, settings, mesh=None) -> (table, answers)``
    ``table``: ``{"overall": row, "<domain>": row, ...}``, row = ``{"n", "greedy_acc", "greedy_se",
    "sampled_acc", "sampled_se", "pass_at_k", "k", "format_ok", "mean_length", "forced"}`` (the sampled
    entries None without samples; a standard error None for fewer than two prompts). ``answers``: one dict per answer, ``{"prompt_id", "domain", "sample"``
    (-1 greedy, 0..K-1 sampled)``, "text", "tokens", "reward", "format_ok", "forced", "length"}``.
``evaluate(params, config, tokenizer, items, settings=EvalSettings(), processor=None) -> table``
    encode and run, the table alone. ``flat_metrics(table)``: ``{"reward", "reward_se", "format_ok",
    "forced", "reward/<domain>"}`` (what RL logs as ``eval_*``).
``reference_nll(params, config, tokenizer, prompts, batch=8) -> (P,)`` the mean negative log-likelihood per
    token of each prompt's reference answer, teacher-forced through the training forward after
    ``benchmark.REPLY_PREFIX`` (an empty thinking, then the box). No generation.
``swap_check(params, config, tokenizer, items, settings=EvalSettings(), processor=None, generate=True,
answers=None) -> {"table": {"overall"|domain: {"n", "nll_true", "nll_swapped"[, "greedy_acc_true",
"greedy_acc_swapped"]}}, "lines": [{"prompt_id", "domain", "partner", "nll_true", "nll_swapped"[, ...]}]}``
    the image-swap check: each image-bearing item against the images of another item of its domain
    (``benchmark.swap_partners``, a deterministic derangement); ``generate=False`` gives the NLLs alone;
    ``answers`` (from ``run``) supplies the true-image greedy rewards instead of generating them again.
``mean_and_se(values) -> (mean, standard error)``; ``format_table``, ``format_swap``, ``write_answers``.

What the numbers are: a reward is the verifier's value in [0, 1] (1/0 for counting and math, partial credit
where a verifier gives it); ``greedy_acc`` is the mean greedy reward over the n prompts; ``sampled_acc`` the mean
over prompts of each prompt's mean over its K samples; each ``_se`` is the standard error of that mean over
prompts, ``std(ddof=1) / sqrt(n)`` of the per-prompt values (samples of one prompt are not independent, so they
are averaged first); ``pass_at_k`` the share of prompts with some sample rewarded > 0.5 (the curriculum's pass
rule); ``format_ok``, ``mean_length`` (generated tokens, the stop token included) and ``forced`` (share whose
answer the thinking budget forced) are over all answers, greedy and sampled.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.benchmark import (REPLY_PREFIX, Item, Prompt, batch_media, encode_prompts, swap_partners,
                                with_swapped_images)
from glmv_jax.config import GlmvConfig
from glmv_jax.data.visual_layout import pad_visual
from glmv_jax.errors import ConfigError, InputError
from glmv_jax.generate.sampler import sample
from glmv_jax.generate.weights import prepare
from glmv_jax.model.glmv import apply, token_inputs
from glmv_jax.ops.logprobs import token_log_probs
from glmv_jax.rl import rlcs
from glmv_jax.rl.config import RLConfig
from glmv_jax.shapes import bucket

PASS_REWARD = 0.5   # a sample "passes" above this reward (pass@K), as the curriculum's offline pass@k counts


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How answers are generated: greedy, plus ``samples`` sampled answers per prompt; ``batch`` rows a call."""

    max_new_tokens: int = 512
    thinking_budget: int | None = None
    samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    batch: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch < 1 or self.samples < 0:
            raise ConfigError(f"need max_new_tokens >= 1, batch >= 1, samples >= 0; got {self.max_new_tokens}, "
                              f"{self.batch}, {self.samples}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ConfigError(f"thinking_budget must not be negative, got {self.thinking_budget}")

    def sampling(self, tokenizer, *, greedy: bool):
        """The RL rollout's SamplingConfig (thinking budget and forced answer included) for these settings."""
        rl = RLConfig(max_new_tokens=self.max_new_tokens, thinking_budget=self.thinking_budget,
                      temperature=self.temperature, top_p=self.top_p)
        return rlcs.sampling_config(rl, tokenizer, greedy=greedy)


# ------------------------------------------------------------------------------------------- answers
def run(params, config: GlmvConfig, tokenizer, prompts: Sequence[Prompt],
        settings: EvalSettings = EvalSettings(), mesh=None) -> tuple[dict, list[dict]]:
    """Greedy (and sampled) answers to ``prompts``, graded: (table, answers) as the module doc says. ``mesh``:
    generate on it (``generate.sampler.sample(mesh=...)``: rows over data x fsdp, heads over tensor)."""
    weights = prepare(params, mesh=mesh, config=config)
    answers = _answers(weights, config, tokenizer, prompts, list(range(len(prompts))), settings, greedy=True,
                       mesh=mesh)
    if settings.samples:
        rows = [r for r in range(len(prompts)) for _ in range(settings.samples)]
        sampled = _answers(weights, config, tokenizer, prompts, rows, settings, greedy=False, mesh=mesh)
        for k, answer in enumerate(sampled):
            answer["sample"] = k % settings.samples
        answers += sampled
    return summarize(answers, settings.samples), answers


def evaluate(params, config: GlmvConfig, tokenizer, items: Sequence[Item], settings: EvalSettings = EvalSettings(),
             processor=None) -> dict:
    """The table of ``run`` on ``items`` (encoded here)."""
    return run(params, config, tokenizer, encode_prompts(items, tokenizer, config, processor), settings)[0]


def _answers(weights, config, tokenizer, prompts, rows: list[int], settings: EvalSettings, *, greedy: bool,
             mesh=None):
    sampling = settings.sampling(tokenizer, greedy=greedy)
    out = []
    for start in range(0, len(rows), settings.batch):
        part = [prompts[r] for r in rows[start:start + settings.batch]]
        n = len(part)
        part += [part[0]] * (settings.batch - n)   # full batches: one compiled program
        inputs = _left_padded(part, sampling.pad_id)
        result = sample(weights, config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        mm_token_type_ids=inputs["token_types"], sampling=sampling, seed=settings.seed + start,
                        mesh=mesh, **batch_media(part))
        tokens, lengths, forced = (np.asarray(x)[:n] for x in (result.tokens, result.lengths, result.forced))
        texts = rlcs.responses(tokens, lengths, tokenizer)
        scores = rlcs.score([{"domain": p.item.domain, "ground_truth": p.item.answer, "id": p.item.id}
                             for p in part[:n]], texts)   # on several processes each scores its share
        for p, text, row, length, was_forced, score in zip(part, texts, tokens, lengths, forced, scores):
            out.append({"prompt_id": p.item.id, "domain": p.item.domain, "sample": -1, "text": text,
                        "tokens": row[:length].tolist(), "reward": float(score["reward"]),
                        "format_ok": bool(score["format_ok"]), "forced": bool(was_forced), "length": int(length)})
    return out


def _left_padded(prompts: Sequence[Prompt], pad_id: int) -> dict[str, np.ndarray]:
    length = max(len(p.input_ids) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[row, length - n:], mask[row, length - n:], types[row, length - n:] = p.input_ids, 1, p.token_types
    return {"input_ids": ids, "attention_mask": mask, "token_types": types}


# --------------------------------------------------------------------------------------------- table
def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean: std with ddof=1 / sqrt(n)); the error is NaN for fewer than 2 values."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def summarize(answers: Sequence[dict], samples: int) -> dict:
    """The table (module doc) of graded answers, per domain and overall."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for a in answers:
        groups[a["domain"]].append(a)
    table = {"overall": _row(answers, samples)}
    table.update({d: _row(groups[d], samples) for d in sorted(groups)})
    return table


def _row(answers: Sequence[dict], samples: int) -> dict:
    greedy = [a["reward"] for a in answers if a["sample"] < 0]
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for a in answers:
        if a["sample"] >= 0:
            per_prompt[a["prompt_id"]].append(a["reward"])
    row = {"n": len(greedy), "k": samples}
    row["greedy_acc"], row["greedy_se"] = _defined(mean_and_se(greedy))
    if samples:
        row["sampled_acc"], row["sampled_se"] = _defined(mean_and_se([np.mean(r) for r in per_prompt.values()]))
        row["pass_at_k"] = float(np.mean([max(r) > PASS_REWARD for r in per_prompt.values()]))
    else:
        row["sampled_acc"] = row["sampled_se"] = row["pass_at_k"] = None
    row["format_ok"] = float(np.mean([a["format_ok"] for a in answers]))
    row["mean_length"] = float(np.mean([a["length"] for a in answers]))
    row["forced"] = float(np.mean([a["forced"] for a in answers]))
    return row


def _defined(pair: tuple[float, float]) -> tuple[float | None, float | None]:
    return tuple(None if math.isnan(x) else x for x in pair)


def flat_metrics(table: dict) -> dict[str, float]:
    """The overall greedy reward, its standard error (NaN below two prompts), format and forced shares, and each
    domain's greedy reward: what RL logs as ``eval_*``."""
    overall = table["overall"]
    se = math.nan if overall["greedy_se"] is None else overall["greedy_se"]   # a number for the metric writers
    return {"reward": overall["greedy_acc"], "reward_se": se, "format_ok": overall["format_ok"],
            "forced": overall["forced"],
            **{f"reward/{d}": row["greedy_acc"] for d, row in table.items() if d != "overall"}}


def _num(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(table: dict) -> str:
    """The table as aligned text: one line per domain, then overall."""
    head = (f"{'domain':<14}{'n':>5}  {'greedy':>14}  {'sampled':>14}  {'pass@k':>7}  {'format':>7}  "
            f"{'length':>7}  {'forced':>7}")
    lines = [head]
    for name in [d for d in table if d != "overall"] + ["overall"]:
        r = table[name]
        lines.append(f"{name:<14}{r['n']:>5}  {_num(r['greedy_acc']):>6} ± {_num(r['greedy_se']):<5}  "
                     f"{_num(r['sampled_acc']):>6} ± {_num(r['sampled_se']):<5}  {_num(r['pass_at_k']):>7}  "
                     f"{_num(r['format_ok']):>7}  {_num(r['mean_length'], '.1f'):>7}  {_num(r['forced']):>7}")
    k = next(iter(table.values()))["k"]
    lines.append(f"(accuracy = mean verifier reward ± its standard error over prompts; sampled: mean of k={k} "
                 "samples per prompt; pass@k: some sample > 0.5)" if k else
                 "(accuracy = mean verifier reward ± its standard error over prompts; no samples: --samples K)")
    return "\n".join(lines)


def write_answers(path: str | Path, answers: Sequence[dict]) -> None:
    """One JSON line per answer."""
    with open(path, "w", encoding="utf-8") as f:
        for a in answers:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------ reference NLL
@functools.partial(jax.jit, static_argnames=("config",))
def token_nll(params, config: GlmvConfig, input_ids, segment_ids, token_types, targets, visual):
    """-log p(targets) (B, T) teacher-forced through the training forward (`token_inputs` + `apply`)."""
    tokens = token_inputs(config, input_ids, segment_ids, token_types, None, visual["image_grid_thw"],
                          visual["video_grid_thw"])
    return -token_log_probs(apply(params, config, tokens, visual), targets)


def reference_nll(params, config: GlmvConfig, tokenizer, prompts: Sequence[Prompt], batch: int = 8) -> np.ndarray:
    """(P,) mean NLL per token of each prompt's reference answer after ``REPLY_PREFIX`` (module doc)."""
    prefix = tokenizer.encode(REPLY_PREFIX)
    out = []
    for start in range(0, len(prompts), batch):
        part = list(prompts[start:start + batch])
        n = len(part)
        part += [part[0]] * (batch - n)
        answers = [tokenizer.encode(p.item.reference_text()) for p in part]
        if not all(answers):
            raise InputError("a reference answer encodes to no tokens")
        seqs = [p.input_ids + prefix + a for p, a in zip(part, answers)]
        length = bucket(max(len(s) for s in seqs), minimum=32)
        ids, segment, types, targets, mask = (np.zeros((batch, length), np.int32) for _ in range(5))
        for row, (p, seq, a) in enumerate(zip(part, seqs, answers)):
            ids[row, :len(seq)], segment[row, :len(seq)] = seq, 1
            types[row, :len(p.token_types)] = p.token_types
            targets[row, :len(seq) - 1] = seq[1:]
            mask[row, len(seq) - 1 - len(a):len(seq) - 1] = 1   # the positions that predict the answer tokens
        media = batch_media(part)
        visual = {}
        visual["pixel_values"], visual["image_grid_thw"] = pad_visual(media["pixel_values"], media["image_grid_thw"],
                                                                      config.vision)
        visual["pixel_values_videos"], visual["video_grid_thw"] = pad_visual(
            media["pixel_values_videos"], media["video_grid_thw"], config.vision)
        nll = np.asarray(token_nll(params, config, jnp.asarray(ids), jnp.asarray(segment), jnp.asarray(types),
                                    jnp.asarray(targets), visual))
        out += list((nll * mask).sum(axis=1)[:n] / mask.sum(axis=1)[:n])
    return np.asarray(out, np.float64)


# ------------------------------------------------------------------------------------- image swap
def swap_check(params, config: GlmvConfig, tokenizer, items: Sequence[Item], settings: EvalSettings = EvalSettings(),
               processor=None, *, generate: bool = True, answers: Sequence[dict] | None = None) -> dict:
    """The image-swap check (module doc). Raises InputError when no domain has two items with images."""
    partners = swap_partners(items)
    kept = [i for i, j in enumerate(partners) if j is not None]
    if not kept:
        raise InputError("the image-swap check needs two lines with images (as many each) in some domain")
    true = encode_prompts([items[i] for i in kept], tokenizer, config, processor)
    swapped = encode_prompts(with_swapped_images(items, partners), tokenizer, config, processor)
    lines = [{"prompt_id": items[i].id, "domain": items[i].domain, "partner": items[partners[i]].id}
             for i in kept]
    for name, prompts in (("true", true), ("swapped", swapped)):
        for line, nll in zip(lines, reference_nll(params, config, tokenizer, prompts, settings.batch)):
            line[f"nll_{name}"] = float(nll)
    if generate:
        weights = prepare(params)
        given = {a["prompt_id"]: a["reward"] for a in answers or () if a["sample"] < 0}
        todo = [(name, p) for name, p in (("true", true), ("swapped", swapped))
                if not (name == "true" and all(line["prompt_id"] in given for line in lines))]
        for name, prompts in todo:
            for line, a in zip(lines, _answers(weights, config, tokenizer, prompts, list(range(len(prompts))),
                                               settings, greedy=True)):
                line[f"greedy_{name}"] = a["reward"]
        for line in lines:
            line.setdefault("greedy_true", given.get(line["prompt_id"]))
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        groups[line["domain"]].append(line)
    table = {"overall": _swap_row(lines, generate), **{d: _swap_row(groups[d], generate) for d in sorted(groups)}}
    return {"table": table, "lines": lines}


def _swap_row(lines: Sequence[dict], generate: bool) -> dict[str, Any]:
    row = {"n": len(lines), "nll_true": float(np.mean([x["nll_true"] for x in lines])),
           "nll_swapped": float(np.mean([x["nll_swapped"] for x in lines]))}
    if generate:
        row["greedy_acc_true"] = float(np.mean([x["greedy_true"] for x in lines]))
        row["greedy_acc_swapped"] = float(np.mean([x["greedy_swapped"] for x in lines]))
    return row


def format_swap(report: dict) -> str:
    """The swap check's table as aligned text."""
    table = report["table"]
    lines = [f"{'image swap':<14}{'n':>5}  {'nll true':>9}  {'nll swapped':>11}  {'greedy true':>11}  "
             f"{'greedy swapped':>14}"]
    for name in [d for d in table if d != "overall"] + ["overall"]:
        r = table[name]
        lines.append(f"{name:<14}{r['n']:>5}  {r['nll_true']:>9.3f}  {r['nll_swapped']:>11.3f}  "
                     f"{_num(r.get('greedy_acc_true')):>11}  {_num(r.get('greedy_acc_swapped')):>14}")
    lines.append("(nll: mean negative log-likelihood per reference-answer token, teacher-forced; swapped: each "
                 "line with the images of another line of its domain)")
    return "\n".join(lines)


__all__ = ["EvalSettings", "PASS_REWARD", "evaluate", "flat_metrics", "format_swap", "format_table", "mean_and_se",
           "reference_nll", "run", "summarize", "swap_check", "token_nll", "write_answers"]
