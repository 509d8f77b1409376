r"""Sigma-weighted Tucker-2 decomposition by exact alternating least squares.

Model, for ``W`` of shape ``(T, S, *spatial)`` and ``P = prod(spatial)``:

.. math::

    \tilde W[t, s, p] = \sum_{a, b} U[t, a]\, V[s, b]\, G[a, b, p],

factors on the output mode (``U``, ``T x R_out``) and the input mode (``V``,
``S x R_in``), the spatial modes kept whole in the core ``G``. The objective is
:math:`f = \|(W - \tilde W)\Sigma^{1/2}\|_F^2` with ``W`` matricized as ``W.reshape(T, -1)``.

One sweep has two exact block updates:

1. **Input factor** ``V`` given ``(U, G)``: the coupled linear system of
   :mod:`._structured_solve` (a few preconditioned CG iterations started from the current
   ``V``, or a dense solve when small), followed by a QR orthonormalization, which changes
   nothing because
2. **output factor and core jointly** given ``span(V)``: with ``Z = V kron I_P`` and
   ``C = Z^T Sigma Z``, the best ``U`` is made of the ``R_out`` leading eigenvectors of
   ``(W Sigma Z) C^+ (W Sigma Z)^T`` and then ``G = U^T (W Sigma Z) C^+``. This is the
   exact minimizer over ``(U, G)`` together, which is stronger than updating them one at a
   time.

Both steps minimize ``f`` over their block, so ``f`` never increases. With ``sigma = I``
the fixed points are those of Frobenius HOOI (TensorLy's ``partial_tucker``).

**Extrapolation.** ALS on real covariances converges linearly and slowly: each sweep moves
``V`` a little further in much the same direction. So a sweep first tries the input factor
extrapolated past its ALS update, ``V + (1 + beta)(V_als - V)``, and keeps the joint step at
that point if its error is below the current one; otherwise it falls back to the plain ALS
step (one extra joint step). ``beta`` starts at ``EXTRAPOLATION_START``, grows after an
accepted extrapolation and shrinks after a rejected one. The accepted iterate still has a
lower error than the last one, so ``f`` still never increases. On the 64- and 128-channel
problems of ``benchmarks/speed.py`` it took 14 instead of 20 and 12 instead of 16 sweeps to
convergence, with slightly lower final errors; on the embedded ResNet-20's layers 0.79-0.87x
the time of plain ALS, on the VGG's 1.04-1.07x (its largest layers stop at ``n_iter_max``
either way, where a rejected try is an extra joint step), never with a higher final error.
"""

from __future__ import annotations

import tensorly as tl
from tensorly.tucker_tensor import TuckerTensor

from .._backend_ops import contract
from .._validation import check_finite, check_init_form, validate_tucker2_rank
from ..norms import psd_solve, top_eigvecs
from ._als import finish, run_als
from ._base import SigmaDecomposition
from ._problem import SigmaProblem

__all__ = ["tucker2_sigma", "Tucker2Sigma"]

#: Extrapolation factor ``beta`` of the first sweep (0 turns extrapolation off), its growth
#: after an accepted extrapolation, its shrink after a rejected one, and its cap. Chosen on
#: the embedded networks' layers (``benchmarks/inner_iterations.py --compare extrapolation``):
#: a rejected try costs a joint step, and faster growth to a higher cap (1.5x, up to 4) was
#: rejected often enough on VGG's 256-channel layers to make them slower than plain ALS.
EXTRAPOLATION_START = 0.5
EXTRAPOLATION_GROW = 1.2
EXTRAPOLATION_SHRINK = 0.5
EXTRAPOLATION_MAX = 1.5


def _orthonormalize(matrix):
    q, _ = tl.qr(matrix)
    return q


class _Tucker2State:
    """One iterate: the factors, its relative sigma-error and ``core_sig = G (Sigma Z)^T``.

    ``core_sig`` (``R_out x n``) is a by-product of the joint step that gives the next
    input-factor solve its starting residual for free; ``beta`` is the extrapolation factor
    the next sweep tries.
    """

    def __init__(self, U, V, G, error, core_sig, beta=None):
        self.U, self.V, self.G, self.error, self.core_sig = U, V, G, error, core_sig
        self.beta = EXTRAPOLATION_START if beta is None else beta


def _joint_step(prob: SigmaProblem, V, r_out: int) -> _Tucker2State:
    """Exact minimizer over ``(U, G)`` together for a fixed orthonormal input factor ``V``.

    With ``Z = V kron I_P``, ``C = Z^T Sigma Z`` and ``F = W Sigma Z``, the best ``U`` is made
    of the leading eigenvectors of ``F C^+ F^T`` and then ``G = U^T F C^+``. The error of the
    resulting model is computed explicitly.
    """
    S, P = prob.n_in, prob.n_pos
    r_in = tl.shape(V)[1]
    # Sigma Z as [s, p, q, b] (the only O(n^2 R_in) product of the step), then C[b, p, c, q].
    sig_z = tl.dot(prob.sigma_by_input(), V)
    C = tl.dot(tl.transpose(V), tl.reshape(sig_z, (S, P * P * r_in)))
    C = tl.reshape(tl.transpose(tl.reshape(C, (r_in, P, P, r_in)), (0, 1, 3, 2)), (r_in * P, r_in * P))
    F = tl.dot(prob.wsig_by_input(), V)  # W Sigma Z as [(t, p), b]
    F = tl.reshape(tl.transpose(tl.reshape(F, (prob.n_out, P, r_in)), (0, 2, 1)), (prob.n_out, r_in * P))
    # psd_solve reads one triangle of C on every backend (Cholesky, or eigh for a singular
    # C), so the round-off asymmetry of the product needs no symmetrization here.
    H = psd_solve(C, tl.transpose(F))  # C^+ F^T, (R_in P) x T
    B = tl.dot(F, H)
    U, _ = top_eigvecs((B + tl.transpose(B)) / 2, r_out)
    G_mat = tl.transpose(tl.dot(H, U))  # R_out x (R_in P)
    G = tl.reshape(G_mat, (r_out, r_in, P))
    # W~ = U G (V kron I)^T and W~ Sigma = U G (Sigma Z)^T, both T x n; Sigma Z's columns
    # are in (q, b) order, so G is read in that order too.
    approx = tl.dot(U, tl.reshape(contract("abp,sb->asp", G, V), (r_out, S * P)))
    G_qb = tl.reshape(tl.transpose(G, (0, 2, 1)), (r_out, P * r_in))
    core_sig = tl.dot(G_qb, tl.transpose(tl.reshape(sig_z, (S * P, P * r_in))))
    approx_sig = tl.dot(U, core_sig)
    return _Tucker2State(U, V, G, prob.relative_error(approx, approx_sig), core_sig)


def _initial_input_factor(tensor, prob: SigmaProblem, ranks, init, random_state):
    S = prob.n_in
    r_out, r_in = ranks
    if check_init_form(init, TuckerTensor, "(core, [U, V, ...])", "(core, factors)",
                       "the factor matrices (output first, input second)"):
        _, factors = init
        if len(factors) < 2 or tuple(tl.shape(factors[1])) != (S, r_in):
            raise ValueError(
                f"`init` decomposition must have an input factor (factors[1]) of shape ({S}, {r_in})."
            )
        factor = tl.tensor(factors[1], **tl.context(tensor))
        # A NaN would surface as "Eigenvalues did not converge" deep inside the first sweep.
        check_finite(factor, "init")
        return _orthonormalize(factor)
    if init == "svd":
        # Plain HOSVD of the input mode: leading left singular vectors of unfold(W, 1).
        unfolded = tl.unfold(tensor, 1)
        V, _ = top_eigvecs(tl.dot(unfolded, tl.transpose(unfolded)), r_in)
        return V
    if init == "frobenius":
        from tensorly.decomposition import partial_tucker

        (_, factors), _ = partial_tucker(tensor, rank=[r_out, r_in], modes=[0, 1], init="svd", tol=1e-8)
        return _orthonormalize(factors[1])
    if init == "random":
        rng = tl.check_random_state(random_state)
        return _orthonormalize(tl.tensor(rng.standard_normal((S, r_in)), **tl.context(tensor)))
    raise ValueError(
        f"Unknown init {init!r}: use 'svd', 'frobenius', 'random' or a TuckerTensor / (core, factors)."
    )


def _to_tucker_tensor(state: _Tucker2State, prob: SigmaProblem) -> TuckerTensor:
    spatial = prob.spatial
    core = tl.reshape(state.G, (tl.shape(state.G)[0], tl.shape(state.G)[1]) + spatial)
    factors = [state.U, state.V] + [tl.eye(d, **tl.context(core)) for d in spatial]
    return TuckerTensor((prob.to_output(core, rescale=True), [prob.to_output(f) for f in factors]))


class _Tucker2Model:
    """The Tucker-2 pieces of the shared ALS driver (:func:`._als.run_als`)."""

    name = "tucker2_sigma"
    rank_key = "ranks"

    @staticmethod
    def resolve_rank(shape, rank) -> tuple[int, int]:
        return validate_tucker2_rank(shape, rank)

    @staticmethod
    def n_unknowns(prob: SigmaProblem, ranks) -> int:
        return prob.n_in * ranks[1]

    @staticmethod
    def initial_state(prob: SigmaProblem, ranks, init, random_state) -> _Tucker2State:
        V = _initial_input_factor(prob.tensor, prob, ranks, init, random_state)
        return _joint_step(prob, V, ranks[0])

    @staticmethod
    def sweep(prob, system, state: _Tucker2State, solver, cg_tol, cg_maxiter, reduction):
        # Input-factor step: only U^T W matters because U is orthonormal.
        x_sig = tl.reshape(tl.dot(tl.transpose(state.U), prob.Wsig), (tl.shape(state.U)[1], prob.n_in, prob.n_pos))
        rhs = contract("asp,abp->sb", x_sig, state.G)
        # The operator at the current V, from the joint step's G (Sigma Z)^T.
        ax0 = contract("asp,abp->sb", tl.reshape(state.core_sig, tl.shape(x_sig)), state.G)
        V_new, info = system.solve(
            state.G, rhs, state.V, method=solver, tol=cg_tol, maxiter=cg_maxiter, reduction=reduction, ax0=ax0
        )
        r_out, beta = tl.shape(state.U)[1], state.beta
        if beta > 0:
            # Extrapolated step (see the module docstring). V_new - V is the ALS step in V's
            # own coordinates: CG started from V, and V is orthonormal.
            trial = _joint_step(prob, _orthonormalize(V_new + beta * (V_new - state.V)), r_out)
            if trial.error < state.error:
                trial.beta = min(beta * EXTRAPOLATION_GROW, EXTRAPOLATION_MAX)
                return trial, info
            beta *= EXTRAPOLATION_SHRINK
        # The joint step depends on span(V) only: orthonormalizing keeps it well scaled.
        new = _joint_step(prob, _orthonormalize(V_new), r_out)
        new.beta = beta
        return new, info

    @staticmethod
    def to_decomposition(prob: SigmaProblem, state: _Tucker2State) -> TuckerTensor:
        return _to_tucker_tensor(state, prob)


def tucker2_sigma(
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
    r"""Tucker-2 decomposition minimizing the sigma-weighted error.

    Finds ``W~ = G x_0 U x_1 V`` (factors on modes 0 and 1, the remaining modes kept whole
    in the core) minimizing

    .. math:: f(\tilde W) = \|(W - \tilde W)\Sigma^{1/2}\|_F^2
              = \operatorname{tr}\big((W - \tilde W)\Sigma (W - \tilde W)^\top\big)

    with ``W`` matricized as ``W.reshape(T, -1)``, by exact alternating least squares. With
    ``sigma = I`` it solves the Frobenius problem of TensorLy's ``partial_tucker``.

    Parameters
    ----------
    tensor : tensor of shape ``(T, S, *spatial)``, order >= 2
        Mode 0 is the output mode (a conv weight ``(T, S, kh, kw)``, a linear weight
        ``(T, S)``, ...).
    rank : int, (int, int) or float
        ``(R_out, R_in)``; an int is used for both modes (clipped to each mode size); a float
        in ``(0, 1]`` keeps that fraction of the parameters (TensorLy's
        ``validate_tucker_rank`` with the spatial modes fixed).
    sigma : tensor of shape ``(n, n)``, ``n = prod(tensor.shape[1:])``
        Symmetric positive semi-definite weight: the covariance (or second moment) of the
        layer's input patches in ``torch.nn.functional.unfold`` order. It is cast to the
        tensor's backend, dtype and device. Scaling it does not change the solution.
    init : {'svd', 'frobenius', 'random'} or TuckerTensor, default is 'svd'
        How the input factor ``V`` starts (the output factor and core are then set to their
        exact optimum for that ``V``):

        * ``'svd'``: leading left singular vectors of the mode-1 unfolding (HOSVD);
        * ``'frobenius'``: the input factor of TensorLy's ``partial_tucker``. Because the
          first step is optimal for that ``V`` and every sweep is monotone, the result is
          never worse in the sigma-norm than the Frobenius decomposition;
        * ``'random'``: a random orthonormal ``V`` (``random_state``);
        * a ``TuckerTensor`` or ``(core, factors)``: warm start from ``factors[1]``.
    n_iter_max : int, default is 100
        Maximum number of ALS sweeps (the initial step counts as one).
    tol : float, default is 1e-8
        Stop when the relative sigma-error decreases by less than ``tol`` in a sweep.
    damping : float, default is 0
        Relative ridge: ``sigma + damping * mean(diag(sigma)) * I`` is used throughout (see
        :func:`tensorly_dataaware.norms.damp_sigma`). Singular ``sigma`` is handled without
        it (pseudo-inverse solves, see Notes); damping additionally pulls the solution toward
        the Frobenius one in directions the data does not excite.
    solver : {'auto', 'cg', 'direct'}, default is 'auto'
        Input-factor solver: dense eigen-solve of the ``(S R_in)``-sized system, or
        matrix-free preconditioned conjugate gradients. ``'auto'`` uses the dense solve up
        to ``DIRECT_SOLVE_MAX_UNKNOWNS`` unknowns.
    cg_tol : float, default is 1e-8
        Relative residual at which CG stops (floored at ten machine epsilons).
    cg_maxiter : int, default is 500
        Most CG iterations in one sweep. Each run starts with a budget of
        ``CG_ITERATIONS_START`` (2) iterations per sweep: the solve is warm-started and the
        joint step moves ``U`` and ``G`` anyway, so solving it more accurately buys
        little (on the embedded networks' layers: the same final errors in 0.35-0.7x the
        time, ``benchmarks/inner_iterations.py``). When a sweep gains less than ``tol``
        while CG was cut short, the budget doubles (up to ``cg_maxiter``) and the run
        stops only if the next sweep also gains less than ``tol``.
    check_psd : bool, default is True
        Verify that ``sigma`` is positive semi-definite (a float64 Cholesky, on the tensor's
        device for PyTorch and on the host otherwise, ``n^3/3`` flops).
    random_state : None, int or np.random.RandomState
        Used by ``init='random'``.
    return_errors : bool, default is False
        Also return the relative sigma-errors (non-increasing): the initial iterate's, then
        one per sweep that did not raise the error. A sweep whose error rises within
        round-off is not recorded (the best iterate is kept), so near convergence the list
        can be shorter than the number of sweeps; ``errors[-1]`` is the returned result's.
    verbose : bool or int, default is False
        Print the error (and CG statistics) of each sweep.
    callback : callable, optional
        ``callback(tucker_tensor, error)`` after each sweep; returning ``True`` stops.
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
        ``non_monotone_steps``, ``ranks``, ``solver`` and ``threads``.

    Returns
    -------
    TuckerTensor, or a tuple ``(tucker, errors)``, ``(tucker, details)`` or ``(tucker, errors, details)``
        ``(core, [U, V, I_{d_2}, ...])`` with ``core`` of shape ``(R_out, R_in, *spatial)``,
        ``U`` and ``V`` with orthonormal columns and identity factors on the spatial modes,
        so that ``tl.tucker_to_tensor`` reconstructs ``W~``. The errors, if asked for, are
        relative sigma-errors ``||(W - W~) L|| / ||W L||`` (with the damped ``sigma``).

    Notes
    -----
    * Every block update is an exact minimizer of ``f``, so the errors are non-increasing.
      If round-off ever makes a sweep increase the objective, the run stops and returns the
      best iterate; an increase beyond round-off also emits a ``NonMonotoneWarning``.
    * Singular ``sigma``: the small systems are solved by eigendecomposition with a
      pseudo-inverse cut-off (minimum-norm solutions); CG on the input-factor system
      converges within the range of the operator.
    * Cost per sweep, with ``n = S P``: about ``n^2 R_in (1 + ...)`` flops for the joint
      step and ``2 R_out n^2`` per CG iteration; ``sigma`` is never expanded beyond its
      ``n x n`` size and no ``(S R_in)^2`` matrix is formed with ``solver='cg'``.

    Examples
    --------
    >>> import numpy as np
    >>> import tensorly as tl
    >>> from tensorly_dataaware import tucker2_sigma, relative_sigma_error
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((8, 6, 3, 3))
    >>> X = rng.standard_normal((500, 54)) @ rng.standard_normal((54, 54))
    >>> sigma = X.T @ X / 500
    >>> tucker, errors = tucker2_sigma(W, (4, 3), sigma, return_errors=True)
    >>> tl.tucker_to_tensor(tucker).shape
    (8, 6, 3, 3)
    >>> bool(np.all(np.diff(errors) <= 0))
    True
    """
    tucker, errors, details = run_als(
        _Tucker2Model,
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
    return finish(tucker, errors, details, return_errors, return_details)


class Tucker2Sigma(SigmaDecomposition):
    """Sigma-weighted Tucker-2 decomposition (class interface of :func:`tucker2_sigma`).

    Parameters
    ----------
    rank, sigma, init, n_iter_max, tol, damping, solver, cg_tol, cg_maxiter, check_psd, random_state, verbose, callback, threads
        As in :func:`tucker2_sigma`.

    Attributes
    ----------
    decomposition_ : TuckerTensor
        The result of the last :meth:`fit_transform`.
    errors_ : list of float
        Relative sigma-error after each sweep (non-increasing).
    details_ : dict
        What ``return_details=True`` returns (stop reason, solves, rank, solver, threads).
    stop_reason_ : str
        Why the run stopped: ``'converged'``, ``'n_iter_max'``, ``'callback'``,
        ``'round-off floor'`` (the error stopped moving above round-off, e.g. with
        ``tol=0``), ``'objective increased'`` or ``'non-finite error'``.
    solves_ : list of SolveInfo
        Method, iterations and final residual of each input-factor solve.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorly_dataaware import Tucker2Sigma
    >>> W = np.random.default_rng(0).standard_normal((6, 5, 3, 3))
    >>> model = Tucker2Sigma(rank=(3, 2), sigma=np.eye(45))
    >>> model.fit_transform(W).core.shape
    (3, 2, 3, 3)
    """

    _function = staticmethod(tucker2_sigma)
