"""Correctness of the sigma-weighted Tucker-2 and CP solvers on every backend."""

import inspect
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac, partial_tucker
from tensorly.testing import assert_array_almost_equal

from tensorly_dataaware import (
    NonMonotoneWarning,
    ParafacSigma,
    Tucker2Sigma,
    parafac_sigma,
    relative_sigma_error,
    sigma_norm,
    tucker2_sigma,
    whitened_svd,
)
from tensorly_dataaware.decomposition._monitor import ALSMonitor

from .conftest import correlated_sigma

SHAPE = (10, 8, 3, 3)
N = 8 * 9


def _t(x, dtype=None):
    return tl.tensor(x, dtype=dtype or tl.backend.float64)


def _low_rank_plus_noise(rng, shape, ranks, noise=0.05):
    core = rng.standard_normal(ranks + shape[2:])
    U = np.linalg.qr(rng.standard_normal((shape[0], ranks[0])))[0]
    V = np.linalg.qr(rng.standard_normal((shape[1], ranks[1])))[0]
    W = np.einsum("abij,ta,sb->tsij", core, U, V)
    return W + noise * rng.standard_normal(shape)


#: Stop reasons of a healthy run; "objective increased" and "non-finite error" are bugs.
GOOD_STOPS = {"converged", "n_iter_max", "round-off floor"}


def _fit(cls, tensor, rank, sigma, **options):
    """Run a solver through its class API and check why it stopped.

    The monotonicity asserts alone cannot fail (the monitor never records an increase);
    the stop reason and the ``NonMonotoneWarning`` (an error in the test configuration,
    see pyproject.toml) are what catch a broken update.
    """
    model = cls(rank, sigma, **options)
    decomposition = model.fit_transform(tensor)
    assert model.stop_reason_ in GOOD_STOPS, model.stop_reason_
    return decomposition, model.errors_


def _np(x):
    return np.asarray(tl.to_numpy(x), dtype=np.float64)


def _sigma_gradients_tucker(W, tucker, sigma):
    """Gradients of f = tr(D sigma D^T) w.r.t. U, V and the core (numpy, float64)."""
    core, (U, V, *_) = tucker
    core, U, V = _np(core), _np(U), _np(V)
    T, S = W.shape[:2]
    approx = np.einsum("abij,ta,sb->tsij", core, U, V)
    E = (-2 * (W - approx).reshape(T, -1) @ sigma).reshape(W.shape)
    gU = np.einsum("tsij,abij,sb->ta", E, core, V)
    gV = np.einsum("tsij,ta,abij->sb", E, U, core)
    gG = np.einsum("tsij,ta,sb->abij", E, U, V)
    return gU, gV, gG


class TestTucker2:
    def test_identity_sigma_matches_partial_tucker(self, heavy_backend, rng):
        W = _low_rank_plus_noise(rng, SHAPE, (4, 3))
        tucker, errors = tucker2_sigma(_t(W), (4, 3), _t(np.eye(N)), tol=1e-12, return_errors=True)
        (core, factors), _ = partial_tucker(_t(W), rank=[4, 3], modes=[0, 1], tol=1e-12, n_iter_max=500)
        ref = tl.norm(_t(W) - tl.tucker_to_tensor((core, factors))) / tl.norm(_t(W))
        assert errors[-1] == pytest.approx(float(ref), rel=1e-6)
        assert relative_sigma_error(_t(W), tucker, _t(np.eye(N))) == pytest.approx(errors[-1], rel=1e-8)

    @pytest.mark.parametrize("init", ["svd", "frobenius", "random"])
    @pytest.mark.parametrize("solver", ["direct", "cg"])
    def test_errors_non_increasing_and_match_reconstruction(self, heavy_backend, rng, init, solver):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        tucker, errors = _fit(
            Tucker2Sigma, _t(W), (5, 4), _t(sigma), init=init, solver=solver, random_state=0, n_iter_max=40
        )
        assert len(errors) >= 2
        assert np.all(np.diff(errors) <= 0)
        assert relative_sigma_error(_t(W), tucker, _t(sigma)) == pytest.approx(errors[-1], rel=1e-8)
        core, factors = tucker
        assert tl.shape(core) == (5, 4, 3, 3)
        assert [tl.shape(f) for f in factors] == [(10, 5), (8, 4), (3, 3), (3, 3)]
        assert_array_almost_equal(tl.dot(tl.transpose(factors[0]), factors[0]), tl.eye(5, dtype=tl.backend.float64))
        assert_array_almost_equal(tl.dot(tl.transpose(factors[1]), factors[1]), tl.eye(4, dtype=tl.backend.float64))

    @pytest.mark.parametrize("solver", ["direct", "cg"])
    def test_first_order_optimality(self, heavy_backend, rng, solver):
        # A well-posed problem (clear low-rank structure), so that ALS converges to a
        # stationary point in a reasonable number of sweeps (on unstructured noise, ALS
        # can crawl through a "swamp" for hundreds of sweeps), and a moderately conditioned
        # sigma (with cond ~ 1e10 the weakly weighted directions converge very slowly).
        W = _low_rank_plus_noise(rng, SHAPE, (5, 4), noise=0.1)
        sigma = correlated_sigma(rng, N, decay=40.0)
        tucker = tucker2_sigma(_t(W), (5, 4), _t(sigma), tol=1e-14, n_iter_max=400, cg_tol=1e-12, solver=solver)
        scale = np.linalg.norm(W.reshape(10, -1) @ sigma)
        for grad in _sigma_gradients_tucker(W, tucker, sigma):
            assert np.linalg.norm(grad) / scale < 1e-5

    def test_beats_frobenius_in_sigma_norm(self, heavy_backend, rng):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        (core, factors), _ = partial_tucker(_t(W), rank=[5, 4], modes=[0, 1], tol=1e-10)
        frob = relative_sigma_error(_t(W), tl.tucker_to_tensor((core, factors)), _t(sigma))
        ours = relative_sigma_error(_t(W), tucker2_sigma(_t(W), (5, 4), _t(sigma)), _t(sigma))
        warm = tucker2_sigma(_t(W), (5, 4), _t(sigma), init="frobenius", n_iter_max=1)
        assert ours < 0.9 * frob
        # The first step from the Frobenius input factor can only improve on it.
        assert relative_sigma_error(_t(W), warm, _t(sigma)) <= frob + 1e-12

    def test_scaling_sigma_changes_nothing(self, heavy_backend, rng):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        a = tl.tucker_to_tensor(tucker2_sigma(_t(W), (5, 4), _t(sigma), n_iter_max=15))
        b = tl.tucker_to_tensor(tucker2_sigma(_t(W), (5, 4), _t(37.5 * sigma), n_iter_max=15))
        assert_array_almost_equal(a, b, decimal=8)

    def test_pointwise_conv_is_whitened_svd(self, heavy_backend, rng):
        # For a 1x1 kernel Tucker-2 is a rank-min(R_out, R_in) problem solved by the whitened SVD.
        W = rng.standard_normal((9, 7, 1, 1))
        sigma = correlated_sigma(rng, 7)
        _, errors = tucker2_sigma(_t(W), (3, 3), _t(sigma), tol=1e-14, n_iter_max=300, return_errors=True)
        last, first = whitened_svd(_t(W), 3, _t(sigma))
        best = relative_sigma_error(_t(W.reshape(9, 7)), tl.dot(last, first), _t(sigma))
        assert errors[-1] == pytest.approx(best, rel=1e-6)

    def test_singular_sigma_no_nan(self, backend, rng):
        X = rng.standard_normal((20, N))  # 20 samples: rank-20 covariance of size 72
        sigma = X.T @ X / 20
        tucker, errors = _fit(Tucker2Sigma, _t(rng.standard_normal(SHAPE)), (5, 4), _t(sigma), n_iter_max=15)
        assert np.all(np.isfinite(_np(tl.tucker_to_tensor(tucker))))
        assert np.all(np.diff(errors) <= 0)

    @pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3), (4, 3, 2, 2, 2)])
    def test_other_orders(self, heavy_backend, rng, shape):
        n = int(np.prod(shape[1:]))
        # Shapes and monotonicity need a few sweeps, not convergence.
        tucker, errors = _fit(Tucker2Sigma, _t(rng.standard_normal(shape)), (3, 2), _t(correlated_sigma(rng, n)), n_iter_max=12)
        assert tl.shape(tl.tucker_to_tensor(tucker)) == shape
        assert np.all(np.diff(errors) <= 0)

    def test_float_rank_and_class_api(self, backend, rng):
        W = _t(rng.standard_normal(SHAPE))
        model = Tucker2Sigma(rank=0.3, sigma=_t(correlated_sigma(rng, N)), n_iter_max=5)
        tucker = model.fit_transform(W)
        assert model.decomposition_ is tucker
        assert 1 <= len(model.errors_) <= 5
        assert model.stop_reason_ in {"converged", "n_iter_max", "objective increased"}
        n_params = sum(int(np.prod(tl.shape(x))) for x in (tucker.core, tucker.factors[0], tucker.factors[1]))
        assert n_params <= 0.35 * np.prod(SHAPE)

    def test_callback_can_stop(self, backend, rng):
        seen = []

        def cb(tucker, error):
            seen.append(error)
            return len(seen) == 3

        tucker2_sigma(_t(rng.standard_normal(SHAPE)), (5, 4), _t(correlated_sigma(rng, N)), callback=cb, tol=0)
        assert len(seen) == 3


class TestParafac:
    def test_identity_sigma_matches_parafac(self, heavy_backend, rng):
        factors = [rng.standard_normal((d, 4)) for d in SHAPE]
        W = np.einsum("tr,sr,ir,jr->tsij", *factors) + 1e-3 * rng.standard_normal(SHAPE)
        _, errors = parafac_sigma(_t(W), 4, _t(np.eye(N)), tol=1e-12, n_iter_max=500, return_errors=True)
        cp = parafac(_t(W), 4, tol=1e-12, n_iter_max=500)
        ref = float(tl.norm(_t(W) - tl.cp_to_tensor(cp)) / tl.norm(_t(W)))
        assert errors[-1] == pytest.approx(ref, rel=1e-4)

    @pytest.mark.parametrize("init", ["svd", "frobenius", "random"])
    @pytest.mark.parametrize("solver", ["direct", "cg"])
    def test_errors_non_increasing(self, heavy_backend, rng, init, solver):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        cp, errors = _fit(ParafacSigma, _t(W), 6, _t(sigma), init=init, solver=solver, random_state=0, n_iter_max=30)
        assert np.all(np.diff(errors) <= 0)
        assert errors[-1] < errors[0]
        assert relative_sigma_error(_t(W), cp, _t(sigma)) == pytest.approx(errors[-1], rel=1e-8)

    def test_first_order_optimality(self, heavy_backend, rng):
        factors = [rng.standard_normal((d, 3)) for d in SHAPE]
        W = np.einsum("tr,sr,ir,jr->tsij", *factors) + 0.1 * rng.standard_normal(SHAPE)
        # Moderately conditioned sigma, as for Tucker-2: with cond ~ 1e10 (decay=8) the ALS
        # needs ~480 sweeps to reach the same stationarity (45 here); the property is the same.
        sigma = correlated_sigma(rng, N, decay=40.0)
        cp = parafac_sigma(_t(W), 3, _t(sigma), tol=1e-15, n_iter_max=2000, cg_tol=1e-12)
        weights, fs = cp
        fs = [_np(f) for f in fs]
        fs[0] = fs[0] * _np(weights)[None, :]
        approx = np.einsum("tr,sr,ir,jr->tsij", *fs)
        E = (-2 * (W - approx).reshape(10, -1) @ sigma).reshape(SHAPE)
        scale = np.linalg.norm(W.reshape(10, -1) @ sigma) * max(np.linalg.norm(f) for f in fs) ** 3
        for mode in range(4):
            others = [fs[m] for m in range(4) if m != mode]
            kr = tl.to_numpy(tl.tenalg.khatri_rao([tl.tensor(o) for o in others]))
            grad = np.moveaxis(E, mode, 0).reshape(SHAPE[mode], -1) @ kr
            assert np.linalg.norm(grad) / scale < 1e-5

    def test_beats_frobenius_in_sigma_norm(self, heavy_backend, rng):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        frob = relative_sigma_error(_t(W), parafac(_t(W), 6, tol=1e-10), _t(sigma))
        ours = relative_sigma_error(_t(W), parafac_sigma(_t(W), 6, _t(sigma)), _t(sigma))
        warm = parafac_sigma(_t(W), 6, _t(sigma), init="frobenius", n_iter_max=1)
        assert ours < 0.9 * frob
        assert relative_sigma_error(_t(W), warm, _t(sigma)) <= frob + 1e-12

    def test_scaling_sigma_changes_nothing(self, heavy_backend, rng):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        a = tl.cp_to_tensor(parafac_sigma(_t(W), 5, _t(sigma), n_iter_max=10, random_state=0))
        b = tl.cp_to_tensor(parafac_sigma(_t(W), 5, _t(0.01 * sigma), n_iter_max=10, random_state=0))
        assert_array_almost_equal(a, b, decimal=7)

    def test_init_from_tensorly_cp_tensor(self, heavy_backend, rng):
        W = _t(rng.standard_normal(SHAPE))
        sigma = _t(correlated_sigma(rng, N))
        start = parafac(W, 5, n_iter_max=5)
        before = relative_sigma_error(W, start, sigma)
        cp, errors = parafac_sigma(W, 5, sigma, init=start, n_iter_max=10, return_errors=True)
        assert errors[0] <= before + 1e-12
        assert isinstance(cp, tl.cp_tensor.CPTensor)

    @pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3), (4, 3, 2, 2, 2)])
    def test_other_orders(self, heavy_backend, rng, shape):
        n = int(np.prod(shape[1:]))
        cp, errors = _fit(ParafacSigma, _t(rng.standard_normal(shape)), 3, _t(correlated_sigma(rng, n)), n_iter_max=12)
        assert tl.shape(tl.cp_to_tensor(cp)) == shape
        assert np.all(np.diff(errors) <= 0)

    def test_singular_sigma_no_nan(self, backend, rng):
        X = rng.standard_normal((15, N))
        cp, errors = _fit(ParafacSigma, _t(rng.standard_normal(SHAPE)), 6, _t(X.T @ X), n_iter_max=15)
        assert np.all(np.isfinite(_np(tl.cp_to_tensor(cp))))
        assert np.all(np.diff(errors) <= 0)

    def test_class_api(self, backend, rng):
        model = ParafacSigma(rank=4, sigma=_t(correlated_sigma(rng, N)), n_iter_max=4)
        cp = model.fit_transform(_t(rng.standard_normal(SHAPE)))
        assert model.decomposition_ is cp and cp.rank == 4
        assert len(model.errors_) <= 4


class TestBackendsAgree:
    """The same code path gives the same answer on every backend and dtype."""

    @pytest.mark.parametrize("method", ["tucker", "cp"])
    def test_same_result_as_numpy(self, backend, rng, method):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)

        def run(dtype):
            args = (_t(W, dtype), (5, 4) if method == "tucker" else 5, _t(sigma, dtype))
            if method == "tucker":
                return _np(tl.tucker_to_tensor(tucker2_sigma(*args, n_iter_max=10)))
            return _np(tl.cp_to_tensor(parafac_sigma(*args, n_iter_max=10, init="random", random_state=3)))

        def err(approx):
            with tl.backend_context("numpy"):
                return relative_sigma_error(W, approx, sigma)

        here64 = run(tl.backend.float64)
        here32 = run(tl.backend.float32)
        with tl.backend_context("numpy"):
            ref = run(tl.backend.float64)
        # float64: the same numbers on every backend.
        assert np.linalg.norm(here64 - ref) / np.linalg.norm(ref) < 1e-6
        # float32: sigma has cond ~ 1e10, so directions it barely weights are not determined
        # in single precision; what must agree is the objective.
        assert abs(err(here32) - err(ref)) < 1e-3 * err(ref) + 1e-4

    def test_dtype_follows_input(self, backend, rng):
        W = _t(rng.standard_normal(SHAPE), tl.backend.float32)
        tucker = tucker2_sigma(W, (3, 3), np.eye(N), n_iter_max=3)
        assert tl.context(tucker.core)["dtype"] == tl.context(W)["dtype"]


class TestBadInput:
    def test_sigma_shape(self, rng):
        with pytest.raises(ValueError, match="square matrix of size n"):
            tucker2_sigma(rng.standard_normal(SHAPE), 3, np.eye(N - 1))

    def test_sigma_not_symmetric(self, rng):
        sigma = np.eye(N)
        sigma[0, 1] = 0.5
        with pytest.raises(ValueError, match="not symmetric"):
            parafac_sigma(rng.standard_normal(SHAPE), 3, sigma)

    def test_sigma_indefinite(self, backend, rng):
        # On every backend: PyTorch runs the PSD test with its own Cholesky, the others on
        # the host.
        sigma = np.eye(N)
        sigma[3, 3] = 0.0
        sigma[3, 4] = sigma[4, 3] = 0.9
        with pytest.raises(ValueError, match="not positive semi-definite"):
            tucker2_sigma(rng.standard_normal(SHAPE), 3, sigma)
        # A singular but PSD sigma (a rank-deficient covariance) passes the same test.
        X = rng.standard_normal((N // 2, N))
        tucker2_sigma(rng.standard_normal(SHAPE), 3, X.T @ X / N, n_iter_max=2)

    @pytest.mark.parametrize("where", ["tensor", "sigma"])
    def test_nan_and_inf(self, rng, where):
        W, sigma = rng.standard_normal(SHAPE), np.eye(N)
        for bad in (np.nan, np.inf):
            W2, s2 = W.copy(), sigma.copy()
            (W2 if where == "tensor" else s2)[1, 1] = bad
            with pytest.raises(ValueError, match="NaN or Inf"):
                tucker2_sigma(W2, 3, s2)
            with pytest.raises(ValueError, match="NaN or Inf"):
                parafac_sigma(W2, 3, s2)

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_non_finite_init(self, rng, bad):
        """A warm start holding a NaN / Inf is refused by name (it used to surface as
        "Eigenvalues did not converge" in the first sweep)."""
        W, sigma = rng.standard_normal(SHAPE), correlated_sigma(rng, N)
        tucker = tucker2_sigma(W, (3, 2), sigma, n_iter_max=2)
        cp = parafac_sigma(W, 3, sigma, n_iter_max=2)
        tucker.factors[1][0, 0] = bad
        cp.factors[2][1, 0] = bad
        with pytest.raises(ValueError, match="`init` contains NaN or Inf"):
            tucker2_sigma(W, (3, 2), sigma, init=(tucker.core, tucker.factors))
        with pytest.raises(ValueError, match="`init` contains NaN or Inf"):
            parafac_sigma(W, 3, sigma, init=cp)

    @pytest.mark.parametrize("rank", [0, -2, (11, 2), (2, 9), (0, 1), 2.5, 0.0])
    def test_tucker_rank_out_of_range(self, rng, rank):
        with pytest.raises(ValueError):
            tucker2_sigma(rng.standard_normal(SHAPE), rank, np.eye(N))

    @pytest.mark.parametrize("rank", [0, -1, 10**6, 1.5])
    def test_cp_rank_out_of_range(self, rng, rank):
        with pytest.raises(ValueError):
            parafac_sigma(rng.standard_normal(SHAPE), rank, np.eye(N))

    def test_rank_type(self, rng):
        with pytest.raises(TypeError):
            tucker2_sigma(rng.standard_normal(SHAPE), "3", np.eye(N))

    def test_order_below_two(self, rng):
        with pytest.raises(ValueError, match="order >= 2"):
            tucker2_sigma(rng.standard_normal(5), 1, np.eye(1))
        with pytest.raises(ValueError, match="order >= 2"):
            parafac_sigma(rng.standard_normal(5), 1, np.eye(1))

    def test_zero_tensor(self):
        with pytest.raises(ValueError, match="zero sigma-norm"):
            tucker2_sigma(np.zeros(SHAPE), 2, np.eye(N))

    def test_integer_tensor(self):
        with pytest.raises(TypeError, match="floating-point"):
            tucker2_sigma(np.ones(SHAPE, dtype=np.int64), 2, np.eye(N))

    def test_unknown_options(self, rng):
        W = rng.standard_normal(SHAPE)
        with pytest.raises(ValueError, match="Unknown init"):
            tucker2_sigma(W, 2, np.eye(N), init="nope")
        with pytest.raises(ValueError, match="Unknown init"):
            parafac_sigma(W, 2, np.eye(N), init="nope")
        with pytest.raises(ValueError, match="solver"):
            tucker2_sigma(W, 2, np.eye(N), solver="lu")
        with pytest.raises(ValueError, match="n_iter_max"):
            parafac_sigma(W, 2, np.eye(N), n_iter_max=0)
        with pytest.raises(ValueError, match="damping"):
            tucker2_sigma(W, 2, np.eye(N), damping=-1.0)
        with pytest.raises(ValueError, match="input factor"):
            tucker2_sigma(W, (3, 2), np.eye(N), init=(None, [np.eye(10)[:, :3], np.eye(8)[:, :3]]))

    def test_inputs_not_modified(self, rng):
        W, sigma = rng.standard_normal(SHAPE), correlated_sigma(rng, N)
        W0, s0 = W.copy(), sigma.copy()
        tucker2_sigma(W, 3, sigma, n_iter_max=3, damping=1e-3)
        parafac_sigma(W, 3, sigma, n_iter_max=3, damping=1e-3)
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(sigma, s0)


class TestNorms:
    def test_sigma_norm_is_output_energy(self, rng):
        X = rng.standard_normal((500, 6))
        W = rng.standard_normal((4, 6))
        assert sigma_norm(W, X.T @ X / 500) ** 2 == pytest.approx(np.mean(np.sum((X @ W.T) ** 2, axis=1)))

    def test_relative_error_of_plain_decomposition_tuples(self, rng):
        """``(weights, factors)`` and ``(core, factors)`` pairs, as the solvers' ``init``
        takes them, mean the same as ``CPTensor`` / ``TuckerTensor`` (they were refused as
        "not a tensor"); a dense tensor written as nested tuples is still a dense tensor."""
        W, sigma = rng.standard_normal(SHAPE), correlated_sigma(rng, N)
        cp = parafac_sigma(W, 3, sigma, n_iter_max=3)
        tucker = tucker2_sigma(W, (3, 2), sigma, n_iter_max=3)
        assert relative_sigma_error(W, (cp.weights, cp.factors), sigma) == relative_sigma_error(W, cp, sigma)
        assert relative_sigma_error(W, (tucker.core, tucker.factors), sigma) == relative_sigma_error(W, tucker, sigma)
        M = rng.standard_normal((2, 3))
        dense = tuple(tuple(row) for row in M)
        assert relative_sigma_error(M, dense, np.eye(3)) == 0.0

    def test_relative_error_shape_mismatch(self, rng):
        with pytest.raises(ValueError, match="approximation"):
            relative_sigma_error(rng.standard_normal((4, 6)), rng.standard_normal((4, 5)), np.eye(6))

    def test_whitened_svd_is_optimal(self, rng):
        W = rng.standard_normal((8, 6))
        sigma = correlated_sigma(rng, 6)
        last, first = whitened_svd(W, 2, sigma)
        best = relative_sigma_error(W, last @ first, sigma)
        # Eckart-Young in the whitened space: equal to the tail singular values of W L.
        L = np.linalg.cholesky(sigma)
        s = np.linalg.svd(W @ L, compute_uv=False)
        assert best == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2)), rel=1e-8)
        with pytest.raises(ValueError):
            whitened_svd(W, 7, sigma)


class TestBackendOps:
    @pytest.mark.parametrize("dtype_name", ["float32", "float64"])
    def test_host_dtype_matches_a_host_copy(self, backend, dtype_name):
        """``host_dtype`` reads the dtype without copying; it must agree with a copy."""
        from tensorly_dataaware._backend_ops import host_dtype

        x = tl.tensor(np.arange(6.0).reshape(2, 3), dtype=getattr(tl.backend, dtype_name))
        if tl.get_backend() == "jax" and dtype_name == "float64" and tl.to_numpy(x).dtype != np.float64:
            pytest.skip("JAX without x64 mode has no float64")
        assert host_dtype(x) == tl.to_numpy(x).dtype == np.dtype(dtype_name)
        assert host_dtype(x[:0]) == np.dtype(dtype_name)  # an empty tensor has a dtype too


class TestMonitor:
    def test_increase_stops_and_keeps_best(self):
        monitor = ALSMonitor(0.0, 1e-16, False, None, "test")
        assert not monitor.record(0.5, "a", lambda s: s)
        assert not monitor.record(0.4, "b", lambda s: s)
        with pytest.warns(NonMonotoneWarning, match="increased"):
            assert monitor.record(0.45, "c", lambda s: s)
        assert monitor.best == "b" and monitor.errors == [0.5, 0.4]
        assert monitor.stop_reason == "objective increased"

    def test_round_off_increase_is_silent_and_tolerated(self):
        monitor = ALSMonitor(0.0, 1e-16, False, None, "test", patience=2)
        monitor.record(0.4, "a", lambda s: s)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            # Within round-off: not recorded, the run goes on, the best iterate is kept...
            assert not monitor.record(0.4 + 1e-16, "b", lambda s: s)
            assert monitor.best == "a" and monitor.errors == [0.4]
            # ...and an improvement resets the count.
            assert not monitor.record(0.39, "c", lambda s: s)
            assert not monitor.record(0.39 + 1e-16, "d", lambda s: s)
            assert monitor.record(0.39 + 2e-16, "e", lambda s: s)
        assert monitor.best == "c" and monitor.stop_reason == "round-off floor"

    def test_noise_scales_with_conditioning(self):
        calm = ALSMonitor(0.0, 1e-7, False, None, "test", noise_scale=1.0)
        rough = ALSMonitor(0.0, 1e-7, False, None, "test", noise_scale=50.0)
        assert rough.noise(0.1) == pytest.approx(50 * calm.noise(0.1))

    def test_verbose_prints(self, rng, capsys):
        tucker2_sigma(rng.standard_normal(SHAPE), 3, np.eye(N), n_iter_max=3, verbose=True, tol=0)
        out = capsys.readouterr().out
        assert "iteration 0" in out and "iteration 2" in out


class TestClassWrapsFunction:
    """TensorLy's pattern: the function is the implementation, the class passes options on."""

    @pytest.mark.parametrize("cls, function", [(Tucker2Sigma, tucker2_sigma), (ParafacSigma, parafac_sigma)])
    def test_signature_covers_function_options(self, cls, function):
        fn = inspect.signature(function).parameters
        init = inspect.signature(cls.__init__).parameters
        options = {name: p for name, p in fn.items() if name not in ("tensor", "return_errors", "return_details")}
        assert set(options) <= set(init), set(options) - set(init)
        for name, p in options.items():
            assert init[name].default == p.default, name

    @pytest.mark.parametrize("method", ["tucker", "cp"])
    def test_class_and_function_agree(self, rng, method):
        W = rng.standard_normal(SHAPE)
        sigma = correlated_sigma(rng, N)
        options = dict(n_iter_max=6, init="random", random_state=2, solver="cg", cg_tol=1e-6, cg_maxiter=50, tol=0.0)
        cls, function, rank = (Tucker2Sigma, tucker2_sigma, (5, 4)) if method == "tucker" else (ParafacSigma, parafac_sigma, 4)
        model = cls(rank, sigma, **options)
        from_class = model.fit_transform(W)
        from_function, errors, details = function(W, rank, sigma, return_errors=True, return_details=True, **options)
        assert model.errors_ == errors
        assert model.stop_reason_ == details["stop_reason"] == "n_iter_max"
        assert len(model.solves_) == len(details["solves"]) == 5
        to_dense = tl.tucker_to_tensor if method == "tucker" else tl.cp_to_tensor
        np.testing.assert_array_equal(to_dense(from_class), to_dense(from_function))

    def test_return_convention(self, rng):
        W, sigma = rng.standard_normal(SHAPE), np.eye(N)
        assert isinstance(tucker2_sigma(W, 3, sigma, n_iter_max=2), tl.tucker_tensor.TuckerTensor)
        cp, details = parafac_sigma(W, 3, sigma, n_iter_max=2, return_details=True)
        assert details["rank"] == 3 and details["solver"] in ("direct", "cg")


def test_jax_solvers_ask_for_full_precision_products(rng):
    """On JAX the solvers run with 'highest' matmul precision (JAX may otherwise use TF32 /
    bfloat16 passes for float32 products on GPUs) and restore the caller's setting."""
    jax = pytest.importorskip("jax")
    W, sigma = rng.standard_normal(SHAPE), np.eye(N)
    seen = []
    previous = tl.get_backend()
    tl.set_backend("jax")
    try:
        with jax.default_matmul_precision("bfloat16"):
            for solver in (tucker2_sigma, parafac_sigma):
                solver(W, 3, sigma, n_iter_max=1, callback=lambda *_: seen.append(jax.config.jax_default_matmul_precision))
            assert jax.config.jax_default_matmul_precision == "bfloat16"
    finally:
        tl.set_backend(previous)
    assert seen and all(value == "highest" for value in seen)


class TestThreads:
    def _settings(self):
        import torch
        from threadpoolctl import threadpool_info

        return torch.get_num_threads(), sorted(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")

    def test_restored_after_call_and_after_error(self, rng):
        from tensorly_dataaware import solver_threads

        import torch

        W, sigma = rng.standard_normal(SHAPE), np.eye(N)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            before = self._settings()
            _, details = tucker2_sigma(W, 3, sigma, n_iter_max=2, return_details=True)
            assert details["threads"] == 1  # the measured default
            assert self._settings() == before
            with pytest.raises(ValueError):
                parafac_sigma(W, 3, sigma, n_iter_max=2, cg_maxiter=0)
            assert self._settings() == before

            seen = []
            tucker2_sigma(W, 3, sigma, n_iter_max=2, callback=lambda *_: seen.append(self._settings()))
            assert seen[0][0] == 1 and all(n == 1 for n in seen[0][1])
            seen.clear()
            with solver_threads(2):
                _, details = tucker2_sigma(W, 3, sigma, n_iter_max=2, return_details=True, callback=lambda *_: seen.append(self._settings()))
                assert details["threads"] == 2
            assert seen[0][0] == 2 and all(n == 2 for n in seen[0][1])
            _, details = tucker2_sigma(W, 3, sigma, n_iter_max=2, threads=0, return_details=True)
            assert details["threads"] == 0
            assert self._settings() == before
        finally:
            torch.set_num_threads(previous)

    def test_backend_defaults(self, rng):
        # Measured: one thread for NumPy's BLAS, PyTorch's own threading for PyTorch.
        import torch

        W, sigma = rng.standard_normal(SHAPE), np.eye(N)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert tucker2_sigma(W, 3, sigma, n_iter_max=1, return_details=True)[1]["threads"] == 1
            seen = []
            with tl.backend_context("pytorch"):
                _, details = parafac_sigma(W, 3, sigma, n_iter_max=2, return_details=True,
                                           callback=lambda *_: seen.append(torch.get_num_threads()))
            assert details["threads"] == 0 and seen[0] == 2
        finally:
            torch.set_num_threads(previous)

    def test_environment_variable(self, rng, monkeypatch):
        W, sigma = rng.standard_normal(SHAPE), np.eye(N)
        monkeypatch.setenv("TENSORLY_DATAAWARE_THREADS", "2")
        assert tucker2_sigma(W, 3, sigma, n_iter_max=1, return_details=True)[1]["threads"] == 2
        monkeypatch.setenv("TENSORLY_DATAAWARE_THREADS", "many")
        with pytest.raises(ValueError, match="TENSORLY_DATAAWARE_THREADS"):
            tucker2_sigma(W, 3, sigma, n_iter_max=1)
        monkeypatch.setenv("TENSORLY_DATAAWARE_THREADS", str(2**40))
        with pytest.raises(ValueError, match="TENSORLY_DATAAWARE_THREADS.*at most"):
            tucker2_sigma(W, 3, sigma, n_iter_max=1)

    @pytest.mark.parametrize("threads", [-1, 1.5, "2", True, 2**31])
    def test_bad_threads(self, rng, threads):
        # 2**31: torch overflowed ("Overflow when unpacking long") and OpenBLAS wrapped the
        # value around; now the package's own message.
        with pytest.raises(ValueError, match="threads"):
            tucker2_sigma(rng.standard_normal(SHAPE), 3, np.eye(N), threads=threads)


class TestAcceptedInputs:
    """Issue 9 item 7: inputs a user passes in practice are accepted or clearly refused."""

    def test_parameter_requiring_grad(self, rng):
        import torch

        W = torch.nn.Parameter(torch.tensor(rng.standard_normal(SHAPE)))
        sigma = torch.tensor(correlated_sigma(rng, N))
        with tl.backend_context("pytorch"):
            tucker = tucker2_sigma(W, (4, 3), sigma, n_iter_max=3)
            cp = parafac_sigma(W, 3, sigma, n_iter_max=3)
            assert not tucker.core.requires_grad and not cp.weights.requires_grad
            assert sigma_norm(W, sigma) > 0
            assert relative_sigma_error(W, tucker, sigma) < 1
            last, _ = whitened_svd(W.reshape(10, -1), 3, sigma)
            assert not last.requires_grad
        assert W.grad is None and W.requires_grad

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    def test_half_precision(self, rng, dtype):
        import torch

        W = torch.tensor(rng.standard_normal(SHAPE)).to(getattr(torch, dtype))
        sigma = torch.tensor(correlated_sigma(rng, N))
        with tl.backend_context("pytorch"):
            tucker, errors = tucker2_sigma(W, (4, 3), sigma, n_iter_max=4, return_errors=True)
            cp = parafac_sigma(W, 3, sigma, n_iter_max=4)
            assert tucker.core.dtype == W.dtype and cp.weights.dtype == W.dtype
            assert np.isfinite(errors[-1]) and errors[-1] < 1
            last, first = whitened_svd(W.reshape(10, -1), 3, sigma)
            assert last.dtype == W.dtype

    def test_half_precision_overflow_is_an_error_not_inf(self, rng):
        """Entries that fit float16 (6e4) can give CP weights that do not (65504): they came
        back as `inf` while errors[-1] was finite."""
        W = rng.standard_normal(SHAPE)
        W = (W / np.abs(W).max() * 6e4).astype(np.float16)
        with pytest.raises(OverflowError, match="float16: pass the tensor in float32 or float64"):
            parafac_sigma(W, 3, np.eye(N))
        core = tucker2_sigma(W.astype(np.float32), (4, 3), np.eye(N)).core  # float32 holds it
        assert core.dtype == np.float32 and np.isfinite(core).all()

    def test_odd_arguments_get_clear_errors(self, rng):
        """Audit: NumPy-array `init`s failed with 'truth value of an array is ambiguous', a
        list of CP factors with 'too many values to unpack', [U, V] for Tucker-2 with a
        misleading shape message, string/None dampings with a comparison error, and
        np.float32 fractions were refused as non-integer ranks."""
        W, sigma = rng.standard_normal(SHAPE), correlated_sigma(rng, N)
        cp = parafac_sigma(W, 3, sigma, n_iter_max=2)
        with pytest.raises(TypeError, match="`init` must be 'svd'"):
            tucker2_sigma(W, (4, 3), sigma, init=rng.standard_normal((SHAPE[1], 3)))
        with pytest.raises(TypeError, match="`init` must be 'svd'"):
            parafac_sigma(W, 3, sigma, init=rng.standard_normal((SHAPE[1], 3)))
        with pytest.raises(ValueError, match="pair \\(weights, factors\\).*list of 4 items"):
            parafac_sigma(W, 3, sigma, init=list(cp.factors))
        with pytest.raises(ValueError, match="pair \\(core, factors\\)"):
            tucker2_sigma(W, (4, 3), sigma, init=[rng.standard_normal((SHAPE[0], 4)), rng.standard_normal((SHAPE[1], 3))])
        assert parafac_sigma(W, 3, sigma, init=cp, n_iter_max=2).rank == 3  # the right forms still work
        for damping, error in (("0.1", TypeError), (None, TypeError), (True, TypeError), (-1.0, ValueError),
                               (float("nan"), ValueError)):
            with pytest.raises(error, match="`damping`"):
                tucker2_sigma(W, (4, 3), sigma, damping=damping)
        assert tucker2_sigma(W, (4, 3), sigma, damping=np.float32(1e-3), n_iter_max=2).rank[:2] == (4, 3)
        assert tucker2_sigma(W, np.float32(0.5), sigma, n_iter_max=2).rank == tucker2_sigma(W, 0.5, sigma, n_iter_max=2).rank
        assert parafac_sigma(W, np.float32(0.5), sigma, n_iter_max=2).rank == parafac_sigma(W, 0.5, sigma, n_iter_max=2).rank

    def test_meta_tensors_are_refused(self):
        import torch

        with tl.backend_context("pytorch"):
            for fn, rank in ((tucker2_sigma, 2), (parafac_sigma, 2)):
                with pytest.raises(ValueError, match="'meta' device"):
                    fn(torch.empty(SHAPE, device="meta", dtype=torch.float64), rank, torch.empty(N, N, device="meta"))

    def test_python_lists(self, rng):
        W, sigma = rng.standard_normal(SHAPE), correlated_sigma(rng, N)
        expected = tucker2_sigma(W, (4, 3), sigma, n_iter_max=3)
        got = tucker2_sigma(W.tolist(), (4, 3), sigma.tolist(), n_iter_max=3)
        assert_array_almost_equal(tl.tucker_to_tensor(got), tl.tucker_to_tensor(expected))
        assert parafac_sigma(W.tolist(), 3, sigma.tolist(), n_iter_max=2).rank == 3
        assert sigma_norm(W.tolist(), sigma.tolist()) == pytest.approx(sigma_norm(W, sigma))
        with pytest.raises(TypeError, match="`tensor`"):
            tucker2_sigma([[1.0, 2.0], [3.0]], 1, np.eye(2))
        with pytest.raises(TypeError, match="`sigma`"):
            tucker2_sigma(W, 3, [["a"] * N] * N)
        with pytest.raises(TypeError, match="`tensor`"):
            tucker2_sigma("weights", 3, sigma)

    def test_other_backend_tensor(self, rng):
        import torch

        W = torch.tensor(rng.standard_normal(SHAPE))
        with tl.backend_context("numpy"):
            with pytest.raises(TypeError, match="`tensor` is a pytorch tensor.*active TensorLy backend is 'numpy'"):
                tucker2_sigma(W, 3, np.eye(N))
            with pytest.raises(TypeError, match="`sigma` is a pytorch tensor"):
                parafac_sigma(W.numpy(), 3, torch.eye(N))
            with pytest.raises(TypeError, match="`tensor` is a pytorch tensor"):
                sigma_norm(W, np.eye(N))
        # NumPy arrays are accepted on every backend (converted, as TensorLy does).
        with tl.backend_context("pytorch"):
            assert tucker2_sigma(W.numpy(), 3, np.eye(N), n_iter_max=2).core.dtype == torch.float64

    @pytest.mark.parametrize("scale", [1e154, 1e200, 1e300, 1e-200])
    def test_huge_and_tiny_weights(self, rng, scale):
        W, sigma = rng.standard_normal(SHAPE), correlated_sigma(rng, N)
        tucker, errors = tucker2_sigma(W, (4, 3), sigma, n_iter_max=5, return_errors=True)
        cp, cp_errors = parafac_sigma(W, 3, sigma, n_iter_max=5, return_errors=True)
        tucker_s, errors_s = tucker2_sigma(W * scale, (4, 3), sigma * scale, n_iter_max=5, return_errors=True)
        cp_s, cp_errors_s = parafac_sigma(W * scale, 3, sigma * scale, n_iter_max=5, return_errors=True)
        # Homogeneous problem: the same relative errors, the solution scaled by `scale`.
        np.testing.assert_allclose(errors_s, errors, rtol=1e-10)
        np.testing.assert_allclose(cp_errors_s, cp_errors, rtol=1e-10)
        np.testing.assert_allclose(tl.tucker_to_tensor(tucker_s) / scale, tl.tucker_to_tensor(tucker), atol=1e-10)
        np.testing.assert_allclose(tl.cp_to_tensor(cp_s) / scale, tl.cp_to_tensor(cp), atol=1e-10)
        assert relative_sigma_error(W * scale, tucker_s, sigma * scale) == pytest.approx(errors[-1], rel=1e-8)
        assert sigma_norm(W * scale, sigma) == pytest.approx(sigma_norm(W, sigma) * scale, rel=1e-12)
        last, first = whitened_svd(W * scale, 3, sigma * scale)
        assert np.all(np.isfinite(last @ first))

    def test_complex_refused(self, rng):
        W, sigma = rng.standard_normal(SHAPE), np.eye(N)
        with pytest.raises(TypeError, match="`sigma` is complex"):
            tucker2_sigma(W, 3, sigma + 1j * np.eye(N))
        with pytest.raises(TypeError, match="`tensor` is complex"):
            parafac_sigma(W + 0j, 3, sigma)
        with pytest.raises(TypeError, match="`sigma` is complex"):
            sigma_norm(W, sigma.astype(complex))

    @pytest.mark.parametrize(
        "option, value, error, match",
        [
            ("cg_maxiter", 0, ValueError, "cg_maxiter"),
            ("cg_maxiter", -5, ValueError, "cg_maxiter"),
            ("cg_maxiter", 2.5, TypeError, "cg_maxiter"),
            ("cg_tol", -1e-3, ValueError, "cg_tol"),
            ("cg_tol", float("nan"), ValueError, "cg_tol"),
            ("cg_tol", "1e-8", TypeError, "cg_tol"),
            ("tol", float("nan"), ValueError, "`tol`"),
            ("n_iter_max", 3.0, TypeError, "n_iter_max"),
            ("check_psd", "yes", TypeError, "check_psd"),
            ("callback", 3, TypeError, "callback"),
            ("damping", float("nan"), ValueError, "damping"),
        ],
    )
    def test_bad_options(self, rng, option, value, error, match):
        W = rng.standard_normal(SHAPE)
        for function, rank in ((tucker2_sigma, 3), (parafac_sigma, 3)):
            with pytest.raises(error, match=match):
                function(W, rank, np.eye(N), **{option: value})

    def test_relative_error_of_nan_approximation(self, rng):
        W = rng.standard_normal(SHAPE)
        with pytest.raises(ValueError, match="`approximation` contains NaN"):
            relative_sigma_error(W, np.full(SHAPE, np.nan), np.eye(N))
        with pytest.raises(ValueError, match="`approximation` is too far"):
            relative_sigma_error(W, W * 1e200, np.eye(N))  # finite, but its error overflows


class TestNoRegression:
    """Speed work must not cost quality: final errors at fixed seeds, recorded from the
    implementation before issue 10 (commit 1dc7927), NumPy float64, default options.

    These slowly converging random problems stop at ``n_iter_max``. Per sweep, the exact
    (dense) input-factor solve is the reference: the default inexact CG sweeps are cheaper
    and need more of them, which :meth:`test_inexact_inner_solves_reach_the_exact_optimum`
    checks at convergence instead.
    """

    RECORDED = {0: (0.31792063281702326, 0.2169352811254147), 1: (0.2446150379278087, 0.17725319886571106)}

    @pytest.mark.parametrize("seed", sorted(RECORDED))
    def test_final_errors_at_least_as_good(self, seed):
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((12, 10, 3, 3))
        sigma = correlated_sigma(rng, 90)
        tucker_before, cp_before = self.RECORDED[seed]
        _, errors = tucker2_sigma(W, (6, 5), sigma, return_errors=True, solver="direct")
        assert errors[-1] <= tucker_before * (1 + 1e-9)
        _, errors = parafac_sigma(W, 8, sigma, return_errors=True, random_state=0)
        assert errors[-1] <= cp_before * (1 + 1e-9)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_inexact_inner_solves_reach_the_exact_optimum(self, seed, monkeypatch):
        # A structured tensor (the ALS converges in tens of sweeps): the default policy (two
        # CG iterations per sweep, more only before stopping) must end where solving every
        # input-factor system to 1e-8 ends.
        from tensorly_dataaware.decomposition import _als

        rng = np.random.default_rng(seed)
        W = _low_rank_plus_noise(rng, (16, 12, 3, 3), (6, 5), noise=0.3)
        # A milder spectrum than the default (decay 8), with which neither policy converges
        # within hundreds of sweeps.
        sigma = correlated_sigma(rng, 12 * 9, decay=50.0)
        options = dict(solver="cg", tol=1e-9, n_iter_max=1000, return_errors=True, return_details=True)
        _, errors, details = tucker2_sigma(W, (6, 5), sigma, **options)
        monkeypatch.setattr(_als, "CG_ITERATIONS_START", 500)
        _, exact_errors, exact_details = tucker2_sigma(W, (6, 5), sigma, **options)
        assert details["stop_reason"] == exact_details["stop_reason"] == "converged"
        assert max(s.iterations for s in details["solves"][:3]) <= 2
        assert errors[-1] <= exact_errors[-1] * (1 + 1e-7)

    def test_extrapolation_needs_fewer_sweeps_and_ends_no_worse(self, monkeypatch):
        # A slowly converging problem: the extrapolated input-factor step must take fewer
        # sweeps to converge than plain ALS, end at least as low, and keep every recorded
        # error non-increasing.
        from tensorly_dataaware.decomposition import _tucker2

        rng = np.random.default_rng(3)
        W = _low_rank_plus_noise(rng, (16, 12, 3, 3), (6, 5), noise=0.3)
        sigma = correlated_sigma(rng, 12 * 9, decay=50.0)
        options = dict(tol=1e-9, n_iter_max=1000, return_errors=True, return_details=True)
        _, errors, details = tucker2_sigma(W, (6, 5), sigma, **options)
        monkeypatch.setattr(_tucker2, "EXTRAPOLATION_START", 0.0)
        _, plain_errors, plain_details = tucker2_sigma(W, (6, 5), sigma, **options)
        assert details["stop_reason"] == plain_details["stop_reason"] == "converged"
        assert len(errors) < 0.9 * len(plain_errors)
        assert errors[-1] <= plain_errors[-1] * (1 + 1e-7)
        assert all(b <= a for a, b in zip(errors, errors[1:]))
        assert not details["non_monotone_steps"]

    def test_inner_budget_grows_before_stopping(self, rng):
        # Stopping on a small decrease while CG was cut short by its budget would report
        # convergence of an under-solved run: the last sweep must have had a raised budget
        # (or a solve that met its tolerance).
        from tensorly_dataaware.decomposition._als import CG_ITERATIONS_START

        W = _low_rank_plus_noise(rng, (16, 12, 3, 3), (6, 5), noise=0.3)
        sigma = correlated_sigma(rng, 12 * 9, decay=50.0)
        _, details = tucker2_sigma(W, (6, 5), sigma, solver="cg", tol=1e-6, return_details=True)
        assert details["stop_reason"] == "converged"
        last = details["solves"][-1]
        assert last.converged or last.iterations > CG_ITERATIONS_START


def test_jax_without_x64_solves_in_float32_without_warnings():
    """JAX without 64-bit mode (its own default) works in float32, as documented, but every
    call asked for float64 and JAX warned that it truncates (398 warnings per CP call). In a
    subprocess: x64 is a process-wide switch and the suite runs with it on."""
    pytest.importorskip("jax")
    code = (
        "import warnings, jax, numpy as np, tensorly as tl\n"
        "import jax.numpy as jnp\n"
        "from tensorly_dataaware import tucker2_sigma, parafac_sigma\n"
        "tl.set_backend('jax'); jax.config.update('jax_enable_x64', False)\n"
        "warnings.simplefilter('error')\n"
        "W = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 3, 3)), dtype=jnp.float32)\n"
        "t, e = tucker2_sigma(W, (3, 2), jnp.eye(45), n_iter_max=5, return_errors=True)\n"
        "cp = parafac_sigma(W, 3, jnp.eye(45), n_iter_max=5)\n"
        "assert t.core.dtype == jnp.float32 and cp.weights.dtype == jnp.float32 and e[-1] < 1\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
