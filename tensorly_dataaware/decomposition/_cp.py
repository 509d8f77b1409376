r"""Sigma-weighted CP (PARAFAC) decomposition by exact alternating least squares.

Model, for ``W`` of shape ``(T, S, d_2, ..., d_{N-1})``:

.. math::

    \tilde W = \sum_r w_r\, a_r \circ b_r \circ c^{(2)}_r \circ \dots \circ c^{(N-1)}_r,
    \qquad \tilde W_{(0)} = A M^\top,\quad M = B \odot C^{(2)} \odot \dots

(``M`` is the Khatri-Rao product of the input-side factors, rows in ``W.reshape(T, -1)``
order). The objective is :math:`f = \|(W - \tilde W)\Sigma^{1/2}\|_F^2`. Every mode is updated
by the exact minimizer of ``f`` over its factor:

* **input channels** ``B`` (``S x R``): the coupled system of :mod:`._structured_solve`, with
  the "core" ``G[a, r, p] = A[a, r] c_p[r]`` (``c_p`` the product of the spatial factors at
  position ``p``), solved by preconditioned CG warm-started at the current ``B`` (or densely
  when small);
* **each spatial mode** ``C`` (``d x R``): a dense ``(d R) x (d R)`` system whose matrix is
  ``(A^T A) * (N^T Sigma N)`` restricted blockwise (``N`` the other input factors);
* **output** ``A``: closed form ``A = W Sigma M (M^T Sigma M)^+``, done last in the sweep
  so that the error of the new iterate comes out of it explicitly and cheaply.

After each input-mode update its columns are normalized and the scale moved into ``A``
(this leaves the model unchanged and keeps the factors balanced, which limits the drift of
degenerate components). With ``sigma = I`` this is plain CP-ALS.
"""

from __future__ import annotations

import warnings

import tensorly as tl
from tensorly.cp_tensor import CPTensor

from .._backend_ops import weighted_sum
from .._validation import check_finite, check_init_form, validate_cp_rank
from ..norms import psd_solve
from ._als import finish, run_als
from ._base import SigmaDecomposition
from ._problem import SigmaProblem
from ._structured_solve import InputFactorSystem

__all__ = ["parafac_sigma", "ParafacSigma"]


class _CPState:
    """One iterate: the factors, its relative sigma-error and ``sig_m = Sigma M`` (``n x R``).

    ``sig_m`` is a by-product of the output step that gives the next channel solve its
    starting residual for free.
    """

    def __init__(self, A, inputs, error, sig_m):
        self.A, self.inputs, self.error, self.sig_m = A, inputs, error, sig_m


def _khatri_rao(factors):
    if len(factors) == 1:
        return factors[0]
    return tl.tenalg.khatri_rao(factors)


def _spatial_products(inputs, context):
    """``c[p, r]``: product of the spatial factors at flattened position ``p`` (``P x R``)."""
    if len(inputs) == 1:
        rank = tl.shape(inputs[0])[1]
        return tl.ones((1, rank), **context)
    return _khatri_rao(inputs[1:])


def _normalize_into(A, factor):
    """Unit-norm columns for ``factor``, the scale moved into ``A`` (model unchanged).

    Returns ``(A diag(s), factor diag(s)^-1, s)``.
    """
    norms = tl.norm(factor, axis=0)
    safe = tl.where(norms > 0, norms, tl.ones(tl.shape(norms), **tl.context(norms)))
    return A * safe[None, :], factor / safe[None, :], safe


def _sigma_times_channel(prob: SigmaProblem, B):
    """``Sigma`` contracted with the channel factor on its column side: ``(S, P, P, R)``.

    ``[s, p, q, r] = sum_u sigma[(s, p), (u, q)] B[u, r]``: the sweep's one ``O(n^2 R)``
    product. The spatial and output steps only contract it further with the small spatial
    factors, so they cost ``O(n P R)`` each instead of another product with ``sigma``.
    """
    return tl.reshape(tl.dot(prob.sigma_by_input(), B), (prob.n_in, prob.n_pos, prob.n_pos, tl.shape(B)[1]))


def _output_step(prob: SigmaProblem, inputs, sig_b=None) -> _CPState:
    """Exact ``A`` for fixed input factors, and the explicit error of the new model.

    ``sig_b`` is :func:`_sigma_times_channel` of ``inputs[0]`` (computed if not given).
    """
    if sig_b is None:
        sig_b = _sigma_times_channel(prob, inputs[0])
    M = _khatri_rao(inputs)  # n x R
    c = _spatial_products(inputs, tl.context(M))  # P x R
    # Sigma M: the spatial products enter column by column (O(n P R)).
    sig_m = tl.reshape(weighted_sum(sig_b, c, 2), (prob.n_in * prob.n_pos, -1))
    gram = tl.dot(tl.transpose(M), sig_m)
    A = tl.transpose(psd_solve((gram + tl.transpose(gram)) / 2, tl.transpose(tl.dot(prob.W, sig_m))))
    error = prob.relative_error(tl.dot(A, tl.transpose(M)), tl.dot(A, tl.transpose(sig_m)))
    return _CPState(A, inputs, error, sig_m)


def _spatial_step(prob: SigmaProblem, A, inputs, k: int, sig_b, aws):
    """Exact update of input mode ``k >= 1`` (a spatial mode) by a dense solve.

    ``sig_b`` is :func:`_sigma_times_channel` of the current channel factor ``inputs[0]``,
    ``aws`` is ``A^T W Sigma`` (``R x n``).
    With ``N_k`` the Khatri-Rao product of the other input factors, the system matrix is
    ``(A^T A) * (N_k^T Sigma_kk N_k)`` blockwise and the right-hand side comes from
    ``A^T W Sigma``.
    """
    m = len(inputs)
    dims = [tl.shape(f)[0] for f in inputs]
    rank = tl.shape(A)[1]
    others = [j for j in range(m) if j != k]
    n_others = prob.n_in * prob.n_pos // dims[k]
    # Column side: sig_b is (S, *rows, *cols, R); contract the other spatial columns,
    # last first so that the remaining axis numbers stay valid.
    half = tl.reshape(sig_b, tuple(dims) + tuple(dims[1:]) + (rank,))
    for j in reversed(others[1:]):
        half = weighted_sum(half, inputs[j], m + j - 1)
    # Row side: one GEMM with N_k over the other rows, x_k moved next to y_k first.
    half = tl.reshape(tl.transpose(half, tuple(others) + (k, m, m + 1)), (n_others, dims[k] * dims[k] * rank))
    N_k = _khatri_rao([inputs[j] for j in others])  # n_others x R, rows in the same order
    quad = tl.reshape(tl.dot(tl.transpose(N_k), half), (rank, dims[k], dims[k], rank))  # [R, i, j, Q]
    quad = tl.transpose(quad, (1, 0, 2, 3)) * tl.reshape(tl.dot(tl.transpose(A), A), (1, rank, 1, rank))
    size = dims[k] * rank
    quad = tl.reshape(quad, (size, size))
    # rhs[i, r] = sum over the other rows of (A^T W Sigma)[r, rows] N_k[others, r].
    aws = tl.reshape(tl.transpose(tl.reshape(aws, (rank,) + tuple(dims)), (0,) + tuple(j + 1 for j in others) + (k + 1,)),
                     (rank, n_others, dims[k]))
    rhs = tl.transpose(tl.sum(aws * tl.transpose(N_k)[:, :, None], axis=1))  # d_k x R
    sol = psd_solve((quad + tl.transpose(quad)) / 2, tl.reshape(rhs, (-1,)))
    return tl.reshape(sol, (dims[k], rank))


def _channel_step(
    prob: SigmaProblem, system: InputFactorSystem, state: _CPState, aws, method, cg_tol, cg_maxiter, reduction
):
    """Exact (CG: to ``cg_tol``) update of the input-channel factor ``B = inputs[0]``.

    ``aws`` is ``A^T W Sigma`` (``R x n``) for the state's ``A``.
    """
    A, inputs = state.A, state.inputs
    context = tl.context(A)
    c = _spatial_products(inputs, context)  # P x R
    T, rank = tl.shape(A)
    # Only A^T A enters the quadratic part: a T x R factor can be replaced by the R x R
    # triangular factor of its QR, which makes every CG matvec cheaper when T > R.
    A_small = tl.qr(A)[1] if T > rank else A
    G = A_small[:, :, None] * tl.transpose(c)[None, :, :]
    aws = tl.reshape(aws, (rank, prob.n_in, prob.n_pos))
    rhs = tl.transpose(tl.sum(aws * tl.transpose(c)[:, None, :], axis=2))  # S x R
    operator = system.operator(G)
    # The operator at the current B: (Y Sigma)^T = (Sigma M) A_small^T with the output
    # step's Sigma M, since Y[a, (s, p)] = sum_r A_small[a, r] M[(s, p), r].
    ax0 = operator.project(tl.dot(state.sig_m, tl.transpose(A_small)))
    return system.solve(
        G, rhs, inputs[0], method=method, tol=cg_tol, maxiter=cg_maxiter, reduction=reduction, ax0=ax0,
        operator=operator,
    )


def _initial_inputs(tensor, prob: SigmaProblem, rank: int, init, random_state):
    from tensorly.decomposition._cp import initialize_cp

    context = tl.context(tensor)
    if check_init_form(init, CPTensor, "(weights, factors)", "(weights, factors)", "one factor matrix per mode"):
        weights, factors = init
        if len(factors) != len(prob.shape) or any(
            tuple(tl.shape(f)) != (d, rank) for f, d in zip(factors, prob.shape)
        ):
            raise ValueError(
                f"`init` CP decomposition must have factors of shapes {[(d, rank) for d in prob.shape]}."
            )
        inputs = [tl.tensor(f, **context) for f in factors[1:]]
        for factor in inputs:
            # A NaN would surface as "Eigenvalues did not converge" in the first solve.
            check_finite(factor, "init")
        return inputs
    if init not in ("svd", "random", "frobenius"):
        raise ValueError(f"Unknown init {init!r}: use 'svd', 'frobenius', 'random' or a CPTensor.")
    with warnings.catch_warnings():
        # TensorLy warns when rank exceeds a mode size and pads the SVD init with random
        # columns (also inside ``parafac``): that is expected for CP ranks and not worth a
        # warning per call.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        if init == "frobenius":
            from tensorly.decomposition import parafac

            cp = parafac(tensor, rank, init="svd", tol=1e-8, random_state=random_state)
        else:
            cp = initialize_cp(tensor, rank, init=init, random_state=random_state)
    return list(cp.factors[1:])


def _to_cp_tensor(state: _CPState, prob: SigmaProblem) -> CPTensor:
    # Weights carry the scale: every factor gets unit-norm columns, as TensorLy's
    # normalize_factors=True would return them.
    A = state.A
    factors = []
    weights = None
    for f in [A] + list(state.inputs):
        norms = tl.norm(f, axis=0)
        safe = tl.where(norms > 0, norms, tl.ones(tl.shape(norms), **tl.context(norms)))
        factors.append(prob.to_output(f / safe[None, :]))
        weights = norms if weights is None else weights * norms
    return CPTensor((prob.to_output(weights, rescale=True), factors))


class _CPModel:
    """The CP pieces of the shared ALS driver (:func:`._als.run_als`)."""

    name = "parafac_sigma"
    rank_key = "rank"

    @staticmethod
    def resolve_rank(shape, rank) -> int:
        return validate_cp_rank(shape, rank)

    @staticmethod
    def n_unknowns(prob: SigmaProblem, rank: int) -> int:
        return prob.n_in * rank

    @staticmethod
    def initial_state(prob: SigmaProblem, rank: int, init, random_state) -> _CPState:
        return _output_step(prob, _initial_inputs(prob.tensor, prob, rank, init, random_state))

    @staticmethod
    def sweep(prob, system, state: _CPState, solver, cg_tol, cg_maxiter, reduction):
        A, inputs = state.A, list(state.inputs)
        # A^T W Sigma, for the channel and spatial steps: between them A only has its columns
        # rescaled (by _normalize_into), so one product, rescaled, serves all of them.
        aws = tl.dot(tl.transpose(A), prob.Wsig)
        B, info = _channel_step(prob, system, state, aws, solver, cg_tol, cg_maxiter, reduction)
        A, inputs[0], scale = _normalize_into(A, B)
        sig_b = _sigma_times_channel(prob, inputs[0])
        for k in range(1, len(inputs)):
            aws = aws * scale[:, None]
            A, inputs[k], scale = _normalize_into(A, _spatial_step(prob, A, inputs, k, sig_b, aws))
        return _output_step(prob, inputs, sig_b), info

    @staticmethod
    def to_decomposition(prob: SigmaProblem, state: _CPState) -> CPTensor:
        return _to_cp_tensor(state, prob)


def parafac_sigma(
    tensor,
    rank,
    sigma,
    *,
    init="svd",
    n_iter_max: int = 100,
    tol: float = 1e-8,
    damping: float = 0.0,
    solver: str = "auto",
    cg_tol: float = 1e-8,
    cg_maxiter: int = 500,
    check_psd: bool = True,
    random_state=None,
    return_errors: bool = False,
    verbose=False,
    callback=None,
    threads: int | None = None,
    return_details: bool = False,
):
    r"""CP decomposition minimizing the sigma-weighted error.

    Finds a rank-``R`` CP tensor ``W~`` (a factor on every mode) minimizing

    .. math:: f(\tilde W) = \|(W - \tilde W)\Sigma^{1/2}\|_F^2

    with ``W`` matricized as ``W.reshape(T, -1)``, by exact alternating least squares on
    every mode. With ``sigma = I`` it solves the problem of TensorLy's ``parafac``.

    Parameters
    ----------
    tensor : tensor of shape ``(T, S, *spatial)``, order >= 2
        Mode 0 is the output mode.
    rank : int or float
        Number of components; a float in ``(0, 1]`` keeps that fraction of the parameters
        (``R * sum(shape)`` parameters for rank ``R``).
    sigma : tensor of shape ``(n, n)``, ``n = prod(tensor.shape[1:])``
        Symmetric positive semi-definite weight, in ``torch.nn.functional.unfold`` order;
        cast to the tensor's backend, dtype and device.
    init : {'svd', 'frobenius', 'random'} or CPTensor, default is 'svd'
        Initial input-side factors (the output factor is then set to its exact optimum):
        TensorLy's ``initialize_cp`` (``'svd'``, ``'random'``), the result of TensorLy's
        ``parafac`` (``'frobenius'``: the sigma-error is then never worse than the
        Frobenius CP's), or a ``CPTensor`` / ``(weights, factors)`` to warm start from.
    n_iter_max : int, default is 100
        Maximum number of ALS sweeps (the initial step counts as one).
    tol : float, default is 1e-8
        Stop when the relative sigma-error decreases by less than ``tol`` in a sweep.
    damping : float, default is 0
        Relative ridge added to ``sigma`` (see :func:`tensorly_dataaware.norms.damp_sigma`).
    solver : {'auto', 'cg', 'direct'}, default is 'auto'
        Solver of the input-channel system (``S * R`` unknowns).
    cg_tol, cg_maxiter : float, int
        Stopping rule of the conjugate gradients of the channel update; as in
        :func:`~tensorly_dataaware.tucker2_sigma`, each sweep gets a budget of
        ``CG_ITERATIONS_START`` (2) iterations, doubled (up to ``cg_maxiter``) before the run
        is allowed to stop on a small decrease while CG was cut short.
    check_psd : bool, default is True
        Verify that ``sigma`` is positive semi-definite.
    random_state : None, int or np.random.RandomState
    return_errors : bool, default is False
        Also return the relative sigma-errors (non-increasing): the initial iterate's, then
        one per sweep that did not raise the error. A sweep whose error rises within
        round-off is not recorded (the best iterate is kept), so near convergence the list
        can be shorter than the number of sweeps; ``errors[-1]`` is the returned result's.
    verbose : bool or int, default is False
    callback : callable, optional
        ``callback(cp_tensor, error)`` after each sweep; returning ``True`` stops.
    threads : int, optional
        BLAS / PyTorch threads for this call (restored afterwards); ``0`` leaves them alone.
        Default: :func:`~tensorly_dataaware.solver_threads`, else
        ``$TENSORLY_DATAAWARE_THREADS``, else 1 on NumPy and JAX and 0 on PyTorch (the
        fastest measured on an idle machine for these small dense operations, see
        :mod:`tensorly_dataaware.decomposition._threads`; pass 1 on a busy machine).
    return_details : bool, default is False
        Also return a dict: ``stop_reason`` (``'converged'``, ``'n_iter_max'``,
        ``'callback'``, ``'round-off floor'``, ``'objective increased'`` or
        ``'non-finite error'``), ``solves`` (one :class:`SolveInfo` per sweep),
        ``non_monotone_steps``, ``rank``, ``solver`` and ``threads``.

    Returns
    -------
    CPTensor, or a tuple ``(cp, errors)``, ``(cp, details)`` or ``(cp, errors, details)``
        ``(weights, factors)`` with unit-norm factor columns; ``tl.cp_to_tensor``
        reconstructs ``W~``. Then the errors and/or the details, if asked for.

    Notes
    -----
    Each sweep costs about ``2 n^2 R`` flops for its one product of ``sigma`` with the
    channel factor (an ``n x P R`` array that the spatial and output steps reuse), plus
    ``2 min(T, R) n^2`` per CG iteration of the channel update; nothing larger than
    ``n x n``, ``n x P R`` or ``(d R)^2`` (``d`` a spatial size) is formed with
    ``solver='cg'``.
    CP is prone to degenerate components at high ranks; the pseudo-inverse solves and the
    per-mode normalization keep the iterates finite and the objective monotone, but they do
    not regularize the model: warm-start from ``init='frobenius'`` when in doubt.

    Examples
    --------
    >>> import numpy as np
    >>> import tensorly as tl
    >>> from tensorly_dataaware import parafac_sigma
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 6, 3, 3))
    >>> X = rng.standard_normal((500, 54)) @ rng.standard_normal((54, 54))
    >>> cp, errors = parafac_sigma(W, 5, X.T @ X / 500, return_errors=True)
    >>> tl.cp_to_tensor(cp).shape
    (8, 6, 3, 3)
    >>> bool(np.all(np.diff(errors) <= 0))
    True
    """
    cp, errors, details = run_als(
        _CPModel,
        tensor,
        rank,
        sigma,
        init=init,
        n_iter_max=n_iter_max,
        tol=tol,
        damping=damping,
        solver=solver,
        cg_tol=cg_tol,
        cg_maxiter=cg_maxiter,
        check_psd=check_psd,
        random_state=random_state,
        verbose=verbose,
        callback=callback,
        threads=threads,
    )
    return finish(cp, errors, details, return_errors, return_details)


class ParafacSigma(SigmaDecomposition):
    """Sigma-weighted CP decomposition (class interface of :func:`parafac_sigma`).

    Parameters
    ----------
    rank, sigma, init, n_iter_max, tol, damping, solver, cg_tol, cg_maxiter, check_psd, random_state, verbose, callback, threads
        As in :func:`parafac_sigma`.

    Attributes
    ----------
    decomposition_ : CPTensor
    errors_ : list of float
        Relative sigma-error after each sweep (non-increasing).
    details_ : dict
        What ``return_details=True`` returns (stop reason, solves, rank, solver, threads).
    stop_reason_ : str
        Why the run stopped, as in :class:`Tucker2Sigma`.
    solves_ : list of SolveInfo

    Examples
    --------
    >>> import numpy as np
    >>> from tensorly_dataaware import ParafacSigma
    >>> W = np.random.default_rng(0).standard_normal((6, 5, 3, 3))
    >>> ParafacSigma(rank=4, sigma=np.eye(45)).fit_transform(W).rank
    4
    """

    _function = staticmethod(parafac_sigma)
