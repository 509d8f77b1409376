"""Our re-implementation of the *published reference approach* for Tucker-2-sigma.

Written from the description in ``shared/paper-notes.md`` (section 2), not from its code,
so that it can be timed on the same backend and machine as our solver:

* init: plain HOSVD factors, then the sigma-optimal core;
* each sweep: input factor ``U_S`` by **unpreconditioned MINRES** (x0 = 0, rtol 1e-10,
  maxiter 2000) on its normal equations with the **dense 6-way einsum matvec**
  ``einsum('ijkumn,qjksmn,us->iq', sigma6, D, U)``; then ``U_T`` in closed form; then the
  core in closed form (two direct solves);
* error ``||(W - W~) L|| / ||W L||`` after each sweep.

The MINRES here is the textbook Paige-Saunders recursion written with TensorLy ops, so it
runs on NumPy, PyTorch and JAX alike (the original uses CuPy on a GPU).
"""

from __future__ import annotations

import time

import numpy as np
import tensorly as tl
from opt_einsum import contract

from tensorly_dataaware.norms import top_eigvecs


def minres(matvec, b, *, rtol=1e-10, maxiter=2000):
    """Unpreconditioned MINRES (Paige-Saunders) for a symmetric operator, from ``x0 = 0``.

    Returns ``(x, n_matvecs, relative_residual)``.
    """
    bnorm = float(tl.norm(b))
    zero = tl.zeros(tl.shape(b), **tl.context(b))
    if bnorm == 0:
        return zero, 0, 0.0
    x, v_old, w_old, w = zero, zero, zero, zero
    v = b / bnorm
    beta = 0.0  # off-diagonal entry coupling v_k to v_{k-1} (none for k = 1)
    c_old, s_old, c, s = 1.0, 0.0, 1.0, 0.0  # Givens rotations k-2 and k-1
    eta = bnorm
    res, k = 1.0, 0
    for k in range(1, maxiter + 1):
        Av = matvec(v)
        alpha = float(tl.sum(v * Av))
        p = Av - alpha * v - beta * v_old
        beta_new = float(tl.norm(p))
        delta = c * alpha - c_old * s * beta
        rho1 = float(np.hypot(delta, beta_new))
        rho2 = s * alpha + c_old * c * beta
        rho3 = s_old * beta
        if rho1 == 0:
            break
        c_new, s_new = delta / rho1, beta_new / rho1
        w_new = (v - rho3 * w_old - rho2 * w) / rho1
        x = x + (c_new * eta) * w_new
        eta = -s_new * eta
        res = abs(eta) / bnorm
        if res <= rtol or beta_new == 0:
            break
        v_old, v = v, p / beta_new
        beta = beta_new
        w_old, w = w, w_new
        c_old, s_old, c, s = c, s, c_new, s_new
    return x, k, res


def reference_tucker2(tensor, ranks, sigma, *, n_iter_max=100, tol=1e-6, target_error=None, time_budget=None,
                      minres_rtol=1e-10, minres_maxiter=2000):
    """Run the reference ALS; stop at ``tol``, ``target_error`` or ``time_budget`` seconds.

    Returns a dict: errors, times (cumulative seconds), matvecs per sweep, reason.
    """
    T, S, kh, kw = tl.shape(tensor)
    K = kh * kw
    r_out, r_in = ranks
    n = S * K
    sigma6 = tl.reshape(sigma, (S, kh, kw, S, kh, kw))
    W = tl.reshape(tensor, (T, n))
    Wsig = tl.dot(W, sigma)
    ref = float(tl.sum(W * Wsig))
    start = time.perf_counter()

    # HOSVD init of both factors.
    U_S, _ = top_eigvecs(tl.dot(tl.unfold(tensor, 1), tl.transpose(tl.unfold(tensor, 1))), r_in)
    U_T, _ = top_eigvecs(tl.dot(tl.unfold(tensor, 0), tl.transpose(tl.unfold(tensor, 0))), r_out)

    def core_update(U_T, U_S):
        # G_mat = (U_T^T U_T)^{-1} U_T^T W Sigma Z (Z^T Sigma Z)^{-1}, Z = U_S kron I_K.
        sig_z = tl.reshape(contract("spuq,ub->spbq", tl.reshape(sigma, (S, K, S, K)), U_S), (n, r_in * K))
        Z = tl.reshape(contract("sb,pq->spbq", U_S, tl.eye(K, **tl.context(U_S))), (n, r_in * K))
        C = tl.dot(tl.transpose(Z), sig_z)
        left = tl.solve(tl.dot(tl.transpose(U_T), U_T), tl.dot(tl.transpose(U_T), tl.dot(Wsig, Z)))
        G = tl.transpose(tl.solve(C, tl.transpose(left)))
        return tl.reshape(G, (r_out, r_in, kh, kw)), sig_z, Z

    def error(U_T, U_S, G):
        approx = tl.reshape(contract("abij,ta,sb->tsij", G, U_T, U_S), (T, n))
        D = W - approx
        return float(np.sqrt(max(float(tl.sum(D * tl.dot(D, sigma))), 0.0) / ref))

    G, _, _ = core_update(U_T, U_S)
    errors = [error(U_T, U_S, G)]
    times = [time.perf_counter() - start]
    matvecs = []
    reason = "n_iter_max"
    for _ in range(1, n_iter_max):
        # U_S: normal equations with the dense 6-way einsum matvec, MINRES from zero.
        H = contract("abij,ta->tbij", G, U_T)
        D6 = contract("tbij,tcmn->bijcmn", H, H)  # (R_in, kh, kw, R_in, kh, kw)
        rhs = contract("tsij,abij,ta->sb", tl.reshape(Wsig, (T, S, kh, kw)), G, U_T)

        def matvec(U):
            return contract("ijkumn,qjksmn,us->iq", sigma6, D6, U)

        U_S, its, _ = minres(matvec, rhs, rtol=minres_rtol, maxiter=minres_maxiter)
        matvecs.append(its)
        # U_T: generalized least squares, T is on the output side.
        _, sig_z, Z = core_update(U_T, U_S)
        Z_T = tl.reshape(contract("abq,sb->asq", tl.reshape(G, (r_out, r_in, K)), U_S), (r_out, n))
        SZt = tl.dot(sigma, tl.transpose(Z_T))
        U_T = tl.transpose(tl.solve(tl.dot(Z_T, SZt), tl.transpose(tl.dot(W, SZt))))
        G, _, _ = core_update(U_T, U_S)
        errors.append(error(U_T, U_S, G))
        times.append(time.perf_counter() - start)
        if errors[-1] > errors[-2]:
            reason = "diverged (rolled back)"
            errors.pop()
            times.pop()
            break
        if target_error is not None and errors[-1] <= target_error:
            reason = "reached target"
            break
        if abs(errors[-2] - errors[-1]) < tol:
            reason = "converged"
            break
        if time_budget is not None and times[-1] > time_budget:
            reason = "time budget"
            break
    return {"errors": errors, "times": times, "matvecs": matvecs, "reason": reason}


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description="A module, not a command: benchmarks/speed.py times this reference approach "
                    "(see its --reference-budget and --no-reference options)."
    ).parse_args()
    print(__doc__)
