"""Class interface shared by the sigma-weighted decompositions (TensorLy's estimator style).

As in TensorLy (``CP`` and ``parafac``), the public function is the implementation and the
class only stores its options and passes them on explicitly; ``tests/test_decomposition.py``
checks that the class signature covers every option of the function, with the same defaults.
"""

from __future__ import annotations

from typing import Callable

from tensorly.decomposition._base_decomposition import DecompositionMixin


class SigmaDecomposition(DecompositionMixin):
    """Store the options of a ``*_sigma`` function and run it on :meth:`fit_transform`.

    Subclasses set ``_function``: the public function (``tucker2_sigma`` or
    ``parafac_sigma``).
    """

    _function: Callable

    def __init__(
        self,
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
        verbose=False,
        callback=None,
        threads: int | None = None,
    ):
        self.rank = rank
        self.sigma = sigma
        self.init = init
        self.n_iter_max = n_iter_max
        self.tol = tol
        self.damping = damping
        self.solver = solver
        self.cg_tol = cg_tol
        self.cg_maxiter = cg_maxiter
        self.check_psd = check_psd
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback
        self.threads = threads

    def fit_transform(self, tensor):
        """Decompose ``tensor``; store and return the decomposition."""
        decomposition, errors, details = type(self)._function(
            tensor,
            self.rank,
            self.sigma,
            init=self.init,
            n_iter_max=self.n_iter_max,
            tol=self.tol,
            damping=self.damping,
            solver=self.solver,
            cg_tol=self.cg_tol,
            cg_maxiter=self.cg_maxiter,
            check_psd=self.check_psd,
            random_state=self.random_state,
            verbose=self.verbose,
            callback=self.callback,
            threads=self.threads,
            return_errors=True,
            return_details=True,
        )
        self.decomposition_ = decomposition
        self.errors_ = errors
        self.details_ = details
        self.stop_reason_ = details["stop_reason"]
        self.solves_ = details["solves"]
        return decomposition

    def transform(self, tensor):
        """Alias of :meth:`fit_transform` (a decomposition has no separate fit)."""
        return self.fit_transform(tensor)
