"""Ahead-of-time plan of one RLCS iteration: `glmv plan --train-config X.yaml` for a config with an `rl:` section.

Compiles, from abstract shapes (no weights allocated) on the run's mesh, the programs one iteration of
`rl.loop.train_rl` runs (`rlcs.iteration`), with what stays on the devices beside each:

- the rollout (`generate.sampler.sample`): the prefill of P prompts (one image of `data.max_pixels` each, T
  tokens), the prefix-sharing expansion of their KV caches to P x group_size rows, and the decode program over
  those caches of T + max_new_tokens slots, on the inference copy of the weights in the compute dtype
  (`generate.weights.prepare(mesh=...)`). P is groups x the curriculum's largest expansion (4), bucketed as the
  loop does: the most the iteration ever rolls out, unless `prompts` says otherwise;
- the teacher-forced log-prob forward of one mini-batch (the on-policy check of every iteration; the reference
  policy's log-probs with rl.kl_coef run the same function on the same shapes);
- the GRPO update of one mini-batch: groups x group_size / minibatches rows of T + max_new_tokens tokens.

The trainer's state (f32 params and optimizer state) stays on the devices while the rollouts run, and the
reference policy (f32 params of the run's start) through the whole iteration when the loop keeps one (rl.kl_coef,
or train.init_from, for the kl_to_start metric). Each program's need is XLA's (arguments + outputs - aliased +
temporaries) plus what stays resident beside it; the iteration's peak is the largest.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax import sharding as mesh_lib
from glmv_jax.config import GlmvConfig
from glmv_jax.data import visual_layout
from glmv_jax.errors import ConfigError
from glmv_jax.generate import sampler
from glmv_jax.generate.weights import prepared_shapes
from glmv_jax.rl.curriculum import MAX_EXPANSION
from glmv_jax.shapes import bucket, round_up
from glmv_jax.train import setup
from glmv_jax.train.plan import Plan, collectives, model_flops, per_device_bytes, planned_model, program_bytes

TEXT_TOKENS = 512   # [ours] default prompt text (system, question, chat template) beside the image's tokens


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes one RLCS iteration runs at."""

    prompts: int         # P rolled out
    rows: int            # P x group_size decode rows
    prompt_len: int      # T: the prompts' left-padded length (the sampler's bucket)
    cache_size: int      # KV slots per row: T + max_new_tokens, rounded up to 128
    image_patches: int   # of each prompt's one image
    update_rows: int     # rows per mini-batch
    update_len: int      # T + max_new_tokens


def rollout_sampling(rl, model: GlmvConfig) -> sampler.SamplingConfig:
    """The rollouts' sampling settings (`rlcs.sampling_config` without a tokenizer: token ids shape nothing, so
    the model's end ids stand in for the tokenizer's)."""
    eos = tuple(model.text.eos_token_id) or (0,)
    budget = {} if rl.thinking_budget is None else dict(thinking_budget=rl.thinking_budget, think_end_id=eos[0],
                                                        forced_answer_ids=(eos[0],) * 3)
    return sampler.SamplingConfig(rl.max_new_tokens, rl.temperature, rl.top_p, eos_ids=eos, pad_id=eos[0], **budget)


def iteration_shapes(cfg, model: GlmvConfig, *, prompt_tokens: int | None = None,
                     prompts: int | None = None) -> Shapes:
    """The iteration's sizes: each prompt one image of `data.max_pixels` and `prompt_tokens` tokens in all (default:
    the image's visual tokens + TEXT_TOKENS), left-padded to the sampler's bucket; `prompts` rolled out (default:
    rl.groups x the curriculum's largest expansion, bucketed as `rlcs.iteration` does)."""
    rl, unit = cfg.rl, model.vision.spatial_merge_size ** 2
    patches = visual_layout.image_patches(model.vision, cfg.data.max_pixels) // unit * unit
    if patches < unit:
        raise ConfigError(f"data.max_pixels = {cfg.data.max_pixels} leaves no image patch to plan")
    tokens = patches // unit + TEXT_TOKENS if prompt_tokens is None else prompt_tokens
    if tokens <= patches // unit:
        raise ConfigError(f"--prompt-tokens {tokens} must exceed the image's {patches // unit} visual tokens")
    count = prompts or bucket(math.ceil(rl.groups * MAX_EXPANSION), minimum=rl.groups)
    if count < rl.groups:
        raise ConfigError(f"--rollout-prompts {count} is below rl.groups = {rl.groups}")
    ones = np.ones((1, tokens), np.int32)  # one row: the sampler's own padding rule and length check
    *_, length, cache_size = sampler.prompt_rows(model, rollout_sampling(rl, model), ones, ones, ones, 0)
    return Shapes(count, count * rl.group_size, length, cache_size, patches,
                  rl.groups * rl.group_size // rl.minibatches, length + rl.max_new_tokens)


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _outputs(compiled):
    """A compiled program's outputs as ShapeDtypeStructs with their shardings (the next program's inputs)."""
    return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), compiled.out_info, compiled.output_shardings)


def rollout_programs(model: GlmvConfig, mesh, weights: dict, shapes: Shapes, sampling, group_size: int) -> dict:
    """The rollout's compiled programs as `sampler.sample(mesh=...)` runs them: {"prefill", "expand", "decode"}
    ("expand" only when prompts are repeated or padded), and the decode state's shapes ("state")."""
    dp = mesh_lib.axis_size(mesh, mesh_lib.BATCH)
    rows, replicated = round_up(shapes.prompts, dp), NamedSharding(mesh, P())
    tokens = _sds((rows, shapes.prompt_len), jnp.int32, sampler.batch_sharding(mesh, 2))
    positions = _sds((3, rows, shapes.prompt_len), jnp.int32, sampler.batch_sharding(mesh, 3, axis=1))
    visual = visual_layout.bucket_shapes(model.vision, [shapes.image_patches] * shapes.prompts, shapes.prompts)
    pixels = _sds(visual["pixel_values"], jnp.float32, replicated)
    grid = _sds(visual["image_grid_thw"], jnp.int32, replicated)
    out = {}
    with jax.set_mesh(mesh):
        out["prefill"] = sampler.prefill.lower(weights, model, tokens, tokens, tokens, positions, pixels, grid, None,
                                               None, cache_size=shapes.cache_size, split=True).compile()
        logits, kv = _outputs(out["prefill"])
        decode_rows = round_up(shapes.rows, dp)
        if group_size > 1 or rows != shapes.prompts:
            index = _sds((decode_rows,), jnp.int32, replicated)
            out["expand"] = sampler.expand_prefix.lower(logits, kv, index).compile()
            logits, kv = _outputs(out["expand"])
        segment = jax.ShapeDtypeStruct((decode_rows, shapes.cache_size), jnp.int32)
        next_pos = jax.ShapeDtypeStruct((decode_rows,), jnp.int32)
        state = jax.eval_shape(lambda lg, c, s, n: sampler.initial_state(lg, c, s, n, shapes.prompt_len, 0, sampling),
                               logits, kv, segment, next_pos)
        state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), state, sampler.state_shardings(state, mesh))
        out["decode"] = sampler.decode.lower(weights, model, state, sampling=sampling,
                                             steps=sampling.max_new_tokens).compile()
    return {**out, "state": state}


def update_batch_shapes(model: GlmvConfig, mesh, shapes: Shapes, kl: bool) -> dict:
    """ShapeDtypeStructs (with shardings) of one mini-batch as `rlcs.update_batch` builds it and
    `PolicyUpdate.place` places it (+ `ref_logp` with the KL term)."""
    from glmv_jax.rl.rlcs import PolicyUpdate

    rows, length = shapes.update_rows, shapes.update_len
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
             for k in ("input_ids", "segment_ids", "mm_token_type_ids", "targets")}
    batch.update({k: jax.ShapeDtypeStruct((rows, length), jnp.float32)
                  for k in ("loss_mask", "old_logp", *(("ref_logp",) if kl else ()))})
    batch["advantages"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
    visual = visual_layout.bucket_shapes(model.vision, [shapes.image_patches] * rows, rows)
    batch["pixel_values"] = jax.ShapeDtypeStruct(visual["pixel_values"], jnp.float32)
    batch["image_grid_thw"] = jax.ShapeDtypeStruct(visual["image_grid_thw"], jnp.int32)
    specs = PolicyUpdate.specs(batch)
    for k, x in batch.items():
        mesh_lib.check_divisible(mesh, x.shape, mesh_lib.spec(specs[k]), k)
    return {k: _sds(x.shape, x.dtype, NamedSharding(mesh, mesh_lib.spec(specs[k]))) for k, x in batch.items()}


def plan_rl(cfg, devices: int, hosts: int = 1, model: GlmvConfig | None = None, *, prompt_tokens: int | None = None,
            prompts: int | None = None) -> Plan:
    """Compile the programs of one RLCS iteration of the training config `cfg` (with an `rl:` section) on `devices`
    devices (module doc) and report per device: the train state, the reference policy, the inference weights,
    the KV caches, the rollout's and the update's temporaries, each phase's peak and the iteration's (the Plan's
    total, which `report` and `smallest_slices` read). `hosts` only labels the report."""
    from glmv_jax.rl.loop import check_rl_mesh, policy_update

    rl = cfg.rl
    if rl is None:
        raise ConfigError("plan_rl needs a config with an rl: section")
    mesh, sizes = setup.run_mesh(cfg, devices=devices)
    model = model or planned_model(cfg)
    check_rl_mesh(mesh, model, rl)
    shapes = iteration_shapes(cfg, model, prompt_tokens=prompt_tokens, prompts=prompts)
    layout, compute = setup.state_layout(model, cfg, mesh), setup.compute_dtype_of(cfg)
    step_state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s),
                              {k: layout.abstract_state[k] for k in ("step", "params", "opt_state")},
                              {k: layout.shardings[k] for k in ("step", "params", "opt_state")})
    shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    params_bytes = per_device_bytes(step_state["params"], shardings_of(step_state["params"]))
    opt_bytes = per_device_bytes(step_state["opt_state"], shardings_of(step_state["opt_state"]))
    state_bytes = per_device_bytes(step_state, shardings_of(step_state))
    reference = params_bytes if (rl.kl_coef or cfg.train.init_from) else 0.0
    weights = prepared_shapes(layout.abstract_params, mesh=mesh, config=model, dtype=compute)
    weights_bytes = per_device_bytes(weights, shardings_of(weights))
    sampling = rollout_sampling(rl, model)

    start = time.perf_counter()
    rollout = rollout_programs(model, mesh, weights, shapes, sampling, rl.group_size)
    lowered = policy_update(cfg, model, layout, mesh).lower(step_state, update_batch_shapes(model, mesh, shapes,
                                                                                           bool(rl.kl_coef)))
    update, log_probs = lowered["update"].compile(), lowered["log_probs"].compile()
    compile_s = time.perf_counter() - start

    kv_bytes = per_device_bytes(rollout["state"]["kv"], shardings_of(rollout["state"]["kv"]))
    resident = {"prefill": state_bytes + reference, "expand": state_bytes + reference + weights_bytes,
                "decode": state_bytes + reference}
    need = {name: program_bytes(rollout[name].memory_analysis()) + extra for name, extra in resident.items()
            if name in rollout}
    largest = max(need, key=need.get)
    update_peak = program_bytes(update.memory_analysis()) + reference
    forward_peak = program_bytes(log_probs.memory_analysis()) + state_bytes - params_bytes + reference
    peak = max(need[largest], update_peak, forward_peak)
    found = {f"{name}: {op}": counted for name, program in (("prefill", rollout["prefill"]),
                                                             ("decode", rollout["decode"]), ("update", update))
             for op, counted in collectives(program.as_text()).items()}
    cost = update.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rows, length = shapes.update_rows, shapes.update_len
    parts = ((("reference policy (f32 params of the run's start, resident)", reference),) if reference else ()) + (
        (f"inference weights ({jnp.dtype(compute or jnp.float32).name} copy, split over tensor only)", weights_bytes),
        (f"KV caches ({shapes.rows} rows x {shapes.cache_size} slots)", kv_bytes),
        (f"rollout temporaries (XLA, {largest} program)", float(rollout[largest].memory_analysis().temp_size_in_bytes)),
        (f"rollout peak (train state + reference + {largest})", need[largest]),
        ("update: activations + temporaries (XLA)", float(update.memory_analysis().temp_size_in_bytes)),
        ("update peak (XLA total + reference)", update_peak),
        ("log-prob forward peak (on-policy check / reference log-probs)", forward_peak))
    setting = (f"one RLCS iteration: rollout of {shapes.prompts} prompts x {rl.group_size} = {shapes.rows} rows "
               f"(prompt {shapes.prompt_len} tokens with one image of {shapes.image_patches} patches, "
               f"{rl.max_new_tokens} new tokens, {shapes.cache_size} KV slots), then {rl.minibatches} updates of "
               f"{rows} rows x {length} tokens (the batch and step below are one mini-batch update); remat "
               f"{cfg.train.remat_policy}, compute {cfg.train.compute_dtype}, params float32 ({hosts} host(s))")
    return Plan(sizes, length, rows, shapes.image_patches // model.vision.spatial_merge_size ** 2, params_bytes,
                opt_bytes, float(update.memory_analysis().temp_size_in_bytes), peak,
                model_flops(model, rows * length, rows * shapes.image_patches, length, rows),
                float(cost.get("flops", 0.0)), found, compile_s, setting=setting, parts=parts,
                total_label="iteration peak (the largest of the three)")


__all__ = ["Shapes", "iteration_shapes", "plan_rl", "rollout_programs", "rollout_sampling", "update_batch_shapes"]
