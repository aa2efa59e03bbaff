"""Training gradients against transformers' autograd: the next-token loss and every parameter's gradient.

Both sides take the mean cross entropy over a batch of image + text rows. transformers' gradients are put
in place of its weights and read back through our HF loader, so they land in our parameter tree by the
same name mapping as the weights. Our dense layers and attention run custom VJPs (`layers._rounded_dot`,
the flash-style attention backward); this is the test that holds them to the reference end to end, with
the remat policies on and off, decoder layers scanned and unrolled.
"""
from __future__ import annotations

import contextlib
import copy
import io

import jax
import numpy as np
import pytest
pytest.importorskip("torch")  # compared against transformers: skipped where torch is not installed
pytest.importorskip("transformers")
import torch
from jax.ad_checkpoint import print_saved_residuals

from glmv_jax import load_hf_checkpoint
from glmv_jax.train.steps import batch_loss
from reference import Prompt, batch, relative_error, save_hf

MODEL_TOL = 1e-4


@pytest.fixture(scope="module")
def reference_grads(tiny_pair, tmp_path_factory):
    """(our training batch, transformers' loss, its gradients in our parameter tree) on two image + text rows."""
    config, model, _, _ = tiny_pair
    tmp_path = tmp_path_factory.mktemp("hf_grads")
    prompts = [Prompt(config, seed).text(5).image(4, 6).text(4) for seed in (1, 2)]  # equal lengths: no padding
    inputs = batch(config, prompts)
    ids = inputs["input_ids"]
    model = copy.deepcopy(model)
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if v is not None}
    loss = model(**kwargs, labels=torch.from_numpy(ids)).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    save_hf(model, tmp_path)
    _, grads = load_hf_checkpoint(tmp_path)
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1).astype(np.int32)
    loss_mask = np.ones(ids.shape, np.float32)
    loss_mask[:, -1] = 0.0  # transformers shifts the labels: the last position predicts nothing
    ours = {"input_ids": ids.astype(np.int32), "segment_ids": np.ones(ids.shape, np.int32), "targets": targets,
            "loss_mask": loss_mask, "mm_token_type_ids": inputs["mm_token_type_ids"].astype(np.int32),
            "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    return ours, loss.item(), grads


@pytest.mark.parametrize("remat_policy, scan_layers", [("none", True), ("dots", True), ("full", True),
                                                       ("none", False), ("dots", False)])
def test_gradients_equal_reference(tiny_pair, reference_grads, remat_policy, scan_layers):
    config, _, params, _ = tiny_pair
    ours, ref_loss, ref_grads = reference_grads
    loss_fn = lambda p: batch_loss(p, config, ours, remat_policy=remat_policy, scan_layers=scan_layers)[0]  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    flat_ours = dict(jax.tree_util.tree_leaves_with_path(grads))
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    assert flat_ours.keys() == flat_ref.keys()
    errors = {jax.tree_util.keystr(k): relative_error(flat_ours[k], flat_ref[k]) for k in flat_ref}
    assert max(errors.values()) <= MODEL_TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("remat_policy, saves_dense", [("dots", True), ("full", False)])
def test_remat_policy_saves_the_dense_outputs(tiny_pair, reference_grads, remat_policy, saves_dense):
    """"dots" keeps the decoder layers' matmul outputs for the backward (dense layers run a custom-VJP
    matmul, which the stock dot policy does not see; they are saved by name); "full" keeps none."""
    config, _, params, _ = tiny_pair
    ours = reference_grads[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda p: batch_loss(p, config, ours, remat_policy=remat_policy)[0], params)
    text = config.text
    b, t = ours["input_ids"].shape
    gate_up = f"f32[{text.num_layers},{b},{t},2,{text.intermediate_size}]"  # (L, B, T, 2, I)
    assert (gate_up in printed.getvalue()) == saves_dense


def test_swiglu_and_its_gradients_equal_autodiff():
    import jax.numpy as jnp
    from flax import linen as nn

    from glmv_jax.ops.swiglu import swiglu

    gate, up, d_out = (jax.random.normal(k, (3, 7, 11)) * 3 for k in jax.random.split(jax.random.key(0), 3))
    plain = lambda g, u: nn.silu(g) * u  # noqa: E731
    np.testing.assert_allclose(swiglu(gate, up), plain(gate, up), rtol=1e-6, atol=1e-6)
    ours = jax.vjp(swiglu, gate, up)[1](d_out)
    ref = jax.vjp(plain, gate, up)[1](d_out)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    half = swiglu(gate.astype(jnp.bfloat16), up.astype(jnp.bfloat16))  # f32 inside, one rounding
    assert half.dtype == jnp.bfloat16
    exact = plain(gate.astype(jnp.bfloat16).astype(jnp.float32), up.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(half, exact.astype(jnp.bfloat16))
