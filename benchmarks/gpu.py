"""`glmv bench --backend gpu`: glmv-jax against transformers on CUDA, bfloat16 on both sides, on a model that loads
the accelerator (`benchmarks/gpu_1b.yaml`, ~1.2B parameters; rows of 4096 tokens with one 896x896 image each).

Theirs: Glm4vForConditionalGeneration on "cuda" in bfloat16 with flash_attention_2 where the flash-attn package
is installed, else sdpa (PyTorch picks its flash / cuDNN kernel). Ours: the same random weights through our HF
converter, attention by the backend default ("cudnn" on GPU). Rows, each the median of interleaved runs after
warm-up, both sides synchronised (jax.block_until_ready, torch.cuda.synchronize):
  prefill b   ours `generate.sampler.prefill` vs `model(**inputs, logits_to_keep=1)` (last-token logits);
  forward b   `glmv_jax.forward` vs `model(**inputs)` (every token's logits);
  train b     our jitted train step (AdamW, decoder layers scanned, `--remat` policy) vs forward + backward +
              clip + torch AdamW, both pure bf16.
MFU: FLOPs counted as MaxText does (`train.plan.model_flops`: matmuls, causal attention halved, vision tower
included; prefill without the lm_head on all but the last token) over the device's nominal dense bf16 peak
(`NOMINAL_PEAK`), with a measured 8192^3 bf16 matmul beside it. Memory: each side's allocator (XLA's BFC pool,
PyTorch's CUDA caching allocator), peak bytes from XLA's compiled analysis and torch.cuda.max_memory_allocated.

`--dry-run` runs the same code on the tiny config with tiny inputs on whatever device is there (CPU here): a check
that the script runs, not a measurement.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
CONFIG = str(Path(__file__).with_name("gpu_1b.yaml"))


@dataclasses.dataclass
class GpuSettings:
    config: str = CONFIG
    batches: tuple[int, ...] = (1, 2)
    train_batch: int = 2
    image_side: int = 896
    text_tokens: int = 3072
    repeats: int = 5
    remat: str = "none"
    matmul_size: int = 8192
    seed: int = 0
    dry_run: bool = False

    @classmethod
    def dry(cls) -> "GpuSettings":
        return cls(config="tiny", batches=(1,), train_batch=1, image_side=56, text_tokens=16, repeats=1,
                   matmul_size=256, dry_run=True)


def nominal_peak(device_kind: str) -> float | None:
    """The dense bf16 FLOP/s of a device kind ("NVIDIA H100 80GB HBM3" -> H100's), or None if unknown."""
    return next((p for name, p in NOMINAL_PEAK.items() if name in device_kind), None)


def _their_attention() -> str:
    import importlib.util
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


class GpuBench:
    def __init__(self, s: GpuSettings):
        import jax
        import torch

        from benchmarks.common import model_pair

        self.s = s
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config, hf, params = model_pair(s.config, s.seed, ("bfloat16",))
        self.params = params["bfloat16"]
        self.attention = _their_attention() if self.device == "cuda" else "sdpa"
        hf.set_attn_implementation(self.attention)
        self.hf = hf.to(self.device, torch.bfloat16)
        self.kind = jax.devices()[0].device_kind
        self.peak = nominal_peak(self.kind)

    def sync(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def prompt(self, batch: int):
        import torch

        from benchmarks.common import image_prompt
        inputs = image_prompt(self.config, batch, self.s.image_side, self.s.text_tokens, self.s.seed)
        tin = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        tin["pixel_values"] = tin["pixel_values"].to(torch.bfloat16)
        return inputs, tin

    def timed(self, ours, theirs) -> dict:
        """Warm-up then the medians of interleaved runs; theirs' peak allocated bytes over its runs."""
        import torch

        from benchmarks.common import interleaved_medians
        ours()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        theirs()
        self.sync()
        t = interleaved_medians({"ours": ours, "theirs": lambda: (theirs(), self.sync())}, self.s.repeats)
        t["theirs_peak"] = torch.cuda.max_memory_allocated() if self.device == "cuda" else 0
        return t

    def row(self, name, batch, t, flops, compiled) -> dict:
        from benchmarks.bench import _memory_bytes
        mfu = (lambda sec: flops / sec / self.peak) if self.peak else (lambda sec: None)
        return {"name": f"{name} b={batch} bf16", "batch": batch, "ours": t["ours"], "theirs": t["theirs"],
                "ratio": t["ours"] / t["theirs"], "flops": flops, "mfu_ours": mfu(t["ours"]),
                "mfu_theirs": mfu(t["theirs"]), "peak_bytes_ours": _memory_bytes(compiled).get("total"),
                "peak_bytes_theirs": t["theirs_peak"],
                "allocator": {"ours": "XLA BFC (device)" if self.device == "cuda" else "host malloc",
                              "theirs": "CUDA caching allocator" if self.device == "cuda" else "host malloc"}}

    def prefill(self, batch: int) -> dict:
        import jax
        import torch

        from benchmarks.bench import prefill_args, prefill_flops
        from glmv_jax.generate import sampler
        inputs, tin = self.prompt(batch)
        args, kwargs = prefill_args(self.params, self.config, inputs, 16)
        compiled = sampler.prefill.lower(*args, **kwargs).compile()

        def theirs():
            with torch.no_grad():
                return self.hf(**tin, logits_to_keep=1)

        t = self.timed(lambda: jax.block_until_ready(sampler.prefill(*args, **kwargs)), theirs)
        seq, patches = inputs["input_ids"].shape[1], inputs["pixel_values"].shape[0] // batch
        return self.row("prefill", batch, t, prefill_flops(self.config, batch, seq, patches), compiled)

    def forward(self, batch: int) -> dict:
        import jax
        import torch

        from benchmarks.bench import _sample_kwargs, forward_args, forward_flops
        from glmv_jax import forward
        from glmv_jax.model import glmv
        inputs, tin = self.prompt(batch)
        args, kwargs = forward_args(self.params, self.config, inputs)
        compiled = glmv.forward_jit.lower(*args, **kwargs).compile()

        def ours():
            return jax.block_until_ready(forward(self.params, self.config, inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"], **_sample_kwargs(inputs)))

        def theirs():
            with torch.no_grad():
                return self.hf(**tin)

        t = self.timed(ours, theirs)
        seq, patches = inputs["input_ids"].shape[1], inputs["pixel_values"].shape[0] // batch
        return self.row("forward", batch, t, forward_flops(self.config, batch, seq, patches), compiled)

    def train(self, batch: int) -> dict:
        import functools

        import jax
        import jax.numpy as jnp

        from benchmarks.bench import torch_train_step, train_flops, train_inputs
        from glmv_jax.train.optimizer import OptimizerConfig, make_optimizer
        from glmv_jax.train.steps import init_state, train_step
        inputs, tin = self.prompt(batch)
        opt = OptimizerConfig(learning_rate=1e-5, warmup_steps=1, total_steps=1000)
        jbatch = {k: jnp.asarray(v) for k, v in train_inputs(inputs, self.config).items()}
        tx = make_optimizer(opt, self.params)
        step = jax.jit(functools.partial(train_step, config=self.config, tx=tx, remat_policy=self.s.remat),
                       donate_argnums=0)
        holder = {"state": init_state(jax.tree.map(jnp.copy, self.params), tx)}
        compiled = step.lower(holder["state"], jbatch).compile()

        def ours():
            holder["state"], metrics = step(holder["state"], jbatch)
            return jax.block_until_ready(metrics)

        model, optimizer, theirs = torch_train_step(self.hf, opt, tin)  # theirs() syncs: it reads the loss
        t = self.timed(ours, theirs)
        del model, optimizer, holder
        seq, patches = inputs["input_ids"].shape[1], inputs["pixel_values"].shape[0] // batch
        return self.row("train step", batch, t, train_flops(self.config, batch, seq, patches), compiled)

    def matmul(self) -> dict:
        import jax
        import jax.numpy as jnp

        from benchmarks.common import interleaved_medians
        n = self.s.matmul_size
        a = jnp.ones((n, n), jnp.bfloat16)
        mm = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
        mm(a).block_until_ready()
        t = interleaved_medians({"ours": lambda: mm(a).block_until_ready()}, max(self.s.repeats, 5))["ours"]
        return {"name": f"matmul {n}^3 bf16", "seconds": t, "flops_per_s": 2.0 * n ** 3 / t}


def run(s: GpuSettings, json_path: str | os.PathLike | None = None) -> dict:
    """The matmul limit, every row (prefill and forward per batch, the train step) and the machine; the JSON is
    rewritten after each row, so a run cut short keeps what it measured."""
    import jax
    import torch
    wall = time.perf_counter()
    bench = GpuBench(s)
    result = {"machine": {"device_kind": bench.kind, "jax_backend": jax.default_backend(), "torch_device": bench.device,
                          "jax": jax.__version__, "torch": torch.__version__, "nominal_peak": bench.peak},
              "settings": {**dataclasses.asdict(s), "their_attention": bench.attention},
              "matmul": bench.matmul(), "figures": []}
    jobs = [(bench.prefill, b) for b in s.batches] + [(bench.forward, b) for b in s.batches]
    for job, batch in jobs + [(bench.train, s.train_batch)]:
        result["figures"].append(job(batch))
        result["wall_s"] = time.perf_counter() - wall
        print(table(result).splitlines()[-3], flush=True)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(result, indent=2, default=lambda x: x.item() if isinstance(
                x, np.generic) else str(x)))
    return result


def table(result: dict) -> str:
    pct = lambda x: "—" if x is None else f"{x:.1%}"  # noqa: E731
    lines = ["| figure | ours | theirs | ours/theirs time | MFU ours / theirs | peak GiB ours / theirs | allocator |",
             "|---|---|---|---|---|---|---|"]
    for f in result["figures"]:
        gib = lambda x: "—" if not x else f"{x / 2 ** 30:.1f}"  # noqa: E731
        lines.append(f"| {f['name']} | {f['ours'] * 1e3:.1f} ms | {f['theirs'] * 1e3:.1f} ms | {f['ratio']:.2f} | "
                     f"{pct(f['mfu_ours'])} / {pct(f['mfu_theirs'])} | {gib(f['peak_bytes_ours'])} / "
                     f"{gib(f['peak_bytes_theirs'])} | {f['allocator']['ours']} / {f['allocator']['theirs']} |")
    m = result["matmul"]
    lines.append(f"\n{result['machine']['device_kind']}: measured {m['name']} {m['flops_per_s'] / 1e12:.0f} TFLOP/s, "
                 f"nominal {(result['machine']['nominal_peak'] or 0) / 1e12:.0f}; theirs: "
                 f"{result['settings']['their_attention']}")
    return "\n".join(lines)


def main(args) -> int:
    """`glmv bench --backend gpu [--dry-run]` (options from `benchmarks.options`)."""
    s = GpuSettings.dry() if args.dry_run else GpuSettings(repeats=args.repeats)
    result = run(s, json_path=args.json)
    print(table(result))
    print(f"\nratio = our time / transformers' (below 1: we are faster). Wrote {args.json} in "
          f"{result['wall_s']:.0f} s.")
    return 0
