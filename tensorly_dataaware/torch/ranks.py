"""Rank selection for factorized layers: parameter ratios, spectral energy, a global budget.

All functions work on shapes and spectra only; they never touch a model.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import torch

__all__ = [
    "dense_params",
    "factorized_params",
    "macs_per_position",
    "ranks_for_ratio",
    "ranks_for_energy",
    "allocate_budget",
]

METHODS = ("tucker2", "cp", "svd")


def dense_params(shape: Sequence[int]) -> int:
    """Weights of the dense layer, ``prod(shape)``."""
    return math.prod(shape)


def factorized_params(method: str, shape: Sequence[int], rank) -> int:
    """Weights of the factorized form (biases excluded).

    * ``tucker2``: ``S R_in + R_out R_in P + T R_out``;
    * ``cp``: ``R (T + S + sum(spatial))``;
    * ``svd``: ``r (T + S P)``.
    """
    T, S, spatial = shape[0], shape[1], tuple(shape[2:])
    P = math.prod(spatial) if spatial else 1
    if method == "tucker2":
        r_out, r_in = rank
        return S * r_in + r_out * r_in * P + T * r_out
    if method == "cp":
        return rank * (T + S + sum(spatial))
    if method == "svd":
        return rank * (T + S * P)
    raise ValueError(f"Unknown method {method!r}; use one of {METHODS}.")


def macs_per_position(method: str, shape: Sequence[int], rank=None, stride: Sequence[int] = (1, 1)) -> int:
    """Multiply-accumulates per *output* position of the layer (dense if ``rank`` is None).

    The first 1x1 convolution of a Tucker-2 or CP layer runs at the input resolution,
    ``prod(stride)`` positions per output position.
    """
    T, S, spatial = shape[0], shape[1], tuple(shape[2:])
    P = math.prod(spatial) if spatial else 1
    if rank is None:
        return T * S * P
    up = math.prod(stride) if stride else 1
    if method == "tucker2":
        r_out, r_in = rank
        return up * S * r_in + r_in * r_out * P + r_out * T
    if method == "cp":
        # 1x1 in, one depthwise conv per spatial mode, 1x1 out.
        return up * S * rank + rank * sum(spatial) + rank * T
    if method == "svd":
        return rank * S * P + rank * T
    raise ValueError(f"Unknown method {method!r}; use one of {METHODS}.")


def _max_rank(method: str, shape: Sequence[int]):
    T, S = shape[0], shape[1]
    P = math.prod(shape[2:]) if len(shape) > 2 else 1
    if method == "tucker2":
        return (T, S)
    if method == "cp":
        return math.prod(shape) // max(shape)
    return min(T, S * P)


def check_fraction(value, label: str) -> None:
    """Refuse a size fraction (``ratio``, ``energy``, ``budget``) outside ``(0, 1]`` or not a number."""
    # bool is an int subclass: `ratio=True` would silently mean "keep everything" (compress
    # refuses it too, see check_rank_options).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{label}` must be a number in (0, 1], got {value!r}.")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"`{label}` must be in (0, 1], got {value}.")


def min_rank(method: str):
    """The smallest factorization of ``method``: rank 1 (``(1, 1)`` for Tucker-2)."""
    return (1, 1) if method == "tucker2" else 1


def ranks_for_ratio(method: str, shape: Sequence[int], ratio: float):
    """Largest rank whose factorized form keeps at most ``ratio`` of the layer's weights.

    Tucker-2 keeps ``R_out / T = R_in / S`` (the same fraction of each channel mode), the
    rule of TensorLy's float ranks: the pair ``(floor(cT), floor(cS))`` for the largest
    fraction ``c`` that fits. A pair with unequal fractions may fit with more weights (the
    floors leave some of the ratio unused on thin modes). At least rank 1 is returned even
    if it exceeds the ratio.

    Parameters
    ----------
    method : {'tucker2', 'cp', 'svd'}
    shape : sequence of int
        Weight shape ``(T, S, *spatial)``.
    ratio : float in (0, 1]

    Returns
    -------
    int or (int, int)

    Raises
    ------
    TypeError
        If ``ratio`` is not a real number (a bool included).
    ValueError
        If ``ratio`` is outside ``(0, 1]``.
    """
    check_fraction(ratio, "ratio")
    T, S = shape[0], shape[1]
    P = math.prod(shape[2:]) if len(shape) > 2 else 1
    # The relative slack lets a rank that fits exactly fit: 0.58 * 100 is 57.99999999999999
    # in floating point, which refused rank 2 of a 4 x 25 matrix (58 weights).
    budget = ratio * dense_params(shape) * (1 + 1e-12)
    if method == "tucker2":
        # Solve c^2 T S P + c (T^2 + S^2) = budget for the channel fraction c.
        a, b = T * S * P, T * T + S * S
        c = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
        r_out, r_in = max(1, min(T, int(c * T))), max(1, min(S, int(c * S)))
        # The floor of 1 on a thin mode (e.g. S = 1) can push the pair over the budget:
        # shrink the relatively larger rank until it fits (or both are 1).
        while factorized_params(method, shape, (r_out, r_in)) > budget and (r_out > 1 or r_in > 1):
            if r_in == 1 or (r_out > 1 and r_out / T >= r_in / S):
                r_out -= 1
            else:
                r_in -= 1
        return (r_out, r_in)
    per_rank = factorized_params(method, shape, 1)
    return max(1, min(int(budget // per_rank), _max_rank(method, shape)))


def _energy_rank(eigvals: torch.Tensor, energy: float) -> int:
    vals = torch.clamp(torch.sort(eigvals, descending=True).values, min=0)
    total = float(vals.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(vals, 0) / total
    # Round-off slack: with a rank-deficient sigma the numerically zero eigenvalues (~1e-13
    # of the total) kept the cumulative sum just below 1, and energy=1.0 chose ranks up to
    # the cap instead of the exact rank.
    target = energy - 1e-12
    return min(int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype, device=cum.device)).item()) + 1, len(vals))


def ranks_for_energy(method: str, weight: torch.Tensor, sigma: torch.Tensor, energy: float):
    """Smallest rank keeping ``energy`` of the whitened spectrum (the output energy).

    The eigenvalues of ``W Sigma W^T`` are the squared singular values of the whitened
    weight ``W Sigma^{1/2}``: keeping the top ``r`` of them is exactly what the whitened SVD
    does, with relative sigma-error ``sqrt(1 - energy)``. For Tucker-2 this gives ``R_out``,
    and ``R_in`` takes the same fraction of the input channels; for CP the rank is the
    whitened SVD rank times the number of kernel positions.

    Every method is capped by its rank at ratio 1.0 (:func:`ranks_for_ratio`; for Tucker-2
    each of ``R_out``, ``R_in`` by the ratio-1 pair), so that the factorized layer never
    holds more weights than the dense one (apart from the rank-1 floor of a tiny layer).
    Below the cap the rank is the energy rank above; at the cap less than ``energy`` may
    be kept (an SVD of a ``T x n`` matrix, for instance, reaches at most rank
    ``floor(T n / (T + n))``, below full rank).

    Parameters
    ----------
    method : {'tucker2', 'cp', 'svd'}
    weight : torch.Tensor of shape ``(T, S, *spatial)``
    sigma : torch.Tensor of shape ``(n, n)``
    energy : float in (0, 1]

    Returns
    -------
    int or (int, int)
    """
    check_fraction(energy, "energy")
    shape = tuple(weight.shape)
    mat = weight.reshape(shape[0], -1).to(torch.float64)
    gram = mat @ sigma.to(mat) @ mat.T
    r = min(_energy_rank(torch.linalg.eigvalsh((gram + gram.T) / 2), energy), shape[0])
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {METHODS}.")
    # The cap: a rank above the ratio-1 rank stores more weights than the dense layer, which
    # no energy target justifies (it used to inflate Tucker-2 and SVD layers silently).
    cap = ranks_for_ratio(method, shape, 1.0)
    if method == "svd":
        return min(r, cap)
    if method == "tucker2":
        frac = r / shape[0]
        r_in = max(1, min(shape[1], math.ceil(frac * shape[1])))
        # Each rank capped on its own: the weights grow with each of R_out and R_in, so the
        # pair costs at most the ratio-1 pair, and an R_out below the cap keeps its energy.
        return (min(r, cap[0]), min(r_in, cap[1]))
    P = math.prod(shape[2:]) if len(shape) > 2 else 1
    return max(1, min(r * P, cap))


def allocate_budget(
    curves: Mapping[str, Sequence[tuple[int, float, object]]],
    budget: int,
) -> dict[str, object]:
    """Spend a total parameter budget where it lowers the summed squared error the most.

    Parameters
    ----------
    curves : mapping name -> list of (params, relative squared error, rank)
        For each layer, candidate ranks in increasing size with their parameter count and
        (estimated) relative squared sigma-error; errors should be non-increasing.
    budget : int
        Total number of weights allowed over all layers.

    Returns
    -------
    dict name -> rank
        Greedy marginal allocation: start every layer at its smallest candidate and
        repeatedly upgrade the layer with the largest error decrease per added parameter
        while the budget allows. The upgrade of a layer may skip candidates: from its
        current one it goes to the later candidate (within the budget) with the steepest
        decrease per parameter, so that a plateau (a larger candidate with the same
        estimated error, e.g. a Tucker-2 rank pair whose input rank alone grew) does not
        stop the layer from ever growing. Once no upgrade lowers the estimate, what is
        left of the budget goes to upgrades that leave it unchanged (an estimate can
        saturate while the true error still falls: a CP rank beyond the output size leaves
        the whitened output tail at zero), one candidate at a time to the layer holding the
        smallest fraction of its largest candidate, while they fit; without this a CP
        ``budget=0.9`` kept 24% of the weights. Greedy: not guaranteed optimal (an
        exhaustive search over the same candidates found up to 15% lower estimates at
        some budgets), nor monotone in ``budget`` for every layer. Raises ``ValueError``
        if even the smallest candidates do not fit, or if a layer has no candidate.
    """
    # Without a candidate a layer has no rank to return (it used to fail with an IndexError).
    empty = [name for name, curve in curves.items() if len(curve) == 0]
    if empty:
        raise ValueError(f"Layer(s) {empty} have no candidate rank in `curves`.")
    choice = {name: 0 for name in curves}
    used = sum(c[0][0] for c in curves.values())
    if used > budget:
        raise ValueError(
            f"The parameter budget {budget} is below the smallest factorization ({used} weights)."
        )
    while True:
        best, best_gain, best_to = None, 0.0, None
        for name, curve in curves.items():
            i = choice[name]
            for j in range(i + 1, len(curve)):
                extra = curve[j][0] - curve[i][0]
                if extra <= 0:
                    continue
                if used + extra > budget:
                    continue
                gain = (curve[i][1] - curve[j][1]) / extra
                if gain > best_gain:
                    best, best_gain, best_to = name, gain, j
        if best is None:
            break
        used += curves[best][best_to][0] - curves[best][choice[best]][0]
        choice[best] = best_to
    while True:
        fits = [
            name for name, curve in curves.items()
            if choice[name] + 1 < len(curve) and used + curve[choice[name] + 1][0] - curve[choice[name]][0] <= budget
        ]
        if not fits:
            break
        name = min(fits, key=lambda n: curves[n][choice[n]][0] / max(curves[n][-1][0], 1))
        used += curves[name][choice[name] + 1][0] - curves[name][choice[name]][0]
        choice[name] += 1
    return {name: curves[name][i][2] for name, i in choice.items()}
