"""RL rollout throughput: our on-device sampler against transformers' `generate`, on the same random weights; ours
with group prefix sharing (each prompt's vision tower and prefill once for its G rows: `sample(group_size=G)`) and
without (the G rows prefilled one by one, as transformers does).

    python -m benchmarks.rollout [--config small] [--groups 8] [--group-size 8] [--new-tokens 64]
                                 [--image-side 112] [--text-tokens 48] [--repeats 2]

An RLCS rollout batch: `groups` prompts x `group_size` rows (each prompt one image of image_side^2 pixels and text), sampled
at temperature 1 over the whole vocabulary (top-p 1, no top-k), exactly `new_tokens` tokens (no stop id), float32.
Tokens/s = rows x new_tokens / the whole call (prefill included), median of `repeats` interleaved runs after a
warm-up (our compile is reported apart).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--image-side", type=int, default=112)
    p.add_argument("--text-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from benchmarks.common import image_prompt, interleaved_medians, model_pair
    from glmv_jax.generate import sampler

    config, hf, params = model_pair(args.config)
    params = params["float32"]
    g, rows, n = args.group_size, args.groups * args.group_size, args.new_tokens
    unique = image_prompt(config, args.groups, args.image_side, args.text_tokens)
    per_image = unique["pixel_values"].shape[0] // args.groups
    inputs = {k: np.repeat(v, g, axis=0) for k, v in unique.items() if k != "pixel_values"}
    inputs["pixel_values"] = np.concatenate([np.tile(block, (g, 1)) for block in
                                             np.split(unique["pixel_values"], args.groups)])
    assert inputs["pixel_values"].shape[0] == rows * per_image
    sampling = sampler.SamplingConfig(n, temperature=1.0, top_p=1.0, pad_id=0)
    keys = ("attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    tin = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def ours(seed=[0], shared=False):  # noqa: B006 - a new seed per call
        seed[0] += 1
        source = unique if shared else inputs
        out = sampler.sample(params, config, source["input_ids"], sampling=sampling, seed=seed[0],
                             group_size=g if shared else 1, **{k: source[k] for k in keys})
        return np.asarray(out.tokens)

    def theirs():
        with torch.no_grad():
            return hf.generate(**tin, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_p=1.0,
                               top_k=None, pad_token_id=0, eos_token_id=None)

    start = time.perf_counter()
    ours()
    first_s = time.perf_counter() - start
    ours(shared=True)
    theirs()
    t = interleaved_medians({"ours": ours, "ours_shared": lambda: ours(shared=True), "theirs": theirs}, args.repeats)
    result = {"rows": rows, "new_tokens": n, "prompt_tokens": int(inputs["input_ids"].shape[1]),
              "first_call_s (compile)": first_s,
              **{f"{k}_s": v for k, v in t.items()},
              **{f"{k}_tokens_per_s": rows * n / v for k, v in t.items()},
              "speedup": t["theirs"] / t["ours"], "speedup_shared": t["theirs"] / t["ours_shared"],
              "sharing_gain": t["ours"] / t["ours_shared"]}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
