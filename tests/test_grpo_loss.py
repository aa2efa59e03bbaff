"""The GRPO loss and its gradient against a small NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.train.losses import grpo_loss


def numpy_grpo(new, old, adv, mask, eps_low, eps_high):
    ratio = np.exp(new - old)
    a = adv[:, None]
    obj = np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    # gradient of -min(...) w.r.t. new: -ratio * a where the unclipped term is the minimum and not clipped
    unclipped_active = (ratio * a <= np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    grad_tok = -(ratio * a) * unclipped_active
    per_sample = -(obj * mask).sum(1) / mask.sum(1)
    loss = per_sample.mean()
    grad = grad_tok * mask / mask.sum(1, keepdims=True) / len(adv)
    return loss, grad


def test_grpo_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    s, n = 6, 9
    old = rng.normal(-2, 0.5, (s, n))
    new = old + rng.normal(0, 0.4, (s, n))  # ratios spread over both clip bounds
    adv = np.array([1.5, -0.7, 0.0, 2.0, -1.2, 0.3])
    mask = (rng.random((s, n)) < 0.8).astype(np.float64)
    mask[:, 0] = 1
    ref_loss, ref_grad = numpy_grpo(new, old, adv, mask, 0.2, 0.28)
    f = lambda x: grpo_loss(x, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),  # noqa: E731
                            jnp.asarray(mask, jnp.float32))[0]
    loss, grad = jax.value_and_grad(f)(jnp.asarray(new, jnp.float32))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
    _, aux = grpo_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    ratio = np.exp(new - old)
    expected = ((((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.28) & (adv[:, None] > 0))) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(aux["clip_fraction"]), expected, rtol=1e-6)
    assert 0 < expected < 0.6


def test_clip_higher_is_asymmetric():
    """A positive advantage is clipped at 1.28, a negative one at 0.8."""
    old = jnp.zeros((2, 1))
    mask = jnp.ones((2, 1))
    new = jnp.log(jnp.array([[1.5], [0.5]]))
    adv = jnp.array([1.0, -1.0])
    loss, aux = grpo_loss(new, old, adv, mask)
    np.testing.assert_allclose(float(loss), -(1.28 * 1.0 + 0.8 * -1.0) / 2, rtol=1e-6)
    assert float(aux["clip_fraction"]) == 1.0
    np.testing.assert_allclose(float(grpo_loss(new, old, adv, mask, eps_high=0.6)[0]), -(1.5 - 0.8) / 2, rtol=1e-6)


def test_samples_weigh_equally_whatever_their_length():
    old = jnp.zeros((2, 4))
    new = jnp.zeros((2, 4))
    mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 1]], jnp.float32)
    adv = jnp.array([1.0, 3.0])
    loss, _ = grpo_loss(new, old, adv, mask)
    assert float(loss) == -(1.0 + 3.0) / 2
    assert float(grpo_loss(new, old, adv, jnp.zeros((2, 4)))[0]) == 0.0
