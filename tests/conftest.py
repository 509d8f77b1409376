"""Test fixtures: every solver test runs on each installed TensorLy backend.

Select a single backend with ``TENSORLY_BACKEND=pytorch pytest`` (TensorLy's own variable);
by default numpy, pytorch and jax are all tested, each skipped if not installed.
"""

import importlib.util
import os

import numpy as np
import pytest
import tensorly as tl

ALL_BACKENDS = ["numpy", "pytorch", "jax"]
_MODULES = {"numpy": "numpy", "pytorch": "torch", "jax": "jax"}


def _selected_backends():
    requested = os.environ.get("TENSORLY_BACKEND")
    names = [requested] if requested else ALL_BACKENDS
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(importlib.util.find_spec(_MODULES[name]) is None, reason=f"{name} not installed"),
        )
        for name in names
    ]


if importlib.util.find_spec("jax") is not None:
    # float64 tests on JAX need 64-bit mode; it must be set before any JAX array exists.
    import jax

    jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=_selected_backends())
def backend(request):
    """Run the test inside ``tl.backend_context(name)``."""
    with tl.backend_context(request.param):
        yield request.param


@pytest.fixture
def torch_single_thread():
    """Run tiny torch tensors on one intra-op thread, restoring the setting afterwards.

    With several threads on a busy machine every small parallel kernel (float64 depthwise
    convolutions especially) can wait a whole scheduler slice, which made the adapter tests
    100x slower under load; one thread is also the fastest for tensors this small.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def correlated_sigma(rng, n, n_samples=None, decay=8.0):
    """A realistic, ill-conditioned, image-like covariance (decaying spectrum)."""
    n_samples = n_samples or 4 * n
    mixing = rng.standard_normal((n, n)) * np.exp(-np.arange(n) / decay)[None, :]
    X = rng.standard_normal((n_samples, n)) @ mixing.T + 0.3 * rng.standard_normal((1, n))
    return X.T @ X / n_samples
