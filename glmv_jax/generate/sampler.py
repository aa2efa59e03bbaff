"""Batched generation: one jitted prefill, then a `lax.while_loop` decode over a donated KV cache.

Prompts are left-padded (to a length bucket) so every row writes its next token at the same cache
slot; each row keeps its own 3D rope position (`max prefill position + 1 + k`, as transformers).
The loop runs wholly on device; `steps_per_call` only sets how often control comes back to the host
(for streaming), and the decode program compiles once per (batch, cache size, sampling settings).
Both run on inference weights (`generate.weights.prepare`: the decoder layers once, as per-layer trees);
a decode step runs the layers unrolled over them and per-layer caches (`generate.decode.decode_step`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.config import GlmvConfig
from glmv_jax.data.visual_layout import pad_visual
from glmv_jax.errors import ConfigError, MeshError
from glmv_jax.generate.decode import decode_step, prefill_hidden
from glmv_jax.generate.kv_cache import CACHE_AXES, cache_layout, constrain_cache
from glmv_jax.generate.weights import prepare, without_layers
from glmv_jax.model import inputs as model_inputs
from glmv_jax.model import rope
from glmv_jax.model.decoder import Decoder
from glmv_jax.model.glmv import Glmv, check_model, params_dtype
from glmv_jax.ops.logprobs import token_log_probs
from glmv_jax.shapes import bucket, round_up
from glmv_jax.sharding import BATCH, axis_size, constrain, spec

NOT_FORCING, FORCE_DONE = -1, -2


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. Hashable: it is a static argument of the decode program.

    temperature 0 is greedy. top_p 1.0 keeps the whole vocabulary; top_k 0 disables top-k.
    thinking_budget: once a row has produced that many tokens without `think_end_id`, the tokens
    `forced_answer_ids` (e.g. `</think>`, `<answer>`) are emitted next and the model finishes its answer.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    thinking_budget: int | None = None
    think_end_id: int | None = None
    forced_answer_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")
        if self.thinking_budget is not None and (self.think_end_id is None or not self.forced_answer_ids):
            raise ConfigError("a thinking_budget needs think_end_id and forced_answer_ids (e.g. </think>, <answer>)")


class SampleOutput(NamedTuple):
    tokens: jax.Array    # (B, N) int32: generated ids, pad_id after a row stopped
    logprobs: jax.Array  # (B, N) float32: log p(token) under softmax(logits / temperature), 0 after stop
    lengths: jax.Array   # (B,) int32: tokens generated, the stop token included
    forced: jax.Array    # (B,) bool: the thinking budget ran out and the answer was forced


# ------------------------------------------------------------------------------ token choice

def greedy(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (B, V) -> (B,) int32 (the first index of the maximum; a row with a NaN gives its
    first NaN). Written as two plain reductions: XLA:CPU runs argmax's (value, index) reduction unvectorised
    (0.66 ms for 8 x 32000 logits, a twentieth of a decode step)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def choose(logits: jax.Array, key: jax.Array, s: SamplingConfig) -> jax.Array:
    """Next token (B,) from logits (B, V): greedy, or sampled after top-k and top-p filtering."""
    if s.temperature == 0:
        return greedy(logits)
    scaled = logits.astype(jnp.float32) / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(scaled, s.top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if s.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        keep_ranked = jnp.cumsum(probs, axis=-1) - probs < s.top_p  # mass strictly above < top_p
        keep = jnp.zeros_like(keep_ranked).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_ranked)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------- programs

def _text_model(config: GlmvConfig, dtype) -> Decoder:
    """The decoder module as `Glmv` builds it, unbound: applied to `params["decoder"]`."""
    return Decoder(config.text, config.tie_word_embeddings, dtype)


@functools.partial(jax.jit, static_argnames=("config", "cache_size", "split"))
def prefill(weights, config: GlmvConfig, input_ids, attention_mask, token_types, position_ids, pixel_values,
            image_grid_thw, pixel_values_videos, video_grid_thw, *, cache_size: int, split: bool = False):
    """Run the prompt (B, T) on inference weights (`weights.prepare`). Returns the last position's logits (B, V)
    float32 and, per layer, (k, v) caches of cache_size slots in `kv_cache.cache_layout` (what
    `decode.decode_step` reads and writes; `split`: the mesh layout, split by row and KV head)."""
    dtype = params_dtype(weights)
    top = without_layers(weights["decoder"])
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731

    def embed(model: Glmv):
        return model.embed_inputs(input_ids, token_types, cast(pixel_values), image_grid_thw,
                                  cast(pixel_values_videos), video_grid_thw)

    x = Glmv(config, dtype).apply({"params": {**weights, "decoder": top}}, method=embed)
    text = _text_model(config, dtype)
    h, kv = prefill_hidden(text, weights["decoder"], x, position_ids, attention_mask, None)
    # The last two positions, not one: XLA:CPU runs a one-row bf16 matmul by converting the whole
    # (hidden, vocab) lm_head to f32 first (24 ms for `small`, against 1.6 ms for two rows).
    logits = text.apply({"params": top}, h[:, -2:], method=Decoder.logits)[:, -1]
    pad = [(0, 0), (0, cache_size - input_ids.shape[1]), (0, 0), (0, 0)]
    logits = constrain(logits.astype(jnp.float32), ("batch", None))
    return logits, tuple(cache_layout(jnp.pad(k, pad), jnp.pad(v, pad), split=split) for k, v in kv)


def _feed(weights, config: GlmvConfig, token, state):
    """One decoder step for `token` (B,) at the cache slot `write_pos`: logits (B, V) float32, new caches. On a
    mesh the logits are gathered whole over the vocabulary (split over `tensor` by the lm head): the token choice
    and its log-prob then run on each device's rows without further collectives."""
    meta = {"write_pos": state["write_pos"], "segment": state["cache_segment"]}
    positions = jnp.broadcast_to(state["next_pos"][None, :, None], (3, token.shape[0], 1))
    logits, kv = decode_step(_text_model(config, params_dtype(weights)), weights["decoder"], token, positions,
                             state["kv"], meta)
    return constrain(logits.astype(jnp.float32), ("batch", None)), kv


def _apply_budget(token, state, s: SamplingConfig):
    """Override `token` with the forced answer where a row's thinking budget ran out; update the counters."""
    forcing = state["force_step"] >= 0
    forced_ids = jnp.array(s.forced_answer_ids, jnp.int32)
    token = jnp.where(forcing, forced_ids[jnp.clip(state["force_step"], 0, len(s.forced_answer_ids) - 1)], token)
    thinking = ~state["think_closed"] & ~state["done"]
    closed = state["think_closed"] | (token == s.think_end_id)
    count = state["think_count"] + thinking
    step = jnp.where(forcing, state["force_step"] + 1, state["force_step"])
    step = jnp.where(step >= len(s.forced_answer_ids), FORCE_DONE, step)
    step = jnp.where((step == NOT_FORCING) & ~closed & (count >= s.thinking_budget), 0, step)
    return token, {**state, "think_closed": closed, "think_count": count, "force_step": step,
                   "forced": state["forced"] | forcing}


@functools.partial(jax.jit, static_argnames=("config", "sampling", "steps"), donate_argnames=("state",))
def decode(weights, config: GlmvConfig, state: dict, *, sampling: SamplingConfig, steps: int) -> dict:
    """Run up to `steps` decode steps on device (fewer if every row stopped) on inference weights
    (`weights.prepare`, the same `prefill` ran on); returns the new state."""
    s = sampling
    stop_at = jnp.minimum(state["step"] + steps, s.max_new_tokens)
    eos = jnp.array(s.eos_ids or (-1,), jnp.int32)

    def body(st):
        key, sub = jax.random.split(st["rng"])
        token = choose(st["logits"], sub, s)
        if s.thinking_budget is not None:
            token, st = _apply_budget(token, st, s)
        logp = token_log_probs(st["logits"] / (s.temperature or 1.0), token)
        done = st["done"]
        token = jnp.where(done, s.pad_id, token)
        st = {**st, "rng": key,
              "tokens": st["tokens"].at[:, st["step"]].set(token),
              "logprobs": st["logprobs"].at[:, st["step"]].set(jnp.where(done, 0.0, logp)),
              "lengths": st["lengths"] + ~done,
              "done": done | jnp.isin(token, eos),
              "cache_segment": st["cache_segment"].at[:, st["write_pos"]].set(1)}
        logits, kv = _feed(weights, config, token, st)
        return {**st, "logits": logits, "kv": kv, "step": st["step"] + 1, "write_pos": st["write_pos"] + 1,
                "next_pos": st["next_pos"] + 1}

    return jax.lax.while_loop(lambda st: (st["step"] < stop_at) & ~jnp.all(st["done"]), body, state)


# ---------------------------------------------------------------------------------- driver

def check_mesh(config: GlmvConfig, mesh) -> None:
    """A mesh the sampler runs on: the model's sizes divide it and it has no `context` split (a decode step is one
    token per row; split rows over `data`/`fsdp`, heads over `tensor`)."""
    if mesh.shape["context"] > 1:
        raise MeshError(f"generate on a mesh with context = {mesh.shape['context']}: decoding splits rows over "
                        "data/fsdp and heads over tensor only; set context to 1")
    check_model(config, mesh)


def batch_sharding(mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Arrays of `ndim` dims split by row (their `axis`) over the data axes of `mesh`."""
    return NamedSharding(mesh, P(*[BATCH if d == axis else None for d in range(ndim)]))


def state_shardings(state: dict, mesh) -> dict:
    """Where the decode state (arrays or their shapes) lives on the mesh: per-row arrays split by row over the data
    axes, caches also by KV head over `tensor` (`kv_cache.CACHE_AXES`), scalars and the key replicated."""
    def one(path, x):
        name = str(getattr(path[0], "key", ""))
        if name == "kv":
            return NamedSharding(mesh, spec(CACHE_AXES))
        if name == "rng" or np.ndim(x) == 0:
            return NamedSharding(mesh, P())
        return batch_sharding(mesh, np.ndim(x))
    return jax.tree_util.tree_map_with_path(one, state)


def _place_state(state: dict, mesh) -> dict:
    return jax.device_put(state, state_shardings(state, mesh))


@jax.jit
def expand_prefix(logits, kv, index):
    """Each prompt's last logits and caches repeated to its rows (`index` (rows,): the prompt of each decode row):
    the prefix sharing of `sample(group_size=G)`, on device."""
    prompts = logits.shape[0]

    def take(cache):   # merged caches (P*K, ...) are gathered per prompt: (P, K, ...) -> (rows, K, ...)
        if cache.ndim == 4:
            return jnp.take(cache, index, axis=0)
        per_prompt = cache.reshape(prompts, -1, *cache.shape[1:])
        return jnp.take(per_prompt, index, axis=0).reshape(-1, *cache.shape[1:])

    kv = tuple(constrain_cache((take(k), take(v))) if k.ndim == 4 else (take(k), take(v)) for k, v in kv)
    return constrain(jnp.take(logits, index, axis=0), ("batch", None)), kv


def prompt_rows(config: GlmvConfig, sampling: SamplingConfig, ids, mask, types, extra: int):
    """Left-pad the (checked) prompts to their length bucket and add `extra` dummy rows (one real pad token, text
    only) so the rows divide the mesh's data axes. Returns (ids, mask, types, length, cache_size)."""
    b, t = ids.shape
    length = bucket(t, minimum=32)
    cache_size = round_up(length + sampling.max_new_tokens, 128)
    if length + sampling.max_new_tokens > config.text.max_position_embeddings:
        raise model_inputs.InputError(
            f"prompt ({t} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings {config.text.max_position_embeddings}")
    left = lambda x, v=0: np.pad(np.asarray(x), [(0, extra), (length - t, 0)], constant_values=v)  # noqa: E731
    ids, mask, types = left(ids, sampling.pad_id), left(mask), left(types)
    mask[b:, -1] = 1
    return ids, mask, types, length, cache_size


def sample(params, config: GlmvConfig, input_ids, *, sampling: SamplingConfig, attention_mask=None,
           pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
           mm_token_type_ids=None, seed: int = 0, steps_per_call: int | None = None,
           on_tokens: Callable[[np.ndarray], None] | None = None, mesh=None, group_size: int = 1) -> SampleOutput:
    """Generate up to `sampling.max_new_tokens` tokens after each prompt row (left padding, like transformers).

    `params`: the model's parameters, or inference weights from `generate.weights.prepare` (prepare once to
    reuse them across calls; `prepare(params, donate=True)` keeps one copy of the decoder weights). Model
    parameters are prepared here, for this call: their decoder layers are then held twice until it returns.
    `on_tokens`, if given, is called with the (B, n) tokens produced by each call of the decode
    program (every `steps_per_call` steps), for streaming.
    `group_size` G: each prompt row is answered G times (output rows p*G .. p*G + G-1 for prompt p): its vision
    tower and prefill run once and its KV cache serves its G rows (prefix sharing).
    `mesh`: run on it (`check_mesh`): rows split over data x fsdp, heads and the KV cache's heads over tensor, the
    weights as `weights.prepare(mesh=...)` lays them out; rows are padded with dummy prompts to divide data x fsdp.
    """
    if group_size < 1:
        raise ConfigError(f"group_size must be >= 1, got {group_size}")
    ids, mask, image_grid, video_grid = model_inputs.check_inputs(
        config, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids)
    if not mask[:, -1].all():
        raise model_inputs.InputError("prompts must be left-padded: the last column of attention_mask must be all 1")
    types = (np.asarray(rope.token_types(config, jnp.asarray(ids))) if mm_token_type_ids is None
             else np.asarray(mm_token_type_ids, np.int32))
    prompts = ids.shape[0]
    rows_out = prompts * group_size
    dp = 1
    if mesh is not None:
        check_mesh(config, mesh)
        dp = axis_size(mesh, BATCH)
    extra = round_up(prompts, dp) - prompts
    ids, mask, types, length, cache_size = prompt_rows(config, sampling, ids, mask, types, extra)
    pixel_values, image_grid = pad_visual(pixel_values, image_grid, config.vision)
    pixel_values_videos, video_grid = pad_visual(pixel_values_videos, video_grid, config.vision)
    positions, _ = rope.get_rope_index(config, ids, image_grid_thw=image_grid, video_grid_thw=video_grid,
                                       attention_mask=mask, mm_token_type_ids=types)
    weights = prepare(params, mesh=mesh, config=config)
    index = None   # the prompt row of each decode row, when not one to one
    if group_size > 1 or extra:
        index = np.repeat(np.arange(prompts), group_size)
        index = np.concatenate([index, np.full(round_up(rows_out, dp) - rows_out, prompts)]).astype(np.int32)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        args = (ids, mask, types, positions)
        if mesh is not None:
            args = tuple(jax.device_put(x, batch_sharding(mesh, x.ndim, axis=x.ndim - 2)) for x in args)
        logits, kv = prefill(weights, config, *args, pixel_values, image_grid, pixel_values_videos, video_grid,
                             cache_size=cache_size, split=mesh is not None)
        segment, next_pos = jnp.pad(args[1], [(0, 0), (0, cache_size - length)]), jnp.max(args[3], axis=(0, 2)) + 1
        if index is not None:
            logits, kv = expand_prefix(logits, kv, index)
            segment, next_pos = segment[index], next_pos[index]
        state = initial_state(logits, kv, segment, next_pos, length, seed, sampling)
        if mesh is not None:
            state = _place_state(state, mesh)
        state = _decode_loop(weights, config, state, sampling, steps_per_call, on_tokens, rows_out)
        outputs = _first_rows(tuple(state[k] for k in ("tokens", "logprobs", "lengths", "forced")), rows_out)
    return SampleOutput(*outputs)


@functools.partial(jax.jit, static_argnames="rows")
def _first_rows(arrays: tuple, rows: int) -> tuple:
    """The first `rows` rows of each array; on a mesh replicated on every device, so that every process of a
    multi-process job can read them whole (`np.asarray`): one all-gather of the (B, N) outputs."""
    return tuple(constrain(x[:rows], (None,) * x.ndim) for x in arrays)


def initial_state(logits, kv, segment, next_pos, length: int, seed: int, sampling: SamplingConfig) -> dict:
    """The decode state before its first step: prefill logits (B, V), caches, valid slots (B, S), next positions."""
    b, n = logits.shape[0], sampling.max_new_tokens
    return {
        "logits": logits, "kv": kv, "rng": jax.random.key(seed), "cache_segment": segment,
        "write_pos": jnp.int32(length), "next_pos": next_pos, "step": jnp.int32(0),
        "tokens": jnp.full((b, n), sampling.pad_id, jnp.int32), "logprobs": jnp.zeros((b, n), jnp.float32),
        "lengths": jnp.zeros((b,), jnp.int32), "done": jnp.zeros((b,), bool),
        "think_closed": jnp.zeros((b,), bool), "think_count": jnp.zeros((b,), jnp.int32),
        "force_step": jnp.full((b,), NOT_FORCING, jnp.int32), "forced": jnp.zeros((b,), bool),
    }


def _decode_loop(weights, config, state, sampling: SamplingConfig, steps_per_call, on_tokens, rows: int) -> dict:
    """Call the decode program until every row stopped or max_new_tokens; stream the first `rows` rows."""
    n = sampling.max_new_tokens
    steps = steps_per_call or n
    while True:
        before = int(state["step"]) if on_tokens else 0
        state = decode(weights, config, state, sampling=sampling, steps=steps)
        step = int(state["step"])
        if on_tokens:
            on_tokens(np.asarray(_first_rows((state["tokens"][:, before:step],), rows)[0]))
        if step >= n or bool(jnp.all(state["done"])):
            return state


def generate(params, config: GlmvConfig, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id=None, seed: int = 0, mesh=None) -> jax.Array:
    """New token ids (B, max_new_tokens) after each prompt; rows that stopped are filled with the pad id."""
    eos = config.text.eos_token_id if eos_token_id is None else eos_token_id
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    pad = config.text.pad_token_id if config.text.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, eos, pad)
    return sample(params, config, input_ids, sampling=sampling, attention_mask=attention_mask,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, seed=seed, mesh=mesh).tokens
