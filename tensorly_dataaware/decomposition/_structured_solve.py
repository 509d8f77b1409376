r"""The input-factor least-squares problem shared by Tucker-2 and CP.

Both solvers meet the same sub-problem when they update the factor ``V`` (``S x R``) of the
input-channel mode. With ``sigma`` viewed as blocks ``sigma4[s, p, u, q]`` (``S x P x S x P``,
``P`` the flattened spatial size) and a "core" ``G`` of shape ``(a, R, P)``, the model is

.. math::

    Y(V)[a, s, p] = \sum_c V[s, c]\, G[a, c, p]

and we minimize :math:`\|(X - Y(V))\Sigma^{1/2}\|_F^2` over ``V``. The normal equations are

.. math::

    \sum_{p, q} \Sigma_{pq}\, V\, K_{qp} = B, \qquad K_{qp} = G_q^\top G_p,

a linear system in ``S * R`` unknowns whose matrix is a sum of ``P**2`` Kronecker products:
``sigma`` couples the channel and spatial indices, so there is no Kronecker shortcut.

* Tucker-2: ``G`` is the core (``a`` runs over ``R_out``).
* CP: ``G[a, r, p] = A[a, r] * c_p[r]`` with ``A`` the output factor (row-compressed) and
  ``c_p`` the product of the spatial factors at position ``p``.

Two solvers:

``direct``
    Form the ``(S R) x (S R)`` matrix and solve it by eigendecomposition (pseudo-inverse).
    Only for small systems.
``cg``
    Matrix-free preconditioned conjugate gradients. A matrix-vector product costs one
    ``(a x n) @ (n x n)`` GEMM plus two small contractions. The preconditioner is the
    Kronecker product :math:`\bar\Sigma \otimes \bar K` with
    :math:`\bar\Sigma = \frac1P\sum_p \Sigma_{pp}` and :math:`\bar K = \sum_p K_{pp}`,
    applied exactly: its inverse is :math:`R \mapsto \bar\Sigma^{-1} R \bar K^{-1}`, with
    :math:`\bar\Sigma^{-1}` formed once from an eigendecomposition (a pseudo-inverse:
    eigenvalues below ``10 eps`` of the largest count as zero) and :math:`\bar K` factored
    by Cholesky in each sweep (the same pseudo-inverse only when that fails). It captures the channel-channel
    correlation that makes real covariances ill-conditioned (``cond ~ 1e10``), which is why
    plain Krylov methods need thousands of iterations on them. CG is started from the
    current ``V``: every CG iterate decreases the quadratic, so even an inexact solve never
    increases the ALS objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorly as tl

from .._backend_ops import cholesky_factor, contract, host_dtype
from ..norms import psd_solve

__all__ = ["InputFactorSystem", "NormalOperator", "SolveInfo"]


@dataclass
class SolveInfo:
    """What one input-factor solve did."""

    method: str
    iterations: int
    relative_residual: float
    #: ``False`` when CG stopped at its iteration budget before reaching its tolerance.
    converged: bool = True


def _eps(tensor) -> float:
    return float(np.finfo(host_dtype(tensor)).eps)


def _pseudo_inverse(eigenvalues, vectors, like):
    """``V diag(1 / lambda) V^T`` over the eigenvalues above round-off, zero on the others.

    For a singular ``sigma`` (or core) the residuals of the normal equations lie in the
    range of the preconditioner's factors (the range of a PSD matrix's off-diagonal block is
    inside that of its diagonal blocks), up to round-off. Inverting the numerically zero
    eigenvalues, even floored at ``10 eps`` of the largest, multiplied that round-off by
    ``1e14`` and sent CG far along the null space: an ALS sweep could *increase* the
    objective. Zero there keeps every iterate in the range, where CG decreases the quadratic.
    """
    floor = _eps(like) * 10 * max(float(tl.max(eigenvalues)), 1e-300)
    keep = eigenvalues > floor
    inverse = tl.where(keep, 1 / tl.where(keep, eigenvalues, tl.ones(tl.shape(eigenvalues), **tl.context(eigenvalues))),
                       tl.zeros(tl.shape(eigenvalues), **tl.context(eigenvalues)))
    return tl.dot(vectors * inverse[None, :], tl.transpose(vectors))


class NormalOperator:
    """``V -> sum_pq sigma_pq V K_qp`` for a fixed ``G`` (``a x R x P``): the CG operator.

    ``G`` is laid out once, in the two orders its two contractions read it, so that an
    application is three plain GEMMs and no copy: ``Y^T = V G_in`` (the model's rows
    ``(s, q)`` by ``a``, directly in the layout the product with ``sigma`` reads), then
    ``sigma Y^T`` (``sigma`` is symmetric: this is ``(Y sigma)^T``, the dominant
    ``a n^2`` flops), then the projection back onto ``V``'s shape. The einsum form it
    replaces copied ``Y`` and ``Y sigma`` into GEMM layouts at every application (0.49
    against 0.28 ms for the GEMM alone, 64 channels, CP rank 68, float64).
    """

    def __init__(self, sigma, G, n_in: int, n_pos: int):
        a, rank, P = tl.shape(G)
        self.sigma, self.n_in, self.n_pos, self.a = sigma, n_in, n_pos, a
        self.g_in = tl.reshape(tl.transpose(G, (1, 2, 0)), (rank, P * a))  # [c, (q, a)]
        self.g_out = tl.reshape(tl.transpose(G, (2, 0, 1)), (P * a, rank))  # [(p, a), b]

    def project(self, ysig_t):
        """``[u, b] = sum_{p, a} ysig_t[(u, p), a] G[a, b, p]`` for ``ysig_t`` of shape ``(n, a)``.

        ``ysig_t`` is ``(Y sigma)^T`` for some model rows ``Y`` (``a x n``); the result is
        the operator's output when ``Y`` is the model of ``V``.
        """
        return tl.dot(tl.reshape(ysig_t, (self.n_in, self.n_pos * self.a)), self.g_out)

    def __call__(self, V):
        y_t = tl.reshape(tl.dot(V, self.g_in), (self.n_in * self.n_pos, self.a))
        return self.project(tl.dot(self.sigma, y_t))


class InputFactorSystem:
    """Normal equations of the input-channel factor for a fixed ``sigma``.

    The object is built once per decomposition (it keeps ``sigma`` in the block layout and
    the eigendecomposition of the averaged diagonal block, which does not change between
    sweeps) and :meth:`solve` is called once per ALS sweep with the current ``G``.

    Parameters
    ----------
    sigma : tensor of shape ``(S * P, S * P)``
        Already validated and damped.
    n_in : int
        ``S``.
    n_pos : int
        ``P``, the product of the spatial sizes (1 for a matrix).
    """

    def __init__(self, sigma, n_in: int, n_pos: int):
        self.sigma = sigma
        self.n_in = n_in
        self.n_pos = n_pos
        self.sigma4 = tl.reshape(sigma, (n_in, n_pos, n_in, n_pos))
        # The channel part of the preconditioner depends on sigma only: factor it once.
        diag_blocks = contract("spup->su", self.sigma4) / n_pos
        eig_a, vecs_a = tl.eigh((diag_blocks + tl.transpose(diag_blocks)) / 2)
        # The preconditioner is a product of its two Kronecker factors' inverses, so the
        # channel one is kept as a matrix: one S x S GEMM per application.
        self.channel_inverse = _pseudo_inverse(eig_a, vecs_a, sigma)

    def operator(self, G) -> "NormalOperator":
        """The normal-equation operator for a fixed ``G``, ready for repeated application."""
        return NormalOperator(self.sigma, G, self.n_in, self.n_pos)

    def matvec(self, V, G):
        """Apply the normal-equation operator: ``sum_pq sigma_pq V K_qp``."""
        return self.operator(G)(V)

    def dense_matrix(self, G):
        """The full ``(S R) x (S R)`` normal matrix (only for small systems)."""
        K = contract("abp,acq->bpcq", G, G)
        M = contract("upsq,bpcq->ubsc", self.sigma4, K)
        size = self.n_in * tl.shape(G)[1]
        return tl.reshape(M, (size, size))

    def _preconditioner(self, G):
        """The inverse of the Kronecker preconditioner, ``R -> Sigma_bar^-1 R K_bar^-1``."""
        Kbar = contract("abp,acp->bc", G, G)
        Kbar = (Kbar + tl.transpose(Kbar)) / 2
        channel_inverse = self.channel_inverse
        # Cholesky (about ten times cheaper than eigh at these sizes, and this runs every
        # sweep); the eigendecomposition's pseudo-inverse only when K_bar is singular or too
        # ill-conditioned for it.
        solve = cholesky_factor(Kbar)
        if solve is not None:
            return lambda R: tl.transpose(solve(tl.transpose(tl.dot(channel_inverse, R))))
        eig_b, vecs_b = tl.eigh(Kbar)
        k_inverse = _pseudo_inverse(eig_b, vecs_b, G)
        return lambda R: tl.dot(tl.dot(channel_inverse, R), k_inverse)

    def solve(
        self, G, rhs, x0, *, method: str = "cg", tol: float = 1e-8, maxiter: int = 500, reduction: float = 0.0,
        ax0=None, operator: "NormalOperator | None" = None,
    ):
        """Solve for ``V`` given the core-like ``G`` (``a x R x P``) and ``rhs`` (``S x R``).

        Parameters
        ----------
        G : tensor of shape ``(a, R, P)``
        rhs : tensor of shape ``(S, R)``
        x0 : tensor of shape ``(S, R)``
            Starting point for CG (the current factor).
        method : {'cg', 'direct'}
        tol : float
            CG stops when ``||residual||_F <= tol * ||rhs||_F``, or (see ``reduction``)
            earlier.
        maxiter : int
            Most CG iterations.
        reduction : float
            CG also stops when the residual is ``reduction`` times the starting one (the
            forcing term of an inexact ALS: the warm start is already good in most
            directions).
        ax0 : tensor of shape ``(S, R)``, optional
            :meth:`matvec` of ``x0``, when the caller has it from its previous step (it
            saves CG its first operator application).
        operator : NormalOperator, optional
            :meth:`operator` of ``G``, when the caller already made it.

        Returns
        -------
        V, SolveInfo
        """
        if method == "direct":
            M = self.dense_matrix(G)
            rank = tl.shape(G)[1]
            sol = psd_solve((M + tl.transpose(M)) / 2, tl.reshape(rhs, (-1,)))
            V = tl.reshape(sol, (self.n_in, rank))
            res = rhs - self.matvec(V, G)
            rel = float(tl.norm(res)) / max(float(tl.norm(rhs)), 1e-300)
            return V, SolveInfo("direct", 1, rel)
        if method != "cg":
            raise ValueError(f"Unknown input-factor solver {method!r}; use 'cg' or 'direct'.")
        if operator is None:
            operator = self.operator(G)
        return self._pcg(G, operator, rhs, x0, tol=tol, maxiter=maxiter, reduction=reduction, ax0=ax0)

    def _pcg(self, G, matvec, rhs, x0, *, tol: float, maxiter: int, reduction: float, ax0=None):
        precond = self._preconditioner(G)
        rhs_norm = float(tl.norm(rhs))
        if rhs_norm == 0.0:
            return tl.zeros(tl.shape(rhs), **tl.context(rhs)), SolveInfo("cg", 0, 0.0)
        # Round-off floor: asking for a residual below what the dtype can represent only
        # burns iterations (float32 cannot go much below 1e-6 on ill-conditioned sigma).
        tol = max(tol, 10 * _eps(rhs))
        x = x0
        r = rhs - (matvec(x) if ax0 is None else ax0)
        res = float(tl.norm(r)) / rhs_norm
        it = 0
        if res <= tol:
            return x, SolveInfo("cg", 0, res)
        tol = max(tol, reduction * res)
        converged = False
        z = precond(r)
        p = z
        rz = tl.sum(r * z)
        for it in range(1, maxiter + 1):
            Ap = matvec(p)
            pAp = tl.sum(p * Ap)
            if float(pAp) <= 0.0:
                # The operator is PSD; a non-positive curvature only appears once the
                # residual lives in its null space (singular sigma): nothing left to gain.
                converged = True
                break
            alpha = rz / pAp
            x = x + alpha * p
            r = r - alpha * Ap
            res = float(tl.norm(r)) / rhs_norm
            if res <= tol:
                converged = True
                break
            z = precond(r)
            rz_new = tl.sum(r * z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        return x, SolveInfo("cg", it, res, converged)
