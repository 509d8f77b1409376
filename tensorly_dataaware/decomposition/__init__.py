"""Sigma-weighted tensor decompositions, written once for every TensorLy backend."""

from ._monitor import NonMonotoneWarning
from ._tucker2 import Tucker2Sigma, tucker2_sigma

__all__ = ["tucker2_sigma", "Tucker2Sigma", "NonMonotoneWarning"]
