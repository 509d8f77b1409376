"""Rank rules: the greedy whole-model allocation, the energy rule's cap, argument checks."""

import math

import pytest

torch = pytest.importorskip("torch")

from tensorly_dataaware.torch.ranks import (  # noqa: E402
    allocate_budget,
    dense_params,
    factorized_params,
    ranks_for_energy,
    ranks_for_ratio,
)


def test_a_plateau_does_not_stop_a_layer_from_growing():
    # "flat" has a candidate that costs more without lowering the error (e.g. only the
    # input rank of a Tucker-2 pair grew); the one after it lowers the error a lot. A
    # one-step greedy sees a zero gain there and never upgrades "flat" again.
    curves = {
        "flat": [(10, 1.0, "f0"), (20, 1.0, "f1"), (30, 0.1, "f2")],
        "other": [(10, 1.0, "o0"), (20, 0.9, "o1"), (30, 0.85, "o2")],
    }
    assert allocate_budget(curves, 50) == {"flat": "f2", "other": "o1"}


def test_convex_curves_take_one_step_at_a_time():
    curves = {
        "a": [(1, 1.0, 1), (2, 0.5, 2), (3, 0.3, 3), (4, 0.2, 4)],
        "b": [(1, 1.0, 1), (2, 0.6, 2), (3, 0.45, 3), (4, 0.4, 4)],
    }
    # Gains per parameter: a 0.5, 0.2, 0.1; b 0.4, 0.15, 0.05. Budget 6 = 2 + 4 upgrades:
    # a (0.5), b (0.4), a (0.2), b (0.15).
    assert allocate_budget(curves, 6) == {"a": 3, "b": 3}


def test_budget_below_the_smallest_candidates():
    with pytest.raises(ValueError, match="budget"):
        allocate_budget({"a": [(10, 1.0, 1)]}, 5)


def test_a_layer_without_candidates_is_named():
    # Used to fail with a raw IndexError on curve[0].
    with pytest.raises(ValueError, match="'a'"):
        allocate_budget({"a": [], "b": [(1, 1.0, 1)]}, 100)


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
def test_bool_fractions_are_refused(method):
    # bool is an int subclass: True used to mean ratio (or energy) 1.
    with pytest.raises(TypeError, match="ratio"):
        ranks_for_ratio(method, (16, 8, 3, 3), True)
    with pytest.raises(TypeError, match="energy"):
        ranks_for_energy(method, torch.ones(4, 2, 3, 3, dtype=torch.float64), torch.eye(18, dtype=torch.float64), True)


# Shapes whose full energy rank costs more than the dense layer (from the audit's model):
# a square 3x3 conv (Tucker-2 (16, 16) held 2816 > 2304 weights), a 1x1 conv (SVD rank 16
# held 768 > 512) and a wide linear layer.
CAP_CASES = [(m, s) for s in ((16, 16, 3, 3), (32, 16, 1, 1)) for m in ("tucker2", "cp", "svd")] + [("svd", (10, 300))]


@pytest.mark.parametrize("method, shape", CAP_CASES)
def test_energy_ranks_never_exceed_the_dense_layer(method, shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=gen, dtype=torch.float64)
    n = math.prod(shape[1:])
    sigma = torch.eye(n, dtype=torch.float64)
    for energy in (0.99, 1.0):
        rank = ranks_for_energy(method, weight, sigma, energy)
        assert factorized_params(method, shape, rank) <= dense_params(shape), (energy, rank)
    # A generic weight needs every whitened direction for energy 1: the cap is the rank.
    assert ranks_for_energy(method, weight, sigma, 1.0) == ranks_for_ratio(method, shape, 1.0)


@pytest.mark.parametrize("method", ["tucker2", "svd"])
def test_energy_rank_below_the_cap_keeps_its_meaning(method):
    # W Sigma^{1/2} with known singular values: below the cap the rule still returns the
    # smallest output rank whose energy reaches the target (the whitened SVD at that rank
    # has relative sigma-error <= sqrt(1 - energy)).
    T, S, k = 16, 16, 3
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(T, T, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(S * k * k, T, generator=gen, dtype=torch.float64))
    sv = 0.5 ** torch.arange(T, dtype=torch.float64)
    weight = (u * sv) @ v.T
    sigma = torch.eye(S * k * k, dtype=torch.float64)
    energies = torch.cumsum(sv**2, 0) / (sv**2).sum()
    for energy in (0.9, 0.99, 0.999):  # ranks 2, 4, 5 of 16
        expected = int((energies < energy).sum()) + 1
        rank = ranks_for_energy(method, weight.reshape(T, S, k, k), sigma, energy)
        r_out = rank[0] if method == "tucker2" else rank
        assert r_out == expected < ranks_for_ratio("svd", (T, S, k, k), 1.0)
        if method == "tucker2":
            assert rank[1] == math.ceil(expected / T * S)
        assert float(energies[r_out - 1]) >= energy > float(energies[r_out - 2])
