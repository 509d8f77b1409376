"""Sigma-weighted tensor decompositions, written once for every TensorLy backend."""

from ._als import DIRECT_SOLVE_MAX_UNKNOWNS
from ._cp import ParafacSigma, parafac_sigma
from ._monitor import NonMonotoneWarning
from ._structured_solve import SolveInfo
from ._threads import solver_threads
from ._tucker2 import Tucker2Sigma, tucker2_sigma

__all__ = [
    "tucker2_sigma",
    "Tucker2Sigma",
    "parafac_sigma",
    "ParafacSigma",
    "NonMonotoneWarning",
    "SolveInfo",
    "solver_threads",
    "DIRECT_SOLVE_MAX_UNKNOWNS",
]
