"""allocate_budget: the greedy whole-model allocation."""

import pytest

pytest.importorskip("torch")

from tensorly_dataaware.torch.ranks import allocate_budget  # noqa: E402


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
