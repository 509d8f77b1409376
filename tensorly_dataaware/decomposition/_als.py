"""The alternating-least-squares driver shared by :func:`tucker2_sigma` and :func:`parafac_sigma`.

Both solvers do the same things around their model-specific block updates: validate the
problem and the options, pick the input-factor solver, start from an initial iterate, run
sweeps until the monitor says stop, and report what happened. That is written once here; a
model only supplies its rank rule, its initial iterate, one sweep and the conversion of an
iterate into a TensorLy decomposition (a :class:`ALSModel`).
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol

import numpy as np

from .._backend_ops import full_precision_products
from .._validation import check_positive_int
from ._monitor import ALSMonitor
from ._problem import SigmaProblem
from ._structured_solve import InputFactorSystem, SolveInfo
from ._threads import solver_threads

__all__ = ["CG_ITERATIONS_START", "DIRECT_SOLVE_MAX_UNKNOWNS", "ALSModel", "run_als", "validate_als_options"]

#: ``solver="auto"`` solves the input-channel system densely up to this many unknowns
#: (``S * R_in`` for Tucker-2, ``S * R`` for CP); above it, preconditioned CG is much cheaper
#: (see benchmarks/speed.py). The distributed memory model imports it from here.
DIRECT_SOLVE_MAX_UNKNOWNS = 512

#: CG iterations allowed in the first sweeps' input-factor solves. The solve is warm-started
#: at the current factor and the next joint/output step moves the other factors anyway, so
#: solving it accurately buys little outer progress: on the embedded ResNet-20 and VGG
#: layers (10% kept, 30 sweeps) two iterations per sweep gave the same final Tucker-2 errors
#: as solves to the forcing tolerance in 0.35-0.71x the time, and CP errors within +-1% in
#: 0.72-0.88x (``benchmarks/inner_iterations.py``). When a sweep gains less than ``tol``
#: while the solve was cut short, the budget doubles (up to ``cg_maxiter``) and the run
#: stops only if the sweep with the larger budget also gains less than ``tol``.
CG_ITERATIONS_START = 2


class ALSModel(Protocol):
    """What a decomposition model supplies to :func:`run_als`."""

    name: str
    rank_key: str

    def resolve_rank(self, shape: tuple, rank) -> Any:
        """Validate ``rank`` for a tensor of ``shape``; return the resolved rank."""

    def n_unknowns(self, prob: SigmaProblem, rank) -> int:
        """Number of unknowns of the input-channel system (chooses the solver)."""

    def initial_state(self, prob: SigmaProblem, rank, init, random_state) -> Any:
        """First iterate (with its ``error`` attribute)."""

    def sweep(self, prob: SigmaProblem, system: InputFactorSystem, state, solver: str, cg_tol: float,
              cg_maxiter: int, reduction: float) -> tuple[Any, SolveInfo]:
        """One ALS sweep from ``state``: the new iterate and what its inner solve did."""

    def to_decomposition(self, prob: SigmaProblem, state) -> Any:
        """The TensorLy decomposition of an iterate, in the caller's dtype and scale."""


def _check_tolerance(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number >= 0, got {value!r}.")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return value


def validate_als_options(*, n_iter_max, tol, solver, cg_tol, cg_maxiter, check_psd, verbose, callback,
                         damping=0.0) -> dict:
    """Check the options every solver shares, before any work is done.

    Returns
    -------
    dict
        The options, normalized (``int``/``float``/``bool``).
    """
    if not isinstance(solver, str) or solver not in ("auto", "direct", "cg"):
        raise ValueError(f"Unknown `solver` {solver!r}: use 'auto', 'direct' or 'cg'.")
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable or None, got {type(callback).__name__}.")
    if not isinstance(check_psd, (bool, np.bool_)):
        raise TypeError(f"`check_psd` must be a bool, got {check_psd!r}.")
    return {
        "n_iter_max": check_positive_int(n_iter_max, "n_iter_max"),
        "tol": _check_tolerance(tol, "tol"),
        "solver": solver,
        "cg_tol": _check_tolerance(cg_tol, "cg_tol"),
        "cg_maxiter": check_positive_int(cg_maxiter, "cg_maxiter"),
        "check_psd": bool(check_psd),
        "damping": _check_tolerance(damping, "damping"),
        "verbose": verbose,
        "callback": callback,
    }


def run_als(
    model: ALSModel,
    tensor,
    rank,
    sigma,
    *,
    init,
    n_iter_max: int,
    tol: float,
    damping: float,
    solver: str,
    cg_tol: float,
    cg_maxiter: int,
    check_psd: bool,
    random_state,
    verbose,
    callback,
    threads,
):
    """Run the monotone ALS of ``model`` on ``tensor``.

    Returns
    -------
    (decomposition, errors, details)
        The best iterate as a TensorLy decomposition, the relative sigma-error of every
        recorded sweep (non-increasing) and a dict with ``stop_reason``, ``solves`` (one
        :class:`SolveInfo` per sweep), ``non_monotone_steps``, the resolved rank under
        ``model.rank_key``, the ``solver`` used and ``threads`` (the BLAS/torch thread count
        the run used, ``None`` if left alone).
    """
    options = validate_als_options(
        n_iter_max=n_iter_max, tol=tol, solver=solver, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
        check_psd=check_psd, verbose=verbose, callback=callback, damping=damping,
    )
    with solver_threads(threads) as used_threads, full_precision_products():
        prob = SigmaProblem.build(tensor, sigma, damping=options["damping"], check_psd=options["check_psd"])
        rank = model.resolve_rank(prob.shape, rank)
        solver = options["solver"]
        if solver == "auto":
            solver = "direct" if model.n_unknowns(prob, rank) <= DIRECT_SOLVE_MAX_UNKNOWNS else "cg"
        monitor = ALSMonitor(options["tol"], prob.eps, verbose, callback, model.name, noise_scale=prob.noise_scale)
        system = InputFactorSystem(prob.sigma, prob.n_in, prob.n_pos)

        def make(state):
            return model.to_decomposition(prob, state)

        state = model.initial_state(prob, rank, init, random_state)
        solves: list[SolveInfo] = []
        stop = monitor.record(state.error, state, make)
        inner = min(CG_ITERATIONS_START, options["cg_maxiter"])
        for _ in range(1, options["n_iter_max"]):
            if stop:
                break
            state, info = model.sweep(prob, system, state, solver, options["cg_tol"], inner, monitor.forcing())
            solves.append(info)
            stop = monitor.record(
                state.error, state, make,
                extra=f" ({info.method}: {info.iterations} it, residual {info.relative_residual:.2e})",
                inner_truncated=not info.converged and inner < options["cg_maxiter"],
            )
            if monitor.inner_starved:
                inner = min(2 * inner, options["cg_maxiter"])
        details = {
            "stop_reason": monitor.stop_reason,
            "solves": solves,
            "non_monotone_steps": monitor.non_monotone_steps,
            model.rank_key: rank,
            "solver": solver,
            "threads": used_threads,
        }
        return make(monitor.best), monitor.errors, details


def finish(decomposition, errors, details, return_errors: bool, return_details: bool):
    """The public functions' return convention: the decomposition, then what was asked for."""
    out = (decomposition,)
    if return_errors:
        out += (errors,)
    if return_details:
        out += (details,)
    return out[0] if len(out) == 1 else out
