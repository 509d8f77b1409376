"""Data-aware (covariance-weighted) tensor decompositions for compressing neural networks."""

from .decomposition import NonMonotoneWarning, Tucker2Sigma, tucker2_sigma
from .norms import relative_sigma_error, sigma_norm, whitened_svd

__version__ = "0.1.0"
__all__ = ["tucker2_sigma", "Tucker2Sigma", "sigma_norm", "relative_sigma_error", "whitened_svd", "NonMonotoneWarning"]
