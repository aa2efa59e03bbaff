"""The sampler on a mesh and with shared prefixes: the same tokens as one device / as repeated rows, and a decode
step with no collective but those its sharding needs (counted in the compiled HLO).

conftest.py gives this process 8 simulated CPU devices.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax import init_params
from glmv_jax import sharding as mesh_lib
from glmv_jax.errors import MeshError
from glmv_jax.generate import sampler
pytest.importorskip("torch")  # reference.py builds the prompts with torch beside it
from reference import Prompt, batch

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


@pytest.fixture(scope="module")
def model(tiny_config):
    return tiny_config, init_params(tiny_config, seed=0)


def prompts(config):
    """Three prompts (two with images of different sizes, one text only) of different lengths."""
    return [Prompt(config, 1).text(4).image(4, 6).text(3), Prompt(config, 2).text(9),
            Prompt(config, 3).text(2).image(2, 4).text(5)]


def run(config, params, inputs, sampling, **kw):
    out = sampler.sample(params, config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                         sampling=sampling, seed=5, **kw)
    return jax.tree.map(np.asarray, out._asdict())


SAMPLED = sampler.SamplingConfig(12, temperature=1.0, pad_id=299, eos_ids=(306,))


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)])
def test_sharded_sampling_equals_one_device(model, sizes):
    """8 devices sample the same tokens as one (3 prompts x G = 2: dummy rows pad them to the data axes), with
    the same log-probs within float32 rounding."""
    config, params = model
    inputs = batch(config, prompts(config))
    one = run(config, params, inputs, SAMPLED, group_size=2)
    many = run(config, params, inputs, SAMPLED, group_size=2, mesh=mesh_lib.make_mesh(**sizes))
    assert one["tokens"].shape == (6, 12)
    for key in ("tokens", "lengths", "forced"):
        np.testing.assert_array_equal(many[key], one[key])
    np.testing.assert_allclose(many["logprobs"], one["logprobs"], atol=1e-5)


def test_prefix_sharing_equals_repeated_rows(model):
    """group_size=G (one prefill per prompt, its caches repeated on device) samples, with the same key, the same
    tokens and log-probs as the G-times repeated prompts prefilled row by row (float32)."""
    config, params = model
    g = 3
    shared = run(config, params, batch(config, prompts(config)), SAMPLED, group_size=g)
    repeated = run(config, params, batch(config, [p for p in prompts(config) for _ in range(g)]), SAMPLED)
    np.testing.assert_array_equal(shared["tokens"], repeated["tokens"])
    np.testing.assert_array_equal(shared["lengths"], repeated["lengths"])
    # the two prefill batches differ in shape, so XLA may sum in another order: a few float32 ulps of a
    # log-prob (1.1e-6 relative measured with the fan-in init), within the module tolerance
    np.testing.assert_allclose(shared["logprobs"], repeated["logprobs"], rtol=1e-5, atol=0)
    assert len({tuple(row) for row in shared["tokens"][:g]}) > 1   # a group's rows sample independently


def count_collectives(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def expected_collectives(config, mesh) -> dict[str, int]:
    """What the decode program's sharding needs, per step. With `tensor` > 1 (Megatron layout: q/k/v and gate_up
    split by output, o and down by input): one all-reduce after each row-parallel matmul (o, down: 2 a layer),
    one for the token embedding (its table split by vocabulary: each device looks up its part), one all-gather
    of the vocabulary-split logits before the token is chosen. With rows split over data x fsdp: one all-reduce
    of the loop's "every row stopped" test. Nothing else: the weights are whole on their embed dim, the KV cache
    is split by row and KV head as the attention reads it."""
    tensor = mesh.shape["tensor"] > 1
    rows = mesh_lib.axis_size(mesh, mesh_lib.BATCH) > 1
    counts = dict.fromkeys(COLLECTIVES, 0)
    counts["all-reduce"] = tensor * (2 * config.text.num_layers + 1) + rows
    counts["all-gather"] = int(tensor)
    return counts


@pytest.mark.parametrize("sizes, temperature", [(dict(data=2, fsdp=2, tensor=2), 1.0), (dict(fsdp=8), 1.0),
                                                 (dict(data=4, tensor=2), 0.0)])
def test_decode_step_collectives_are_what_the_sharding_needs(model, sizes, temperature, monkeypatch):
    config, params = model
    mesh = mesh_lib.make_mesh(**sizes)
    s = sampler.SamplingConfig(4, temperature=temperature, pad_id=299, eos_ids=(306,))
    captured = {}
    decode = sampler.decode

    def capture(weights, config, state, **kw):
        captured.update(weights=weights, state=jax.tree.map(jnp.copy, state))
        return decode(weights, config, state, **kw)

    monkeypatch.setattr(sampler, "decode", capture)
    ids = np.array([Prompt(config, i).text(6).ids for i in range(4)])
    sampler.sample(params, config, ids, sampling=s, mesh=mesh, group_size=2)
    with jax.set_mesh(mesh):
        hlo = decode.lower(captured["weights"], config, captured["state"], sampling=s, steps=4).compile().as_text()
    assert count_collectives(hlo) == expected_collectives(config, mesh)
    k_cache = captured["state"]["kv"][0][0]   # split by row over data x fsdp and by KV head over tensor
    assert k_cache.sharding.spec[:2] == mesh_lib.spec(("batch", "act_kv_heads"))[:2]
    layer = captured["weights"]["decoder"]["layers"][0]
    assert ("qkv" in layer) == (mesh.shape["tensor"] == 1)      # q/k/v fused only when heads are not split


def test_context_mesh_is_refused(model):
    config, params = model
    with pytest.raises(MeshError, match="context"):
        sampler.sample(params, config, np.array([Prompt(config, 1).text(5).ids]), sampling=SAMPLED,
                       mesh=mesh_lib.make_mesh(context=2, tensor=2, fsdp=2))
