"""Shared fixtures: the tiny config and a random transformers model loaded into ours through the HF loader.

torch and transformers (the numerical ground truth) are imported only by the tests that compare against them,
through `reference.py` or `pytest.importorskip`, so e.g. the reward tests run without them."""
from __future__ import annotations

import os
import sys

# Simulated devices for the multi-device tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from glmv_jax import load_config, load_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_pair(tiny_config, tmp_path_factory):
    """(config, transformers model, our params loaded from its save_pretrained folder)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from reference import hf_model, save_hf

    model = hf_model(tiny_config, seed=0)
    path = tmp_path_factory.mktemp("tiny_hf")
    save_hf(model, path)
    config, params = load_hf_checkpoint(path)
    assert config == tiny_config
    return config, model, params, path
