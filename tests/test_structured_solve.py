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
    # K_bar singular: its eigenvalues are floored at 10 eps max(eig), so the zero direction
    # is scaled by a huge but finite factor and the others are inverted exactly.
    assert np.all(np.isfinite(out))
    eig, vecs = np.linalg.eigh(k_bar)
    floor = 10 * np.finfo(np.float64).eps * eig.max()
    k_inverse = vecs @ np.diag(1 / np.clip(eig, floor, None)) @ vecs.T
    expected = np.linalg.solve(sigma_bar, R) @ k_inverse
    np.testing.assert_allclose(out[:, 0], expected[:, 0], rtol=1e-6)
    assert np.abs(out[:, 1]).max() > 1e6 * np.abs(out[:, 0]).max()


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
