"""The input-factor normal equations shared by Tucker-2 and CP (``_structured_solve``).

The operator and the preconditioner are checked entry by entry against their dense
definitions on small problems, on every backend, including the fallback of the
preconditioner when its Kronecker factor ``K_bar`` is singular.
"""

import numpy as np
import pytest
import tensorly as tl

from tensorly_dataaware.decomposition._structured_solve import InputFactorSystem

from .conftest import correlated_sigma

S, P, A_ROWS, RANK = 4, 3, 3, 2


def _problem(rng, zero_component: bool = False):
    sigma = correlated_sigma(rng, S * P)
    G = rng.standard_normal((A_ROWS, RANK, P))
    if zero_component:
        G[:, 1, :] = 0.0  # K_bar = sum_p G_p^T G_p is then singular
    return sigma, G


def _dense_kron_preconditioner(sigma, G):
    """``Sigma_bar kron K_bar`` in the ``(s, r)`` row-major order of ``V``."""
    sigma4 = sigma.reshape(S, P, S, P)
    sigma_bar = np.einsum("spup->su", sigma4) / P
    k_bar = np.einsum("abp,acp->bc", G, G)
    return sigma_bar, k_bar


def test_operator_matches_dense_normal_matrix(backend, rng):
    sigma, G = _problem(rng)
    V = rng.standard_normal((S, RANK))
    system = InputFactorSystem(tl.tensor(sigma), S, P)
    dense = tl.to_numpy(system.dense_matrix(tl.tensor(G)))
    # Independent definition: sum_pq sigma_pq V K_qp with K_qp = G_q^T G_p.
    sigma4 = sigma.reshape(S, P, S, P)
    expected = np.einsum("upsq,sc,acq,abp->ub", sigma4, V, G, G)
    np.testing.assert_allclose(dense @ V.reshape(-1), expected.reshape(-1), rtol=1e-10, atol=1e-12)
    operator = system.operator(tl.tensor(G))
    np.testing.assert_allclose(tl.to_numpy(operator(tl.tensor(V))), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tl.to_numpy(system.matvec(tl.tensor(V), tl.tensor(G))), expected, rtol=1e-10, atol=1e-12)
    # project() of (Y sigma)^T for the model rows Y of V is the same operator.
    Y = np.einsum("sc,acq->asq", V, G).reshape(A_ROWS, -1)
    np.testing.assert_allclose(tl.to_numpy(operator.project(tl.tensor((Y @ sigma).T))), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("zero_component", [False, True], ids=["cholesky", "singular-K-fallback"])
def test_preconditioner_inverts_the_kronecker_approximation(backend, rng, zero_component):
    sigma, G = _problem(rng, zero_component)
    R = rng.standard_normal((S, RANK))
    system = InputFactorSystem(tl.tensor(sigma), S, P)
    out = tl.to_numpy(system._preconditioner(tl.tensor(G))(tl.tensor(R)))
    sigma_bar, k_bar = _dense_kron_preconditioner(sigma, G)
    if not zero_component:
        expected = np.linalg.solve(np.kron(sigma_bar, k_bar), R.reshape(-1)).reshape(S, RANK)
        np.testing.assert_allclose(out, expected, rtol=1e-8)
        return
    # K_bar singular: the pseudo-inverse, i.e. zero along the null direction (the residuals
    # of the normal equations have no component there) and exact on the others. A floored
    # inverse (huge but finite there) amplified round-off until CG raised the objective.
    assert np.all(np.isfinite(out))
    expected = np.linalg.solve(sigma_bar, R) @ np.linalg.pinv(k_bar, rcond=1e-12, hermitian=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-12 * np.abs(expected).max())
    assert np.abs(out[:, 1]).max() == 0.0


def _rank_deficient_case(seed):
    """A small Tucker-2 problem with a singular sigma on which CG once raised the objective."""
    rng = np.random.default_rng(seed)
    T, S = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    shape = (T, S) + [(1,), (3,), (2, 2), ()][seed % 4]
    n = int(np.prod(shape[1:]))
    r_sig = int(rng.integers(1, n + 1))
    g = np.random.default_rng(seed)
    X = g.standard_normal((max(3 * n, 10), r_sig)) @ g.standard_normal((r_sig, n))
    W = rng.standard_normal(shape)
    rank = (int(rng.integers(1, T + 1)), int(rng.integers(1, S + 1)))
    return W, X.T @ X / len(X), rank


@pytest.mark.parametrize("seed", [72, 123])
def test_cg_with_a_singular_sigma_is_monotone_and_matches_the_direct_solve(seed):
    """With a floored (not pseudo-) inverse in the preconditioner, these runs raised the
    objective in a sweep (0.4708 -> 0.7668 for seed 72) and stopped early above the direct
    solver's error."""
    import warnings

    from tensorly_dataaware import NonMonotoneWarning, tucker2_sigma

    W, sigma, rank = _rank_deficient_case(seed)
    assert np.linalg.matrix_rank(sigma) < sigma.shape[0]
    runs = {}
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("error", NonMonotoneWarning)
        for solver in ("cg", "direct"):
            runs[solver] = tucker2_sigma(W, rank, sigma, solver=solver, init="random", random_state=seed,
                                         n_iter_max=60, return_errors=True, return_details=True)
    assert runs["cg"][2]["non_monotone_steps"] == [] and runs["cg"][2]["stop_reason"] == "converged"
    assert abs(runs["cg"][1][-1] - runs["direct"][1][-1]) < 1e-6


def test_cg_solution_solves_the_normal_equations(backend, rng):
    """CG from a poor start reaches the direct solution (the operator, preconditioner and
    CG recurrences together)."""
    sigma, G = _problem(rng)
    system = InputFactorSystem(tl.tensor(sigma), S, P)
    rhs = rng.standard_normal((S, RANK))
    V_cg, info = system.solve(tl.tensor(G), tl.tensor(rhs), tl.tensor(np.zeros((S, RANK))), method="cg", tol=1e-12, maxiter=200)
    V_direct, _ = system.solve(tl.tensor(G), tl.tensor(rhs), None, method="direct")
    assert info.converged
    np.testing.assert_allclose(tl.to_numpy(V_cg), tl.to_numpy(V_direct), rtol=1e-6, atol=1e-8)
