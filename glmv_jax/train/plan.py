"""Ahead-of-time plan of a train step: compile the real step from abstract shapes, no weights allocated.

Prints per-device memory (params, optimizer state, activations/temporaries from XLA's compiled
memory analysis), FLOPs per step, the collectives with their bytes, and the step time that would
follow at a given MFU on a TPU v5p chip and an H100. FLOPs are counted as MaxText does: matmuls
only, 6 x params x tokens for the layers, causal attention halved, the vision tower included.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax import sharding as mesh_lib
from glmv_jax.config import GlmvConfig
from glmv_jax.data import visual_layout

PEAK_BF16 = {"TPU v5p": 459e12, "H100 SXM": 989e12}  # dense bf16 FLOP/s per chip
HBM = {"TPU v5p": 95e9, "H100 SXM": 80e9}
TOKEN_KEYS = ("input_ids", "segment_ids", "mm_token_type_ids", "targets", "loss_mask")


@dataclasses.dataclass
class Plan:
    mesh: dict
    seq: int
    global_batch: int
    image_tokens: int
    bytes_params: float
    bytes_opt_state: float
    bytes_temp: float
    bytes_total: float
    flops_model: float       # per step, whole mesh (MaxText convention)
    flops_xla: float         # per device, XLA's count of the compiled program
    collectives: dict        # op -> (count, bytes per device)
    compile_s: float

    @property
    def devices(self) -> int:
        return int(np.prod(list(self.mesh.values())))

    def step_time(self, chip: str, mfu: float) -> float:
        return self.flops_model / self.devices / (PEAK_BF16[chip] * mfu)


def model_flops(config: GlmvConfig, tokens: int, patches: int, seq: int, sequences: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, matmuls only, causal attention halved."""
    t, v = config.text, config.vision
    attn_params = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    layer = attn_params + 3 * t.hidden_size * t.intermediate_size
    decoder = 2 * tokens * (t.num_layers * layer + t.hidden_size * t.vocab_size)
    attention = 2 * 2 * sequences * seq * seq * t.num_heads * t.head_dim * t.num_layers / 2
    vlayer = 4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.out_hidden_size
    vision = 2 * patches * (v.depth * vlayer + v.patch_dim * v.hidden_size)
    vision += 2 * (patches // 4) * (4 * v.hidden_size * v.out_hidden_size + v.out_hidden_size ** 2
                                     + 3 * v.out_hidden_size * v.intermediate_size)
    # vision attention: images of `patches / images` patches; bounded by one image per sequence's budget
    vision += 2 * 2 * patches * min(patches, 4 * 6144) * v.hidden_size * v.depth
    return 3.0 * (decoder + attention + vision)


def abstract_batch(config: GlmvConfig, mesh, seq: int, batch: int, image_tokens: int) -> tuple[dict, dict]:
    """ShapeDtypeStructs of a packed batch and their shardings: one image of `image_tokens` visual tokens per
    sequence, laid out as the trainer does (data/visual_layout, flat, rows split over the `patches` axes)."""
    budgets = visual_layout.VisualBudgets(row_multiple=mesh_lib.axis_size(mesh, mesh_lib.RULES["patches"]))
    visual = visual_layout.abstract_shapes(config.vision, budgets, images=batch,
                                           patches=config.vision.spatial_merge_size ** 2 * image_tokens * batch)
    shapes = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
              for k in TOKEN_KEYS}
    shapes["pixel_values"] = jax.ShapeDtypeStruct(visual["pixel_values"], jnp.float32)
    shapes["image_grid_thw"] = jax.ShapeDtypeStruct(visual["image_grid_thw"], jnp.int32)
    specs = {k: ("batch", "length") for k in TOKEN_KEYS}
    specs.update(pixel_values=("patches", None), image_grid_thw=(None, None))
    shardings = {k: NamedSharding(mesh, mesh_lib.spec(specs[k])) for k in shapes}
    for k, s in shapes.items():
        mesh_lib.check_divisible(mesh, s.shape, mesh_lib.spec(specs[k]), k)
    return shapes, shardings


def collectives(hlo: str) -> dict[str, tuple[int, float]]:
    """Count the collectives of an optimized HLO module and the bytes each moves per device."""
    sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "s64": 8, "f64": 8}
    out: dict[str, list] = {}
    for line in hlo.splitlines():
        m = re.search(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                      r"(-start)?\(", line)
        if not m:
            continue
        nbytes = sum(sizes.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
        entry = out.setdefault(m.group(2), [0, 0.0])
        entry[0] += 1
        entry[1] += nbytes
    return {k: (c, b) for k, (c, b) in out.items()}


def plan(config: GlmvConfig, sizes: dict[str, int], *, seq: int, batch_per_replica: int = 1,
         image_tokens: int | None = None, remat_policy: str = "full", compute_dtype=jnp.bfloat16,
         optimizer=None, attention_impl: str | None = None) -> Plan:
    """Compile the train step for `config` on a mesh of `sizes` from abstract shapes and report it.
    `attention_impl`: see `glmv_jax.ops.attention` (None: the host backend's; "splash" compiles the Pallas kernel
    in interpret mode, its block-sized buffers, as on TPU)."""
    from glmv_jax.model.glmv import check_model, init_params, param_shardings
    from glmv_jax.train.optimizer import OptimizerConfig, make_optimizer
    from glmv_jax.train.steps import init_state, state_shardings, train_step

    mesh = mesh_lib.make_mesh(**sizes, devices=jax.devices()[:int(np.prod(list(sizes.values()) or [1]))])
    check_model(config, mesh)
    global_batch = batch_per_replica * mesh.shape["data"] * mesh.shape["fsdp"]
    mesh_lib.check_batch(mesh, global_batch, seq)
    image_tokens = seq // 4 if image_tokens is None else image_tokens
    abstract_params = jax.eval_shape(lambda: init_params(config))
    tx = make_optimizer(optimizer or OptimizerConfig(), abstract_params)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    shardings = state_shardings(abstract_state, param_shardings(config, mesh), mesh)
    batch, batch_shardings = abstract_batch(config, mesh, seq, global_batch, image_tokens)
    step = functools.partial(train_step, config=config, tx=tx, context=mesh.shape["context"],
                             remat_policy=remat_policy, compute_dtype=compute_dtype, attention_impl=attention_impl)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(shardings, batch_shardings),
                           out_shardings=(shardings, NamedSharding(mesh, P())),
                           donate_argnums=0).lower(abstract_state, batch).compile()
    compile_s = time.perf_counter() - start

    def per_device(tree, tree_shardings):
        return sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)))

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params_bytes = per_device(abstract_state["params"], shardings["params"])
    opt_bytes = per_device(abstract_state["opt_state"], shardings["opt_state"])
    temp = float(memory.temp_size_in_bytes)
    total = float(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + temp)
    tokens = global_batch * seq
    patches = batch["pixel_values"].shape[0]
    return Plan(sizes, seq, global_batch, image_tokens, params_bytes, opt_bytes, temp, total,
                model_flops(config, tokens, patches, seq, global_batch), float(cost.get("flops", 0.0)),
                collectives(compiled.as_text()), compile_s)


def report(p: Plan) -> str:
    gb = 1e9
    lines = [
        f"mesh {', '.join(f'{k}={v}' for k, v in p.mesh.items())}; sequence {p.seq}; global batch {p.global_batch}"
        f" ({p.image_tokens} visual tokens per sequence); compiled in {p.compile_s:.0f}s",
        "",
        "| per device | GB |", "|---|---|",
        f"| params (f32 master) | {p.bytes_params / gb:.2f} |",
        f"| optimizer state | {p.bytes_opt_state / gb:.2f} |",
        f"| activations + temporaries (XLA) | {p.bytes_temp / gb:.2f} |",
        f"| total (XLA: arguments + outputs - aliased + temporaries) | {p.bytes_total / gb:.2f} |",
        "",
        f"FLOPs per step: {p.flops_model:.3e} (model, whole mesh; {p.flops_model / p.devices:.3e} per device). "
        f"XLA's own count, {p.flops_xla:.3e} per device, sees each scanned layer body once.",
        "",
        "Collectives of the compiled step (an op inside the layer scan is listed once but runs once per layer):",
        "",
        "| collective | ops | MB per device |", "|---|---|---|",
    ]
    lines += [f"| {op} | {c} | {b / 1e6:.1f} |" for op, (c, b) in sorted(p.collectives.items())]
    lines += ["", "| chip | HBM GB | fits | step at 40% MFU | step at 60% MFU |", "|---|---|---|---|---|"]
    for chip in PEAK_BF16:
        fits = "yes" if p.bytes_total <= HBM[chip] else "no"
        lines.append(f"| {chip} | {HBM[chip] / gb:.0f} | {fits} | {p.step_time(chip, 0.4):.2f} s | "
                     f"{p.step_time(chip, 0.6):.2f} s |")
    return "\n".join(lines)
