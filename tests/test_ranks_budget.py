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


def test_a_saturated_estimate_does_not_leave_the_budget_unspent():
    """The whitened output tail of a CP rank is 0 from the output size on, so the greedy
    stopped there: CP budget=0.9 kept 24% of the weights. What the estimate cannot use is now
    spread over the layers (the smallest fraction of its largest candidate first)."""
    curves = {
        "a": [(10, 0.5, 1), (20, 0.0, 2), (30, 0.0, 3), (40, 0.0, 4)],
        "b": [(10, 0.4, 1), (20, 0.0, 2), (30, 0.0, 3), (40, 0.0, 4)],
    }
    assert allocate_budget(curves, 40) == {"a": 2, "b": 2}
    assert allocate_budget(curves, 70) == {"a": 4, "b": 3}
    from torch import nn

    from tensorly_dataaware.torch import collect_covariances, compress

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    stats = collect_covariances(net, [torch.randn(16, 16, 8, 8)], progress=False)
    _, report = compress(net, stats, "cp", budget=0.9, progress=False, return_report=True, n_iter_max=2)
    kept = sum(r.params_after for r in report) / sum(r.params_before for r in report)
    assert 0.85 < kept <= 0.9


def test_small_budgets_can_use_rank_one_and_exact_fits_fit():
    """Each layer's smallest budget candidate was its 2% rank, which refused budgets that
    rank-1 layers fit; floating point (0.58 * 100 = 57.99...) refused ranks that fit
    exactly; energy=1.0 on a rank-deficient covariance kept round-off eigenvalues."""
    from tensorly_dataaware.torch.compress import _budget_ranks

    shape = (64, 64, 3, 3)
    prepared = [(name, None, "tucker2", torch.randn(*shape, dtype=torch.float64), torch.eye(576, dtype=torch.float64))
                for name in ("a", "b")]
    ranks = _budget_ranks(prepared, 0.01)
    assert sum(factorized_params("tucker2", shape, r) for r in ranks.values()) <= 0.01 * 2 * dense_params(shape)
    assert ranks_for_ratio("svd", (4, 25), 0.58) == 2
    assert ranks_for_ratio("cp", (10, 32, 3, 3), 0.35) == 21
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 144, generator=gen, dtype=torch.float64)
    weight = torch.randn(16, 16, 3, 3, generator=gen, dtype=torch.float64)
    sigma = x.T @ x / 200
    assert ranks_for_energy("svd", weight, sigma, 1.0) == 2
    assert ranks_for_energy("tucker2", weight, sigma, 1.0) == (2, 2)


def test_explicit_ranks_that_leave_too_little_budget_are_named():
    from torch import nn

    from tensorly_dataaware.torch import collect_covariances, plan_compression

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 6))
    stats = collect_covariances(net, [torch.randn(8, 3, 8, 8)], progress=False)
    total = sum(dense_params(tuple(net[i].weight.shape)) for i in (0, 1, 3))
    fc = factorized_params("svd", (6, 512), 6)
    budget = (fc + 20) / total  # 20 weights left for two convolutions
    with pytest.raises(ValueError, match="explicit `ranks` use .* left are below the smallest factorization"):
        plan_compression(net, stats, "tucker2", ranks={"3": 6}, budget=budget)
    with pytest.raises(ValueError, match="names a layer twice"):
        plan_compression(net, stats, "tucker2", ratio=0.5, layers=["1", "1"])
