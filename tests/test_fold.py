"""Tests of tensorly_dataaware.torch.fold (BatchNorm folded into the convolution feeding it)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import deploy, fold_batchnorm, optimize_for_inference  # noqa: E402
from tensorly_dataaware.torch.layers import _FormMixin  # noqa: E402

from ._factorized_models import SmallFactorized, small_input  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _random_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> nn.BatchNorm2d:
    # Statistics far from the identity map, so that a fold that ignored one of them fails.
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 3 + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    return bn


def _batchnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("form", ["chain", "other"])
def test_every_factorized_kind_is_folded_exactly(form):
    model, x = SmallFactorized(), small_input()
    if form == "other":  # cached dense / merged kernels must follow the folded factors
        for module in model.modules():
            if isinstance(module, _FormMixin):
                module.set_form(module.forms[-1])
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, pairs = fold_batchnorm(model, return_pairs=True)
    # One pair per factorized convolution (each is followed by its BatchNorm).
    assert len(pairs) == 6 and all(bn.endswith(str(int(conv.split(".")[-1]) + 1)) for conv, bn in pairs)
    assert _batchnorms(folded) == []
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    # inplace=False: the caller's model keeps its BatchNorms and weights.
    assert len(_batchnorms(model)) == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_plain_convolutions_any_groups_without_bias_float64():
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=False), _random_bn(nn.BatchNorm2d(8), gen), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1, padding_mode="reflect"), _random_bn(nn.BatchNorm2d(8, affine=False), gen),
        nn.Conv2d(8, 6, 1, groups=2, stride=2), _random_bn(nn.BatchNorm2d(6), gen),
    ).double().eval()
    x = torch.randn(3, 4, 9, 9, generator=gen, dtype=torch.float64)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert pairs == [("0", "1"), ("3", "4"), ("5", "6")]
    assert folded[0].bias is not None and folded[0].bias.dtype == torch.float64
    torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-10)


class _Residual(nn.Module):
    """Conv output used twice (BN and the residual), BN after ReLU, a conv called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.used_twice, self.bn_a = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.after_relu, self.bn_b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.shared, self.bn_c = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.ok, self.bn_d = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.no_stats = nn.BatchNorm2d(3, track_running_stats=False)
        self.ok2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.used_twice(x)
        x = self.bn_a(y) + y
        x = self.bn_b(torch.relu(self.after_relu(x)))
        x = self.bn_c(self.shared(self.shared(x)))
        x = self.bn_d(self.ok(x))
        return self.no_stats(self.ok2(x))


def test_only_safe_pairs_are_folded():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the convolutions' default initialization
    net = _Residual()
    for name in ("bn_a", "bn_b", "bn_c", "bn_d"):
        _random_bn(getattr(net, name), gen)
    net.eval()
    x = torch.randn(2, 3, 6, 6, generator=gen)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert pairs == [("ok", "bn_d")]
    assert isinstance(folded.bn_a, nn.BatchNorm2d) and isinstance(folded.bn_c, nn.BatchNorm2d)
    # The last BatchNorm (left alone, see `pairs`) normalizes by batch statistics, which
    # amplify rounding differences: compare the outputs without it.
    folded.no_stats, net.no_stats = nn.Identity(), nn.Identity()
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_non_finite_statistics_are_left_alone_and_train_mode_becomes_eval():
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), _random_bn(nn.BatchNorm2d(4), gen), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        net[3].running_var[0] = float("nan")
    net.train()
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert pairs == [("0", "1")] and not folded.training and net.training


def test_untraceable_model_raises_and_optimize_warns():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    net, x = Branchy().eval(), small_input()
    with pytest.raises(ValueError, match="torch.fx cannot trace Branchy"):
        fold_batchnorm(net)
    with pytest.warns(RuntimeWarning, match="BatchNorm not folded"):
        fast = optimize_for_inference(net, x, repeats=1)
    torch.testing.assert_close(fast(x), net(x))
    with pytest.raises(TypeError, match="model"):
        fold_batchnorm("net")


def test_optimize_for_inference_folds_and_reports(monkeypatch):
    model, x = SmallFactorized(), small_input()

    def fake(calls, repeats, warmup=1):  # any configuration but the model as given wins
        for fn in calls.values():
            fn()
        return {key: [9.0 if key == "as given" else 1.0] * repeats for key in calls}

    monkeypatch.setattr(deploy, "time_interleaved", fake)
    fast, report = optimize_for_inference(model, x, repeats=2, return_report=True)
    assert len(report.folded_batchnorm) == 6 and _batchnorms(fast) == []
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    kept, report = optimize_for_inference(model, x, repeats=2, return_report=True, fold_bn=False)
    assert report.folded_batchnorm == [] and len(_batchnorms(kept)) == 6
    # A model without factorized layers is accepted (the fair baseline: fold + layout only).
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval()
    fast, report = optimize_for_inference(plain, x, repeats=2, return_report=True)
    assert report.layers == [] and report.folded_batchnorm == [["0", "1"]]
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_folded_model_scripts_and_matches():
    model, x = SmallFactorized(), small_input()
    folded = fold_batchnorm(copy.deepcopy(model))
    scripted = torch.jit.script(folded)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


class _Tied(nn.Module):
    """Two conv -> BatchNorm pairs, ``second`` first in the graph, with tensors shared as ``tie`` says."""

    def __init__(self, tie: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        torch.manual_seed(3)  # the convolutions' default initialization
        self.second, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), _random_bn(nn.BatchNorm2d(4), gen)
        self.first, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), _random_bn(nn.BatchNorm2d(4), gen)
        self.other = nn.Conv2d(4, 4, 3, padding=1)
        if tie == "weight":  # the audit's case: another convolution (no BatchNorm) uses it
            self.other.weight = self.first.weight
        elif tie == "storage":  # two Parameters over one memory
            self.other.weight = nn.Parameter(self.first.weight.data)
        elif tie == "bias_is_bn_bias":  # folding `second` first would change bn1 before its fold
            self.second.bias = self.bn1.bias
        elif tie == "bn":  # BatchNorms sharing their affine parameters: only read, folding is fine
            self.bn2.weight, self.bn2.bias = self.bn1.weight, self.bn1.bias

    def forward(self, x):
        x = torch.relu(self.bn2(self.second(x)))
        return self.other(torch.relu(self.bn1(self.first(x))))


@pytest.mark.parametrize("tie,inplace,expected_pairs", [
    ("weight", False, [("second", "bn2")]),
    ("storage", True, [("second", "bn2")]),
    # A deep copy gives the two Parameters a memory each: `first` can then be folded.
    ("storage", False, [("second", "bn2"), ("first", "bn1")]),
    ("bias_is_bn_bias", False, [("first", "bn1")]),
    ("bn", False, [("second", "bn2"), ("first", "bn1")]),
])
def test_shared_parameters_are_never_changed(tie, inplace, expected_pairs):
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = _Tied(tie).eval()(x)
    folded, pairs = fold_batchnorm(_Tied(tie).eval(), inplace=inplace, return_pairs=True)
    assert pairs == expected_pairs
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    # optimize_for_inference folds by default: the same output, and the same pairs reported.
    fast, report = optimize_for_inference(
        _Tied(tie).eval(), x, repeats=1, memory_formats="contiguous", inplace=inplace, return_report=True
    )
    assert report.folded_batchnorm in ([], [list(pair) for pair in expected_pairs])  # [] if "as given" won
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_subclasses_are_traced_as_leaves():
    """fx traced into a BatchNorm2d subclass, whose `if self.training` is control flow: a model
    with even an empty subclass could not be folded at all. A subclass that keeps the forward
    is folded; one with its own forward is left alone (it may compute something else)."""

    class Plain(nn.BatchNorm2d):
        pass

    class Own(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), Plain(4), nn.ReLU(), nn.Conv2d(4, 4, 3), Own(4)).eval()
    for bn in (net[1], net[4]):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert pairs == [("0", "1")]
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-6)
