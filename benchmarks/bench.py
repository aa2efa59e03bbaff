"""`glmv bench`: glmv-jax against transformers on the same random weights, with the machine's limits.

    glmv bench [--only prefill,forward,train,decode] [--dtypes float32,bfloat16] [--repeats 3] [--new-tokens 128]
               [--json runs/bench/bench.json] [--png runs/bench/bench.png]

The `small` config's random weights go into transformers' Glm4vForConditionalGeneration (PyTorch eager,
as many threads as XLA uses: every core) and, through `save_pretrained` and our HF converter, into
glmv-jax. Both get the same inputs: per row one 448x448 image (256 visual tokens) and 256 text tokens.
After warm-up (two steps each for training), each figure is the median of `repeats` runs taken in turn (ours,
theirs, ours, ...), so drift on the machine hits both sides alike.

Figures, each in float32 and in bfloat16 on both sides (our params loaded as bfloat16; theirs
`model.to(torch.bfloat16)`; training is then pure bf16 on both sides, AdamW moments included):
  prefill b=1, b=4   ours: the jitted `generate.sampler.prefill` (prompt padded to its length bucket, K/V
                     cache filled, last-token logits); theirs: `model(**inputs, logits_to_keep=1)` under no_grad,
                     the last token's logits too (equal work; before, theirs computed all tokens' logits).
  forward b=1, b=4   both full forwards through the public APIs, every token's logits: `glmv_jax.forward`
                     (host checks, bucketing, the jitted program) against `model(**inputs)` under no_grad.
  train b=4          ours: jitted `train.steps.train_step` (donated state, AdamW via `make_optimizer`, no
                     remat, decoder layers unrolled as `train.scan_layers: false` runs them; `--scan-layers`
                     times the scanned stack); theirs: forward with labels, backward, grad-norm clip,
                     torch.optim.AdamW step.
  decode b=1, b=8    greedy, `new_tokens` tokens, no stop token. Ours: `sample`; theirs: `generate(
                     do_sample=False, min_new_tokens=max_new_tokens)`. Decode time = generate time - the
                     prefill inside that same call; the figure is that per new token (a batch step).
Limits, measured in the same run: jitted 2048^3 matmul in f32 and in bf16 with f32 accumulation (torch's
matmul beside it), and memory read bandwidth (jitted sum of a 1 GiB f32 array; torch's sum beside it).
Utilisation: prefill and training FLOPs counted as MaxText does (`train.plan.model_flops`: matmuls,
causal attention halved, vision tower included; a prefill is a third of a training step's, without the
lm_head on all but the last token) over the measured matmul peak of the dtype; decode: bytes of the
decoder + lm_head weights read per step over the measured bandwidth.
Malloc: each row names the host malloc each side ran with (one process: the same; `glmv_jax.hostmem`).
Peak memory: ours from XLA's compiled memory analysis (arguments + outputs - aliased + temporaries);
theirs = parameter bytes + the process's peak RSS growth during the warm-up call (sampled every 2 ms,
after handing free heap memory back with malloc_trim; a coarse figure, PyTorch has no CPU allocator stats).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.options import DTYPES, SECTIONS, SHORT, Settings, add_arguments


# ------------------------------------------------------------------------------------ helpers

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _memory_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes), "total": int(total)}


def _tree_bytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _torch_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


class _Captured(Exception):
    pass


@contextlib.contextmanager
def _patched(module, name: str, make):
    """Temporarily replace module.name by make(original)."""
    original = getattr(module, name)
    setattr(module, name, make(original))
    try:
        yield original
    finally:
        setattr(module, name, original)


def _torch_inputs(inputs: dict, dtype) -> dict:
    import torch
    out = {k: torch.from_numpy(v) for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _sample_kwargs(inputs: dict) -> dict:
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
            "mm_token_type_ids": inputs["mm_token_type_ids"]}


def _per_row_flops(config, seq: int, patches: int) -> float:
    """Training FLOPs (3x forward) of one row of `seq` tokens with one image of `patches` patches."""
    from glmv_jax.train.plan import model_flops
    # model_flops bounds vision attention by all of a batch's patches; per row it is exactly one image's
    return model_flops(config, seq, patches, seq, 1)


def prefill_flops(config, batch: int, seq: int, patches: int) -> float:
    """A prefill: the forward third of the training count, lm_head only on the last token."""
    t = config.text
    return batch * (_per_row_flops(config, seq, patches) / 3 - 2 * (seq - 1) * t.hidden_size * t.vocab_size)


def train_flops(config, batch: int, seq: int, patches: int) -> float:
    return batch * _per_row_flops(config, seq, patches)


def decode_weight_bytes(params) -> int:
    """Bytes of weights one decode step reads: the decoder layers, final norm and lm_head (the embedding
    table is gathered, B rows, not read whole)."""
    import jax
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params["decoder"])[0]:
        if "embed" not in jax.tree_util.keystr(path):
            total += x.size * x.dtype.itemsize
    return int(total)


def captured_call(module, name: str, run) -> tuple[tuple, dict]:
    """The (args, kwargs) with which `run()` calls `module.name` (that call is stopped there)."""
    captured = {}

    def make(original):
        def capture(*args, **kwargs):
            captured.update(args=args, kwargs=kwargs)
            raise _Captured
        return capture

    with _patched(module, name, make):
        try:
            run()
        except _Captured:
            pass
    return captured["args"], captured["kwargs"]


def prefill_args(params, config, inputs: dict, new_tokens: int):
    """The exact arguments `sample` passes to the jitted prefill (bucketed, left-padded, 3D positions)."""
    from glmv_jax.generate import sampler
    return captured_call(sampler, "prefill", lambda: sampler.sample(
        params, config, inputs["input_ids"], **_sample_kwargs(inputs),
        sampling=sampler.SamplingConfig(new_tokens, pad_id=0)))


def forward_args(params, config, inputs: dict, attention_impl: str | None = None):
    """The arguments `glmv_jax.forward` passes to its jitted program for a bench prompt (checked, bucketed)."""
    from glmv_jax.model import glmv
    return captured_call(glmv, "forward_jit", lambda: glmv.forward(
        params, config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
        attention_impl=attention_impl, **_sample_kwargs(inputs)))


def forward_flops(config, batch: int, seq: int, patches: int) -> float:
    """A full forward: the forward third of the training count (lm_head on every token)."""
    return batch * _per_row_flops(config, seq, patches) / 3


def torch_train_step(hf_model, opt, tin: dict):
    """(model copy in train mode, its torch AdamW, step()) for transformers' side of a train row: forward with
    labels, backward, grad-norm clip, AdamW step; step() returns the loss."""
    import torch
    model = copy.deepcopy(hf_model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    labels = tin["input_ids"].clone()

    def step():
        loss = model(**tin, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return model, optimizer, step


def malloc_in_use() -> str:
    """The host malloc of this process (both sides of the CPU bench share it): `glmv_jax.hostmem`'s tuning or not."""
    return _malloc({"glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")})


# ------------------------------------------------------------------------------------ limits

def train_inputs(inputs: dict, config) -> dict:
    """Our training batch for a bench prompt: every position predicts the next one, as transformers' labels;
    visual inputs in the layout `data/visual_layout.pad_visual` picks (framed: one image per row)."""
    from glmv_jax.data.visual_layout import pad_visual
    pixels, grid = pad_visual(inputs["pixel_values"], inputs["image_grid_thw"], config.vision)
    ids = inputs["input_ids"].astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    loss_mask = np.ones(ids.shape, np.float32)
    loss_mask[:, -1] = 0.0
    return {"input_ids": ids, "segment_ids": np.ones_like(ids), "targets": targets, "loss_mask": loss_mask,
            "mm_token_type_ids": inputs["mm_token_type_ids"].astype(np.int32), "pixel_values": pixels,
            "image_grid_thw": grid}


def measure_limits(s: Settings) -> list[dict]:
    """Matmul peak (f32; bf16 with f32 accumulation) and read bandwidth, jitted, with torch's beside them."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.common import interleaved_medians

    rows = []
    n = s.matmul_size
    rng = np.random.default_rng(s.seed)
    a_np, b_np = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    for dtype in s.dtypes:
        jdt, tdt = getattr(jnp, dtype), getattr(torch, dtype)
        a, b = jnp.asarray(a_np, jdt), jnp.asarray(b_np, jdt)
        ta, tb = torch.from_numpy(a_np).to(tdt), torch.from_numpy(b_np).to(tdt)
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        mm(a, b).block_until_ready()
        ta @ tb
        t = interleaved_medians({"ours": lambda: mm(a, b).block_until_ready(), "theirs": lambda: ta @ tb},
                                max(s.repeats, 5))
        flops = 2.0 * n ** 3
        accumulate = "" if dtype == "float32" else ", f32 accumulation"
        rows.append({"name": f"matmul {n}^3 {SHORT[dtype]}", "section": "limits", "dtype": dtype, "batch": None,
                     "unit": "s", "ours": t["ours"], "theirs": t["theirs"], "ratio": t["ours"] / t["theirs"],
                     "flops": flops, "ours_rate": flops / t["ours"], "theirs_rate": flops / t["theirs"],
                     "rate_unit": "FLOP/s", "utilisation": None,
                     "note": f"jax.jit matmul{accumulate} vs torch.matmul ({dtype} out)"})
        del a, b, ta, tb
    nbytes = s.bandwidth_mib << 20
    big = jnp.ones((nbytes // 4,), jnp.float32)
    tbig = torch.ones(nbytes // 4, dtype=torch.float32)
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    tbig.sum()
    t = interleaved_medians({"ours": lambda: total(big).block_until_ready(), "theirs": lambda: tbig.sum()},
                            max(s.repeats, 5))
    rows.append({"name": f"read bandwidth {s.bandwidth_mib} MiB", "section": "limits", "dtype": "float32",
                 "batch": None, "unit": "s", "ours": t["ours"], "theirs": t["theirs"],
                 "ratio": t["ours"] / t["theirs"], "bytes": nbytes, "ours_rate": nbytes / t["ours"],
                 "theirs_rate": nbytes / t["theirs"], "rate_unit": "B/s", "utilisation": None,
                 "note": "jax.jit(jnp.sum) vs torch.sum over one f32 array"})
    del big, tbig
    return rows


# ------------------------------------------------------------------------------------ sections

class Bench:
    def __init__(self, s: Settings, config, hf_model, params, dtype: str, limits: dict):
        import torch
        self.s, self.config, self.hf, self.params, self.dtype = s, config, hf_model, params, dtype
        self.torch_dtype = getattr(torch, dtype)
        self.peak = limits["matmul"][dtype]
        self.bandwidth = limits["bandwidth"]
        self.hf_param_bytes = _torch_bytes(hf_model.parameters())

    def prompt(self, batch: int) -> dict:
        from benchmarks.common import image_prompt
        return image_prompt(self.config, batch, self.s.image_side, self.s.text_tokens, self.s.seed)

    def _row(self, name, section, batch, unit, ours, theirs, **extra) -> dict:
        malloc = malloc_in_use()  # one process: both sides run with the same malloc
        return {"name": f"{name} {SHORT[self.dtype]}", "section": section, "dtype": self.dtype, "batch": batch,
                "unit": unit, "ours": ours, "theirs": theirs, "ratio": ours / theirs,
                "malloc": {"ours": malloc, "theirs": malloc}, **extra}

    def _flops_row(self, name, section, batch, t, flops, *, compiled, compile_s, first_call_s, rss, **extra) -> dict:
        """A row timed in seconds and rated in FLOPs against the matmul peak, with compile and memory figures."""
        return self._row(name, section, batch, "s", t["ours"], t["theirs"], flops=flops,
                         utilisation=flops / t["ours"] / self.peak, utilisation_of="matmul peak",
                         theirs_utilisation=flops / t["theirs"] / self.peak, compile_s=compile_s,
                         first_call_s=first_call_s, peak_bytes_ours=_memory_bytes(compiled),
                         peak_bytes_theirs=self.hf_param_bytes + rss.growth, **extra)

    def _patches(self, inputs) -> int:
        return int(inputs["pixel_values"].shape[0] // inputs["input_ids"].shape[0])

    # ---- prefill
    def prefill_args(self, inputs: dict, new_tokens: int):
        return prefill_args(self.params, self.config, inputs, new_tokens)

    def prefill(self, batch: int) -> dict:
        import jax
        import torch

        from benchmarks.common import PeakRSS, interleaved_medians
        from glmv_jax.generate import sampler

        inputs = self.prompt(batch)
        args, kwargs = self.prefill_args(inputs, self.s.new_tokens)  # the program decode's `sample` runs too
        start = time.perf_counter()
        compiled = sampler.prefill.lower(*args, **kwargs).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(sampler.prefill(*args, **kwargs))
        first_call_s = time.perf_counter() - start
        tin = _torch_inputs(inputs, self.torch_dtype)

        def theirs():
            with torch.no_grad():
                return self.hf(**tin, logits_to_keep=1)

        with PeakRSS() as rss:
            theirs()
        t = interleaved_medians({"ours": lambda: jax.block_until_ready(sampler.prefill(*args, **kwargs)),
                                 "theirs": theirs}, self.s.repeats)
        seq, padded = inputs["input_ids"].shape[1], args[2].shape[1]
        flops = prefill_flops(self.config, batch, seq, self._patches(inputs))
        return self._flops_row(f"prefill b={batch}", "prefill", batch, t, flops, compiled=compiled,
                               compile_s=compile_s, first_call_s=first_call_s, rss=rss,
                               note=f"{seq} prompt tokens ({padded} after our bucketing); theirs: model(**inputs, "
                                    f"logits_to_keep=1), the last token's logits; ours the last two positions' "
                                    f"(returning the last) and the K/V cache")

    def forward(self, batch: int) -> dict:
        """Both full forwards through the public API: `glmv_jax.forward` against `model(**inputs)`, every
        token's logits on both sides."""
        import jax
        import torch

        from benchmarks.common import PeakRSS, interleaved_medians
        from glmv_jax import forward
        from glmv_jax.model import glmv

        inputs = self.prompt(batch)
        args, kwargs = forward_args(self.params, self.config, inputs)
        start = time.perf_counter()
        compiled = glmv.forward_jit.lower(*args, **kwargs).compile()
        compile_s = time.perf_counter() - start

        def ours():
            return jax.block_until_ready(forward(self.params, self.config, inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"], **_sample_kwargs(inputs)))

        start = time.perf_counter()
        ours()
        first_call_s = time.perf_counter() - start
        tin = _torch_inputs(inputs, self.torch_dtype)

        def theirs():
            with torch.no_grad():
                return self.hf(**tin)

        with PeakRSS() as rss:
            theirs()
        t = interleaved_medians({"ours": ours, "theirs": theirs}, self.s.repeats)
        seq = inputs["input_ids"].shape[1]
        flops = forward_flops(self.config, batch, seq, self._patches(inputs))
        return self._flops_row(f"forward b={batch}", "forward", batch, t, flops, compiled=compiled,
                               compile_s=compile_s, first_call_s=first_call_s, rss=rss,
                               note=f"{seq} tokens; both sides every token's logits (glmv_jax.forward, with its host "
                                    f"checks, vs model(**inputs))")

    # ---- training
    def train_batch(self, batch: int) -> dict:
        inputs = self.prompt(batch)
        return train_inputs(inputs, self.config), inputs

    def train(self, batch: int) -> dict:
        import jax
        import jax.numpy as jnp

        from benchmarks.common import PeakRSS, interleaved_medians
        from glmv_jax.train.optimizer import OptimizerConfig, make_optimizer
        from glmv_jax.train.steps import init_state, train_step

        opt = OptimizerConfig(learning_rate=1e-5, warmup_steps=1, total_steps=1000)
        jbatch, inputs = self.train_batch(batch)
        jbatch = {k: jnp.asarray(v) for k, v in jbatch.items()}
        tx = make_optimizer(opt, self.params)
        step = jax.jit(functools.partial(train_step, config=self.config, tx=tx, scan_layers=self.s.scan_layers),
                       donate_argnums=0)
        holder = {"state": init_state(jax.tree.map(jnp.copy, self.params), tx)}
        start = time.perf_counter()
        compiled = step.lower(holder["state"], jbatch).compile()
        compile_s = time.perf_counter() - start

        def ours():
            holder["state"], metrics = step(holder["state"], jbatch)
            return jax.block_until_ready(metrics)

        start = time.perf_counter()
        ours_loss = float(ours()["loss"])
        first_call_s = time.perf_counter() - start

        tin = _torch_inputs(inputs, self.torch_dtype)
        model, optimizer, theirs = torch_train_step(self.hf, opt, tin)

        with PeakRSS() as rss:
            their_loss = theirs()
        ours(), theirs()  # a second warm-up step each: the heap grows to its steady size over the first steps
        t = interleaved_medians({"ours": ours, "theirs": theirs}, self.s.train_repeats or self.s.repeats)
        del model, optimizer, holder
        seq = inputs["input_ids"].shape[1]
        flops = train_flops(self.config, batch, seq, self._patches(inputs))
        return self._flops_row(f"train step b={batch}", "train", batch, t, flops, compiled=compiled,
                               compile_s=compile_s, first_call_s=first_call_s, rss=rss,
                               first_loss={"ours": ours_loss, "theirs": their_loss},
                               note=f"{seq} tokens per row, AdamW + clip; theirs' peak includes grads and AdamW "
                                    f"state allocated on the warm-up step")

    # ---- decode
    def decode(self, batch: int) -> dict:
        import jax
        import torch
        import transformers

        from benchmarks.common import PeakRSS, interleaved_timings
        from glmv_jax.generate import sampler

        n = self.s.new_tokens
        inputs = self.prompt(batch)
        sampling = sampler.SamplingConfig(n, pad_id=0)  # no stop ids: always n tokens
        marks: dict = {}
        compiled: dict = {}

        def compile_first(original):  # AOT-compile (timed) before the first call, which then hits the cache
            def wrapper(*args, **kwargs):
                if "decode" not in compiled:
                    start = time.perf_counter()
                    compiled["decode"] = original.lower(*args, **kwargs).compile()
                    marks["decode_compile_s"] = time.perf_counter() - start
                return original(*args, **kwargs)
            return wrapper

        def stamp_prefill(original):
            def wrapper(*args, **kwargs):
                out = jax.block_until_ready(original(*args, **kwargs))
                marks["prefill_done"] = time.perf_counter()
                return out
            return wrapper

        def ours():
            start = time.perf_counter()
            with _patched(sampler, "prefill", stamp_prefill):
                out = sampler.sample(self.params, self.config, inputs["input_ids"], **_sample_kwargs(inputs),
                                     sampling=sampling)
                marks["tokens"] = np.asarray(out.tokens)
            end = time.perf_counter()
            return {"prefill": marks["prefill_done"] - start, "decode": end - marks["prefill_done"]}

        # the prefill program (same cache size) may be compiled already by the prefill section
        args, kwargs = self.prefill_args(inputs, n)
        start = time.perf_counter()
        prefill_compiled = sampler.prefill.lower(*args, **kwargs).compile()
        prefill_compile_s = time.perf_counter() - start
        start = time.perf_counter()
        with _patched(sampler, "decode", compile_first):
            ours()
        first_call_s = time.perf_counter() - start

        class Stamp(transformers.LogitsProcessor):
            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        tin = _torch_inputs(inputs, self.torch_dtype)
        their_tokens = {}

        def theirs(new_tokens=n):
            stamp = Stamp()
            start = time.perf_counter()
            with torch.no_grad():
                out = self.hf.generate(**tin, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0, eos_token_id=None,
                                       logits_processor=transformers.LogitsProcessorList([stamp]))
            end = time.perf_counter()
            their_tokens["tokens"] = out[:, inputs["input_ids"].shape[1]:].numpy()
            return {"prefill": stamp.times[0] - start, "decode": end - stamp.times[0]}

        with PeakRSS() as rss:  # a short warm-up: eager has nothing to compile; the prefill holds the peak
            theirs(min(n, 8))
        t = interleaved_timings({"ours": ours, "theirs": theirs}, self.s.repeats)
        ours_step, their_step = t["ours"]["decode"] / n, t["theirs"]["decode"] / n
        weight_bytes = decode_weight_bytes(self.params)
        same = (marks["tokens"].shape == their_tokens["tokens"].shape
                and bool((marks["tokens"] == their_tokens["tokens"]).all()))
        return self._row(f"decode b={batch}", "decode", batch, "s/token", ours_step, their_step,
                         weight_bytes=weight_bytes, utilisation=weight_bytes / ours_step / self.bandwidth,
                         utilisation_of="read bandwidth",
                         theirs_utilisation=weight_bytes / their_step / self.bandwidth,
                         tokens_per_s={"ours": batch / ours_step, "theirs": batch / their_step},
                         generate_s={"ours": t["ours"]["total"], "theirs": t["theirs"]["total"]},
                         prefill_in_generate_s={"ours": t["ours"]["prefill"], "theirs": t["theirs"]["prefill"]},
                         compile_s=prefill_compile_s + marks.get("decode_compile_s", 0.0),
                         compile_parts_s={"prefill": prefill_compile_s, "decode": marks.get("decode_compile_s")},
                         first_call_s=first_call_s,
                         peak_bytes_ours={"prefill": _memory_bytes(prefill_compiled),
                                          "decode": _memory_bytes(compiled["decode"]) if "decode" in compiled else {},
                                          "total": max(_memory_bytes(prefill_compiled).get("total", 0),
                                                       _memory_bytes(compiled["decode"]).get("total", 0)
                                                       if "decode" in compiled else 0)},
                         peak_bytes_theirs=self.hf_param_bytes + rss.growth, same_greedy_tokens=same,
                         note=f"{n} new tokens; per token = (generate - its prefill) / {n}")


# ------------------------------------------------------------------------------------ run

def run(settings: Settings | None = None, *, json_path: str | os.PathLike | None = "runs/bench/bench.json",
        png_path: str | os.PathLike | None = "runs/bench/bench.png", **overrides) -> dict:
    """Run the benchmark; returns (and writes as JSON, and charts as PNG) {machine, settings, figures, ...}.

    `overrides` set fields of `Settings` (e.g. config="tiny", repeats=1, new_tokens=4).
    """
    s = dataclasses.replace(settings or Settings(), **overrides)
    unknown = set(s.sections) - set(SECTIONS)
    if unknown or set(s.dtypes) - set(DTYPES):
        raise ValueError(f"sections must be among {SECTIONS} and dtypes among {DTYPES}; got {s.sections}, "
                         f"{s.dtypes}")
    wall = time.perf_counter()
    load_start = os.getloadavg()
    import jax
    import torch

    from benchmarks.common import model_pair

    torch.set_num_threads(s.threads)
    figures = measure_limits(s)
    by_name = {f["name"]: f for f in figures}
    limits = {"matmul": {d: by_name[f"matmul {s.matmul_size}^3 {SHORT[d]}"]["ours_rate"] for d in s.dtypes},
              "bandwidth": by_name[f"read bandwidth {s.bandwidth_mib} MiB"]["ours_rate"]}
    for f in figures:
        _log(_line(f))
    config, hf_model, params = model_pair(s.config, s.seed, tuple(s.dtypes))
    hf_attention = hf_model.config._attn_implementation
    for dtype in s.dtypes:
        hf_model.to(getattr(torch, dtype))
        bench = Bench(s, config, hf_model, params[dtype], dtype, limits)
        jobs = ([(bench.prefill, b) for b in s.prefill_batches] * ("prefill" in s.sections)
                + [(bench.forward, b) for b in s.prefill_batches] * ("forward" in s.sections)
                + [(bench.decode, b) for b in s.decode_batches] * ("decode" in s.sections)
                + [(bench.train, s.train_batch)] * ("train" in s.sections))
        for job, batch in jobs:
            start = time.perf_counter()
            figures.append({**job(batch), "wall_s": time.perf_counter() - start, "load_average": os.getloadavg()})
            _log(_line(figures[-1]))
        del bench
    order = {name: i for i, name in enumerate(("limits",) + SECTIONS)}
    figures.sort(key=lambda f: (order[f["section"]], DTYPES.index(f["dtype"]) if f["section"] != "limits" else 0,
                                f["batch"] or 0))
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "jax_devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "torch": torch.__version__,
                    "transformers": _version("transformers"), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "settings": {**dataclasses.asdict(s), "hf_attention": hf_attention},
        "limits": limits,
        "figures": figures,
        "wall_s": time.perf_counter() - wall,
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=_jsonable))
    if png_path:
        chart(result, png_path)
    return result


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ------------------------------------------------------------------------------------ output

def _time(seconds: float, unit: str) -> str:
    if unit == "s/token":
        return f"{seconds * 1e3:.1f} ms/tok"
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _rate(x: float, unit: str) -> str:
    return f"{x / 1e9:.1f} G{unit}"


def _mb(x) -> str:
    if isinstance(x, dict):
        x = x.get("total")
    return "—" if not x else f"{x / 2 ** 20:.0f}"


def _line(f: dict) -> str:
    util = "" if f.get("utilisation") is None else f", utilisation {f['utilisation']:.1%} of {f['utilisation_of']}"
    took = f" [{f['wall_s']:.0f} s, load {f['load_average'][0]:.1f}]" if "wall_s" in f else ""
    return (f"{f['name']}: ours {_time(f['ours'], f['unit'])}, theirs {_time(f['theirs'], f['unit'])}, "
            f"ratio {f['ratio']:.2f}{util}{took}")


def table(result: dict) -> str:
    """The markdown table: per figure ours, theirs, ratio of times, our utilisation, compile, peak memory."""
    lines = ["| figure | ours | theirs | ours/theirs time | our utilisation | our compile | peak MiB ours / theirs "
             "| malloc ours / theirs |", "|---|---|---|---|---|---|---|---|"]
    for f in result["figures"]:
        ours, theirs = _time(f["ours"], f["unit"]), _time(f["theirs"], f["unit"])
        if f["section"] == "limits":
            ours += f" ({_rate(f['ours_rate'], f['rate_unit'])})"
            theirs += f" ({_rate(f['theirs_rate'], f['rate_unit'])})"
            util = "(the limit)"
        else:
            what = "FLOP peak" if f["utilisation_of"] == "matmul peak" else "bandwidth"
            util = f"{f['utilisation']:.1%} of {what}"
        if f["section"] == "decode":
            ours += f" ({f['tokens_per_s']['ours']:.0f} tok/s)"
            theirs += f" ({f['tokens_per_s']['theirs']:.0f} tok/s)"
        compile_s = f"{f['compile_s']:.1f} s" if f.get("compile_s") is not None else "—"
        memory = "—" if f["section"] == "limits" else f"{_mb(f['peak_bytes_ours'])} / {_mb(f['peak_bytes_theirs'])}"
        malloc = " / ".join(f["malloc"].values()) if "malloc" in f else "—"
        lines.append(f"| {f['name']} | {ours} | {theirs} | {f['ratio']:.2f} | {util} | {compile_s} | {memory} "
                     f"| {malloc} |")
    return "\n".join(lines)


def header(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    return (f"glmv bench: config {s['config']}, {m['cpus']} CPUs ({m['processor']}), torch {m['torch']} with "
            f"{m['torch_threads']} threads, transformers {m['transformers']} (attention: {s['hf_attention']}), "
            f"jax {m['jax']}; host malloc {_malloc(m)}; our train step's decoder layers "
            f"{'scanned' if s.get('scan_layers') else 'unrolled'}; medians of {s['repeats']} interleaved runs after "
            f"warm-up; 1-minute load average {m['load_average_start'][0]:.2f} at start, "
            f"{m['load_average_end'][0]:.2f} at end (near 0: a quiet machine; near or above the CPU count: other "
            f"work shared it and the times are noisy)")


def _malloc(machine: dict) -> str:
    """How the process's (shared by both sides) glibc malloc was set up: `glmv_jax.hostmem`'s tuning or not."""
    from glmv_jax import hostmem
    return "tuned (glmv_jax.hostmem)" if hostmem.TUNABLES in machine.get("glibc_tunables", "") else "system default"


def chart(result: dict, path: str | os.PathLike) -> None:
    """Bars of ours/theirs time per figure, a line at 1.0 (below: we are faster)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = result["figures"]
    names = [f["name"] for f in figures]
    ratios = [f["ratio"] for f in figures]
    colors = ["#888888" if f["section"] == "limits" else ("#1f77b4" if f["dtype"] == "float32" else "#ff7f0e")
              for f in figures]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(figures) + 2), 4.5))
    bars = ax.bar(range(len(figures)), ratios, color=colors)
    ax.axhline(1.0, color="black", linewidth=1)
    for bar, r in zip(bars, ratios):
        ax.annotate(f"{r:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(figures)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("time ours / transformers (lower is better)")
    ax.set_title(f"glmv-jax vs transformers, {result['settings']['config']} config "
                 "(grey: limits, blue: f32, orange: bf16)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None, *, args: argparse.Namespace | None = None) -> int:
    """Run from command-line arguments (or from `args` already parsed by `add_arguments`'s options)."""
    if args is None:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
        args = add_arguments(parser).parse_args(argv)
    if getattr(args, "backend", "cpu") == "gpu":
        from benchmarks import gpu
        return gpu.main(args)
    s = Settings(config=args.config, sections=tuple(x for x in args.only.split(",") if x),
                 dtypes=tuple(x for x in args.dtypes.split(",") if x), repeats=args.repeats,
                 train_repeats=args.train_repeats, prefill_batches=tuple(args.prefill_batch),
                 train_batch=args.train_batch, scan_layers=args.scan_layers,
                 decode_batches=tuple(args.decode_batch), new_tokens=args.new_tokens,
                 image_side=args.image_side, text_tokens=args.text_tokens, threads=args.threads)
    result = run(s, json_path=args.json, png_path=args.png)
    print(header(result))
    print()
    print(table(result))
    print()
    print(f"ratio = our time / transformers' time (below 1: we are faster). Wrote {args.json} and {args.png} "
          f"in {result['wall_s']:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
