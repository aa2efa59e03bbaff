"""Ahead-of-time plan of a train step: compile the real step from abstract shapes, no weights allocated.

Prints per-device memory (params, optimizer state, activations/temporaries from XLA's compiled
memory analysis), FLOPs per step, the collectives with their bytes, and the step time that would
follow at a given MFU on a TPU v5p chip and an H100. FLOPs are counted as MaxText does: matmuls
only, 6 x params x tokens for the layers, causal attention halved, the vision tower included.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax import sharding as mesh_lib
from glmv_jax.config import GlmvConfig
from glmv_jax.data import visual_layout
from glmv_jax.errors import ConfigError
from glmv_jax.train.batches import BATCH_SPECS, TOKEN_KEYS

PEAK_BF16 = {"TPU v5p": 459e12, "H100 SXM": 989e12}  # dense bf16 FLOP/s per chip
HBM = {"TPU v5p": 95e9, "H100 SXM": 80e9}
# TPU slice kinds: (HBM bytes per chip, chips per host, slice-name number per chip: v5p-64 is 32 chips)
SLICES = {"v5p": (95e9, 4, 2), "v4": (32e9, 4, 2), "v6e": (32e9, 4, 1)}


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
    accumulate: int = 1      # micro-batches per step (optimizer.accumulate)
    bytes_accumulation: float = 0.0  # the f32 gradient sum of accumulation, per device (inside bytes_temp)
    setting: str = ""        # remat, dtypes, visual shapes: what was compiled, in words
    parts: tuple = ()        # (label, bytes per device) rows between the optimizer state and the total, when set
    total_label: str = "total (XLA: arguments + outputs - aliased + temporaries)"

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
    sequence, laid out as the trainer does (train/batches: one flat visual block per data x fsdp shard)."""
    blocks = mesh_lib.axis_size(mesh, mesh_lib.BATCH)
    budgets = visual_layout.VisualBudgets(row_multiple=mesh.shape["context"])
    per_block = batch // blocks
    visual = visual_layout.abstract_shapes(config.vision, budgets, images=per_block,
                                           patches=config.vision.spatial_merge_size ** 2 * image_tokens * per_block)
    shapes = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
              for k in TOKEN_KEYS}
    shapes["pixel_values"] = jax.ShapeDtypeStruct((blocks, *visual["pixel_values"]), jnp.float32)
    shapes["image_grid_thw"] = jax.ShapeDtypeStruct((blocks, *visual["image_grid_thw"]), jnp.int32)
    specs = dict(BATCH_SPECS)
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

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params_bytes = per_device_bytes(abstract_state["params"], shardings["params"])
    opt_bytes = per_device_bytes(abstract_state["opt_state"], shardings["opt_state"])
    temp = float(memory.temp_size_in_bytes)
    total = float(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + temp)
    tokens = global_batch * seq
    patches = math.prod(batch["pixel_values"].shape[:-1])
    return Plan(sizes, seq, global_batch, image_tokens, params_bytes, opt_bytes, temp, total,
                model_flops(config, tokens, patches, seq, global_batch), float(cost.get("flops", 0.0)),
                collectives(compiled.as_text()), compile_s)


def report(p: Plan) -> str:
    gb = 1e9
    batch = (f"global batch {p.global_batch}" if p.accumulate == 1 else
             f"global batch {p.global_batch * p.accumulate} = {p.global_batch} per micro-batch x {p.accumulate}")
    lines = [
        f"mesh {', '.join(f'{k}={v}' for k, v in p.mesh.items())}; sequence {p.seq}; {batch}"
        + (f"; {p.setting}" if p.setting else f" ({p.image_tokens} visual tokens per sequence)")
        + f"; compiled in {p.compile_s:.0f}s",
        "",
        "| per device | GB |", "|---|---|",
        f"| params (f32 master) | {p.bytes_params / gb:.2f} |",
        f"| optimizer state | {p.bytes_opt_state / gb:.2f} |",
        *(f"| {label} | {size / gb:.2f} |" for label, size in p.parts or (
            *([("accumulation buffer (f32 gradient sum, kept across the micro-batches)", p.bytes_accumulation)]
              if p.accumulate > 1 else []),
            ("activations + temporaries (XLA)", p.bytes_temp))),
        f"| {p.total_label} | {p.bytes_total / gb:.2f} |",
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
    fitting = smallest_slices(p)
    if fitting:
        lines += ["", f"At {p.devices} chips it fits on: {', '.join(fitting)} (HBM per chip: "
                  + ", ".join(f"{chip} {hbm / gb:.0f} GB" for chip, (hbm, _, _) in SLICES.items()) + ")."]
    else:
        lines += ["", f"At {p.devices} chips it fits on none of {', '.join(SLICES)}: more chips or accumulation."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ a training YAML, as glmv train runs it
def slice_chips(name: str) -> tuple[int, int]:
    """(chips, hosts) of a TPU slice name: v5p-64 -> (32, 8), v4-128 -> (64, 16), v6e-16 -> (16, 4)."""
    kind, _, count = name.partition("-")
    if kind not in SLICES or not count.isdigit() or int(count) % SLICES[kind][2]:
        raise ConfigError(f"unknown slice {name!r}: expected one of {', '.join(k + '-N' for k in SLICES)}")
    chips = int(count) // SLICES[kind][2]
    return chips, max(1, chips // SLICES[kind][1])


def smallest_slices(p: Plan) -> list[str]:
    """The slices of p.devices chips whose HBM holds the plan's per-device total."""
    return [f"{kind}-{p.devices * per}" for kind, (hbm, _, per) in SLICES.items() if p.bytes_total <= hbm]


def planned_model(cfg, workdir=None):
    """The model `glmv train` builds for `cfg`: that of a run folder's config.json when `workdir` is given (what
    the run wrote), else the config's model; with data.tokenizer = synthetic, its vocabulary rounded up as a
    tokenizer trained here would make it (at most data.vocab_size ids)."""
    import dataclasses

    from glmv_jax.config import load_config
    from glmv_jax.train.setup import VOCAB_MULTIPLE

    if workdir is not None:
        return load_config(str(workdir))
    model = cfg.base_model()
    if cfg.data.tokenizer == "synthetic":
        vocab = -(-cfg.data.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        model = dataclasses.replace(model, text=dataclasses.replace(model.text, vocab_size=vocab))
    return model


def plan_run(cfg, devices: int, hosts: int = 1, model=None) -> Plan:
    """Compile exactly the train step `glmv train` runs for the training config `cfg` on `devices` devices (of
    `hosts` processes): its mesh, state layout and optimizer (train/setup.py), its micro-batches
    (optimizer.accumulate), remat, dtypes, sequence length and fixed visual budgets (data.max_images,
    data.pixel_rows or data.frame_patches, of the global batch, split over the data x fsdp visual blocks), from
    abstract shapes; `hosts` only labels the report (the shapes are the same on any number of processes)."""
    from glmv_jax.model.glmv import check_model
    from glmv_jax.train import batches, setup

    sizes = cfg.mesh.sizes(devices)
    mesh = mesh_lib.make_mesh(**sizes, devices=jax.devices()[:int(np.prod(list(sizes.values())))])
    model, data = model or planned_model(cfg), cfg.data
    check_model(model, mesh)
    mesh_lib.check_batch(mesh, data.batch_size, data.seq_len)
    if not data.max_images or not (data.pixel_rows or data.frame_patches):
        raise ConfigError("glmv plan --train-config needs fixed visual budgets (data.max_images and data.pixel_rows "
                          "or data.frame_patches): without them every batch has its own shapes")
    layout = setup.state_layout(model, cfg, mesh)
    blocks = mesh_lib.axis_size(mesh, mesh_lib.BATCH)   # one visual block per data x fsdp shard (train/batches)
    unit = model.vision.spatial_merge_size ** 2
    block = visual_layout.abstract_shapes(model.vision, batches.block_budgets(data, mesh, model.vision),
                                          images=1, patches=unit, widest=unit)
    visual = {k: (blocks, *shape) for k, shape in block.items()}
    batch = {k: jax.ShapeDtypeStruct((data.batch_size, data.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in TOKEN_KEYS}
    batch["pixel_values"] = jax.ShapeDtypeStruct(visual["pixel_values"], jnp.float32)
    batch["image_grid_thw"] = jax.ShapeDtypeStruct(visual["image_grid_thw"], jnp.int32)
    batch_shardings = {k: NamedSharding(mesh, mesh_lib.spec(BATCH_SPECS[k])) for k in batch}
    for k, x in batch.items():
        mesh_lib.check_divisible(mesh, x.shape, mesh_lib.spec(BATCH_SPECS[k]), k)
    step_state = {k: layout.abstract_state[k] for k in ("step", "params", "opt_state")}
    accumulate = cfg.optimizer.accumulate
    fn = setup.jit_train_step(cfg, model, layout, mesh, batch_shardings)
    params_bytes = per_device_bytes(step_state["params"], layout.shardings["params"])
    opt_bytes = per_device_bytes(step_state["opt_state"], layout.shardings["opt_state"])
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        if accumulate == 1:
            programs = [(fn.single.lower(step_state, batch).compile(), 0.0)]
        else:  # the micro-batch program (the optimizer state stays resident beside it) and the update
            from glmv_jax.train.steps import init_accumulator
            acc = jax.eval_shape(init_accumulator, step_state["params"])
            programs = [(fn.micro.lower(acc, step_state["params"], batch).compile(), opt_bytes),
                        (fn.apply.lower(step_state, acc).compile(), 0.0)]
    compile_s = time.perf_counter() - start
    peaks = [program_bytes(compiled.memory_analysis()) + resident for compiled, resident in programs]
    compiled = programs[int(np.argmax(peaks))][0]
    temp = float(compiled.memory_analysis().temp_size_in_bytes)
    cost = programs[0][0].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    found: dict = {}
    for program, _ in programs:
        for op, (c, b) in collectives(program.as_text()).items():
            found[op] = (found.get(op, (0, 0.0))[0] + c, found.get(op, (0, 0.0))[1] + b)
    patches = int(np.prod(visual["pixel_values"][:-1]))
    flops = model_flops(model, data.batch_size * data.seq_len, patches, data.seq_len, data.batch_size) * accumulate
    setting = (f"remat {cfg.train.remat_policy}, compute {cfg.train.compute_dtype}, params float32; visual per "
               f"micro-batch: pixel_values {visual['pixel_values']}, image_grid_thw {visual['image_grid_thw']} "
               f"({hosts} host(s))")
    if accumulate > 1:
        setting += "; peak of the micro-batch program (optimizer state resident beside it) and the update program"
    return Plan(sizes, data.seq_len, data.batch_size, patches // unit, params_bytes, opt_bytes, temp, max(peaks),
                flops, float(cost.get("flops", 0.0)), found, compile_s, accumulate,
                per_device_bytes(acc["grads"], layout.param_shardings) if accumulate > 1 else 0.0, setting)


def program_bytes(memory) -> float:
    """Bytes a compiled program needs on a device: arguments + outputs - aliased + temporaries."""
    return float(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                 + memory.temp_size_in_bytes)


def per_device_bytes(tree, shardings) -> float:
    """Bytes one device holds of the abstract `tree` placed as `shardings` say."""
    return float(sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                     for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))
