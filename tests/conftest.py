"""Test fixtures: every solver test runs on each installed TensorLy backend.

Select a single backend with ``TENSORLY_BACKEND=pytorch pytest`` (TensorLy's own variable);
by default numpy, pytorch and jax are all tested, each skipped if not installed.
"""

import os

# One thread for every BLAS, OpenMP and XLA pool, set before NumPy, PyTorch or JAX is
# imported (they read these once, at load time). The test problems are tiny: threads only
# add synchronization, and on a loaded machine every parallel kernel can wait a whole
# scheduler slice (TestParafac::test_first_order_optimality[pytorch]: 171 s with default
# threads, 4.5 s with one). setdefault: an explicit setting by the caller wins.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorly as tl  # noqa: E402

ALL_BACKENDS = ["numpy", "pytorch", "jax"]
_MODULES = {"numpy": "numpy", "pytorch": "torch", "jax": "jax"}


def _selected_backends(slow=()):
    requested = os.environ.get("TENSORLY_BACKEND")
    names = [requested] if requested else ALL_BACKENDS
    return [
        pytest.param(
            name,
            marks=[pytest.mark.skipif(importlib.util.find_spec(_MODULES[name]) is None, reason=f"{name} not installed")]
            + ([pytest.mark.slow] if name in slow else []),
        )
        for name in names
    ]


if importlib.util.find_spec("jax") is not None:
    # float64 tests on JAX need 64-bit mode; it must be set before any JAX array exists.
    import jax

    jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="session")
def _single_thread_session():
    """Also pin the pools that were loaded before this file ran (threadpoolctl) and torch's.

    The environment variables above cover libraries loaded later; this covers a NumPy that a
    plugin imported first. Tests that measure thread effects set their own counts.
    """
    from threadpoolctl import threadpool_limits

    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch
    previous = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    if torch is not None:
        torch.set_num_threads(previous)


@pytest.fixture(params=_selected_backends())
def backend(request):
    """Run the test inside ``tl.backend_context(name)``."""
    with tl.backend_context(request.param):
        yield request.param


@pytest.fixture(params=_selected_backends(slow=("jax",)))
def heavy_backend(request):
    """Like ``backend``, with the JAX case marked ``slow`` (still run by default and in CI).

    JAX runs the solvers op by op, compiling every primitive for every new shape: a
    convergence test that takes 1 s on NumPy takes 20-80 s on JAX on a loaded 2-core
    machine. The backend-independent properties (optimality, monotonicity on many inits)
    are tested on NumPy and PyTorch in the fast loop (``-m "not slow"``), and JAX there by
    the agreement tests (same numbers as NumPy, ``TestBackendsAgree``).
    """
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


_SESSION_BACKEND = tl.get_backend()


@pytest.fixture(autouse=True)
def _no_global_backend_change():
    """Fail a test that leaves TensorLy's global backend changed (the library must only use
    ``tl.backend_context``), and restore it so that later tests are not affected."""
    before = tl.get_backend()
    if before != _SESSION_BACKEND:
        # Changed outside any test: at import or collection time (tensorly-torch, for one,
        # calls tl.set_backend('pytorch') when imported). Every later test would run on it.
        tl.set_backend(_SESSION_BACKEND)
        pytest.fail(f"TensorLy's global backend was {before!r} when this test started (set outside a test, "
                    f"e.g. by an import during collection); expected {_SESSION_BACKEND!r}")
    yield
    after = tl.get_backend()
    if after != before:
        tl.set_backend(before)
        pytest.fail(f"the test left TensorLy's global backend set to {after!r} (was {before!r})")
