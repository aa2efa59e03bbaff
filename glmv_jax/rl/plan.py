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
    layout = setup.state_layout(model, cfg, mesh)
    keys = ("step", "params", "opt_state")
    state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), {k: layout.abstract_state[k] for k in keys},
                         {k: layout.shardings[k] for k in keys})
    weights = prepared_shapes(layout.abstract_params, mesh=mesh, config=model, dtype=setup.compute_dtype_of(cfg))
    start = time.perf_counter()
    programs = rollout_programs(model, mesh, weights, shapes, rollout_sampling(rl, model), rl.group_size)
    batch = update_batch_shapes(model, mesh, shapes, bool(rl.kl_coef))
    programs.update({k: x.compile() for k, x in policy_update(cfg, model, layout, mesh).lower(state, batch).items()})
    compile_s = time.perf_counter() - start
    sizes_of = {name: _device_bytes(tree) for name, tree in (("state", state), ("params", state["params"]),
                                                            ("opt_state", state["opt_state"]), ("weights", weights),
                                                            ("kv", programs["state"]["kv"]))}
    # the reference policy: kept by the loop with rl.kl_coef, and for the kl_to_start metric with train.init_from
    sizes_of["reference"] = sizes_of["params"] if (rl.kl_coef or cfg.train.init_from) else 0.0
    return _iteration_plan(cfg, model, sizes, shapes, programs, sizes_of, compile_s, hosts)


def _device_bytes(tree) -> float:
    """Bytes one device holds of the ShapeDtypeStructs of `tree`, placed as their shardings say."""
    return per_device_bytes(tree, jax.tree.map(lambda x: x.sharding, tree))


def _iteration_plan(cfg, model: GlmvConfig, sizes: dict, shapes: Shapes, programs: dict, held: dict,
                    compile_s: float, hosts: int) -> Plan:
    """The Plan of one iteration: each program's XLA total plus what stays resident beside it (`held`: bytes per
    device of the train state, its params and optimizer state, the inference weights, the KV caches, the
    reference policy); its total is the largest."""
    rl, ref = cfg.rl, held["reference"]
    resident = {"prefill": held["state"] + ref, "expand": held["state"] + ref + held["weights"],
                "decode": held["state"] + ref}
    need = {name: program_bytes(programs[name].memory_analysis()) + extra for name, extra in resident.items()
            if name in programs}
    largest = max(need, key=need.get)
    update, temp = programs["update"], lambda name: float(programs[name].memory_analysis().temp_size_in_bytes)
    update_peak = program_bytes(update.memory_analysis()) + ref
    forward_peak = program_bytes(programs["log_probs"].memory_analysis()) + held["state"] - held["params"] + ref
    found = {f"{name}: {op}": counted for name in ("prefill", "decode", "update")
             for op, counted in collectives(programs[name].as_text()).items()}
    cost = update.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rows, length = shapes.update_rows, shapes.update_len
    parts = ((("reference policy (f32 params of the run's start, resident)", ref),) if ref else ()) + (
        (f"inference weights ({cfg.train.compute_dtype} copy, split over tensor only)", held["weights"]),
        (f"KV caches ({shapes.rows} rows x {shapes.cache_size} slots)", held["kv"]),
        (f"rollout temporaries (XLA, {largest} program)", temp(largest)),
        (f"rollout peak (train state + reference + {largest})", need[largest]),
        ("update: activations + temporaries (XLA)", temp("update")),
        ("update peak (XLA total + reference)", update_peak),
        ("log-prob forward peak (on-policy check / reference log-probs)", forward_peak))
    setting = (f"one RLCS iteration: rollout of {shapes.prompts} prompts x {rl.group_size} = {shapes.rows} rows "
               f"(prompt {shapes.prompt_len} tokens with one image of {shapes.image_patches} patches, "
               f"{rl.max_new_tokens} new tokens, {shapes.cache_size} KV slots), then {rl.minibatches} updates of "
               f"{rows} rows x {length} tokens (the batch and step below are one mini-batch update); remat "
               f"{cfg.train.remat_policy}, compute {cfg.train.compute_dtype}, params float32 ({hosts} host(s))")
    return Plan(sizes, length, rows, shapes.image_patches // model.vision.spatial_merge_size ** 2, held["params"],
                held["opt_state"], temp("update"), max(need[largest], update_peak, forward_peak),
                model_flops(model, rows * length, rows * shapes.image_patches, length, rows),
                float(cost.get("flops", 0.0)), found, compile_s, setting=setting, parts=parts,
                total_label="iteration peak (the largest of the three)")


__all__ = ["Shapes", "iteration_shapes", "plan_rl", "rollout_programs", "rollout_sampling", "update_batch_shapes"]
