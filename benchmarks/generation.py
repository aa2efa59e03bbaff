"""Prefill and greedy decode of glmv-jax against transformers' generate, side by side on the `small` config.

    python -m benchmarks.generation [--batch 1 8] [--new-tokens 128] [--repeats 3]

Same random float32 weights on both sides, one 448x448 image + 256 text tokens per row (about 512
tokens), 2 threads. Prefill = the prompt forward to the first token's logits; decode tokens/s =
batch * new tokens / (generate time - prefill time). Medians of interleaved runs after warm-up.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import torch

from benchmarks.common import image_prompt, interleaved_medians, paired_models
from glmv_jax import SamplingConfig, sample
from glmv_jax.generate import sampler


def run(batches=(1, 8), new_tokens: int = 128, repeats: int = 3) -> list[dict]:
    torch.set_num_threads(2)
    config, model, params = paired_models("small")
    results = []
    for b in batches:
        inputs = image_prompt(config, b)
        torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        s = SamplingConfig(new_tokens, pad_id=0)  # no stop ids: always new_tokens tokens
        prefill_only = SamplingConfig(1, pad_id=0)

        def ours(sampling):
            out = sample(params, config, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"],
                         sampling=sampling)
            return jax.block_until_ready(out.tokens)

        def theirs(n):
            with torch.no_grad():
                return model.generate(**torch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)

        for warm in (lambda: ours(s), lambda: ours(prefill_only), lambda: theirs(1)):
            warm()
        t = interleaved_medians({"ours_prefill": lambda: ours(prefill_only), "hf_prefill": lambda: theirs(1),
                                 "ours_generate": lambda: ours(s), "hf_generate": lambda: theirs(new_tokens)},
                                repeats)
        ours_tokens, hf_tokens = np.asarray(ours(s)), theirs(new_tokens)[:, inputs["input_ids"].shape[1]:].numpy()
        row = {
            "batch": b, "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": new_tokens,
            "prefill_s": {"ours": t["ours_prefill"], "hf": t["hf_prefill"]},
            "decode_tok_s": {"ours": b * new_tokens / max(t["ours_generate"] - t["ours_prefill"], 1e-9),
                             "hf": b * new_tokens / max(t["hf_generate"] - t["hf_prefill"], 1e-9)},
            "same_tokens": bool((ours_tokens == hf_tokens).all()),
            "decode_compiles": sampler.decode._cache_size(),
        }
        results.append(row)
        p, d = row["prefill_s"], row["decode_tok_s"]
        print(f"batch {b}: prefill ours {p['ours']:.3f}s  hf {p['hf']:.3f}s  ratio {p['ours'] / p['hf']:.2f}x time | "
              f"decode ours {d['ours']:.1f} tok/s  hf {d['hf']:.1f} tok/s  speed-up {d['ours'] / d['hf']:.2f}x | "
              f"same greedy tokens: {row['same_tokens']}", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = run(tuple(args.batch), args.new_tokens, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
