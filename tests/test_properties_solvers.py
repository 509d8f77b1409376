"""Property-based tests of the solver API (issue 9 item 14, solver half).

Random shapes, ranks, dtypes and corrupted inputs. Every outcome must be either a correct
result (finite, right shapes, non-increasing errors, never worse than the initial iterate)
or a ``ValueError`` / ``TypeError`` whose message names the offending argument. Nothing
else (no ``LinAlgError``, ``IndexError``, NaN result, silent acceptance of garbage).

The run is bounded for CI: the ``ci`` profile (default) has a fixed number of examples, no
deadline (timings on a shared machine are noise) and is derandomized, so every run tries
the same examples. ``HYPOTHESIS_PROFILE=dev`` explores more.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import tensorly as tl

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tensorly_dataaware import (  # noqa: E402
    parafac_sigma,
    relative_sigma_error,
    sigma_norm,
    tucker2_sigma,
    whitened_svd,
)

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No "explain" phase: it only annotates a failure, and costs a second run of each one.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ARGUMENTS = ("tensor", "sigma", "rank", "approximation", "matrix", "damping", "n_iter_max", "cg_tol", "cg_maxiter", "tol")


def _names_an_argument(exc: Exception) -> bool:
    return any(re.search(rf"`{name}`|\b{name}\b", str(exc)) for name in ARGUMENTS)


@st.composite
def problems(draw, *, corrupt: bool, singular: bool = True):
    """A tensor ``(T, S, *spatial)``, a PSD sigma (possibly singular), optionally corrupted."""
    order = draw(st.integers(2, 4))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 5))) + tuple(draw(st.integers(1, 3)) for _ in range(order - 2))
    n = int(np.prod(shape[1:]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(["float64", "float32"]))
    # Huge and tiny weights (the solvers rescale internally), within the dtype's range.
    W = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e-150, 1e150] if dtype == "float64" else [1.0, 1e-15, 1e15]))
    samples = draw(st.integers(1 if singular else n, 3 * n))  # fewer samples than n: a singular sigma
    X = rng.standard_normal((samples, n)) * np.exp(-np.arange(n) / draw(st.sampled_from([2.0, 50.0])))
    sigma = X.T @ X / samples
    W, sigma = W.astype(dtype), sigma.astype(dtype)
    if corrupt:
        kind = draw(st.sampled_from(["nan_tensor", "inf_sigma", "asymmetric", "wrong_size", "indefinite", "zero_tensor", "int_tensor", "complex_sigma"]))
        if kind == "nan_tensor" or (kind == "asymmetric" and n < 2):
            W.flat[draw(st.integers(0, W.size - 1))] = np.nan
        elif kind == "inf_sigma":
            sigma[0, 0] = np.inf
        elif kind == "asymmetric" and n >= 2:
            sigma = sigma + np.triu(np.ones_like(sigma), 1) * (1.0 + float(np.abs(sigma).max()))
        elif kind == "wrong_size":
            sigma = np.eye(n + 1, dtype=dtype)
        elif kind == "indefinite":
            sigma = sigma - 2 * (float(np.trace(sigma)) + 1.0) * np.outer(np.eye(n)[0], np.eye(n)[0])
        elif kind == "zero_tensor":
            W = np.zeros_like(W)
        elif kind == "int_tensor":
            W = np.ones(shape, dtype=np.int64)
        elif kind == "complex_sigma":
            sigma = sigma + 1j * np.eye(n)
    return W, sigma


def _check_errors(errors):
    errors = np.asarray(errors)
    assert errors.ndim == 1 and len(errors) >= 1
    assert np.all(np.isfinite(errors)) and np.all(errors >= 0)
    assert np.all(np.diff(errors) <= 0), errors  # monotone ...
    assert errors[-1] <= errors[0]  # ... hence never worse than the initial iterate


tucker_ranks = st.one_of(
    st.integers(-1, 7), st.tuples(st.integers(0, 7), st.integers(0, 6)), st.floats(-0.5, 1.5), st.just(float("nan"))
)


@given(problem=problems(corrupt=False), rank=tucker_ranks, solver=st.sampled_from(["direct", "cg"]), n_iter=st.integers(1, 6))
def test_tucker2_sigma_result_or_named_error(problem, rank, solver, n_iter):
    W, sigma = problem
    try:
        tucker, errors = tucker2_sigma(W, rank, sigma, n_iter_max=n_iter, solver=solver, return_errors=True, check_psd=False)
    except (ValueError, TypeError) as exc:
        assert _names_an_argument(exc), exc
        return
    core, factors = tucker
    r_out, r_in = core.shape[:2]
    assert core.shape[2:] == W.shape[2:] and core.dtype == W.dtype
    assert factors[0].shape == (W.shape[0], r_out) and factors[1].shape == (W.shape[1], r_in)
    approx = tl.tucker_to_tensor(tucker)
    assert approx.shape == W.shape and np.all(np.isfinite(approx))
    _check_errors(errors)
    assert errors[-1] <= 1.0 + 1e-6  # never worse than the zero approximation (U, V span nothing new)
    if W.dtype == np.float64:
        assert relative_sigma_error(W, approx, sigma) == pytest.approx(errors[-1], rel=1e-6, abs=1e-9)


# Non-singular sigma only: with a singular sigma, CP can fit W exactly in the sigma-seminorm
# and the next sweep then reads 1e-5..1e-4 (float32 input) instead of 0 -- a real,
# known accuracy limit of the pseudo-inverse solves, reported by this suite and pinned by
# test_cp_exact_fit_on_singular_sigma below (xfail) until it is fixed.
@given(problem=problems(corrupt=False, singular=False), rank=st.one_of(st.integers(-1, 12), st.floats(-0.5, 1.5)), n_iter=st.integers(1, 5))
def test_parafac_sigma_result_or_named_error(problem, rank, n_iter):
    W, sigma = problem
    try:
        cp, errors = parafac_sigma(W, rank, sigma, n_iter_max=n_iter, return_errors=True, check_psd=False, init="random", random_state=0)
    except (ValueError, TypeError) as exc:
        assert _names_an_argument(exc), exc
        return
    weights, factors = cp
    assert len(factors) == W.ndim and all(f.shape == (d, cp.rank) for f, d in zip(factors, W.shape))
    approx = tl.cp_to_tensor(cp)
    assert approx.shape == W.shape and np.all(np.isfinite(approx))
    _check_errors(errors)


@given(problem=problems(corrupt=True), method=st.sampled_from(["tucker", "cp", "norm", "error", "svd"]))
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_corrupted_inputs_are_named_errors(problem, method):
    W, sigma = problem
    if method in ("norm", "svd") and not np.any(W):
        return  # a zero tensor is valid there: norm 0, any rank-r factor pair
    if method in ("norm", "error", "svd") and W.dtype.kind == "i":
        return  # the norms accept integer tensors (computed in float64); only the solvers refuse them
    with pytest.raises((ValueError, TypeError)) as info:
        if method == "tucker":
            tucker2_sigma(W, 1, sigma, n_iter_max=2)
        elif method == "cp":
            parafac_sigma(W, 1, sigma, n_iter_max=2)
        elif method == "norm":
            sigma_norm(W, sigma, check_psd=True)
        elif method == "error":
            relative_sigma_error(W, np.zeros(W.shape), sigma, check_psd=True)
        else:
            whitened_svd(W, 1, sigma)
    assert _names_an_argument(info.value), info.value


@given(problem=problems(corrupt=False), scale=st.sampled_from([1e-100, 0.5, 3.0, 1e100]))
def test_norms(problem, scale):
    W, sigma = problem
    W = W.astype(np.float64)
    sigma = sigma.astype(np.float64)
    norm = sigma_norm(W, sigma)
    assert np.isfinite(norm) and norm >= 0
    assert sigma_norm(scale * W, sigma) == pytest.approx(scale * norm, rel=1e-9, abs=1e-300)
    frob = float(np.linalg.norm(W))
    assert sigma_norm(W, np.eye(sigma.shape[0])) == pytest.approx(frob, rel=1e-9)
    if norm > 1e-12 * frob * np.sqrt(float(np.abs(sigma).max())):
        assert relative_sigma_error(W, W, sigma) == pytest.approx(0.0, abs=1e-7)
        assert relative_sigma_error(W, np.zeros_like(W), sigma) == pytest.approx(1.0, rel=1e-9)
        assert relative_sigma_error(W, (1 - scale) * W, sigma) == pytest.approx(abs(scale), rel=1e-6)


@given(problem=problems(corrupt=False), rank=st.integers(-1, 7))
def test_whitened_svd_optimal_or_named_error(problem, rank):
    W, sigma = problem
    W, sigma = W.astype(np.float64), sigma.astype(np.float64)
    try:
        last, first = whitened_svd(W, rank, sigma, check_psd=False)
    except (ValueError, TypeError) as exc:
        assert _names_an_argument(exc), exc
        return
    mat = W.reshape(W.shape[0], -1)
    assert last.shape == (W.shape[0], rank) and first.shape == (rank, mat.shape[1])
    np.testing.assert_allclose(last.T @ last, np.eye(rank), atol=1e-8)
    ours = relative_sigma_error(mat, last @ first, sigma) if sigma_norm(mat, sigma) > 0 else 0.0
    # Optimal among rank-r approximations: no worse than the Frobenius truncated SVD.
    u = np.linalg.svd(mat, full_matrices=False)[0][:, :rank]
    if sigma_norm(mat, sigma) > 0:
        assert ours <= relative_sigma_error(mat, u @ (u.T @ mat), sigma) + 1e-7


@pytest.mark.xfail(strict=True, reason="known: CP sweeps after an exact fit in a singular sigma's seminorm are not exactly monotone")
def test_cp_exact_fit_on_singular_sigma():
    rng = np.random.default_rng(302)
    W = rng.standard_normal((3, 4, 1, 2))
    rng.integers(1, 9)  # keeps the draws of the reproducer that found it
    X = rng.standard_normal((4, 8)) * np.exp(-np.arange(8) / 2.0)
    sigma = X.T @ X / 4
    _, errors = parafac_sigma(W, 3, sigma, n_iter_max=10, check_psd=False, init="random", random_state=0, return_errors=True)
    _check_errors(errors)
