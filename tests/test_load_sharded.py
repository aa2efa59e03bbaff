"""Loading at size: HF and orbax checkpoints read straight into a mesh's shardings equal the one-device load bit
for bit, and the sharded model's logits equal transformers'."""
from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from glmv_jax import load_hf_checkpoint
from glmv_jax import sharding as mesh_lib
from glmv_jax.checkpoint import slices
from glmv_jax.model.glmv import param_shardings

MESH = {"fsdp": 4, "tensor": 2}


def _assert_bitwise(sharded, single, shardings):
    """Same tree, dtypes and bits; every leaf placed as `shardings` say, each device holding its own block."""
    assert jax.tree.structure(sharded) == jax.tree.structure(single)
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(single),
                               jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(path)
        assert a.sharding == s, name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        full = np.asarray(b)
        for shard in a.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=name)
        np.testing.assert_array_equal(np.asarray(a), full, err_msg=name)


@pytest.mark.parametrize("shape,index", [((2, 6), (slice(None), slice(3, 6))), ((4, 3, 5), (slice(1, 3),)),
                                         ((3, 4, 2), (slice(None), slice(2, 4), slice(None))),
                                         ((5,), (slice(0, 0),)), ((2, 3), (slice(None), slice(None)))])
def test_flat_runs_cover_exactly_the_block(shape, index):
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    want = flat[slices.normalize(index, shape)].reshape(-1)
    got = np.concatenate([np.arange(a, b) for a, b in slices.flat_runs(shape, index)] or [np.zeros(0, int)])
    np.testing.assert_array_equal(got, want)
    runs = slices.flat_runs(shape, index)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs))  # merged where adjacent


def test_hf_checkpoint_into_mesh_equals_one_device_and_transformers(tiny_pair):
    from reference import Prompt, batch, hf_logits, relative_error
    from glmv_jax import forward

    config, model, _, path = tiny_pair   # path: transformers' save_pretrained folder
    _, single = load_hf_checkpoint(path)
    mesh = mesh_lib.make_mesh(**MESH)
    shardings = param_shardings(config, mesh)
    _, sharded = load_hf_checkpoint(path, shardings=shardings)
    _assert_bitwise(sharded, single, shardings)
    for dtype in ("bfloat16",):  # converted after slicing: the same bits as converting the whole tensor
        _, one16 = load_hf_checkpoint(path, dtype=dtype)
        _, mesh16 = load_hf_checkpoint(path, dtype=dtype, mesh=mesh)
        _assert_bitwise(mesh16, one16, shardings)

    prompts = [Prompt(config, 20 + i).text(3 + i).image(4, 6).text(4) for i in range(4)]
    inputs = batch(config, prompts)
    ours = forward(sharded, config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], mesh=mesh)
    real = inputs["attention_mask"].astype(bool)  # padding positions are numbered differently (left padding)
    assert relative_error(np.asarray(ours)[real], hf_logits(model, inputs)[real]) <= 1e-4


def test_orbax_and_init_from_into_mesh_equal_one_device(tiny_pair, tmp_path):
    from glmv_jax.checkpoint import convert
    from glmv_jax.train import setup
    from glmv_jax.train.config import from_dict

    config, _, params, path = tiny_pair
    convert.save_orbax_params(tmp_path / "orbax", config, params)
    mesh = mesh_lib.make_mesh(**MESH)
    shardings = param_shardings(config, mesh)
    _, sharded = convert.load_orbax_params(tmp_path / "orbax", shardings=shardings)
    _assert_bitwise(sharded, params, shardings)

    layout = setup.state_layout(config, from_dict({"model": config.to_dict()}), mesh)
    for folder in (tmp_path / "orbax", path):  # train.init_from: an orbax folder, an HF folder
        _assert_bitwise(setup.load_init_params(str(folder), config, layout), params, layout.param_shardings)


def test_every_block_read_in_small_chunks_equals_the_whole_leaf_cut(tiny_pair):
    """Any block of every tensor, read a few rows at a time, equals the same block cut from the whole leaf."""
    from glmv_jax.checkpoint.hf import _keys, _open_folder, weight_map

    config, _, params, path = tiny_pair
    located = _open_folder(path)
    rng = np.random.default_rng(0)
    for entry in weight_map(config):
        key = _keys(entry)[-1]
        full = np.asarray(_leaf(params, entry.path))
        full = full[-1] if entry.layers else full
        starts = [int(rng.integers(0, n)) for n in entry.shape]
        index = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, entry.shape))
        for chunk_bytes in (1, 300, 1 << 20):
            got = slices.read_block(located[key].file, key, entry.kind, entry.shape, index, chunk_bytes=chunk_bytes)
            np.testing.assert_array_equal(got, full[index], err_msg=f"{key} {index} chunk {chunk_bytes}")


def _leaf(tree, path):
    for name in path:
        tree = tree[name]
    return tree
