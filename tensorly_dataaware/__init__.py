"""Data-aware (covariance-weighted) tensor decompositions for compressing neural networks.

The decompositions run on every TensorLy backend (``tl.set_backend``); the PyTorch
adapter lives in :mod:`tensorly_dataaware.torch` and is imported only on demand.
"""

from .decomposition import (
    NonMonotoneWarning,
    ParafacSigma,
    Tucker2Sigma,
    parafac_sigma,
    solver_threads,
    tucker2_sigma,
)
from .norms import relative_sigma_error, sigma_norm, whitened_svd

__version__ = "0.1.0"
__all__ = [
    "tucker2_sigma",
    "Tucker2Sigma",
    "parafac_sigma",
    "ParafacSigma",
    "sigma_norm",
    "relative_sigma_error",
    "whitened_svd",
    "NonMonotoneWarning",
    "solver_threads",
]
