"""One RLCS iteration, wholly in JAX on device except the reward checks: curriculum-sampled prompts ->
G rollouts each with the on-device sampler -> verifiable rewards -> group-normalised advantages ->
the most balanced groups -> several GRPO (clip-higher) mini-batch updates.

The sampler reads the trainer's current params directly (no host copy). Log-probs are those of
softmax(logits / temperature) for both the rollout and the update, so the ratio starts at 1.

On several processes every process runs this same host code on the same values: the rollouts come back whole
to each (the sampler replicates its outputs), each scores its share of the rows and gathers every row's reward
(`score`), and `PolicyUpdate` places the update batches from them (`sharding.shard_batch`: each process keeps
its devices' shards); the drawn prompts are compared across processes (`distributed.check_same`).
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.config import GlmvConfig
from glmv_jax.data.processor import ImageProcessor
from glmv_jax.data.visual_layout import pad_visual
from glmv_jax.errors import ConfigError
from glmv_jax.generate.sampler import SamplingConfig, sample
from glmv_jax.generate.weights import prepare
from glmv_jax.model.glmv import apply, token_inputs
from glmv_jax.rl import rewards
from glmv_jax.rl.config import RLConfig
from glmv_jax.rl.curriculum import Curriculum, is_informative, select_balanced
from glmv_jax.rl.prompts import Prompts, make_prompts
from glmv_jax.shapes import bucket
from glmv_jax.sharding import shard_batch
from glmv_jax.train import distributed
from glmv_jax.train.losses import grpo_loss, token_log_probs


# ---------------------------------------------------------------------------------- rollouts

def sampling_config(cfg: RLConfig, tokenizer, *, greedy: bool = False) -> SamplingConfig:
    budget = {}
    if cfg.thinking_budget is not None:
        budget = dict(thinking_budget=cfg.thinking_budget, think_end_id=tokenizer.token_id("</think>"),
                      forced_answer_ids=tuple(tokenizer.encode("</think>\n<answer>")))
    return SamplingConfig(cfg.max_new_tokens, 0.0 if greedy else cfg.temperature, 1.0 if greedy else cfg.top_p,
                          eos_ids=tokenizer.eos_ids, pad_id=tokenizer.eos_ids[0], **budget)


def responses(tokens: np.ndarray, lengths: np.ndarray, tokenizer) -> list[str]:
    """Decoded responses. A stop token that is part of the reply format (`</answer>`) is kept; control stop
    tokens (`<|endoftext|>`, `<|user|>`, ...) are dropped, as the format gate wants the text to end at </answer>."""
    control = set(tokenizer.eos_ids) - {tokenizer.token_id("</answer>")} if tokenizer.has_token("</answer>") \
        else set(tokenizer.eos_ids)
    return [tokenizer.decode([int(t) for t in row[:n] if int(t) not in control], skip_special_tokens=False)
            for row, n in zip(tokens, lengths)]


def score(examples: Sequence[dict], texts: Sequence[str]) -> list[dict]:
    """`rewards.score_batch` of the pairs, the same on every process: on several processes each scores its share of
    the rows (a contiguous part) and the {"reward", "format_ok", "domain"} of every row are gathered, the rewards'
    float64 bits unchanged. Each row is scored once, so a verifier's time limit cannot give hosts different rewards."""
    count, processes = len(texts), jax.process_count()
    if processes == 1:
        return rewards.score_batch(examples, texts)
    per = -(-count // processes)
    start = min(jax.process_index() * per, count)
    mine = rewards.score_batch(list(examples[start:start + per]), list(texts[start:start + per]))
    table = np.zeros((per, 3), np.int32)   # reward (float64 as two int32 words), format_ok
    table[:len(mine), :2] = np.array([s["reward"] for s in mine], np.float64).view(np.int32).reshape(-1, 2)
    table[:len(mine), 2] = [s["format_ok"] for s in mine]
    every = distributed.allgather(table).reshape(-1, 3)[:count]
    reward = np.ascontiguousarray(every[:, :2]).view(np.float64)[:, 0]
    return [{"reward": float(r), "format_ok": bool(ok), "domain": e["domain"]}
            for r, ok, e in zip(reward, every[:, 2], examples)]


def rollout(params, config: GlmvConfig, prompts: Prompts, index: Sequence[int], sampling: SamplingConfig, seed: int,
            *, group_size: int = 1, mesh=None):
    """Sample `group_size` responses per row of `index` (rows p*G .. p*G + G-1 answer index[p]; the prompt's vision
    tower and prefill run once for its G rows); returns the SampleOutput as numpy. `mesh`: sample on it
    (`params` then best prepared for it: `prepare(params, mesh=mesh, config=config)`)."""
    inputs = prompts.rows(index)
    out = sample(params, config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                 mm_token_type_ids=inputs["mm_token_type_ids"], sampling=sampling, seed=seed, mesh=mesh,
                 group_size=group_size)
    return jax.tree.map(np.asarray, out._asdict())


def group_advantages(rewards_: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(P, G) rewards -> (r - group mean) / (group std + eps); 0 for groups with equal rewards."""
    mean = rewards_.mean(axis=1, keepdims=True)
    std = rewards_.std(axis=1, keepdims=True)
    return np.where(std > 0, (rewards_ - mean) / (std + eps), 0.0)


# ------------------------------------------------------------------------------------ update

def policy_tokens(out: dict, sampling: SamplingConfig) -> np.ndarray:
    """(B, N) bool: the response tokens the policy sampled: within the length, and not the answer opening
    (`sampling.forced_answer_ids`) the thinking budget forced, which the sampler emits at columns
    thinking_budget .. thinking_budget + len - 1 of a row whose `forced` is set."""
    n = out["tokens"].shape[1]
    mask = np.arange(n)[None] < out["lengths"][:, None]
    if sampling.thinking_budget is not None:
        start, forced_ids = sampling.thinking_budget, np.asarray(sampling.forced_answer_ids)
        stop = min(start + len(forced_ids), n)
        rows = np.nonzero(out["forced"])[0]
        match = np.all(out["tokens"][rows, start:stop] == forced_ids[:stop - start], axis=1)
        mask[rows[match], start:stop] = False
    return mask


def update_batch(prompts: Prompts, index: Sequence[int], out: dict, advantages: np.ndarray,
                 config: GlmvConfig, token_mask: np.ndarray | None = None) -> dict:
    """Teacher-forcing rows prompt + response for the policy loss, with old log-probs at the target places.

    Row r: the left-padded prompt (T) then its N response tokens. targets[t] = sequence[t + 1];
    the response token k is predicted at column T - 1 + k, where old_logp and the loss mask go.
    `token_mask` (S, N) (default: the tokens within each length) says which response tokens the loss counts;
    a row without any adds nothing to it (`grpo_loss` averages over the rows that have tokens).
    """
    inputs = prompts.rows(index)
    s, t = inputs["input_ids"].shape
    n = out["tokens"].shape[1]
    live = np.arange(n)[None] < out["lengths"][:, None]
    ids = np.concatenate([inputs["input_ids"], out["tokens"]], axis=1)
    segment = np.concatenate([inputs["attention_mask"], live], axis=1).astype(np.int32)
    types = np.concatenate([inputs["mm_token_type_ids"], np.zeros((s, n), np.int32)], axis=1)
    targets = np.concatenate([ids[:, 1:], np.zeros((s, 1), np.int32)], axis=1)
    mask = np.zeros((s, t + n), np.float32)
    old = np.zeros((s, t + n), np.float32)
    mask[:, t - 1:t - 1 + n] = live if token_mask is None else token_mask
    old[:, t - 1:t - 1 + n] = out["logprobs"]
    pixels, grid = pad_visual(inputs["pixel_values"], inputs["image_grid_thw"], config.vision)
    return {"input_ids": ids.astype(np.int32), "segment_ids": segment, "mm_token_type_ids": types,
            "targets": targets.astype(np.int32), "loss_mask": mask, "old_logp": old,
            "advantages": advantages.astype(np.float32), "pixel_values": pixels, "image_grid_thw": grid}


def sequence_log_probs(params, batch: dict, *, config: GlmvConfig, cfg: RLConfig, compute_dtype=None,
                       model_options: dict | None = None):
    """Teacher-forced (log p(targets) (S, T), logits / temperature (S, T, V) float32) of an update batch: the
    distribution the rollouts were sampled from, softmax(logits / temperature). `model_options`: the trainer's
    remat_policy, scan_layers and attention_impl (`model.glmv.apply`)."""
    if compute_dtype is not None:
        params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    tokens = token_inputs(config, batch["input_ids"], batch["segment_ids"], batch["mm_token_type_ids"],
                          image_grid_thw=batch["image_grid_thw"])
    visual = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    logits = apply(params, config, tokens, visual, **(model_options or {})).astype(jnp.float32) / cfg.temperature
    return token_log_probs(logits, batch["targets"]), logits


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy (S, T) of softmax(logits) over the vocabulary."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def policy_step(state: dict, batch: dict, *, config: GlmvConfig, tx, cfg: RLConfig, compute_dtype=None,
                model_options: dict | None = None):
    """One GRPO update: (new state, metrics {loss, clip_fraction, ratio, grad_norm} (+ kl, entropy when their
    coefficients are set)). With `cfg.kl_coef` the batch carries `ref_logp` (see `make_reference`)."""
    def loss_fn(params):
        new_logp, logits = sequence_log_probs(params, batch, config=config, cfg=cfg, compute_dtype=compute_dtype,
                                              model_options=model_options)
        return grpo_loss(new_logp, batch["old_logp"], batch["advantages"], batch["loss_mask"],
                         eps_low=cfg.eps_low, eps_high=cfg.eps_high, ref_logp=batch.get("ref_logp"),
                         kl_coef=cfg.kl_coef, entropy=entropy(logits) if cfg.entropy_coef else None,
                         entropy_coef=cfg.entropy_coef)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def make_policy_step(config: GlmvConfig, tx, cfg: RLConfig, compute_dtype=None, **kw) -> "PolicyUpdate":
    return PolicyUpdate(config, tx, cfg, compute_dtype, **kw)


class PolicyUpdate:
    """The jitted GRPO update (`policy_step`, the state donated), sharded as the trainer's step when given a mesh:
    the state keeps `state_shardings` (train/setup.py `state_layout`), batches are split by row over data x fsdp,
    and the forward takes the trainer's remat, layer-scan and attention choices (`model_options`).

    `log_probs(params, batch)`: the same teacher-forced forward without the update, for the on-policy check.
    """

    SPECS = {**{k: ("batch", "length") for k in ("input_ids", "segment_ids", "mm_token_type_ids", "targets",
                                                 "loss_mask", "old_logp", "ref_logp")}, "advantages": ("batch",)}

    def __init__(self, config: GlmvConfig, tx, cfg: RLConfig, compute_dtype=None, *, mesh=None, state_shardings=None,
                 model_options: dict | None = None):
        self.mesh, self.compute_dtype = mesh, compute_dtype
        kw = dict(config=config, cfg=cfg, compute_dtype=compute_dtype, model_options=model_options)
        step = functools.partial(policy_step, tx=tx, **kw)
        replicated = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
        out = {} if mesh is None else {"out_shardings": (state_shardings, NamedSharding(mesh, P()))}
        self._step = jax.jit(step, donate_argnums=0, **out)
        # whole on every device: every process reads them (np.asarray)
        self._log_probs = jax.jit(lambda p, b: sequence_log_probs(p, b, **kw)[0], **replicated)

    def scope(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def place(self, batch: dict) -> dict:
        """A host batch (the same on every process) on the mesh: per-row arrays split over data x fsdp, visual inputs
        replicated."""
        if self.mesh is None:
            return batch
        placed = {k: v for k, v in batch.items() if v is not None}
        return {**batch, **shard_batch(placed, self.mesh, self.specs(placed))}

    @classmethod
    def specs(cls, batch: dict) -> dict:
        """Logical axes of each array (or shape) of `batch`: per-row arrays by row, visual inputs replicated."""
        return {k: cls.SPECS.get(k, (None,) * np.ndim(v)) for k, v in batch.items()}

    def __call__(self, state: dict, batch: dict):
        with self.scope():
            return self._step(state, self.place(batch))

    def log_probs(self, params, batch: dict) -> np.ndarray:
        """Teacher-forced log p(targets) (S, T) of a host batch under `params`, as numpy (on every process)."""
        with self.scope():
            return np.asarray(self._log_probs(params, self.place(batch)))

    def lower(self, state: dict, batch: dict) -> dict:
        """The update and the log-prob forward lowered for abstract `state` and `batch` (ShapeDtypeStructs with
        their shardings; `glmv plan`): {"update": ..., "log_probs": ...}."""
        with self.scope():
            return {"update": self._step.lower(state, batch),
                    "log_probs": self._log_probs.lower(state["params"], batch)}


def on_policy_gap(step_fn, params, batches: Sequence[dict]) -> dict:
    """Mean and max |rollout log-prob - training-forward log-prob| over the sampled tokens of `batches` (their
    `old_logp` under `loss_mask`), the training forward run by `step_fn.log_probs` on `params`, the parameters
    that sampled them: the sampler and the update must see one policy (the GRPO ratio starts at 1)."""
    total, count, worst = 0.0, 0.0, 0.0
    for batch in batches:
        gap = np.abs(step_fn.log_probs(params, batch).astype(np.float64) - batch["old_logp"]) * batch["loss_mask"]
        total, count, worst = total + gap.sum(), count + batch["loss_mask"].sum(), max(worst, float(gap.max()))
    return {"logp_gap_mean": float(total / max(count, 1.0)), "logp_gap_max": worst}


def make_reference(step_fn: PolicyUpdate, params):
    """batch -> the batch with `ref_logp` (S, T): the sampled tokens' log-probs under `params`, the policy at
    the start of the RL run, which the KL term (`cfg.kl_coef`) keeps the updated policy close to; computed by the
    update's own forward (`step_fn.log_probs`: its mesh, dtype and model options)."""
    def add_ref_logp(batch: dict) -> dict:
        return {**batch, "ref_logp": step_fn.log_probs(params, batch)}

    return add_ref_logp


def minibatch_rows(keep: Sequence[int], useful: np.ndarray, group_size: int, minibatches: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """The rollout rows of groups `keep` (group g: rows g * group_size ..) in `minibatches` shuffled parts, each
    with an equal share (up to one row) of the rows of `useful` groups (informative: rewards not all equal)."""
    def rows(groups):
        return np.array([r for g in groups for r in range(g * group_size, (g + 1) * group_size)], dtype=int)

    split = [np.array_split(rng.permutation(rows(groups)), minibatches)
             for groups in ([g for g in keep if useful[g]], [g for g in keep if not useful[g]])]
    return [np.concatenate(parts).astype(int) for parts in zip(*split)]


def kl_to_reference(batch: dict) -> float:
    """KL(policy || start) estimated on the batch's loss tokens, sampled from the policy: the mean of k3 =
    exp(ref - old) - (ref - old) - 1 with `old_logp` (the rollout policy) and `ref_logp` (the start)."""
    mask = np.asarray(batch["loss_mask"]) > 0
    delta = np.asarray(batch["ref_logp"], np.float64)[mask] - np.asarray(batch["old_logp"], np.float64)[mask]
    return float(np.mean(np.exp(delta) - delta - 1.0)) if delta.size else 0.0


def iteration(state: dict, step_fn, config: GlmvConfig, cfg: RLConfig, curriculum: Curriculum,
              pool, tokenizer, processor: ImageProcessor, rng: np.random.Generator,
              seed: int, reference=None) -> tuple[dict, dict]:
    """One RLCS iteration; returns (new train state, metrics). `reference` (`make_reference`) is needed when
    `cfg.kl_coef` > 0."""
    if cfg.kl_coef and reference is None:
        raise ConfigError("rl.kl_coef > 0 needs the reference policy's log-probs (make_reference)")
    t0 = time.perf_counter()
    # At least the EMA's prompt count, rounded up to a shape bucket so the sampler compiles a few programs.
    count = bucket(curriculum.next_prompt_count(cfg.groups), minimum=cfg.groups)
    ids = curriculum.sample(count, rng)
    prompts = make_prompts([pool[i] for i in ids], tokenizer, processor, tokenizer.eos_ids[0])
    # every process draws the same prompts (seeded curriculum) and runs the same rollouts on the global mesh
    distributed.check_same("the iteration's prompts", ids, prompts.input_ids, *prompts.grids)
    rows = np.repeat(np.arange(len(ids)), cfg.group_size)
    mesh = getattr(step_fn, "mesh", None)
    # the policy as the sampler runs it: per-layer weights laid out for decoding, in the update's compute dtype
    weights = prepare(state["params"], mesh=mesh, config=config, dtype=getattr(step_fn, "compute_dtype", None))
    out = rollout(weights, config, prompts, np.arange(len(ids)), sampling_config(cfg, tokenizer), seed,
                  group_size=cfg.group_size, mesh=mesh)
    del weights
    t_rollout = time.perf_counter() - t0

    texts = responses(out["tokens"], out["lengths"], tokenizer)
    scores = score([prompts.examples[r] for r in rows], texts)
    reward = np.array([s["reward"] for s in scores], np.float64).reshape(len(ids), cfg.group_size)
    for example_id, group in zip(ids, reward):
        curriculum.update(example_id, group.tolist())
    useful = np.array([is_informative(g) for g in reward])
    keep = select_balanced([g.tolist() for g in reward], min(cfg.groups, len(ids)))
    curriculum.end_iteration()
    advantages = group_advantages(reward)
    t_score = time.perf_counter() - t0 - t_rollout

    # Groups with equal rewards (no advantage) are dropped from the loss, not averaged in as filler: their rows
    # stay in the batch (fixed shapes, one compiled update) with no loss tokens, and each mini-batch gets an
    # equal share of the informative rows. Forced answer openings are not the policy's: masked out too.
    tokens = policy_tokens(out, sampling_config(cfg, tokenizer)) & np.repeat(useful, cfg.group_size)[:, None]
    live = [g for g in keep if useful[g]]
    updates, kls, gap = [], [], {}
    if live:
        batches = [update_batch(prompts, rows[part], {k: v[part] for k, v in out.items()},
                                advantages.reshape(-1)[part], config, token_mask=tokens[part])
                   for part in minibatch_rows(keep, useful, cfg.group_size, cfg.minibatches, rng)]
        gap = on_policy_gap(step_fn, state["params"], batches)   # before the first update moves the params
        for batch in batches:
            if reference is not None:
                batch = reference(batch)
                kls.append(kl_to_reference(batch))
            state, metrics = step_fn(state, batch)
            updates.append(jax.tree.map(float, metrics))
    t_update = time.perf_counter() - t0 - t_rollout - t_score

    by_domain = defaultdict(list)
    for s in scores:
        by_domain[s["domain"]].append(s["reward"])
    generated = int(out["lengths"].sum())
    metrics = {
        "reward": float(reward.mean()), **{f"reward/{d}": float(np.mean(v)) for d, v in sorted(by_domain.items())},
        "format_ok": float(np.mean([s["format_ok"] for s in scores])),
        "balanced_groups": float(useful.mean()), "expansion": float(curriculum.expansion), "prompts": len(ids),
        "updated_groups": len(live),
        "response_length": float(out["lengths"].mean()), "forced_answers": float(out["forced"].mean()),
        **{k: float(np.mean([u[k] for u in updates])) if updates else 0.0
           for k in ("clip_fraction", "loss", "grad_norm", *(("kl", "entropy") if updates else ())) if
           not updates or k in updates[0]},
        **({"kl_to_start": float(np.mean(kls))} if kls else {}),
        **gap, "rollout_s": t_rollout, "score_s": t_score, "update_s": t_update,
        "rollout_tokens_per_s": generated / max(t_rollout, 1e-9),
    }
    return state, metrics
