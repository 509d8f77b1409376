"""Bookkeeping shared by the ALS loops: errors, best iterate, stopping, monotonicity."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

__all__ = ["ALSMonitor", "NonMonotoneWarning"]


class NonMonotoneWarning(RuntimeWarning):
    """An ALS sweep increased the objective by more than round-off."""


class ALSMonitor:
    """Track the relative errors of an ALS run and decide when to stop.

    Every block update of our ALS minimizes the same objective over its block, so the
    error sequence is non-increasing in exact arithmetic. The monitor enforces that: an
    increase stops the run and the best iterate is returned; if the increase is larger than
    what round-off can explain (``100 * eps`` on the relative error, whose absolute accuracy
    is about ``eps / 2`` with the explicit error formula we use), a
    :class:`NonMonotoneWarning` says so loudly.

    Parameters
    ----------
    tol : float
        Stop when the relative error decreases by less than ``tol`` in one sweep
        (TensorLy's ``abs_rec_error`` criterion).
    eps : float
        Machine epsilon of the working dtype.
    verbose : bool or int
    callback : callable or None
        ``callback(decomposition, error)``; returning ``True`` stops the run.
    name : str
        Shown in messages.
    noise_scale : float
        ``||W||_F ||W Sigma||_F / ||W||_Sigma^2 >= 1``: how much round-off in the error
        evaluation is amplified by the conditioning of the problem.
    patience : int
        Round-off-level increases in a row tolerated before stopping.
    """

    def __init__(
        self,
        tol: float,
        eps: float,
        verbose: bool | int,
        callback: Callable | None,
        name: str,
        noise_scale: float = 1.0,
        patience: int = 3,
    ):
        if tol < 0 or not np.isfinite(tol):
            raise ValueError(f"`tol` must be a finite number >= 0, got {tol}.")
        if callback is not None and not callable(callback):
            raise TypeError("`callback` must be callable or None.")
        self.tol = tol
        self.eps = eps
        self.noise_scale = max(1.0, float(noise_scale))
        self.patience = patience
        self.stalls = 0
        self.verbose = verbose
        self.callback = callback
        self.name = name
        self.errors: list[float] = []
        self.best: Any = None
        self.stop_reason = "n_iter_max"
        self.non_monotone_steps: list[tuple[int, float, float]] = []
        self.inner_starved = False
        self._budget_raised = False

    def noise(self, error: float) -> float:
        """Largest increase of the relative error that round-off can explain near ``error``.

        The squared relative error ``e^2`` is computed to an absolute accuracy of about
        ``c = 100 eps noise_scale``, so ``e`` is uncertain by ``c / (2 e)``, and by ``sqrt(c)``
        once ``e`` itself is that small: an exact fit (``e = 0``, reached on small problems
        with a singular sigma) can read as ``1e-7`` on the next sweep in float64, which is
        round-off, not an increase of the objective (found by the Hypothesis suite).
        """
        c = 100.0 * self.eps * self.noise_scale
        return c / (2.0 * max(error, np.sqrt(c) / 2.0))

    def forcing(self, ceiling: float = 0.1, floor: float = 1e-10) -> float:
        """Residual reduction to ask of the next warm-started inner (CG) solve.

        Early sweeps move the error a lot and gain little from a precise inner solve; near
        convergence the inner accuracy must follow the outer progress. So the inner solve
        reduces its starting residual by the square root of the last relative decrease of
        the error, clipped to ``[floor, ceiling]`` (an inexact-Newton forcing term; on
        ResNet-like layers it saved about a third of the matrix-vector products against
        exact solves, for the same final error and number of sweeps). CG is warm-started at
        the current factor, so any accuracy keeps the ALS monotone.
        """
        if len(self.errors) < 2 or self.errors[-1] <= 0:
            return ceiling
        decrease = max((self.errors[-2] - self.errors[-1]) / self.errors[-1], 0.0)
        return max(floor, min(ceiling, float(np.sqrt(decrease))))

    def record(
        self,
        error: float,
        state: Any,
        make_decomposition: Callable[[Any], Any],
        extra: str = "",
        inner_truncated: bool = False,
    ) -> bool:
        """Record the error of a new iterate; return True when the run should stop.

        ``inner_truncated`` says that the sweep's inner solve stopped at an iteration
        budget the driver may still raise. A small decrease then may say more about the
        budget than about convergence, so instead of stopping, the monitor sets
        :attr:`inner_starved` (the driver doubles the budget) and stops only if the next
        sweep, with the larger budget, also gains less than ``tol``.
        """
        self.inner_starved = False
        if not np.isfinite(error):
            self.stop_reason = "non-finite error"
            warnings.warn(
                f"{self.name}: the error became {error} at iteration {len(self.errors)}; "
                "returning the best finite iterate.",
                NonMonotoneWarning,
                stacklevel=3,
            )
            return True
        iteration = len(self.errors)
        if self.errors and error > self.errors[-1]:
            prev = self.errors[-1]
            if error - prev > self.noise(prev):
                self.stop_reason = "objective increased"
                self.non_monotone_steps.append((iteration, prev, error))
                warnings.warn(
                    f"{self.name}: iteration {iteration} increased the relative error from "
                    f"{prev:.10g} to {error:.10g}; stopping and returning the best iterate.",
                    NonMonotoneWarning,
                    stacklevel=3,
                )
                return True
            self.stalls += 1
            if self.stalls >= self.patience:
                self.stop_reason = "round-off floor"
                return True
            return False
        self.stalls = 0
        self.errors.append(float(error))
        self.best = state
        if self.verbose:
            print(f"{self.name} iteration {iteration}: relative sigma-error {error:.10g}{extra}")
        if self.callback is not None and self.callback(make_decomposition(state), float(error)) is True:
            self.stop_reason = "callback"
            return True
        if len(self.errors) >= 2 and self.tol and (self.errors[-2] - self.errors[-1]) < self.tol:
            if inner_truncated and not self._budget_raised:
                self.inner_starved = self._budget_raised = True
                return False
            self.stop_reason = "converged"
            return True
        self._budget_raised = False
        return False
