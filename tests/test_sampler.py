"""Generation: token for token equal to transformers' greedy generate; one compile; no host round trips."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import torch

from glmv_jax import SamplingConfig, forward, generate, init_params, sample
from glmv_jax.generate import sampler
from glmv_jax.generate.kv_cache import cache_layout
from glmv_jax.generate.weights import prepare
from glmv_jax.model.inputs import InputError
from reference import Prompt, batch, relative_error

EOS = (306,)


def hf_generate(model, inputs, max_new_tokens):
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(EOS),
                             pad_token_id=299)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def ours_generate(config, params, inputs, max_new_tokens, **kw):
    return np.asarray(generate(params, config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               pixel_values_videos=inputs["pixel_values_videos"],
                               video_grid_thw=inputs["video_grid_thw"], max_new_tokens=max_new_tokens,
                               eos_token_id=EOS, **kw))


@pytest.mark.parametrize("prompts", [
    lambda c: [Prompt(c, 1).text(4).image(4, 6).text(3), Prompt(c, 2).text(9), Prompt(c, 3).text(2).image(2, 4).text(5)],
    lambda c: [Prompt(c, 4).text(3).video(3, 4, 6, timestamps=2).text(4)],
], ids=["left_padded_images_and_text_only_row", "video"])
def test_greedy_equals_transformers(tiny_pair, prompts):
    config, model, params, _ = tiny_pair
    inputs = batch(config, prompts(config))
    ref = hf_generate(model, inputs, 24)
    ours = ours_generate(config, params, inputs, 24)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)


def test_greedy_is_argmax_first_index_on_ties_and_nan():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, size=(6, 50)).astype(np.float32)  # many ties
    logits[4, [7, 30]] = np.nan
    logits[5, :] = -np.inf
    got = np.asarray(sampler.greedy(jnp.asarray(logits)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[4] == 7 and got[5] == 0


def test_logprobs_are_the_models(tiny_pair):
    """Greedy log-probs equal log softmax of a plain forward over prompt + generated tokens."""
    config, _, params, _ = tiny_pair
    inputs = batch(config, [Prompt(config, 5).text(4).image(4, 6).text(3)])
    out = sample(params, config, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                 image_grid_thw=inputs["image_grid_thw"], sampling=SamplingConfig(12, pad_id=299))
    full = np.concatenate([inputs["input_ids"], np.asarray(out.tokens)], axis=1)
    logits = forward(params, config, full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    t = inputs["input_ids"].shape[1]
    expected = jax.nn.log_softmax(logits[0, t - 1:-1], axis=-1)[jnp.arange(12), out.tokens[0]]
    assert relative_error(out.logprobs[0], expected) <= 1e-4
    assert int(out.lengths[0]) == 12 and not bool(out.forced[0])


def test_decode_compiles_once_and_runs_on_device(tiny_pair):
    config, _, params, _ = tiny_pair
    s = SamplingConfig(10, pad_id=299)
    before = sampler.decode._cache_size()
    for seed, n in enumerate([5, 9, 14]):
        p = Prompt(config, seed).text(n)
        calls = []
        sample(params, config, np.array([p.ids]), sampling=s, on_tokens=calls.append)
        assert len(calls) == 1 and calls[0].shape == (1, 10)  # the whole loop in one device call
    assert sampler.decode._cache_size() - before == 1


def test_decode_makes_no_host_transfer(tiny_pair):
    """Run the decode program under a transfer guard: any host <-> device copy inside would raise."""
    config, _, params, _ = tiny_pair
    s = SamplingConfig(8, pad_id=299)
    ids = np.array([Prompt(config, 9).text(6).ids])
    out = sample(params, config, ids, sampling=s)  # compiles
    b, t = 1, 32
    state = {
        "logits": jnp.zeros((b, config.text.vocab_size)),
        "kv": tuple(cache_layout(*(jnp.zeros((b, 128, config.text.num_kv_heads, config.text.head_dim)),) * 2)
                    for _ in range(config.text.num_layers)),
        "rng": jax.random.key(0), "cache_segment": jnp.ones((b, 128), jnp.int32), "write_pos": jnp.int32(t),
        "next_pos": jnp.full((b,), t, jnp.int32), "step": jnp.int32(0), "tokens": jnp.zeros((b, 8), jnp.int32),
        "logprobs": jnp.zeros((b, 8)), "lengths": jnp.zeros((b,), jnp.int32), "done": jnp.zeros((b,), bool),
        "think_closed": jnp.zeros((b,), bool), "think_count": jnp.zeros((b,), jnp.int32),
        "force_step": jnp.full((b,), -1, jnp.int32), "forced": jnp.zeros((b,), bool)}
    weights = prepare(jax.device_put(params))
    with jax.transfer_guard("disallow"):
        new = sampler.decode(weights, config, state, sampling=s, steps=8)
        jax.block_until_ready(new)
    assert int(new["step"]) == 8 and out.tokens.shape == (1, 8)


def test_stop_ids_and_padding(tiny_pair):
    config, _, params, _ = tiny_pair
    ids = np.array([Prompt(config, 1).text(7).ids, Prompt(config, 2).text(7).ids])
    free = np.asarray(sample(params, config, ids, sampling=SamplingConfig(16, pad_id=299)).tokens)
    stop = int(free[0, 3])  # make the 4th token of row 0 a stop id
    out = sample(params, config, ids, sampling=SamplingConfig(16, eos_ids=(stop,), pad_id=299))
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[0, :4], free[0, :4])
    assert (tokens[0, 4:] == 299).all() and int(out.lengths[0]) == 4
    assert (np.asarray(out.logprobs)[0, 4:] == 0).all()
    first = int(np.argmax(free[1] == stop)) if (free[1] == stop).any() else 15
    assert int(out.lengths[1]) == first + 1


def test_sampling_filters(tiny_pair):
    config, _, params, _ = tiny_pair
    ids = np.array([Prompt(config, 3).text(6).ids] * 4)
    greedy = np.asarray(sample(params, config, ids, sampling=SamplingConfig(8, pad_id=299)).tokens)
    for s in (SamplingConfig(8, temperature=1.0, top_k=1, pad_id=299),
              SamplingConfig(8, temperature=1.0, top_p=1e-6, pad_id=299)):
        np.testing.assert_array_equal(np.asarray(sample(params, config, ids, sampling=s, seed=3).tokens), greedy)
    s = SamplingConfig(8, temperature=1.5, pad_id=299)
    a = np.asarray(sample(params, config, ids, sampling=s, seed=7).tokens)
    np.testing.assert_array_equal(a, np.asarray(sample(params, config, ids, sampling=s, seed=7).tokens))
    assert len({tuple(row) for row in a}) > 1  # rows sample independently
    logits = np.asarray(forward(params, config, ids[:1]))[0, -1]
    top3 = set(np.argsort(-logits)[:3].tolist())
    for seed in range(6):
        out = sample(params, config, ids, sampling=SamplingConfig(1, temperature=2.0, top_k=3, pad_id=299), seed=seed)
        assert set(np.asarray(out.tokens)[:, 0].tolist()) <= top3


def test_thinking_budget_forces_the_answer(tiny_pair):
    config, _, params, _ = tiny_pair
    ids = np.array([Prompt(config, 4).text(5).ids])
    free = np.asarray(sample(params, config, ids, sampling=SamplingConfig(20, pad_id=299)).tokens)[0]
    think_end, answer = 307, 308
    assert think_end not in free
    s = SamplingConfig(20, pad_id=299, thinking_budget=6, think_end_id=think_end, forced_answer_ids=(think_end, answer))
    out = sample(params, config, ids, sampling=s)
    tokens = np.asarray(out.tokens)[0]
    np.testing.assert_array_equal(tokens[:6], free[:6])
    assert tokens[6] == think_end and tokens[7] == answer and bool(out.forced[0])
    assert not (tokens[8:] == 307).any()  # the answer continues freely, no second forcing


def test_right_padding_and_too_long_are_refused(tiny_pair):
    config, _, params, _ = tiny_pair
    ids = np.array([Prompt(config, 1).text(6).ids])
    with pytest.raises(InputError, match="left-padded"):
        generate(params, config, ids, attention_mask=np.array([[1, 1, 1, 1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(InputError, match="max_position_embeddings"):
        generate(params, config, ids, max_new_tokens=config.text.max_position_embeddings)


def test_decode_holds_one_copy_of_the_decoder_weights(tiny_config):
    """Generation keeps each decoder weight once: `prepare(params, donate=True)` frees the stacked layers it turns
    into per-layer weights, and while decoding on them the only arrays added are the caches and the decode state
    (before: prefill returned a fused per-layer copy of the layers that decode held beside the originals)."""
    config = tiny_config
    params = jax.jit(lambda: init_params(config, 0))()
    nbytes = lambda arrays: sum(x.nbytes for x in arrays)  # noqa: E731
    live = lambda: nbytes({id(x): x for x in jax.live_arrays()}.values())  # noqa: E731
    layer_bytes, total = nbytes(jax.tree.leaves(params["decoder"]["layers"])), nbytes(jax.tree.leaves(params))
    weights = prepare(params, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(params["decoder"]["layers"]))
    assert nbytes(jax.tree.leaves(weights)) == total
    del params
    b, new, cache_slots = 2, 8, 128
    t = config.text
    cache_bytes = t.num_layers * 2 * b * t.num_kv_heads * t.head_dim * cache_slots * 4
    before, during = live(), []
    ids = np.array([Prompt(config, 2).text(9).ids] * b)
    out = sample(weights, config, ids, sampling=SamplingConfig(new, pad_id=299), steps_per_call=new // 2,
                 on_tokens=lambda _: during.append(live()))
    assert out.tokens.shape == (b, new) and len(during) == 2
    assert cache_bytes < layer_bytes
    assert max(during) - before <= cache_bytes + layer_bytes // 4, (max(during) - before, cache_bytes, layer_bytes)
