"""`glmv demo`: pretraining, SFT and RLCS of the tiny model on the synthetic tasks, with a report.

Three stages, each in its own folder of the workdir, run in-process with the training entry points
(`glmv_jax.train.loop.train`, `glmv_jax.rl.loop.train_rl`) from `configs/demo_{pretrain,sft,rl}.yaml`:

    WORKDIR/pretrain   captions                      (train)
    WORKDIR/sft        <think>…</think><answer>…</answer>   (train, init_from pretrain)
    WORKDIR/rl         RLCS                          (train_rl, init_from sft)

After each stage the model answers the same held-out prompts greedily (`rlcs.evaluate`: the RL config's
held-out set, its sampling limits); accuracy is the mean reward by domain, format_ok the share of well-formed
answers. A stage whose final checkpoint exists is not trained again and its evaluation (saved as
`demo_eval.json` in its folder) is reused, so a second run only rewrites the report. The report
(`WORKDIR/report.md`) has the table, PNG plots of the loss and reward curves (drawn with Pillow) and three
example answers of the final model (held-out prompts 0, 1 and 2, not chosen by result).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STAGES = (("pretrain", "pretraining", "demo_pretrain.yaml"), ("sft", "SFT", "demo_sft.yaml"),
          ("rl", "RL", "demo_rl.yaml"))
EVAL_FILE = "demo_eval.json"
N_EXAMPLES = 3
SAMPLES = 4  # answers per held-out prompt in the sampled evaluation (at the RL temperature)

# Smoke-sized overrides (tests): a few steps of each stage, a handful of prompts, short answers.
_SMALL = ["data.min_pixels=1568", "data.max_pixels=6272"]   # 28..56 px images in the smoke run
FAST = {
    "pretrain": ["train.steps=6", "train.eval_every=0", "train.log_every=3", "checkpoint.every=6",
                 "data.n_train=200", "data.seq_len=128", "data.max_images=64", "data.frame_patches=16", *_SMALL],
    "sft": ["train.steps=4", "train.eval_every=0", "train.log_every=2", "checkpoint.every=4", "data.n_train=200",
            "data.seq_len=128", "data.max_images=32", "data.frame_patches=16", *_SMALL],
    "rl": ["rl.iterations=2", "rl.groups=2", "rl.group_size=4", "rl.prompt_pool=8", "rl.eval_prompts=8",
           "rl.eval_every=1", "rl.offline_k=2", "rl.max_new_tokens=16", "rl.thinking_budget=8",
           "optimizer.total_steps=4", "checkpoint.every=2", *_SMALL],
}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _banner(text: str) -> None:
    _say("\n" + "=" * 100 + f"\nglmv demo: {text}\n" + "=" * 100)


def _final_step(folder: Path) -> int | None:
    from glmv_jax.checkpoint.state import checkpoint_dir

    directory = checkpoint_dir(folder)
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def stage_done(name: str, cfg, folder: Path) -> bool:
    """Whether the stage in `folder` reached its final checkpoint."""
    if name == "rl":
        progress = folder / "progress.json"
        return progress.is_file() and json.loads(progress.read_text()).get("iteration") == cfg.rl.iterations
    return _final_step(folder) == cfg.train.steps


# ------------------------------------------------------------------------------------------ evaluation
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


def held_out(rl_cfg) -> list[dict]:
    """The RL config's held-out prompts (as `train_rl` builds them: data seed + 10000)."""
    from glmv_jax.data import synthetic

    return [synthetic.example_at(i, seed=rl_cfg.data.seed + 10_000) for i in range(rl_cfg.rl.eval_prompts)]


def evaluate_stage(folder: Path, rl_cfg, examples: list[dict]) -> dict:
    """Greedy held-out evaluation of the stage in `folder` (`rlcs.evaluate`), plus the full answers of the first
    `N_EXAMPLES` prompts; cached in `folder/demo_eval.json`."""
    cache = folder / EVAL_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if (saved.get("n_prompts") == len(examples) and saved.get("step") == _final_step(folder)
                and "sampled_reward" in saved.get("scores", {})):
            return saved
    from glmv_jax.rl import rewards, rlcs
    from glmv_jax.train.loop import image_processor

    model, params, tokenizer = _load_model(folder)
    processor = image_processor(rl_cfg.data, model.vision)
    prompts = rlcs.make_prompts(examples, tokenizer, processor, tokenizer.eos_ids[0])
    scores = rlcs.evaluate(params, model, prompts, rl_cfg.rl, tokenizer)
    sampled = rlcs.evaluate(params, model, prompts, rl_cfg.rl, tokenizer, samples=SAMPLES)
    scores.update({"sampled_reward": sampled["reward"], "sampled_format_ok": sampled["format_ok"]})
    index = list(range(min(N_EXAMPLES, len(examples))))
    out = rlcs.rollout(params, model, prompts, index, rlcs.sampling_config(rl_cfg.rl, tokenizer, greedy=True), seed=0)
    texts = rlcs.responses(out["tokens"], out["lengths"], tokenizer)
    scored = rewards.score_batch([examples[i] for i in index], texts)
    answers = [{"index": i, "id": examples[i]["id"], "domain": examples[i]["domain"],
                "question": examples[i]["question"], "response": text, "ground_truth": examples[i]["ground_truth"],
                "target": examples[i]["target"], "reward": s["reward"], "format_ok": s["format_ok"],
                "forced": bool(out["forced"][k])}
               for k, (i, text, s) in enumerate(zip(index, texts, scored))]
    result = {"scores": scores, "answers": answers, "n_prompts": len(examples), "step": _final_step(folder)}
    cache.write_text(json.dumps(result, indent=1, default=str))
    return result


# --------------------------------------------------------------------------------------------- plots
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    import math

    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - step * 1e-6:   # the last tick covers the largest value
        ticks.append(round(ticks[-1] + step, 10))
    return ticks if len(ticks) > 1 else [ticks[0], round(ticks[0] + step, 10)]


def line_plot(path: Path, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str = "step",
              ylabel: str = "", size: tuple[int, int] = (720, 420)) -> Path:
    """A small line chart (PNG) with Pillow: one line (and dots) per series of (x, y) points."""
    from PIL import Image, ImageDraw, ImageFont

    series = {k: [(float(x), float(y)) for x, y in v] for k, v in series.items() if v}
    w, h = size
    left, right, top, bottom = 70, 20, 40, 55
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 12), title, fill=(0, 0, 0), font=font)
    points = [p for v in series.values() for p in v]
    if not points:
        draw.text((left, h // 2), "no data", fill=(0, 0, 0), font=font)
        img.save(path)
        return path
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt, yt = _nice_ticks(min(xs), max(xs)), _nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    for t in yt:
        _, yy = px(x0, t)
        draw.line([(left, yy), (w - right, yy)], fill=(230, 230, 230))
        draw.text((8, yy - 6), f"{t:.4g}", fill=(60, 60, 60), font=font)
    for t in xt:
        xx, _ = px(t, y0)
        draw.line([(xx, top), (xx, h - bottom)], fill=(240, 240, 240))
        draw.text((xx - 8, h - bottom + 6), f"{t:g}", fill=(60, 60, 60), font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    draw.text(((w - left) // 2 + left - 20, h - 22), xlabel, fill=(0, 0, 0), font=font)
    if ylabel:
        draw.text((8, top - 16), ylabel, fill=(0, 0, 0), font=font)
    for k, (name, pts) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        xy = [px(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
        lx, ly = w - right - 170, top + 8 + 16 * k
        draw.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=color, width=3)
        draw.text((lx + 26, ly), name, fill=(0, 0, 0), font=font)
    img.save(path)
    return path


def _curve(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def _plots(workdir: Path) -> dict[str, str]:
    from glmv_jax.train.metrics import read_jsonl

    def records(stage: str) -> list[dict]:
        path = workdir / stage / "metrics.jsonl"
        return read_jsonl(path) if path.is_file() else []

    pre, sft, rl = records("pretrain"), records("sft"), records("rl")
    out = {}
    out["pretrain"] = line_plot(workdir / "pretrain_loss.png", "Pretraining loss (captions)",
                                {"train loss": _curve(pre, "loss"), "eval loss": _curve(pre, "eval_loss")},
                                ylabel="loss").name
    out["sft"] = line_plot(workdir / "sft_loss.png", "SFT loss (thinking + boxed answer)",
                           {"train loss": _curve(sft, "loss"), "eval loss": _curve(sft, "eval_loss")},
                           ylabel="loss").name
    out["rl"] = line_plot(workdir / "rl_reward.png", "RLCS rewards",
                          {"rollout reward (sampled)": _curve(rl, "reward"),
                           "held-out reward (greedy)": _curve(rl, "eval_reward"),
                           "rollout format_ok": _curve(rl, "format_ok")},
                          xlabel="iteration", ylabel="reward").name
    return out


# --------------------------------------------------------------------------------------------- report
def _domains(evals: dict[str, dict]) -> list[str]:
    names = set()
    for result in evals.values():
        names |= {k.split("/", 1)[1] for k in result["scores"] if k.startswith("reward/")}
    return sorted(names)


def table(evals: dict[str, dict]) -> str:
    """The markdown table: a row per stage; overall, each domain and format_ok (greedy), then the sampled
    evaluation's mean reward and format_ok."""
    domains = _domains(evals)
    head = ["stage", "overall", *domains, "format_ok", "sampled reward", "sampled format_ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, label, _ in STAGES:
        if name not in evals:
            continue
        s = evals[name]["scores"]
        cells = [f"after {label}", f"{s['reward']:.3f}", *(f"{s.get(f'reward/{d}', float('nan')):.3f}" for d in domains),
                 f"{s['format_ok']:.3f}", f"{s.get('sampled_reward', float('nan')):.3f}",
                 f"{s.get('sampled_format_ok', float('nan')):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fence(text: str) -> str:
    return "```text\n" + text.replace("```", "`\u200b``") + "\n```"


def write_report(workdir: Path, evals: dict[str, dict], examples: list[dict], timings: dict[str, dict],
                 configs: dict[str, Any], fast: bool) -> Path:
    plots = _plots(workdir)
    rl_cfg = configs["rl"]
    lines = ["# glmv demo: pretraining -> SFT -> RLCS of the tiny model on the synthetic tasks", ""]
    if fast:
        lines += ["**Smoke-sized run (`--fast`): a few steps per stage; the numbers mean nothing.**", ""]
    lines += [f"Held-out evaluation: the same {len(examples)} prompts (synthetic seed {rl_cfg.data.seed + 10_000}, "
              f"domains round robin) after every stage, greedy, at most {rl_cfg.rl.max_new_tokens} new tokens "
              f"(thinking budget {rl_cfg.rl.thinking_budget}). Accuracy = mean reward (in [0, 1]; OCR gets partial "
              "credit by edit distance); format_ok = share of answers in the "
              "`<think>…</think><answer>…</answer>` format with one box. The sampled columns: "
              f"{SAMPLES} answers per prompt sampled as in RL (temperature {rl_cfg.rl.temperature}), mean reward "
              "and share well formed.", "",
              "## Accuracy by domain", "", table(evals), ""]
    lines += ["## Stages", "", "| stage | config | folder | steps | wall time |", "|---|---|---|---:|---:|"]
    for name, label, config in STAGES:
        t = timings.get(name, {})
        cfg = configs[name]
        steps = f"{cfg.rl.iterations} iterations" if name == "rl" else f"{cfg.train.steps} steps"
        when = f"{t['train_s']:.0f} s" + (" (reused)" if t.get("reused") else "") if t else "-"
        lines.append(f"| {label} | `configs/{config}` | `{name}/` | {steps} | {when} |")
    lines += ["", "## Curves", "",
              f"![pretraining loss]({plots['pretrain']})", "", f"![SFT loss]({plots['sft']})", "",
              f"![RL rewards]({plots['rl']})", "",
              "The rollout reward is that of the sampled training rollouts (temperature "
              f"{rl_cfg.rl.temperature}); the held-out reward is the greedy evaluation above (iteration 0: the SFT "
              "model).", "", f"## Example answers (final model; held-out prompts 0..{N_EXAMPLES - 1}, not chosen by "
              "result)", ""]
    final = evals.get("rl") or evals.get("sft") or evals.get("pretrain")
    for a in final["answers"]:
        image = workdir / f"example_{a['index']}.png"
        examples[a["index"]]["image"].save(image)
        lines += [f"### {a['index'] + 1}. {a['domain']} ({a['id']})", "",
                  f"![{a['domain']} example]({image.name})", "",
                  f"**Question:** {a['question']}", "",
                  "**Model (thinking and answer, verbatim):**", "", _fence(a["response"]), "",
                  f"**Ground truth:** `{json.dumps(a['ground_truth'])}`  ", f"**Reward:** {a['reward']:.3f} "
                  f"(format_ok {a['format_ok']}{', answer forced by the thinking budget' if a['forced'] else ''})",
                  "", "<details><summary>the SFT target for this prompt</summary>", "", _fence(a["target"]), "",
                  "</details>", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------------ run
def stage_configs(workdir: Path, fast: bool = False) -> dict[str, Any]:
    from glmv_jax.train.config import load_train_config

    inits = {"pretrain": None, "sft": workdir / "pretrain", "rl": workdir / "sft"}
    out = {}
    for name, _, config in STAGES:
        overrides = list(FAST[name]) if fast else []
        if inits[name] is not None:
            overrides.append(f"train.init_from={json.dumps(str(inits[name]))}")
        out[name] = load_train_config(CONFIG_DIR / config, overrides)
    return out


def run(workdir: str | Path = "runs/demo", fast: bool = False) -> dict:
    """Run (or reuse) the three stages, evaluate each, write `workdir/report.md`; returns a summary dict
    (`evals` by stage, `timings`, `report`, `total_s`)."""
    from glmv_jax.train.loop import _use_compile_cache, train

    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _use_compile_cache(str(workdir / "jax_cache"))
    configs = stage_configs(workdir, fast)
    examples = held_out(configs["rl"])
    evals, timings = {}, {}
    for k, (name, label, config) in enumerate(STAGES, 1):
        folder = workdir / name
        cfg = configs[name]
        t0 = time.perf_counter()
        if stage_done(name, cfg, folder):
            _banner(f"stage {k}/3: {label}: finished earlier in {folder}; reused (no training)")
            reused = True
        else:
            what = f"{cfg.rl.iterations} RLCS iterations" if name == "rl" else f"{cfg.train.steps} steps"
            _banner(f"stage {k}/3: {label} ({what}, configs/{config}) -> {folder}")
            if name == "rl":
                from glmv_jax.rl.loop import train_rl
                train_rl(cfg, folder)
            else:
                train(cfg, folder)
            reused = False
        t1 = time.perf_counter()
        _say(f"glmv demo: {label} {'reused' if reused else f'trained in {t1 - t0:.0f}s'}; evaluating on "
             f"{len(examples)} held-out prompts ...")
        evals[name] = evaluate_stage(folder, configs["rl"], examples)
        t2 = time.perf_counter()
        s = evals[name]["scores"]
        _say(f"glmv demo: after {label}: reward {s['reward']:.3f}, format_ok {s['format_ok']:.3f}, "
             f"sampled reward {s['sampled_reward']:.3f} "
             f"({', '.join(f'{key[7:]} {v:.3f}' for key, v in s.items() if key.startswith('reward/'))}) "
             f"[eval {t2 - t1:.0f}s; elapsed {t2 - started:.0f}s]")
        timings[name] = {"train_s": t1 - t0, "eval_s": t2 - t1, "reused": reused}
    report = write_report(workdir, evals, examples, timings, configs, fast)
    total = time.perf_counter() - started
    print("\n" + table(evals))
    print(f"\nglmv demo: report in {report}; total {total:.0f}s "
          f"({', '.join('%s %.0f+%.0fs' % (n, t['train_s'], t['eval_s']) for n, t in timings.items())})")
    return {"evals": {k: v["scores"] for k, v in evals.items()}, "timings": timings, "report": str(report),
            "total_s": total}


def main(workdir: str = "runs/demo", fast: bool = False) -> int:
    run(workdir, fast=fast)
    return 0


__all__ = ["line_plot", "main", "run", "stage_configs", "table", "write_report"]
