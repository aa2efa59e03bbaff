"""`glmv train` for a config with an `rl:` section: RLCS from an SFT checkpoint on the synthetic tasks.

One readable function: model and tokenizer from `train.init_from` (set up as `glmv train` does,
train/setup.py), the prompt pool and held-out prompts, an offline pass@k run that seeds the curriculum,
then iterations of `rlcs.iteration` with metrics, evaluation and checkpoints. Runs on the run's mesh
(data / fsdp / tensor): the update sharded as the trainer's step, rollouts on the sampler's mesh layout
(`generate.weights.prepare(mesh=...)`).

On several processes (a `jax.distributed` job, as `glmv train`; cli.py joins it) RLCS is the same job as on one:
every process draws the same prompts (seeded pool and curriculum), the rollouts run on the global mesh and come
back whole to every process (the sampler replicates its outputs), each process scores its share of the rows and
every row's reward is gathered to all (`rlcs.score`: each row scored once, so a verifier's time limit cannot make
hosts disagree), and the update batches are placed from the same host values (`sharding.shard_batch`). The
config, the held-out prompts and each iteration's prompts are compared across processes
(`distributed.check_same`): hosts that disagree stop with a DataError. Process 0 writes the metrics and run
files; orbax saves and restores the state across the processes.

A checkpoint holds, beside the train state (keyed by optimizer step), the loop's state as a JSON item of
the same orbax step: {"iteration", "curriculum"}; a resume continues after that iteration, and
metrics.jsonl (keyed by iteration) drops the records written after it.
"""
from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

import numpy as np

from glmv_jax import benchmark, evaluate
from glmv_jax.checkpoint.state import TrainCheckpointer, has_checkpoint
from glmv_jax.data import synthetic
from glmv_jax.errors import CheckpointError, ConfigError
from glmv_jax.generate.weights import prepare
from glmv_jax.rl import rewards, rlcs
from glmv_jax.rl.config import RLConfig
from glmv_jax.rl.curriculum import Curriculum
from glmv_jax.rl.prompts import JsonlPromptPool, Prompts, make_prompts
from glmv_jax.data import sources as sources_lib
from glmv_jax.train import distributed, setup
from glmv_jax.train.config import TrainConfig
from glmv_jax.train.metrics import MetricsWriter, Progress


class SyntheticPool:
    """The RL prompt pool: synthetic examples 0..n-1 of `seed`, drawn when asked for (a large pool costs no memory)."""

    def __init__(self, n: int, seed: int, domains: tuple[str, ...] = (), level: str = "standard"):
        self.n, self.seed = n, seed
        self.families, self.level = tuple(domains) or synthetic.DOMAINS, level

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise KeyError(index)
        return synthetic.example_at(int(index), self.seed, self.families, self.level)

    def domains(self) -> list[str]:
        return [self.families[i % len(self.families)] for i in range(self.n)]


def prompt_pool(cfg: TrainConfig) -> tuple[Any, list[dict]]:
    """(the RL prompt pool, the held-out examples) of `data.source`: synthetic tasks, or the user's JSONL prompts
    (`rl.prompts.JsonlPromptPool`: every line checked here, before any rollout)."""
    rl = cfg.rl
    if cfg.data.source == "synthetic":
        return SyntheticPool(rl.prompt_pool, cfg.data.seed, cfg.data.domains, cfg.data.level), held_out_examples(cfg)
    if cfg.data.source != "jsonl":
        raise ConfigError(f"RL prompts come from data.source synthetic or jsonl, not {cfg.data.source}")
    pool = JsonlPromptPool(cfg.data.path, cfg.data.image_root, held_out=rl.eval_prompts)
    return pool, pool.held_out_examples() or [pool[i] for i in range(min(rl.eval_prompts, len(pool)))]


def offline_pass_rates(params, model, prompts: Prompts, cfg: RLConfig, tokenizer, k: int,
                       batch: int = 64, mesh=None) -> list[float]:
    """Share of k sampled answers with reward > 0.5, per prompt (the curriculum's offline pass@k). Each prompt's
    vision tower and prefill run once for its k answers (`rlcs.rollout(group_size=k)`)."""
    wins = np.zeros(len(prompts.examples))
    sampling = rlcs.sampling_config(cfg, tokenizer)
    per_call = max(1, batch // k)
    for start in range(0, len(prompts.examples), per_call):
        index = np.arange(start, min(start + per_call, len(prompts.examples)))
        out = rlcs.rollout(params, model, prompts, index, sampling, seed=start * k, group_size=k, mesh=mesh)
        part = np.repeat(index, k)
        texts = rlcs.responses(out["tokens"], out["lengths"], tokenizer)
        scores = rlcs.score([prompts.examples[r] for r in part], texts)
        np.add.at(wins, part, [s["reward"] > 0.5 for s in scores])
    return (wins / k).tolist()


def held_out_metrics(params, model, tokenizer, prompts, settings, mesh=None) -> dict[str, float]:
    """Greedy held-out evaluation through `glmv_jax.evaluate` (what `glmv eval` runs), on `mesh` if given:
    reward (± reward_se), format_ok, forced, reward/<domain>."""
    return evaluate.flat_metrics(evaluate.run(params, model, tokenizer, prompts, settings, mesh=mesh)[0])


def check_rl_mesh(mesh, model, rl: RLConfig) -> None:
    """RLCS on `mesh`: no context split (rollouts decode a token per row), the model's sizes divide it, and each
    update mini-batch (groups x group_size / minibatches rows) divides data x fsdp."""
    from glmv_jax import sharding
    from glmv_jax.generate.sampler import check_mesh

    check_mesh(model, mesh)
    rows, dp = rl.groups * rl.group_size // rl.minibatches, sharding.axis_size(mesh, sharding.BATCH)
    if rl.groups * rl.group_size % rl.minibatches or rows % dp:
        raise ConfigError(f"rl.groups x rl.group_size = {rl.groups * rl.group_size} rollouts in {rl.minibatches} "
                          f"mini-batches must give a multiple of data x fsdp = {dp} rows each")


def policy_update(cfg: TrainConfig, model, layout: setup.StateLayout, mesh) -> rlcs.PolicyUpdate:
    """The run's GRPO update on `mesh`, sharded as the trainer's step (its state layout, remat, scan and attention
    choices, compute dtype); `glmv plan` compiles the same."""
    options = dict(remat_policy=cfg.train.remat_policy, scan_layers=cfg.train.scan_layers,
                   attention_impl=cfg.train.attention_impl)
    return rlcs.make_policy_step(model, layout.tx, cfg.rl, setup.compute_dtype_of(cfg), mesh=mesh,
                                 model_options=options,
                                 state_shardings={k: layout.shardings[k] for k in ("step", "params", "opt_state")})


def train_rl(cfg: TrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) RLCS iterations; returns the last metrics (with eval_reward)."""
    rl: RLConfig = cfg.rl
    workdir = setup.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    main = distributed.is_main()

    # ------------------------------------------------------------------------------ model and tokenizer
    mesh, _ = setup.run_mesh(cfg, who="glmv train (rl)")
    if cfg.optimizer.accumulate != 1:
        raise ConfigError("optimizer.accumulate applies to glmv train's micro-batches; an RLCS update takes its "
                          "iteration's whole batch (set optimizer.accumulate: 1)")
    train_source, _ = sources_lib.make_sources(cfg.data)
    resuming = has_checkpoint(workdir)
    if not resuming and not cfg.train.init_from:
        raise ConfigError("an RL run starts from an SFT model: set train.init_from")
    if rl.kl_coef and not cfg.train.init_from:
        raise ConfigError("rl.kl_coef > 0 needs train.init_from (the policy the KL term is measured against)")
    with distributed.main_first("glmv train (rl): tokenizer"):   # process 0 copies it into the workdir
        tokenizer, model = setup.tokenizer_and_model(cfg, workdir, train_source,
                                                     None if resuming else cfg.train.init_from)
    check_rl_mesh(mesh, model, rl)
    pool, held_out = prompt_pool(cfg)   # a bad prompt line is an error here, before any model work
    processor = setup.image_processor(cfg.data, model.vision)
    eval_prompts = benchmark.encode_prompts(benchmark.items_from_examples(held_out), tokenizer, model, processor)
    distributed.check_same("the run config and prompts", cfg.to_yaml(), str(len(pool)),   # before any collective
                           *(np.asarray(p.input_ids) for p in eval_prompts))
    distributed.check_same("whether the workdir holds a checkpoint to resume from", str(resuming))

    # ------------------------------------------------------------------------------- params and state
    layout = setup.state_layout(model, cfg, mesh)
    checkpointer = TrainCheckpointer(workdir, keep=cfg.checkpoint.keep)
    state = setup.restore_or_init(cfg, layout, checkpointer, model, mesh, resuming=resuming, who="glmv train (rl)")
    rng_key = state.pop("rng")
    saved = state.pop("loop", None) or {}
    if resuming and not saved:
        raise CheckpointError(f"{checkpointer.directory}/{checkpointer.latest_step()} holds no RL loop state "
                              "(iteration, curriculum): not an RLCS checkpoint of this version; use a new workdir")
    curriculum = Curriculum.from_dict(saved["curriculum"]) if resuming else None
    done = int(saved["iteration"]) if resuming else 0
    if main:
        setup.write_run_files(workdir, cfg, model)
    step_fn = policy_update(cfg, model, layout, mesh)
    policy = lambda params: prepare(params, mesh=mesh, config=model, dtype=step_fn.compute_dtype)  # noqa: E731
    reference = None
    # The policy at the start of the RL run: the log-probs the KL term compares against, and without that term
    # the `kl_to_start` metric (one more forward pass per update), so a user sees how far the policy moved.
    if rl.kl_coef or (cfg.train.init_from and has_checkpoint(setup.workdir_path(cfg.train.init_from))):
        start = setup.load_init_params(cfg.train.init_from, model, layout)
        reference = rlcs.make_reference(step_fn, start)

    # ------------------------------------------------------------------- prompt pool, held-out prompts
    eval_settings = evaluate.EvalSettings(rl.max_new_tokens, rl.thinking_budget, batch=min(32, len(held_out)))
    rewards.warmup()
    writer = MetricsWriter(workdir, resume_step=done, enabled=main)   # records are keyed by iteration; process 0
    if curriculum is None:
        if rl.offline_k:
            pool_prompts = make_prompts([pool[i] for i in range(len(pool))], tokenizer, processor,
                                             tokenizer.eos_ids[0])
            rates = offline_pass_rates(policy(state["params"]), model, pool_prompts, rl, tokenizer, k=rl.offline_k,
                                       mesh=mesh)
        else:  # no offline pass: every example starts at Beta(1, 1) (medium) and is placed by its rollouts
            rates = [0.5] * len(pool)
        curriculum = Curriculum.from_pass_at_k(list(range(len(pool))), pool.domains(), rates, k=rl.offline_k)
        before = held_out_metrics(policy(state["params"]), model, tokenizer, eval_prompts, eval_settings, mesh)
        writer.write({"step": 0, **{f"eval_{k}": v for k, v in before.items()},
                      "offline_pass_rate": float(np.mean(rates))})
        if main:
            print(f"glmv train (rl): before RL, held-out reward {before['reward']:.3f} "
                  f"(offline pass@{rl.offline_k} {np.mean(rates):.3f})", file=sys.stderr)

    # -------------------------------------------------------------------------------------- iterations
    rng = np.random.default_rng(rl.seed * 1_000_003 + done)
    progress = Progress(rl.iterations, initial=done, stream=None if main else io.StringIO())
    last: dict[str, Any] = {}
    try:
        for it in range(done + 1, rl.iterations + 1):
            state, metrics = rlcs.iteration(state, step_fn, model, rl, curriculum, pool, tokenizer, processor, rng,
                                            seed=rl.seed * 100_003 + it, reference=reference)
            last = {"step": it, **metrics}
            if it % rl.eval_every == 0 or it == rl.iterations:
                scores = held_out_metrics(policy(state["params"]), model, tokenizer, eval_prompts, eval_settings, mesh)
                last.update({f"eval_{k}": v for k, v in scores.items()})
            writer.write(last)
            progress.update()
            progress.log(last)
            progress.write(f"iteration {it}: reward {last['reward']:.3f}, updated groups {last['updated_groups']}, "
                           f"clip fraction {last['clip_fraction']:.3f}, KL to start "
                           f"{last.get('kl_to_start', float('nan')):.4f}, on-policy |rollout - training log-prob| "
                           f"mean {last.get('logp_gap_mean', float('nan')):.2e} "
                           f"max {last.get('logp_gap_max', float('nan')):.2e}"
                           + (f", held-out reward {last['eval_reward']:.3f}" if "eval_reward" in last else ""))
            if it % cfg.checkpoint.every == 0 or it == rl.iterations:
                # keyed by optimizer step, but unique: an iteration whose groups all had equal rewards updates nothing
                key = max(int(state["step"]), (checkpointer.latest_step() or 0) + 1)
                checkpointer.save(key, {**state, "rng": rng_key},
                                  loop_state={"iteration": it, "curriculum": curriculum.to_dict()})
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
    if main:
        print(f"glmv train (rl): {rl.iterations - done} iterations in {time.perf_counter() - started:.0f}s; "
              f"held-out reward {last.get('eval_reward')}", file=sys.stderr)
    return last


def held_out_examples(cfg: TrainConfig) -> list[dict]:
    """The RL run's held-out prompts: synthetic examples 0..eval_prompts-1 of seed data.seed + 10000."""
    return [synthetic.example_at(i, cfg.data.seed + 10_000, tuple(cfg.data.domains) or synthetic.DOMAINS,
                                 cfg.data.level) for i in range(cfg.rl.eval_prompts)]


def finished_iterations(workdir: str | os.PathLike) -> int:
    """The iterations done by the RL run in `workdir` (by its latest checkpoint); 0 without one."""
    workdir = setup.workdir_path(workdir)
    if not has_checkpoint(workdir):
        return 0
    with TrainCheckpointer(workdir, read_only=True) as checkpointer:
        return int((checkpointer.restore_loop_state() or {}).get("iteration", 0))


__all__ = ["SyntheticPool", "finished_iterations", "held_out_examples", "offline_pass_rates", "policy_update",
           "train_rl"]
