"""Tests of tensorly_dataaware.torch.deploy (choosing the fastest equivalent layer forms)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tensorly_dataaware.torch import deploy  # noqa: E402
from tensorly_dataaware.torch.serialization import compression_spec  # noqa: E402
from tensorly_dataaware.torch.deploy import format_deploy_report, optimize_for_inference  # noqa: E402
from tensorly_dataaware.torch.layers import CPConv2d, Tucker2Conv2d, build_from_spec  # noqa: E402

from ._factorized_models import SmallFactorized, small_input  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _forms(model):
    return {name: m.form for name, m in model.named_modules() if hasattr(m, "set_form")}


def test_optimized_model_is_equivalent_and_input_untouched():
    model, x = SmallFactorized(), small_input()
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast, report = optimize_for_inference(model, x, threads=1, repeats=2, return_report=True)
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    assert report.max_rel_diff < 1e-4
    # The caller's model is not modified (inplace=False): same forms, weights and layout.
    assert set(_forms(model).values()) == {"chain"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous()
    assert [row.name for row in report.layers] == list(_forms(model))
    assert report.memory_format in ("contiguous", "channels_last")
    assert set(report.configurations_ms) <= {
        "as given", "contiguous", "channels_last", "contiguous, all dense", "channels_last, all dense"
    }
    assert {"as given", "contiguous", "channels_last"} <= set(report.configurations_ms)
    for row in report.layers:
        assert row.form_before == "chain" and row.ms_before > 0 and row.ms_after > 0 and row.params > 0
        assert row.macs_after > 0
    text = format_deploy_report(report)
    assert "whole model" in text and "features.1" in text


def test_selection_follows_the_measurements(monkeypatch):
    """With fake timings in which one form always wins, every layer takes that form."""
    model, x = SmallFactorized(), small_input()

    def fake(calls, repeats, warmup=1):
        for fn in calls.values():
            fn()
        speed = {"dense": 1.0, "merged": 2.0, "chain": 3.0, "as given": 9.0, "contiguous": 5.0, "channels_last": 4.0}
        return {key: [speed.get(key, 1.0)] * repeats for key in calls}

    monkeypatch.setattr(deploy, "time_interleaved", fake)
    fast = optimize_for_inference(model, x, repeats=3, max_macs_ratio=float("inf"))
    assert set(_forms(fast).values()) == {"dense"}
    weight = fast.features[1].core.weight  # 3x3: the layout is visible
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    # Without 'dense' among the candidates, CP and Tucker-2 take 'merged', the others stay chains.
    fast = optimize_for_inference(model, x, repeats=3, candidates=("chain", "merged"), memory_formats="contiguous")
    forms = _forms(fast)
    has_merged = {n for n, m in fast.named_modules() if isinstance(m, (CPConv2d, Tucker2Conv2d))}
    assert len(has_merged) == 4 and {forms[n] for n in has_merged} == {"merged"}
    assert {f for n, f in forms.items() if n not in has_merged} == {"chain"}
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_cost_model_prunes_expensive_forms(monkeypatch):
    model, x = SmallFactorized(), small_input()
    seen = []

    def record(calls, repeats, warmup=1):
        seen.append(set(calls))
        return {key: [1.0] * repeats for key in calls}

    monkeypatch.setattr(deploy, "time_interleaved", record)
    monkeypatch.setattr(deploy, "_PRUNE_MIN_MACS", 0)  # the test layers are tiny
    optimize_for_inference(model, x, repeats=1, max_macs_ratio=1.0, memory_formats="contiguous")
    # With ratio 1 only forms as cheap as the cheapest are timed: never the dense kernel of the
    # convolutions here, but the head's (rank 3 of a 5 x 6 matrix: dense is the cheaper one).
    *convs, head, whole = seen
    assert all("dense" not in keys for keys in convs) and len(convs) == 6
    assert head == {"chain", "dense"} and whole == {"as given", "contiguous", "contiguous, all dense"}


def test_forms_survive_spec_round_trip():
    model, x = SmallFactorized(), small_input()
    # BatchNorm folding would change the state_dict's keys (tested in test_fold.py).
    fast = optimize_for_inference(model, x, repeats=1, memory_formats="contiguous", fold_bn=False)
    for name, module in fast.named_modules():
        if hasattr(module, "set_form"):
            module.set_form(module.forms[-1])  # a non-chain form everywhere
    fresh = SmallFactorized(seed=3)
    for name, spec in compression_spec(fast).items():
        parent, _, child = name.rpartition(".")
        setattr(fresh.get_submodule(parent) if parent else fresh, child, build_from_spec(spec))
    fresh.load_state_dict(fast.state_dict())
    assert _forms(fresh) == _forms(fast)
    torch.testing.assert_close(fresh.eval()(x), fast(x), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    model, x = SmallFactorized(), small_input()
    with pytest.raises(TypeError, match="model"):
        optimize_for_inference("model", x)
    with pytest.raises(TypeError, match="example_input"):
        optimize_for_inference(model, x.numpy())
    with pytest.raises(ValueError, match="threads"):
        optimize_for_inference(model, x, threads=0)
    with pytest.raises(ValueError, match="candidates"):
        optimize_for_inference(model, x, candidates=("dense",))
    with pytest.raises(ValueError, match="memory_formats"):
        optimize_for_inference(model, x, memory_formats=("nhwc",))
    with pytest.raises(ValueError, match="repeats"):
        optimize_for_inference(model, x, repeats=0)
    with pytest.raises(ValueError, match="max_macs_ratio"):
        optimize_for_inference(model, x, max_macs_ratio=0.5)
    with pytest.raises(TypeError, match="fold_bn"):
        optimize_for_inference(model, x, fold_bn="yes")


def test_time_interleaved_loops_fast_calls_within_a_sample():
    import time

    counts = {"fast": 0, "slow": 0}

    def fast():
        counts["fast"] += 1

    def slow():
        counts["slow"] += 1
        time.sleep(0.004)

    times = deploy.time_interleaved({"fast": fast, "slow": slow}, repeats=3, min_sample_ms=2.0)
    assert [len(t) for t in times.values()] == [3, 3]
    # warm-up + estimate + 3 samples of one call each for the slow one; many per sample for the fast one.
    assert counts["slow"] == 5 and counts["fast"] > 5 * 3
    assert min(times["slow"]) >= 4.0 and max(times["fast"]) < 1.0


def test_cached_kernels_follow_the_layout():
    """A form's kernel must be in the model's layout, or oneDNN reorders it at every call."""
    model = SmallFactorized().to(memory_format=torch.channels_last)
    tucker, cp = model.features[1], model.features[4]  # Tucker-2 and CP layers
    cl = torch.channels_last
    # Tucker-2's core tells the layout, so set_form after the conversion follows it ...
    kernel = tucker.set_form("dense")._form_weight
    assert kernel.is_contiguous(memory_format=cl) and not kernel.is_contiguous()
    # ... CP's factors (1x1 and depthwise) do not: the pass converts after choosing a form.
    assert isinstance(cp, CPConv2d)
    for form in ("merged", "dense"):
        variant = deploy._apply(cp, {"": form}, "channels_last")
        kernel = variant._form_weight
        assert kernel.is_contiguous(memory_format=cl) and (form == "merged" or not kernel.is_contiguous())


def test_all_dense_configuration_competes_as_a_whole(monkeypatch):
    """Per-layer winners that lose together: the all-dense configuration is taken."""
    model, x = SmallFactorized(), small_input()

    def fake(calls, repeats, warmup=1):
        for fn in calls.values():
            fn()
        speed = {"chain": 1.0, "merged": 2.0, "dense": 3.0, "as given": 9.0, "contiguous": 8.0,
                 "contiguous, all dense": 7.0}
        return {key: [speed.get(key, 1.0)] * repeats for key in calls}

    monkeypatch.setattr(deploy, "time_interleaved", fake)
    fast, report = optimize_for_inference(model, x, repeats=2, memory_formats="contiguous", return_report=True)
    assert set(_forms(fast).values()) == {"dense"} and report.memory_format == "contiguous"
    assert report.configurations_ms["contiguous, all dense"] == report.ms_after == 7.0
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


class _TwoOutputs(torch.nn.Module):
    """SmallFactorized returning ``(logits, {"features": ...})``, or ``(logits, None)``."""

    def __init__(self, with_none: bool = False) -> None:
        super().__init__()
        self.body, self.with_none = SmallFactorized(), with_none

    def forward(self, x):
        features = self.body.features(x)
        logits = self.body.head(torch.flatten(self.body.pool(features), 1))
        return logits, (None if self.with_none else {"features": features * 1e3})


def test_nested_outputs_are_compared_tensor_by_tensor(monkeypatch):
    model, x = _TwoOutputs(), small_input()
    fast, report = optimize_for_inference(model, x, repeats=1, memory_formats="contiguous", return_report=True)
    with torch.no_grad():
        (logits, aux), (want_logits, want_aux) = fast(x), model(x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux["features"], want_aux["features"], rtol=1e-4, atol=1e-2)
    # Each tensor relative to its own scale: the features (x 1e3) do not hide the logits.
    assert report.max_abs_diff >= float((logits - want_logits).abs().max())
    assert 0 <= report.max_rel_diff < 1e-4
    # An output that cannot be compared fails on the first forward pass, before any timing.
    def no_timing(*args, **kwargs):
        raise AssertionError("timed")

    monkeypatch.setattr(deploy, "time_interleaved", no_timing)
    with pytest.raises(TypeError, match=r"output\[1\] has type NoneType"):
        optimize_for_inference(_TwoOutputs(with_none=True), x, repeats=1)


def test_a_layout_the_model_cannot_run_in_is_skipped():
    """`x.view(n, -1)` after a convolution fails on channels_last activations: the default
    layouts made optimize_for_inference crash on such models."""
    import torch.nn.functional as F
    from torch import nn

    from tensorly_dataaware.torch import collect_covariances, compress

    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 9 * 9, 5)

        def forward(self, x):
            return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).view(x.size(0), -1))

    torch.manual_seed(0)
    net = ViewNet().eval()
    stats = collect_covariances(net, [torch.randn(4, 3, 9, 9)], layers=["c2"], progress=False)
    small = compress(net, stats, "tucker2", ratio=0.5, progress=False, n_iter_max=3)
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(RuntimeWarning, match="channels_last layout is skipped"):
        fast, report = optimize_for_inference(small, x, repeats=1, return_report=True)
    assert report.memory_format == "contiguous"
    torch.testing.assert_close(fast(x), small(x), rtol=1e-5, atol=1e-6)
