"""The PyTorch adapter end to end: statistics -> decomposition -> factorized modules."""

import copy
import warnings

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

from tensorly_dataaware import relative_sigma_error
from tensorly_dataaware.torch import (
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    collect_covariances,
    compress,
    compress_sequential,
    format_report,
    load_compressed,
    ranks_for_ratio,
    save_compressed,
)
from tensorly_dataaware.torch.ranks import allocate_budget, factorized_params


# Tiny float64 tensors: one thread (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("torch_single_thread")


class ConvZoo(nn.Module):
    """Conv layers in many configurations, each fed by the previous one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.b = nn.Conv2d(8, 10, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.c = nn.Conv2d(10, 12, (3, 1), padding=(2, 0), dilation=(2, 1), padding_mode="circular")
        self.d = nn.Conv2d(12, 12, (1, 3), padding="same", padding_mode="replicate")
        self.e = nn.Conv2d(12, 9, 1)
        self.g = nn.Conv2d(9, 9, 3, padding=1, groups=3)
        self.fc = nn.Linear(9, 5)

    def forward(self, x):
        for layer in (self.a, self.b, self.c, self.d, self.e, self.g):
            x = torch.relu(layer(x))
        return self.fc(x.mean(dim=(2, 3)))


def _batches(n=6, size=10, seed=0, channels=3):
    gen = torch.Generator().manual_seed(seed)
    # Smooth, correlated, non-centred inputs, like images.
    out = []
    for _ in range(n):
        x = torch.randn(8, channels, size, size, generator=gen, dtype=torch.float64)
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) + 0.5
        out.append(x)
    return out


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    model = ConvZoo().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = collect_covariances(model, _batches(), progress=False)
    return model, stats


SUPPORTED = ["a", "b", "c", "d", "e", "fc"]


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
@pytest.mark.parametrize("norm", ["sigma", "frobenius"])
def test_replaced_layers_compute_their_approximation(zoo, method, norm):
    model, stats = zoo
    small, report = compress(
        model, stats, method, ratio=0.5, norm=norm, layers=SUPPORTED, progress=False,
        return_report=True, n_iter_max=15, random_state=0,
    )
    x = _batches(1, seed=5)[0]
    names = dict(small.named_modules())
    expected = {
        "tucker2": Tucker2Conv2d, "cp": CPConv2d, "svd": LowRankConv2d,
    }[method]
    for name in ["a", "b", "c", "d"]:
        assert isinstance(names[name], expected if tuple(getattr(model, name).kernel_size) != (1, 1) else LowRankConv2d)
    assert isinstance(names["e"], LowRankConv2d) and isinstance(names["fc"], LowRankLinear)
    # Every factorized module equals the dense op with its approximated weight, for the
    # layer's own stride / padding / padding_mode / dilation.
    inputs = {}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n in SUPPORTED]
    model(x)
    for h in hooks:
        h.remove()
    for name in SUPPORTED:
        orig, new = getattr(model, name), names[name]
        w = new.weight_approx()
        bias = new.last.bias
        if isinstance(orig, nn.Linear):
            ref = F.linear(inputs[name], w.reshape(orig.weight.shape), bias)
        else:
            ref = getattr(orig, "_conv_forward")(inputs[name], w.reshape(orig.weight.shape), bias)
        torch.testing.assert_close(new(inputs[name]), ref, rtol=1e-9, atol=1e-9)
    rows = {r.name: r for r in report}
    assert set(rows) == set(SUPPORTED)
    for r in report:
        assert r.params_after <= 0.5 * r.params_before or r.rank in (1, (1, 1))
        assert 0 <= r.sigma_error < 1.0
    assert "total" in format_report(report)


def test_original_untouched_unless_inplace(zoo):
    model, stats = zoo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compress(model, stats, "tucker2", ratio=0.4, layers=["a", "b"], progress=False, n_iter_max=3)
    assert small is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert type(model.a) is nn.Conv2d
    clone = ConvZoo().double()
    clone.load_state_dict(model.state_dict())
    same = compress(clone, stats, "tucker2", ratio=0.4, layers=["a"], progress=False, inplace=True, n_iter_max=3)
    assert same is clone and isinstance(clone.a, Tucker2Conv2d)


def test_bias_correction_makes_centred_objective_exact(zoo):
    """With the centred covariance and corrected bias, the layer's mean squared output change
    on the calibration data equals the sigma-norm of W - W~, and the mean output is kept."""
    model, stats = zoo
    small = compress(model, stats, "tucker2", ranks={"b": (3, 2)}, layers=["b"], damping=0.0, progress=False)
    xs = []
    hook = model.b.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    for x in _batches():
        model(x)
    hook.remove()
    x = torch.cat(xs)
    y, y_new = model.b(x), small.b(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), y_new.mean(dim=(0, 2, 3)), rtol=1e-8, atol=1e-10)
    mse = ((y - y_new) ** 2).sum(dim=1).mean()
    W = model.b.weight.detach()
    D = (W - small.b.weight_approx()).reshape(W.shape[0], -1)
    sigma = stats["b"].sigma(True)
    assert float(mse) == pytest.approx(float(torch.sum(D * (D @ sigma)).detach()), rel=1e-8)
    # Without the correction the mean output shifts.
    raw = compress(model, stats, "tucker2", ranks={"b": (3, 2)}, layers=["b"], bias_correction=False, progress=False)
    assert not torch.allclose(y.mean(dim=(0, 2, 3)), raw.b(x).mean(dim=(0, 2, 3)), atol=1e-6)


def test_white_noise_covariance_gives_frobenius_solution():
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(6, 8, 3, padding=0, bias=False)).double()
    gen = torch.Generator().manual_seed(2)
    noise = [torch.randn(64, 6, 12, 12, generator=gen, dtype=torch.float64) for _ in range(8)]
    stats = collect_covariances(conv, noise, progress=False)
    W = conv[0].weight.detach()
    for method, rank in (("svd", 3), ("tucker2", (4, 3))):
        a = compress(conv, stats, method, ranks={"0": rank}, progress=False, centered=False, bias_correction=False)
        b = compress(conv, stats, method, ranks={"0": rank}, norm="frobenius", progress=False)
        ea = torch.linalg.norm(W - a[0].weight_approx()) / torch.linalg.norm(W)
        eb = torch.linalg.norm(W - b[0].weight_approx()) / torch.linalg.norm(W)
        # The sample covariance of white noise is I up to O(1/sqrt(samples)) fluctuations.
        assert float(ea) == pytest.approx(float(eb), rel=2e-2)


def test_sigma_beats_frobenius_on_real_statistics(zoo):
    model, stats = zoo
    _, rep_s = compress(model, stats, "tucker2", ratio=0.3, layers=["b", "c"], progress=False, return_report=True)
    _, rep_f = compress(model, stats, "tucker2", ratio=0.3, layers=["b", "c"], norm="frobenius", progress=False, return_report=True)
    for s, f in zip(rep_s, rep_f):
        assert s.sigma_error < f.sigma_error


def test_save_load_round_trip(zoo, tmp_path):
    model, stats = zoo
    small = compress(model, stats, "cp", ratio=0.5, layers=SUPPORTED, progress=False, n_iter_max=5)
    path = tmp_path / "small.pt"
    save_compressed(small, path)
    fresh = load_compressed(ConvZoo().double(), path)
    x = _batches(1, seed=9)[0]
    torch.testing.assert_close(fresh(x), small(x))
    assert not list(tmp_path.glob(".tmp-*"))


def test_unsupported_and_bad_arguments(zoo):
    model, stats = zoo
    with pytest.warns(UserWarning, match="grouped"):
        compress(model, stats, "svd", ratio=0.9, progress=False)
    with pytest.raises(ValueError, match="grouped"):
        compress(model, stats, "tucker2", ratio=0.5, layers=["g"], progress=False)
    with pytest.raises(ValueError, match="method"):
        compress(model, stats, "qr", ratio=0.5, layers=["a"])
    with pytest.raises(ValueError, match="norm"):
        compress(model, stats, ratio=0.5, layers=["a"], norm="l1")
    with pytest.raises(ValueError, match="ratio"):
        compress(model, stats, ratio=1.5, layers=["a"])
    with pytest.raises(ValueError, match="at most one"):
        compress(model, stats, ratio=0.5, energy=0.9, layers=["a"])
    with pytest.raises(ValueError, match="ranks"):
        compress(model, stats, layers=["a"])
    with pytest.raises(ValueError, match="not a module"):
        compress(model, stats, ratio=0.5, layers=["nope"])
    other = {"a": stats["b"]}
    with pytest.raises(ValueError, match="shape"):
        compress(model, other, ratio=0.5, layers=["a"])
    with pytest.raises(ValueError):
        compress(model, stats, ranks={"a": (9, 2)}, layers=["a"], progress=False)


class _LoRALinear(nn.Linear):
    """A Linear subclass whose output is not W x + b (a low-rank update on top)."""

    def __init__(self, n_in, n_out, rank=2):
        super().__init__(n_in, n_out, dtype=torch.float64)
        self.down = nn.Parameter(torch.randn(rank, n_in, dtype=torch.float64))
        self.up = nn.Parameter(torch.randn(n_out, rank, dtype=torch.float64))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


class _InitLinear(nn.Linear):
    """A Linear subclass that only changes the initialization: the same computation."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.1)
        nn.init.zeros_(self.bias)


@pytest.mark.parametrize("sequential", [False, True], ids=["one-shot", "sequential"])
def test_linear_subclass_overriding_forward_is_kept_dense(sequential):
    """A Linear subclass with its own forward is not replaced by a factorization of its raw
    weight (that silently dropped its update): kept dense with the reason by default, an
    error when named. A subclass with nn.Linear's forward is compressed as usual."""
    from tensorly_dataaware.torch import compress_sequential

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12, dtype=torch.float64), nn.ReLU(), _LoRALinear(12, 12), nn.ReLU(),
                          _InitLinear(12, 6, dtype=torch.float64)).eval()
    batches = [torch.randn(40, 8, dtype=torch.float64) for _ in range(2)]
    run = (lambda **kw: compress_sequential(model, batches, "svd", progress=False, return_report=True, **kw)) \
        if sequential else \
        (lambda **kw: compress(model, collect_covariances(model, batches, progress=False), "svd", progress=False,
                               return_report=True, **kw))
    with pytest.warns(UserWarning, match="_LoRALinear overrides nn.Linear.forward"):
        small, report = run(ratio=0.5)
    rows = {row.name: row for row in report}
    assert rows["2"].method == "dense" and "overrides nn.Linear.forward" in rows["2"].notes[0]
    assert small[2] is not model[2] and type(small[2]) is _LoRALinear  # a copy, kept as it is
    assert rows["4"].method == "svd" and not isinstance(small[4], _InitLinear)
    with pytest.raises(ValueError, match="overrides nn.Linear.forward"):
        run(ratio=0.5, layers=["2"])


class _InitConv2d(nn.Conv2d):
    """A Conv2d subclass that only changes the initialization: the same computation."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.2)
        nn.init.zeros_(self.bias)


class _CenteredConv2d(nn.Conv2d):
    """A Conv2d subclass whose output is not the convolution with its weight."""

    def forward(self, x):
        return self._conv_forward(x, self.weight - self.weight.mean((1, 2, 3), keepdim=True), self.bias)


def test_conv2d_subclasses_compressed_only_when_they_compute_a_convolution(tmp_path):
    """Parametrized (weight-normalized) and initialization-only Conv2d subclasses are
    compressed like nn.Conv2d (full ranks reproduce the output; save/load round trip on a
    fresh model); a subclass that overrides forward is kept dense with the reason."""
    from torch.nn.utils import parametrizations

    from tensorly_dataaware.torch import load_compressed, save_compressed

    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64)), nn.ReLU(),
            _InitConv2d(8, 8, 3, padding=1, padding_mode="reflect", dtype=torch.float64), nn.ReLU(),
            _CenteredConv2d(8, 8, 3, padding=1, dtype=torch.float64),
        ).eval()

    model = make()
    batches = [torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = collect_covariances(model, batches, progress=False)
    with pytest.warns(UserWarning, match="_CenteredConv2d overrides nn.Conv2d.forward"):
        small, report = compress(model, stats, "tucker2", ranks={"0": (8, 3), "2": (8, 8)}, return_report=True,
                                 progress=False)
    assert [row.method for row in report] == ["tucker2", "tucker2", "dense"]
    x = batches[0]
    torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-10)
    save_compressed(small, tmp_path / "small.pt")
    torch.testing.assert_close(load_compressed(make(), tmp_path / "small.pt")(x), small(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="overrides nn.Conv2d.forward"):
        compress(model, stats, "tucker2", ratio=0.5, layers=["4"], progress=False)


def test_rank_rules(zoo):
    model, stats = zoo
    for method, shape in (("tucker2", (64, 32, 3, 3)), ("cp", (64, 32, 3, 3)), ("svd", (10, 40))):
        for ratio in (0.05, 0.2, 0.5):
            rank = ranks_for_ratio(method, shape, ratio)
            # Rank 1 is the floor even when it exceeds the ratio (documented).
            assert factorized_params(method, shape, rank) <= ratio * np.prod(shape) or rank in (1, (1, 1))
            bigger = (rank[0] + 1, rank[1] + 1) if isinstance(rank, tuple) else rank + 1
            assert factorized_params(method, shape, bigger) > ratio * np.prod(shape)
    small, rep = compress(model, stats, "tucker2", budget=0.3, layers=SUPPORTED, progress=False, return_report=True, n_iter_max=3)
    assert sum(r.params_after for r in rep) <= 0.3 * sum(r.params_before for r in rep)
    _, rep = compress(model, stats, "svd", energy=1.0, layers=["fc"], progress=False, return_report=True)
    # Full rank (5) would cost 70 weights against the dense 45: energy ranks are capped at
    # the dense layer's size (ratio 1.0).
    assert rep[0].rank == ranks_for_ratio("svd", (5, 9), 1.0) == 3 and rep[0].params_after <= rep[0].params_before
    curves = {"x": [(1, 1.0, 1), (3, 0.2, 2)], "y": [(1, 1.0, 1), (3, 0.9, 2)]}
    assert allocate_budget(curves, 4) == {"x": 2, "y": 1}
    with pytest.raises(ValueError, match="budget"):
        allocate_budget(curves, 1)


def test_explicit_ranks_are_kept_under_a_budget(zoo):
    """``ranks`` for some layers and ``budget`` for the model: those layers keep their ranks
    (the budget used to overwrite them) and their parameters count against the budget;
    ranks that leave nothing for the other layers are refused."""
    from tensorly_dataaware.torch import plan_compression

    model, stats = zoo
    jobs = plan_compression(model, stats, "tucker2", ranks={"a": (2, 1)}, budget=0.3, layers=SUPPORTED)
    by_name = {job.name: job for job in jobs}
    assert by_name["a"].rank == (2, 1)
    dense = sum(int(np.prod(job.weight.shape)) for job in jobs)
    assert sum(factorized_params(job.method, tuple(job.weight.shape), job.rank) for job in jobs) <= 0.3 * dense
    # The other layers get what the budget allocation gives them without "a" in it.
    alone = plan_compression(model, stats, "tucker2", budget=0.3, layers=SUPPORTED)
    assert {job.name: job.rank for job in alone}["a"] != (2, 1)
    with pytest.raises(ValueError, match="nothing is left"):
        plan_compression(model, stats, "tucker2", ranks={"fc": 5, "e": (9, 12)}, budget=0.05, layers=SUPPORTED)
    # A budget that rounds to no parameter at all, without explicit ranks, is about the
    # budget (the message blamed "the explicit `ranks`", which were not given).
    with pytest.raises(ValueError, match="below the smallest factorization: give a larger `budget`"):
        plan_compression(model, stats, "tucker2", budget=1e-6, layers=SUPPORTED)


def test_a_layer_registered_under_two_names_is_replaced_under_both():
    """``named_modules()`` lists a module registered twice under its first name only; the
    forward pass here uses the other one, which kept running the dense layer while the
    report said it was compressed. At full rank the output is unchanged."""

    from ._factorized_models import SharedStem

    torch.manual_seed(0)
    model = SharedStem(6, 6).double().eval()
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    stats = collect_covariances(model, [x], progress=False)
    small = compress(model, stats, "tucker2", ranks={"stem": (6, 6), "layers.1": (6, 6)}, progress=False,
                     n_iter_max=5)
    assert isinstance(small.layers[0], Tucker2Conv2d) and small.layers[0] is small.stem
    assert isinstance(model.layers[0], nn.Conv2d) and model.layers[0] is model.stem  # the original is untouched
    torch.testing.assert_close(small(x), model(x), rtol=1e-8, atol=1e-8)


def test_statistics_of_a_layer_with_other_settings_are_refused():
    """Statistics carry the layer's settings: those of a layer with the same weight shape
    but another padding / dilation / padding mode are for other patches and are refused
    (they used to be accepted silently)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    base = nn.Sequential(nn.Conv2d(3, 8, 3)).double()
    stats = collect_covariances(base, [x], progress=False)
    for other in (dict(padding=2, dilation=2), dict(padding=1, padding_mode="circular"), dict(stride=2)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, **other)).double()
        model.load_state_dict(base.state_dict())
        with pytest.raises(ValueError, match="collected on a layer with other settings"):
            compress(model, stats, "tucker2", ranks={"0": (4, 2)}, progress=False)
    compress(base, stats, "tucker2", ranks={"0": (4, 2)}, progress=False, n_iter_max=2)  # its own: fine


def test_compress_leaves_the_rng_and_frozen_layers_as_they_were(zoo):
    """compress draws nothing from the global RNG (the factorized modules' constructors did),
    and a frozen layer gives frozen factors (new Parameters are trainable by default)."""
    model, stats = zoo
    frozen = copy.deepcopy(model).requires_grad_(False)
    state = torch.get_rng_state()
    small = compress(frozen, stats, "tucker2", ratio=0.5, layers=["a", "fc"], progress=False, n_iter_max=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(p.requires_grad for p in small.parameters())
    trainable = compress(model, stats, "svd", ratio=0.5, layers=["fc"], progress=False)
    assert all(p.requires_grad for p in trainable.fc.parameters())


def test_decomposition_error_matches_report(zoo):
    model, stats = zoo
    small, rep = compress(model, stats, "tucker2", ratio=0.3, layers=["c"], progress=False, return_report=True, damping=0.0)
    W = model.c.weight.detach()
    with tl.backend_context("pytorch"):
        err = relative_sigma_error(W, small.c.weight_approx(), stats["c"].sigma(True))
    assert err == pytest.approx(rep[0].sigma_error, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(ratio=0.5, ranks={"typo": (2, 2)}), ValueError, "typo"),
        (dict(ratio=0.5, layers=[]), ValueError, "empty"),
        (dict(ratio=True), TypeError, "ratio"),
        (dict(energy="0.5"), TypeError, "energy"),
        (dict(ranks={"c": 0.5}, layers=["c"]), TypeError, r"ranks\['c'\]"),
        (dict(ranks={"c": (2, 2)}, layers=["c"], method="cp"), TypeError, "pair"),
        (dict(ranks={"c": (2, True)}, layers=["c"]), TypeError, "rank"),
        (dict(ranks={"c": 5000}, layers=["c"], method="cp"), ValueError, r"ranks\['c'\]"),
        (dict(ranks={"fc": 99}, layers=["fc"], method="svd"), ValueError, r"ranks\['fc'\]"),
        (dict(ranks=[("c", 2)], layers=["c"]), TypeError, "mapping"),
        (dict(ratio=0.5, layers=["c"], norm="frobenius", cg_tol=1e-3), TypeError, "cg_tol"),
        (dict(ratio=0.5, layers=["c"], bogus=1), TypeError, "bogus"),
        (dict(ratio=0.5, layers=["c"], device="nonsense"), ValueError, "device"),
    ],
)
def test_bad_compress_arguments_fail_before_any_work(zoo, kwargs, error, match, monkeypatch):
    """Every bad argument is refused before the first decomposition (none is attempted)."""
    import importlib

    compress_module = importlib.import_module("tensorly_dataaware.torch.compress")
    model, stats = zoo
    calls = []
    monkeypatch.setattr(compress_module, "_decompose", lambda *a, **k: calls.append(a) or pytest.fail("decomposed"))
    method = kwargs.pop("method", "tucker2")
    with pytest.raises(error, match=match):
        compress(model, stats, method, progress=False, **kwargs)
    assert not calls


def test_stats_values_must_be_layer_statistics(zoo):
    model, stats = zoo
    bad = dict(stats)
    bad["c"] = stats["c"].sigma()
    with pytest.raises(TypeError, match=r"stats\['c'\].*LayerStatistics"):
        compress(model, bad, ratio=0.5, layers=["c"], progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(zoo):
    model, stats = zoo
    with pytest.raises(ValueError, match="CUDA is not available"):
        compress(model, stats, ratio=0.5, layers=["c"], device="cuda", progress=False)
    with pytest.raises(ValueError, match="'meta' holds no values"):  # was an error from deep inside
        compress(model, stats, ratio=0.5, layers=["c"], device="meta", progress=False)
    if not hasattr(torch, "xpu") or not torch.xpu.is_available():
        with pytest.raises(ValueError, match="'xpu' is not usable here"):
            compress(model, stats, ratio=0.5, layers=["c"], device="xpu", progress=False)
    with pytest.raises(ValueError, match="'meta' holds no values"):
        compress_sequential(model, [torch.zeros(2, 3, 10, 10, dtype=torch.float64)], ratio=0.5, layers=["c"],
                            device="meta", progress=False)


def _singular_sigma(n, negative, seed=0):
    """A covariance with a null space, one of whose zero eigenvalues is ``negative`` instead:
    what float32 round-off leaves in the statistics of linearly dependent inputs."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.logspace(0, -3, n, dtype=torch.float64)
    values[-6:] = 0.0
    values[-1] = negative
    return (q * values) @ q.T


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
def test_round_off_indefinite_statistics_are_made_psd(method):
    from tensorly_dataaware import parafac_sigma, tucker2_sigma
    from tensorly_dataaware.torch.compress import LayerJob, decompose_layer

    torch.manual_seed(0)
    module = nn.Conv2d(4, 6, 3).double()
    sigma = _singular_sigma(36, -1e-6)
    rank = {"tucker2": (3, 2), "cp": 4, "svd": 3}[method]
    if method != "svd":
        # The solvers' own test rejects it (-1e-6 is below -1e-6 * mean(diag) = -8e-8)...
        solver = tucker2_sigma if method == "tucker2" else parafac_sigma
        with tl.backend_context("pytorch"), pytest.raises(ValueError, match="not positive semi-definite"):
            solver(module.weight.detach(), rank, sigma)

    def job(sigma):
        return LayerJob("conv", module, method, module.weight.detach().clone(), sigma, torch.zeros(36, dtype=torch.float64), rank)

    # ... the adapter knows it is round-off of sums of outer products, zeroes it and says so:
    # the same factors as for the matrix with that eigenvalue at zero.
    new, row = decompose_layer(job(sigma), random_state=0)
    assert any("made PSD" in note for note in row.notes), row.notes
    expected, expected_row = decompose_layer(job(_singular_sigma(36, 0.0)), random_state=0)
    assert not any("made PSD" in note for note in expected_row.notes)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected(x), rtol=1e-6, atol=1e-8)
    assert row.sigma_error == pytest.approx(expected_row.sigma_error, rel=1e-6)


def _zero_first_conv_net():
    """conv -> ReLU -> conv, float64, with an all-zero first weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1)).double().eval()
    with torch.no_grad():
        model[0].weight.zero_()
    return model


def _compress_one_layer(model, batches, method, layer, sequential):
    """Layer ``layer`` compressed at 30% by ``compress_sequential`` or, one-shot, by ``compress``."""
    from tensorly_dataaware.torch import compress_sequential

    kwargs = dict(ratio=0.3, layers=[layer], return_report=True, progress=False)
    if sequential:
        return compress_sequential(model, batches, method, **kwargs)
    return compress(model, collect_covariances(model, batches, progress=False), method, **kwargs)


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
@pytest.mark.parametrize("sequential", [False, True])
def test_layer_with_constant_inputs(method, sequential):
    """A layer whose inputs are all zero on the calibration data (after a dead ReLU): sigma is
    zero, every W~ fits equally well; it is fitted in the Frobenius norm and says so (a
    ValueError 'sigma is the zero matrix' before)."""
    model = _zero_first_conv_net()
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
    batches = _batches(n=2)
    out, (row,) = _compress_one_layer(model, batches, method, "2", sequential)
    assert row.method == method and row.sigma_error == 0.0
    assert any("Frobenius" in note for note in row.notes), row.notes
    assert all(torch.isfinite(p).all() for p in out.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out(batches[0]), model(batches[0]))


def test_indefinite_statistics_beyond_round_off_are_refused():
    from tensorly_dataaware.torch.compress import LayerJob, decompose_layer

    module = nn.Conv2d(4, 6, 3).double()
    job = LayerJob(
        "conv", module, "tucker2", module.weight.detach().clone(), _singular_sigma(36, -0.1),
        torch.zeros(36, dtype=torch.float64), (3, 2),
    )
    with pytest.raises(ValueError, match=r"layer 'conv' are not positive semi-definite.*round-off bound"):
        decompose_layer(job)


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
@pytest.mark.parametrize("where", ["sigma", "mean"])
def test_non_finite_statistics_are_refused(method, where):
    """NaN fails every comparison, so statistics holding one were taken for a zero
    sigma-norm and silently fitted in the Frobenius norm; now they are refused."""
    from tensorly_dataaware.torch.compress import LayerJob, decompose_layer

    module = nn.Conv2d(4, 6, 3).double()
    sigma, mean = _singular_sigma(36, 0.0), torch.zeros(36, dtype=torch.float64)
    if where == "sigma":
        sigma[5, 7] = sigma[7, 5] = float("nan")
    else:
        mean[3] = float("inf")
    job = LayerJob("conv", module, method, module.weight.detach().clone(), sigma, mean, (3, 2) if method == "tucker2" else 3)
    with pytest.raises(ValueError, match=r"layer 'conv' contain NaN or Inf"):
        decompose_layer(job)


def test_psd_check_of_torch_statistics_stays_in_torch_under_any_tensorly_backend(monkeypatch):
    """The adapter's PSD test factors torch statistics with torch whatever TensorLy's global
    backend is (the default NumPy backend copied them to the host, a GPU matrix included)."""
    from tensorly_dataaware import _validation

    monkeypatch.setattr(_validation.scipy.linalg, "cholesky", lambda *a, **k: pytest.fail("copied to the host"))
    with tl.backend_context("numpy"):
        assert _validation._shifted_cholesky_succeeds(torch.eye(3, dtype=torch.float64), 0.0)
        assert not _validation._shifted_cholesky_succeeds(-torch.eye(3, dtype=torch.float64), 0.0)


def test_dependent_inputs_after_a_compressed_layer():
    """Circular padding with a dilated 5x5 kernel on 10x9 maps repeats pixels within a patch:
    the covariance of ``c``'s inputs is singular, and after the compressed ``a`` and ``b`` its
    float32 statistics came out indefinite beyond the solvers' PSD tolerance (a ValueError
    on the development machine before the adapter made them PSD). The model also has a
    layer called twice (kept dense) and dropout in train mode."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 24, 7, 2, 3)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.a = nn.Conv2d(24, 32, (1, 3), padding=(0, 1))
            self.b = nn.Conv2d(32, 32, (3, 1), padding=(1, 0))
            self.c = nn.Conv2d(32, 40, 5, padding="same", dilation=2, padding_mode="circular")
            self.shared = nn.Conv2d(40, 40, 3, padding=1)
            self.drop = nn.Dropout(0.3)
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.stem(x)))
            x = torch.relu(self.b(torch.relu(self.a(x))))
            x = torch.relu(self.c(x))
            x = torch.relu(self.shared(torch.relu(self.shared(x))))
            return self.fc(self.drop(x.mean((2, 3))))

    from tensorly_dataaware.torch import compress_sequential

    torch.manual_seed(0)
    model = Net().train()
    batches = [(torch.randn(16, 3, 40, 36), torch.randint(0, 5, (16,))) for _ in range(3)]
    out, report = compress_sequential(model, batches, "tucker2", ratio=0.3, progress=False, return_report=True)
    rows = {row.name: row for row in report}
    assert rows["shared"].method == "dense"
    assert all(rows[name].method == "tucker2" for name in ("stem", "a", "b", "c"))
    assert model.training and out.training
    model.eval(), out.eval()
    with torch.no_grad():
        y, y_ref = out(batches[0][0]), model(batches[0][0])
    assert torch.isfinite(y).all()
    assert float((y - y_ref).norm() / y_ref.norm()) < 0.1


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
@pytest.mark.parametrize("sequential", [False, True])
def test_pruned_all_zero_layer(method, sequential):
    """An all-zero (pruned) weight is decomposed exactly, as zero factors (the solvers have
    nothing to normalize: a ValueError or a singular-matrix error before)."""
    model = _zero_first_conv_net()
    batches = _batches(n=2)
    out, (row,) = _compress_one_layer(model, batches, method, "0", sequential)
    assert row.method == method and row.sigma_error == 0.0
    assert "zero weight: factors set to zero" in row.notes
    factors = [p for name, p in out[0].named_parameters() if "bias" not in name]
    assert factors and all(not p.any() for p in factors)
    with torch.no_grad():
        torch.testing.assert_close(out(batches[0]), model(batches[0]))


def test_replacing_a_hooked_layer_warns_that_the_hooks_stay_behind():
    """Hooks on a compressed layer were dropped silently (the statistics include their effect,
    the factorized module does not run them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(4, 3, 8, 8)
    stats = collect_covariances(model, [x], progress=False)
    model[2].register_forward_hook(lambda m, a, out: out.clamp(max=0.1))
    with pytest.warns(RuntimeWarning, match="Layer '2' has forward hooks"):
        compress(model, stats, "tucker2", ratio=0.5, layers=["2"], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compress(model, stats, "tucker2", ratio=0.5, layers=["0"], progress=False)  # no hook there
