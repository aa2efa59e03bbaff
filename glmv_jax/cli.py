"""The `glmv` console script: convert, generate, eval, plan, train (RL configs go to rl/loop), bench and demo.

A user error (`GlmvError`: bad config, input, mesh, checkpoint or data; a missing or existing file) is printed
as one line and exits with status 2; anything else is a bug of ours and shows its traceback."""
from __future__ import annotations

import argparse
import math
import sys
import time

from glmv_jax import hostmem


def _convert(args: argparse.Namespace) -> int:
    from glmv_jax.checkpoint import convert
    start = time.perf_counter()
    if args.to == "orbax":
        convert.hf_to_orbax(args.src, args.dst, dtype=args.dtype)
    else:
        convert.orbax_to_hf(args.src, args.dst, dtype=args.dtype)
    print(f"converted {args.src} -> {args.dst} ({args.to}, {args.dtype}) in {time.perf_counter() - start:.1f}s")
    return 0


def _model_and_tokenizer(args: argparse.Namespace, mesh=None):
    """(config, params, tokenizer) of `--model` (and `--tokenizer`), in `--dtype` (default: float32 on CPU,
    bfloat16 on accelerators), on `mesh` if given; the tokenizer's special ids checked against the config's."""
    import jax

    from glmv_jax.checkpoint.convert import load_folder
    from glmv_jax.data.tokenizer import Tokenizer, check_ids

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    config, params = load_folder(args.model, dtype=dtype, mesh=mesh)
    tokenizer = Tokenizer.from_file(args.tokenizer or args.model)
    check_ids(tokenizer, {name: getattr(config, name) for name in (
        "image_token_id", "image_start_token_id", "image_end_token_id", "video_start_token_id",
        "video_end_token_id")})
    return config, params, tokenizer


def _mesh_of(args: argparse.Namespace):
    """The mesh of `--mesh` (e.g. data=2,fsdp=2,tensor=2) for generation, or None: on a CPU-only host its devices are
    simulated (call before jax starts its backend); a host with accelerators uses its own."""
    if not args.mesh:
        return None
    from glmv_jax.sharding import parse_mesh

    sizes = parse_mesh(args.mesh)
    _simulate_devices(math.prod(sizes.values()), cpu_only=False)
    import jax

    from glmv_jax.sharding import make_mesh

    return make_mesh(**sizes, devices=jax.devices()[:math.prod(sizes.values())])


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from glmv_jax.data import chat
    from glmv_jax.data.processor import ImageProcessor, VideoProcessor
    from glmv_jax.data.video import is_video_file, process_video_file, read_frames
    from glmv_jax.generate.sampler import SamplingConfig, sample
    from glmv_jax.generate.weights import prepare

    mesh = _mesh_of(args)
    config, params, tokenizer = _model_and_tokenizer(args, mesh)
    content, extra = [], {}
    if args.image:
        images = ImageProcessor()(args.image)
        content += [{"type": "image"} for _ in args.image]
        extra.update(pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"])
    if args.video:
        if is_video_file(args.video):  # mp4/webm/mov/mkv/avi through PyAV, sampled as the reference does
            video = process_video_file(args.video, VideoProcessor())
        else:
            frames, fps = read_frames(args.video, args.video_fps)
            video = VideoProcessor()(frames, video_fps=fps)
        content.append({"type": "video"})
        extra.update(pixel_values_videos=video["pixel_values_videos"], video_grid_thw=video["video_grid_thw"])
    content.append({"type": "text", "text": args.prompt})
    encoded = chat.encode([{"role": "user", "content": content}], tokenizer,
                          image_grids=extra.get("image_grid_thw"), video_grids=extra.get("video_grid_thw"),
                          video_timestamps=[video["frame_timestamps"]] if args.video else None,
                          merge_size=config.vision.spatial_merge_size)
    budget = {}
    if args.thinking_budget is not None:
        budget = dict(thinking_budget=args.thinking_budget, think_end_id=tokenizer.token_id("</think>"),
                      forced_answer_ids=tuple(tokenizer.encode("</think>\n<answer>")))
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                              eos_ids=tokenizer.eos_ids, pad_id=tokenizer.eos_ids[0], **budget)
    shown, printed = [], [""]

    def stream(tokens: np.ndarray) -> None:
        shown.extend(int(t) for t in tokens[0])
        text = tokenizer.decode(shown[: _stop_index(shown, sampling.eos_ids)], skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
            print(text[len(printed[0]):], end="", flush=True)
            printed[0] = text

    ids = np.array([encoded["input_ids"]])
    # the decoder layers held once (the stacked originals are freed); on a mesh, split over it
    weights = prepare(params, donate=True, mesh=mesh, config=config)
    out = sample(weights, config, ids, sampling=sampling, mm_token_type_ids=np.array([encoded["mm_token_type_ids"]]),
                 seed=args.seed, steps_per_call=args.stream_every, on_tokens=stream, mesh=mesh, **extra)
    final = tokenizer.decode(shown[: _stop_index(shown, sampling.eos_ids)])
    print(final[len(printed[0]):])
    forced = " (thinking budget reached: answer forced)" if bool(out.forced[0]) else ""
    print(f"[{int(out.lengths[0])} tokens{forced}]", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from glmv_jax import benchmark, evaluate

    items = benchmark.load_benchmark(args.data)   # every line checked before the model loads
    mesh = _mesh_of(args)
    settings = evaluate.EvalSettings(args.max_new_tokens, args.thinking_budget, args.samples, args.temperature,
                                     args.top_p, args.batch, args.seed)
    config, params, tokenizer = _model_and_tokenizer(args, mesh)
    prompts = benchmark.encode_prompts(items, tokenizer, config)
    print(f"glmv eval: {len(items)} prompts x (greedy + {args.samples} samples) ...", file=sys.stderr)
    table, answers = evaluate.run(params, config, tokenizer, prompts, settings, mesh=mesh)
    out = Path(args.out or Path(args.data).with_suffix(".answers.jsonl"))
    evaluate.write_answers(out, answers)
    print(evaluate.format_table(table))
    report = {"table": table}
    if args.swap_images:
        report["swap"] = evaluate.swap_check(params, config, tokenizer, items, settings, answers=answers)
        print(evaluate.format_swap(report["swap"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"answers: {out}", file=sys.stderr)
    return 0


def _simulate_devices(devices: int, *, cpu_only: bool = True) -> None:
    """Simulate `devices` devices on the host CPU (XLA_FLAGS, read when jax first starts its backend, not at
    import), unless XLA_FLAGS already sets a count (then that one holds: also inherited by every subprocess);
    `cpu_only`: and run on them even where accelerators are (glmv plan)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if cpu_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _plan_train_config(args: argparse.Namespace) -> int:
    """`glmv plan --train-config X.yaml --slice v5p-64 | --devices N [--search]`: the step glmv train runs (with an
    `rl:` section, one RLCS iteration: rl/plan.py)."""
    import glmv_jax.rl.config  # noqa: F401  (registers the `rl:` section of training configs)
    from glmv_jax.errors import ConfigError, GlmvError
    from glmv_jax.train.config import load_train_config

    cfg = load_train_config(args.train_config, args.overrides)
    if args.slice:
        from glmv_jax.train.plan import slice_chips
        devices, hosts = slice_chips(args.slice)
    elif args.devices:
        devices, hosts = args.devices, args.hosts or 1
    else:
        raise ConfigError("glmv plan --train-config needs --slice (e.g. v5p-64) or --devices N")
    _simulate_devices(devices)
    from glmv_jax.rl.plan import plan_rl
    from glmv_jax.train.plan import plan_run, planned_model, report, smallest_slices

    model = planned_model(cfg, args.workdir)

    while True:
        print(f"compiling {'one RLCS iteration' if cfg.rl else 'the train step'} of {args.train_config} on {devices} "
              f"simulated devices ({hosts} host(s)) ...", file=sys.stderr)
        result = (plan_run(cfg, devices, hosts, model) if cfg.rl is None else
                  plan_rl(cfg, devices, hosts, model, prompt_tokens=args.prompt_tokens, prompts=args.rollout_prompts))
        print(report(result), flush=True)
        half = devices // 2
        if not (args.search and smallest_slices(result) and half >= 1):
            return 0
        try:  # the next smaller slice must still hold the config's mesh and batch
            cfg.mesh.sizes(half)
        except GlmvError:
            return 0
        devices, hosts = half, max(1, hosts // 2)
        print("", flush=True)


def _plan(args: argparse.Namespace) -> int:
    import math

    from glmv_jax.sharding import parse_mesh

    from glmv_jax.errors import ConfigError

    if args.train_config:
        return _plan_train_config(args)
    if not (args.config and args.mesh and args.seq):
        raise ConfigError("glmv plan needs --train-config, or --config, --mesh and --seq")
    sizes = parse_mesh(args.mesh)
    devices = math.prod(sizes.values())
    _simulate_devices(devices)
    from glmv_jax.config import load_config
    from glmv_jax.train.plan import plan, report

    config = load_config(args.config)
    print(f"compiling the train step for {args.config} on {devices} simulated devices ...", file=sys.stderr)
    result = plan(config, sizes, seq=args.seq, batch_per_replica=args.batch, image_tokens=args.image_tokens,
                  remat_policy=args.remat, attention_impl=args.attention_impl)
    print(f"attention impl: {args.attention_impl}")
    print(report(result))
    return 0


def _stop_index(ids: list[int], eos: tuple[int, ...]) -> int:
    return next((i for i, t in enumerate(ids) if t in eos), len(ids))


def _train(args: argparse.Namespace) -> int:
    """0 when done, 3 when training diverged (a bad config or data raises, for `main` to print)."""
    import json

    from glmv_jax.train import distributed

    distributed.initialize()  # one job across the processes of the environment, before any device is used
    import glmv_jax.rl.config  # noqa: F401  (registers the `rl:` section of training configs)
    from glmv_jax.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    from glmv_jax.train import loop

    try:
        if cfg.rl is not None:
            from glmv_jax.rl.loop import train_rl
            final = train_rl(cfg, args.workdir)
        else:
            final = loop.train(cfg, args.workdir)
    except loop.TrainingDiverged as e:
        print(f"\nglmv train: error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({k: final[k] for k in ("step", "loss", "eval_loss", "eval_reward") if k in final}))
    return 0


def _bench_module(name: str = "bench"):
    """benchmarks.<name>: installed with the package, else from the source checkout next to glmv_jax (None if
    absent)."""
    import importlib
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ImportError:
        from pathlib import Path
        root = Path(__file__).resolve().parent.parent
        if not (root / "benchmarks" / f"{name}.py").is_file():
            return None
        sys.path.insert(0, str(root))
        return importlib.import_module(f"benchmarks.{name}")


def _bench(args: argparse.Namespace) -> int:
    bench = _bench_module()
    if bench is None:
        raise FileNotFoundError("glmv bench needs the benchmarks/ folder of a source checkout")
    return bench.main(args=args)


def _demo(args: argparse.Namespace) -> int:
    from glmv_jax import demo
    return demo.main(args.workdir, fast=args.fast, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv", description="GLM-4.1V-Thinking in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="HF safetensors folder <-> orbax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["orbax", "hf"], required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(run=_convert)
    p = sub.add_parser("generate", help="answer a prompt about images / a video, streaming to the terminal")
    p.add_argument("--model", required=True, help="HF folder (safetensors + tokenizer) or orbax folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / .model (default: inside --model)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--video", default=None, help="a video file (mp4/webm/mov/mkv/avi), a folder of frames or an animated GIF/WebP")
    p.add_argument("--video-fps", type=float, default=None, help="frame rate of a folder of frames (a video file has its own)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="force </think><answer> after this many thinking tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-every", type=int, default=8, help="tokens per device call between prints")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on accelerators, float32 on CPU")
    p.add_argument("--mesh", default=None, help="decode on a mesh, e.g. data=2,fsdp=2,tensor=2 (no context); "
                                                "simulated CPU devices on a host without accelerators")
    p.set_defaults(run=_generate)
    p = sub.add_parser("eval", help="answer a JSONL benchmark (greedy and sampled), graded by the registered "
                                    "verifiers: a per-domain table and a JSONL of every answer")
    p.add_argument("--model", required=True, help="HF folder (safetensors + tokenizer) or orbax folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / .model (default: inside --model)")
    p.add_argument("--data", required=True, help="benchmark JSONL: domain, answer, question or conversation, "
                                                 "images / videos (paths relative to the file)")
    p.add_argument("--samples", type=int, default=0, help="sampled answers per prompt (K) beside the greedy one")
    p.add_argument("--batch", type=int, default=8, help="rows per generation call")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="force </think><answer> after this many thinking tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled answers")
    p.add_argument("--top-p", type=float, default=1.0, help="of the sampled answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="answers JSONL (default: DATA.answers.jsonl)")
    p.add_argument("--json", default=None, help="also write the table(s) as JSON here")
    p.add_argument("--swap-images", action="store_true", help="also the image-swap check: greedy accuracy and "
                   "reference-answer NLL with each line's images replaced by another line's of its domain")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on accelerators, float32 on CPU")
    p.add_argument("--mesh", default=None, help="generate on a mesh, e.g. data=2,fsdp=2,tensor=2 (no context); "
                                                "simulated CPU devices on a host without accelerators")
    p.set_defaults(run=_eval)
    p = sub.add_parser("plan", help="compile the train step ahead of time on simulated devices; print memory, "
                                    "FLOPs, collectives and step times")
    p.add_argument("--train-config", default=None, help="a training YAML: plan exactly the step glmv train runs "
                                                            "from it (mesh, micro-batches, remat, dtypes, visual budgets)")
    p.add_argument("--slice", default=None, help="with --train-config: a TPU slice, e.g. v5p-64 (32 chips, 8 hosts)")
    p.add_argument("--devices", type=int, default=None, help="with --train-config: devices (instead of --slice)")
    p.add_argument("--hosts", type=int, default=None, help="with --devices: processes (default 1)")
    p.add_argument("--search", action="store_true", help="with --train-config: halve the slice while it still fits")
    p.add_argument("--workdir", default=None, help="with --train-config: the run folder whose model (config.json) "
                                                   "to plan (a tokenizer trained there sets its vocabulary)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="with --train-config: config overrides")
    p.add_argument("--prompt-tokens", type=int, default=None, help="with an rl: config: tokens per prompt, its "
                   "image included (default: one data.max_pixels image's visual tokens + 512)")
    p.add_argument("--rollout-prompts", type=int, default=None, help="with an rl: config: prompts rolled out "
                   "(default: rl.groups x the curriculum's largest expansion, 4)")
    p.add_argument("--config", default=None, help="model config: preset name, YAML or HF config.json")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=1,context=4,tensor=2")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="sequences per data replica (data x fsdp)")
    p.add_argument("--image-tokens", type=int, default=None, help="visual tokens per sequence (default seq/4)")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--attention-impl", default="cpu", choices=["cpu", "xla", "splash"],
                   help="the attention compiled into the plan (splash: the Pallas TPU kernel, in interpret mode)")
    p.set_defaults(run=_plan)
    p = sub.add_parser("train", help="train or resume a run: orbax checkpoints and metrics.jsonl in --workdir")
    p.add_argument("--config", required=True, help="training YAML, e.g. configs/tiny_pretrain.yaml")
    p.add_argument("--workdir", required=True, help="run folder; the run resumes when it holds a checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=300")
    p.set_defaults(run=_train)
    p = sub.add_parser("bench", help="time glmv-jax against transformers on the same random weights (prefill, "
                                     "train step, decode; f32 and bf16) with the machine's matmul/bandwidth limits")
    options = _bench_module("options")  # the options alone: no numpy, jax or torch for `glmv --help`
    if options is not None:
        options.add_arguments(p)
    p.set_defaults(run=_bench)
    p = sub.add_parser("demo", help="pretraining, SFT and RLCS of the tiny model on the synthetic tasks, evaluated "
                                    "after each stage; writes WORKDIR/report.md (finished stages are reused)")
    p.add_argument("--workdir", default="runs/demo", help="one folder per stage, and the report")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every stage and rl.seed (init, data order, "
                   "sampling); the data and held-out prompts stay the same")
    p.add_argument("--fast", action="store_true", help="a smoke-sized run (a few steps per stage)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `glmv` command itself (not a call from Python): keep freed host memory on CPU
        hostmem.reexec_with_tuned_malloc("glmv_jax.cli", sys.argv[1:])
    args = build_parser().parse_args(argv)
    from glmv_jax.errors import GlmvError

    try:
        return args.run(args)
    except (GlmvError, FileNotFoundError, FileExistsError) as e:
        # bad input (files, configs, shapes): one clear line, no traceback, nothing half-done printed as a result;
        # any other exception is a bug of ours and keeps its traceback
        print(f"\nglmv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
