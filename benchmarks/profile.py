"""Where the time goes: a `jax.profiler` trace of one jitted program, summed by XLA op.

    python -m benchmarks.profile train   [--config small] [--batch 4] [--dtype float32] [--top 20]
    python -m benchmarks.profile prefill [--batch 1]
    python -m benchmarks.profile decode  [--batch 1] [--new-tokens 128]

Random `small` weights (no transformers needed), the same inputs as `glmv bench` (one 448x448 image and 256
text tokens per row). The program is compiled and warmed up, then run `--runs` times inside
`jax.profiler.trace`; the trace (an XSpace protobuf) is read back with `jax.profiler.ProfileData` and every
XLA op event's *exclusive* time (its duration minus the ops nested in it, e.g. a while loop's body) is
summed by op. Each op is labelled with the JAX operation it came from (`metadata.op_name` in the compiled
HLO), so the table reads like "decoder/attention/dot_general 31%". The trace folder is kept (open it in
TensorBoard/XProf for the timeline).
"""
from __future__ import annotations

import argparse
import collections
import functools
import re
import tempfile
import time
from pathlib import Path


OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name="([^"]*)"')


def op_labels(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op path it came from (jit(...)/.../dot_general), from compiled HLO text."""
    labels = {}
    for line in hlo_text.splitlines():
        m = OP_NAME.match(line)
        if m:
            labels[m.group(1)] = m.group(2)
    return labels


def exclusive_times(path: str | Path, module: str | None = None) -> dict[str, float]:
    """Seconds per XLA op name in a trace file, exclusive of nested op events, summed over all threads."""
    import jax

    totals: dict[str, float] = collections.defaultdict(float)
    data = jax.profiler.ProfileData.from_file(str(path))
    for plane in data.planes:
        for line in plane.lines:
            events = []
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats and (module is None or module in str(stats.get("hlo_module", ""))):
                    events.append((e.start_ns, e.start_ns + e.duration_ns, str(stats["hlo_op"])))
            events.sort(key=lambda x: (x[0], -x[1]))
            stack: list[list] = []  # [end, name, exclusive ns]
            for start, end, name in events:
                while stack and stack[-1][0] <= start:
                    _, done, ns = stack.pop()
                    totals[done] += ns / 1e9
                if stack:
                    stack[-1][2] -= min(end, stack[-1][0]) - start  # nested: not the parent's own time
                stack.append([end, name, end - start])
            for _, done, ns in stack:
                totals[done] += ns / 1e9
    return dict(totals)


def short_label(op_name: str) -> str:
    """`jit(train_step)/jvp(Glmv)/decoder/.../dot_general` -> the last few meaningful path parts."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "pjit(", "jvp(", "transpose(",
                                                                        "checkpoint", "remat", "while", "body",
                                                                        "closed_call", "core_call"))]
    return "/".join(parts[-4:]) or op_name


def profile(fn, args, runs: int, top: int, out: str | Path | None = None) -> list[dict]:
    """Trace `runs` calls of the jitted `fn(*args)` (after a warm-up) and return the top ops by exclusive time."""
    import jax

    compiled = fn.lower(*args).compile()
    labels = op_labels(compiled.as_text())
    jax.block_until_ready(fn(*args))
    folder = Path(out or tempfile.mkdtemp(prefix="glmv-profile-"))
    start = time.perf_counter()
    with jax.profiler.trace(str(folder)):
        for _ in range(runs):
            jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - start) / runs
    traces = sorted(folder.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    times = exclusive_times(traces[-1])
    total = sum(times.values())
    by_label: dict[str, float] = collections.defaultdict(float)
    for name, seconds in times.items():
        by_label[short_label(labels.get(name, name))] += seconds / runs
    rows = sorted(({"op": k, "seconds": v, "share": v / (total / runs)} for k, v in by_label.items()),
                  key=lambda r: -r["seconds"])
    print(f"trace: {folder}  wall {wall:.3f} s per call, op time {total / runs:.3f} s per call "
          f"(summed over threads)")
    for r in rows[:top]:
        print(f"  {r['share']:6.1%} {r['seconds']:8.4f} s  {r['op']}")
    return rows


def _program(section: str, config, params, batch: int, new_tokens: int):
    import jax
    import jax.numpy as jnp

    from benchmarks.bench import Bench, Settings, _patched, _sample_kwargs, train_inputs
    from benchmarks.common import image_prompt
    from glmv_jax.generate import sampler

    inputs = image_prompt(config, batch)
    if section == "train":
        from glmv_jax.train.optimizer import OptimizerConfig, make_optimizer
        from glmv_jax.train.steps import init_state, train_step

        tx = make_optimizer(OptimizerConfig(learning_rate=1e-5, warmup_steps=1, total_steps=1000), params)
        step = jax.jit(functools.partial(train_step, config=config, tx=tx,  # not donated: called repeatedly
                                         scan_layers=Settings.scan_layers))
        return step, (init_state(params, tx), {k: jnp.asarray(v) for k, v in train_inputs(inputs, config).items()})
    bench = Bench.__new__(Bench)
    bench.s, bench.config, bench.params = Settings(), config, params
    args, kwargs = bench.prefill_args(inputs, new_tokens)
    if section == "prefill":
        return jax.jit(lambda p, *rest: sampler.prefill(p, config, *rest, **kwargs)), (args[0], *args[2:])
    # decode: `new_tokens` greedy steps from the prefilled prompt, without stop ids (the state as `sample` builds it)
    captured = {}

    def capture(original):
        def wrapper(weights, config, state, **kw):
            captured["weights"], captured["state"] = weights, jax.tree.map(jnp.copy, state)
            return original(weights, config, state, **kw)
        return wrapper

    sampling = sampler.SamplingConfig(new_tokens, pad_id=0)
    with _patched(sampler, "decode", capture):
        sampler.sample(params, config, inputs["input_ids"], sampling=sampling, **_sample_kwargs(inputs))
    fn = jax.jit(lambda w, st: sampler.decode(w, config, st, sampling=sampling, steps=new_tokens))
    return fn, (captured["weights"], captured["state"])


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp

    from glmv_jax import load_config
    from glmv_jax.model.glmv import init_params

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=("train", "prefill", "decode"))
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=None, help="default: 4 for train, 1 otherwise")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="trace folder (default: a new temporary folder)")
    args = p.parse_args(argv)
    config = load_config(args.config)
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(args.dtype)), init_params(config, 0))
    batch = args.batch or (4 if args.section == "train" else 1)
    fn, fn_args = _program(args.section, config, params, batch, args.new_tokens)
    profile(fn, fn_args, args.runs, args.top, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
