"""`glmv train` for a config with an `rl:` section: RLCS from an SFT checkpoint on the synthetic tasks.

One readable function: model and tokenizer from `train.init_from`, the prompt pool and held-out
prompts, an offline pass@k run that seeds the curriculum, then iterations of `rlcs.iteration` with
metrics, evaluation and checkpoints. Runs on one device (the sampler takes no mesh yet).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.checkpoint.state import TrainCheckpointer, has_checkpoint
from glmv_jax.config import to_hf_dict
from glmv_jax.data import synthetic
from glmv_jax import sharding as mesh_lib
from glmv_jax.rl import rewards, rlcs
from glmv_jax.rl.curriculum import Curriculum
from glmv_jax.train import sources as sources_lib
from glmv_jax.train.config import TrainConfig, check_model_tokenizer, model_for_tokenizer
from glmv_jax.train.loop import (_load_init_params, compute_dtype_of, image_processor, init_sharded_params,
                                  state_layout)
from glmv_jax.train.metrics import MetricsWriter, Progress
from glmv_jax.train.steps import init_state

CURRICULUM_FILE = "curriculum.json"


class SyntheticPool:
    """The RL prompt pool: synthetic examples 0..n-1 of `seed`, drawn when asked for (a large pool costs no memory)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise KeyError(index)
        return synthetic.example_at(int(index), seed=self.seed)

    def domains(self) -> list[str]:
        return [synthetic.DOMAINS[i % len(synthetic.DOMAINS)] for i in range(self.n)]


def offline_pass_rates(params, model, prompts: rlcs.Prompts, cfg: rlcs.RLConfig, tokenizer, k: int,
                       batch: int = 64) -> list[float]:
    """Share of k sampled answers with reward > 0.5, per prompt (the curriculum's offline pass@k)."""
    rows = np.repeat(np.arange(len(prompts.examples)), k)
    wins = np.zeros(len(prompts.examples))
    sampling = rlcs.sampling_config(cfg, tokenizer)
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        out = rlcs.rollout(params, model, prompts, part, sampling, seed=start)
        texts = rlcs.responses(out["tokens"], out["lengths"], tokenizer)
        scores = rewards.score_batch([prompts.examples[r] for r in part], texts)
        np.add.at(wins, part, [s["reward"] > 0.5 for s in scores])
    return (wins / k).tolist()


def train_rl(cfg: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) RLCS iterations; returns the last metrics (with eval_reward)."""
    rl: rlcs.RLConfig = cfg.rl
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # ------------------------------------------------------------------------------ model and tokenizer
    sizes = cfg.mesh.sizes(1)
    if math.prod(sizes.values()) != 1:
        raise NotImplementedError("RLCS runs on one device for now (the sampler takes no mesh); set mesh to 1")
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    train_source, _ = sources_lib.make_sources(cfg.data)
    resuming = has_checkpoint(workdir)
    if not resuming and not cfg.train.init_from:
        raise ValueError("an RL run starts from an SFT model: set train.init_from")
    tokenizer, trained_here = sources_lib.tokenizer_for_run(cfg.data, workdir, train_source,
                                                            None if resuming else cfg.train.init_from)
    model = cfg.base_model()
    if trained_here or cfg.data.tokenizer == "synthetic":
        model = model_for_tokenizer(model, tokenizer)
    check_model_tokenizer(model, tokenizer)
    processor = image_processor(cfg.data, model.vision)

    # ------------------------------------------------------------------------------- params and state
    layout = state_layout(model, cfg, mesh)
    checkpointer = TrainCheckpointer(workdir, keep=cfg.checkpoint.keep)
    if resuming:
        state = checkpointer.restore(layout.restore_target())
        state.pop("rng")
        curriculum = Curriculum.from_dict(json.loads((workdir / CURRICULUM_FILE).read_text()))
    else:
        params = (_load_init_params(cfg.train.init_from, model, layout.abstract_params, layout.param_shardings)
                  if cfg.train.init_from else init_sharded_params(model, cfg.train.seed, layout.param_shardings))
        state = init_state(params, layout.tx)
        curriculum = None
    (workdir / "train_config.yaml").write_text(cfg.to_yaml())
    (workdir / "config.json").write_text(json.dumps(to_hf_dict(model), indent=2))
    step_fn = rlcs.make_policy_step(model, layout.tx, rl, compute_dtype_of(cfg))

    # ------------------------------------------------------------------- prompt pool, held-out prompts
    pool = SyntheticPool(rl.prompt_pool, cfg.data.seed)
    held_out = [synthetic.example_at(i, seed=cfg.data.seed + 10_000) for i in range(rl.eval_prompts)]
    eval_prompts = rlcs.make_prompts(held_out, tokenizer, processor, tokenizer.eos_ids[0])
    rewards.warmup()
    writer = MetricsWriter(workdir, resume_step=int(state["step"]))
    if curriculum is None:
        if rl.offline_k:
            pool_prompts = rlcs.make_prompts([pool[i] for i in range(len(pool))], tokenizer, processor,
                                             tokenizer.eos_ids[0])
            rates = offline_pass_rates(state["params"], model, pool_prompts, rl, tokenizer, k=rl.offline_k)
        else:  # no offline pass: every example starts at Beta(1, 1) (medium) and is placed by its rollouts
            rates = [0.5] * len(pool)
        curriculum = Curriculum.from_pass_at_k(list(range(len(pool))), pool.domains(), rates, k=rl.offline_k)
        before = rlcs.evaluate(state["params"], model, eval_prompts, rl, tokenizer)
        writer.write({"step": 0, **{f"eval_{k}": v for k, v in before.items()},
                      "offline_pass_rate": float(np.mean(rates))})
        print(f"glmv train (rl): before RL, held-out reward {before['reward']:.3f} "
              f"(offline pass@{rl.offline_k} {np.mean(rates):.3f})", file=sys.stderr)

    # -------------------------------------------------------------------------------------- iterations
    done = int(json.loads((workdir / "progress.json").read_text())["iteration"]) if resuming else 0
    rng = np.random.default_rng(rl.seed * 1_000_003 + done)
    progress = Progress(rl.iterations, initial=done)
    last: dict[str, Any] = {}
    try:
        for it in range(done + 1, rl.iterations + 1):
            state, metrics = rlcs.iteration(state, step_fn, model, rl, curriculum, pool, tokenizer, processor, rng,
                                            seed=rl.seed * 100_003 + it)
            last = {"step": it, **metrics}
            if it % rl.eval_every == 0 or it == rl.iterations:
                scores = rlcs.evaluate(state["params"], model, eval_prompts, rl, tokenizer)
                last.update({f"eval_{k}": v for k, v in scores.items()})
            writer.write(last)
            progress.update()
            progress.log(last)
            if it % cfg.checkpoint.every == 0 or it == rl.iterations:
                checkpointer.save(int(state["step"]), {**state, "rng": jnp.zeros((2,), jnp.uint32)})
                checkpointer.wait()
                (workdir / CURRICULUM_FILE).write_text(json.dumps(curriculum.to_dict()))
                (workdir / "progress.json").write_text(json.dumps({"iteration": it}))
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
    print(f"glmv train (rl): {rl.iterations - done} iterations in {time.perf_counter() - started:.0f}s; "
          f"held-out reward {last.get('eval_reward')}", file=sys.stderr)
    return last
