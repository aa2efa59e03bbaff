"""The loss of a packed batch, shared by the train step, the trainer's evaluation (and the AOT plan)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from glmv_jax.config import GlmvConfig
from glmv_jax.model.glmv import apply, token_inputs
from glmv_jax.train.losses import cross_entropy

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def batch_loss(params, config: GlmvConfig, batch: dict, **kwargs):
    """Mean masked cross entropy of a packed batch and its token count (`batch_totals`' total / count)."""
    total, count = batch_totals(params, config, batch, **kwargs)
    return total / jnp.maximum(count, 1.0), count


def batch_totals(params, config: GlmvConfig, batch: dict, *, context: int = 1, remat_policy: str = "none",
                 compute_dtype=None, scan_layers: bool = True, attention_impl: str | None = None):
    """Summed masked cross entropy of a packed batch and its token count.

    batch: input_ids, segment_ids, mm_token_type_ids, targets, loss_mask (B, T); pixel values and grids.
    With context > 1 every per-token array is put in the load-balanced order once, here. With a
    `compute_dtype` (e.g. bfloat16) the float32 master params are cast for the forward pass.
    `scan_layers=False` unrolls the decoder layers (see `train.scan_layers`); `attention_impl` picks the
    attention implementation (`train.attention_impl`, `glmv_jax.ops.attention`).
    """
    if compute_dtype is not None:
        params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    tokens = token_inputs(config, batch["input_ids"], batch["segment_ids"], batch.get("mm_token_type_ids"),
                          batch.get("position_ids"), batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                          context, extra={"targets": batch["targets"], "loss_mask": batch["loss_mask"]})
    visual = {k: batch.get(k) for k in VISUAL_KEYS}
    logits = apply(params, config, tokens, visual, remat_policy, scan_layers, attention_impl)
    return cross_entropy(logits, tokens["targets"], tokens["loss_mask"])


# ------------------------------------------------------------------------------ train state

def init_state(params, tx) -> dict:
    """The train state pytree: step, params, optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def state_shardings(abstract_state, param_shardings, mesh):
    """Shardings of a train state: optimizer leaves shaped like a param (moments) share its sharding."""
    from jax.sharding import NamedSharding, PartitionSpec

    by_path = {}
    jax.tree_util.tree_map_with_path(lambda p, s: by_path.__setitem__(_keys(p), s), param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):  # the longest suffix that names a parameter
            sharding = by_path.get(keys[start:])
            if sharding is not None:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def train_step(state: dict, batch: dict, *, config: GlmvConfig, tx, context: int = 1, remat_policy: str = "none",
               compute_dtype=None, scan_layers: bool = True, attention_impl: str | None = None):
    """One optimizer update on a packed batch: (new state, metrics {loss, grad_norm, tokens})."""
    def loss_fn(params):
        return batch_loss(params, config, batch, context=context, remat_policy=remat_policy,
                          compute_dtype=compute_dtype, scan_layers=scan_layers, attention_impl=attention_impl)

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return apply_grads(state, grads, loss, count, tx=tx)


def apply_grads(state: dict, grads, loss, count, *, tx):
    """The optimizer update of `grads`: (new state, metrics {loss, grad_norm, tokens})."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": count}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


# ------------------------------------------------------------------------------ gradient accumulation
# optimizer.accumulate = N: one update from N micro-batches, fed one at a time (one micro-batch on the devices at
# a time, whatever N): `accumulate_step` adds each one's summed loss, token count and gradient of the summed loss
# into an f32 accumulator (params-sized, donated from call to call); `apply_accumulated` divides by all N
# micro-batches' tokens and updates, so the update is that of one batch holding all N (up to summation order).

def init_accumulator(params) -> dict:
    """Zero sums: {grads: f32 like params, total: (), count: ()}."""
    return {"grads": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            "total": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def accumulate_step(acc: dict, params, batch: dict, *, config: GlmvConfig, **kwargs) -> dict:
    """`acc` plus one micro-batch's summed loss, token count and gradient of the summed loss (see `batch_totals`
    for kwargs)."""
    (total, count), grads = jax.value_and_grad(
        lambda p: batch_totals(p, config, batch, **kwargs), has_aux=True)(params)
    return {"grads": jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc["grads"], grads),
            "total": acc["total"] + total, "count": acc["count"] + count}


def apply_accumulated(state: dict, acc: dict, *, tx):
    """The update of the accumulated micro-batches: mean loss and gradient over all their tokens."""
    scale = 1.0 / jnp.maximum(acc["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), acc["grads"], state["params"])
    return apply_grads(state, grads, acc["total"] * scale, acc["count"], tx=tx)
