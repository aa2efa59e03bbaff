"""`glmv demo`: pretraining, SFT and RLCS of the tiny model on the synthetic tasks, with a report.

Three stages, each in its own folder of the workdir, run in-process (`train.loop.train`, `rl.loop.train_rl`) from
the run configs shipped with the package, `glmv_jax/presets/demo/{pretrain,sft,rl}.yaml`: WORKDIR/pretrain
(captions), WORKDIR/sft (`<think>…</think><answer>…</answer>`, init_from pretrain), WORKDIR/rl (RLCS, init_from
sft). After each stage the model is evaluated on the same held-out prompts (the RL config's) through
`glmv_jax.evaluate` (`evaluate_stage`); a finished stage is not trained again and its evaluation (`demo_eval.json`
in its folder) is reused. The report (`WORKDIR/report.md`) has the tables, PNG plots of the loss and reward curves
and three example answers of the final model (held-out prompts 0, 1 and 2, not chosen by result).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from glmv_jax.demo_eval import N_EXAMPLES, SAMPLES, paired_gain   # numpy only: jax comes with an evaluation

DEMO_CONFIGS = "presets/demo"   # inside the package (package data, beside the model presets)
STAGES = (("pretrain", "pretraining", "pretrain.yaml"), ("sft", "SFT", "sft.yaml"), ("rl", "RL", "rl.yaml"))

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
        from glmv_jax.rl.loop import finished_iterations

        return finished_iterations(folder) == cfg.rl.iterations
    return _final_step(folder) == cfg.train.steps


# ------------------------------------------------------------------------------------------ evaluation
def held_out(rl_cfg) -> list[dict]:
    """The RL config's held-out prompts (as `train_rl` builds them: data seed + 10000)."""
    from glmv_jax.rl.loop import held_out_examples

    return held_out_examples(rl_cfg)


# --------------------------------------------------------------------------------------------- plots
def line_plot(path: Path, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str = "step",
              ylabel: str = "", size: tuple[int, int] = (720, 420)) -> Path:
    """A small line chart (PNG, `size` in pixels) with matplotlib: one line with dots per series of (x, y) points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # files only: no pyplot, no global backend
    from matplotlib.figure import Figure

    series = {k: sorted((float(x), float(y)) for x, y in v) for k, v in series.items() if v}
    fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, linewidth=2, label=name)
    if series:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9")
    fig.tight_layout()
    fig.savefig(path, format="png")
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
def _pm(pair) -> str:
    mean, se = pair
    return "-" if mean is None else f"{mean:.3f}" + ("" if se is None else f" ± {se:.3f}")


def table(evals: dict[str, dict]) -> str:
    """The markdown table: a row per stage (same held-out prompts): greedy and sampled accuracy ± standard error,
    pass@k, format_ok, the image-swap check (greedy accuracy with true -> swapped images, the drop ± its
    standard error; answer NLL true -> swapped) and, for pretraining, the caption NLL true -> swapped."""
    head = ["stage", "greedy acc", "sampled acc", f"pass@{SAMPLES}", "format_ok", "swap: greedy true -> swapped",
            "swap drop", "NLL true -> swapped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, label, _ in STAGES:
        if name not in evals:
            continue
        e = evals[name]
        if "caption" in e:
            c = e["caption"]
            cells = ["-"] * 6 + [f"caption {c['nll_true'][0]:.3f} -> {c['nll_swapped'][0]:.3f} "
                                 f"(gap {_pm(c['nll_gap'])})"]
        else:
            o, w = e["table"]["overall"], e["swap"]["overall"]
            cells = [_pm((o["greedy_acc"], o["greedy_se"])), _pm((o["sampled_acc"], o["sampled_se"])),
                     f"{o['pass_at_k']:.3f}", f"{o['format_ok']:.3f}",
                     f"{w['greedy_acc_true']:.3f} -> {w['greedy_acc_swapped']:.3f}", _pm(e["swap_gap"]),
                     f"answer {w['nll_true']:.3f} -> {w['nll_swapped']:.3f}"]
        lines.append("| " + " | ".join([f"after {label}", *cells]) + " |")
    return "\n".join(lines)


def domain_table(evals: dict[str, dict]) -> str:
    """Greedy / sampled accuracy by domain per stage (the stages that answer)."""
    stages = [(n, label) for n, label, _ in STAGES if n in evals and "table" in evals[n]]
    domains = sorted({d for n, _ in stages for d in evals[n]["table"] if d != "overall"})
    lines = ["| stage | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for n, label in stages:
        t = evals[n]["table"]
        lines.append(f"| after {label} | " + " | ".join(
            f"{t[d]['greedy_acc']:.3f} / {t[d]['sampled_acc']:.3f}" for d in domains) + " |")
    return "\n".join(lines)


def rl_gain(evals: dict[str, dict]) -> str | None:
    """RL - SFT on the same held-out prompts (sampled and greedy accuracy, paired standard errors), or None
    before both stages are evaluated."""
    if not all("per_prompt" in evals.get(name, {}) for name in ("sft", "rl")):
        return None
    parts = []
    for name, (mean, se) in paired_gain(evals["sft"], evals["rl"]).items():
        parts.append(f"{name} {mean:+.3f}" + (f" ± {se:.3f} ({mean / se:+.1f} SE)" if se > 0 else " (no spread)"))
    return "RL - SFT on the same prompts (± paired standard error): " + ", ".join(parts)


def summary(result: dict) -> str:
    """One line of a stage's evaluation, for the console."""
    if "caption" in result:
        c = result["caption"]
        return f"caption NLL {c['nll_true'][0]:.3f} (true images) vs {c['nll_swapped'][0]:.3f} (swapped)"
    o, w = result["table"]["overall"], result["swap"]["overall"]
    return (f"greedy {_pm((o['greedy_acc'], o['greedy_se']))}, sampled {_pm((o['sampled_acc'], o['sampled_se']))}, "
            f"pass@{SAMPLES} {o['pass_at_k']:.3f}, format_ok {o['format_ok']:.3f}; swapped images: greedy "
            f"{w['greedy_acc_swapped']:.3f}, answer NLL {w['nll_true']:.3f} -> {w['nll_swapped']:.3f}")


def _fence(text: str) -> str:
    return "```text\n" + text.replace("```", "`\u200b``") + "\n```"


def write_report(workdir: Path, evals: dict[str, dict], examples: list[dict], timings: dict[str, dict],
                 configs: dict[str, Any], fast: bool) -> Path:
    plots = _plots(workdir)
    rl_cfg = configs["rl"]
    lines = ["# glmv demo: pretraining -> SFT -> RLCS of the tiny model on the synthetic tasks", ""]
    if fast:
        lines += ["**Smoke-sized run (`--fast`): a few steps per stage; the numbers mean nothing.**", ""]
    r = rl_cfg.rl
    lines += [f"Held-out evaluation (`glmv_jax.evaluate`, what `glmv eval` runs): the same {len(examples)} prompts "
              f"(synthetic seed {rl_cfg.data.seed + 10_000}, level {rl_cfg.data.level}, domains "
              f"{', '.join(rl_cfg.data.domains) or 'all'} round robin) after every stage; at most {r.max_new_tokens} "
              f"new tokens (thinking budget {r.thinking_budget}). Accuracy = mean reward in [0, 1]; greedy: one "
              f"answer per prompt; sampled: the mean of {SAMPLES} answers per prompt at the RL temperature "
              f"{r.temperature}; ± one standard error over prompts; pass@{SAMPLES}: share of prompts with a sampled "
              "answer rewarded > 0.5. Image swap: every prompt with the image of another prompt of its domain; a "
              "model that uses its images drops in accuracy and its reference answers' NLL rises. Pretraining never "
              "saw the reply format: its row is the caption NLL per token with the true and with swapped images.",
              "", "## Held-out results", "", table(evals), "", *([gain, ""] if (gain := rl_gain(evals)) else []),
              "Greedy / sampled accuracy by domain:", "",
              domain_table(evals), ""]
    lines += ["## Stages", "", "| stage | config | folder | steps | wall time |", "|---|---|---|---:|---:|"]
    for name, label, config in STAGES:
        t = timings.get(name, {})
        cfg = configs[name]
        steps = f"{cfg.rl.iterations} iterations" if name == "rl" else f"{cfg.train.steps} steps"
        when = f"{t['train_s']:.0f} s" + (" (reused)" if t.get("reused") else "") if t else "-"
        lines.append(f"| {label} | `glmv_jax/{DEMO_CONFIGS}/{config}` | `{name}/` | {steps} | {when} |")
    lines += ["", "## Curves", "",
              f"![pretraining loss]({plots['pretrain']})", "", f"![SFT loss]({plots['sft']})", "",
              f"![RL rewards]({plots['rl']})", "",
              "The rollout reward is that of the sampled training rollouts (temperature "
              f"{rl_cfg.rl.temperature}); the held-out reward is the greedy evaluation above (iteration 0: the SFT "
              "model).", "", f"## Example answers (final model; held-out prompts 0..{N_EXAMPLES - 1}, not chosen by "
              "result)", ""]
    final = evals.get("rl") or evals.get("sft") or {"answers": []}
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
def stage_configs(workdir: Path, fast: bool = False, seed: int = 0) -> dict[str, Any]:
    import glmv_jax.rl.config  # noqa: F401  (registers the `rl:` section)
    from glmv_jax.config import PRESET_DIR
    from glmv_jax.train.config import load_train_config


    inits = {"pretrain": None, "sft": workdir / "pretrain", "rl": workdir / "sft"}
    out = {}
    for name, _, config in STAGES:
        overrides = (list(FAST[name]) if fast else []) + [f"train.seed={seed}"]
        if name == "rl":
            overrides.append(f"rl.seed={seed}")
        if inits[name] is not None:
            overrides.append(f"train.init_from={json.dumps(str(inits[name]))}")
        out[name] = load_train_config(PRESET_DIR / "demo" / config, overrides)
    return out


def run(workdir: str | Path = "runs/demo", fast: bool = False, seed: int = 0) -> dict:
    """Run (or reuse) the three stages, evaluate each, write `workdir/report.md`; returns a summary dict
    (`evals` by stage, `timings`, `report`, `total_s`)."""
    from glmv_jax.demo_eval import evaluate_stage
    from glmv_jax.train.loop import train
    from glmv_jax.train.setup import use_compile_cache

    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    use_compile_cache(str(workdir / "jax_cache"))
    configs = stage_configs(workdir, fast, seed)
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
            _banner(f"stage {k}/3: {label} ({what}, {DEMO_CONFIGS}/{config}) -> {folder}")
            if name == "rl":
                from glmv_jax.rl.loop import train_rl
                train_rl(cfg, folder)
            else:
                train(cfg, folder)
            reused = False
        t1 = time.perf_counter()
        _say(f"glmv demo: {label} {'reused' if reused else f'trained in {t1 - t0:.0f}s'}; evaluating on "
             f"{len(examples)} held-out prompts ...")
        evals[name] = evaluate_stage(name, folder, configs["rl"], examples, _final_step(folder))
        t2 = time.perf_counter()
        _say(f"glmv demo: after {label}: {summary(evals[name])} [eval {t2 - t1:.0f}s; elapsed {t2 - started:.0f}s]")
        timings[name] = {"train_s": t1 - t0, "eval_s": t2 - t1, "reused": reused}
    report = write_report(workdir, evals, examples, timings, configs, fast)
    total = time.perf_counter() - started
    print("\n" + table(evals))
    if gain := rl_gain(evals):
        print("\n" + gain)
    print(f"\nglmv demo: report in {report}; total {total:.0f}s "
          f"({', '.join('%s %.0f+%.0fs' % (n, t['train_s'], t['eval_s']) for n, t in timings.items())})")
    return {"evals": {k: {key: v[key] for key in ("table", "swap", "swap_gap", "per_prompt", "caption")
                      if key in v}
                      for k, v in evals.items()}, "timings": timings, "report": str(report),
            "total_s": total}


def main(workdir: str = "runs/demo", fast: bool = False, seed: int = 0) -> int:
    run(workdir, fast=fast, seed=seed)
    return 0


__all__ = ["domain_table", "line_plot", "main", "rl_gain", "run", "stage_configs", "summary", "table",
           "write_report"]
