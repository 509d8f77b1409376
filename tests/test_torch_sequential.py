"""Sequential calibration (compress_sequential): equations, equivalences and contracts."""

import collections
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import (  # noqa: E402
    collect_covariances,
    compress,
    compress_sequential,
    layer_call_order,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _conv_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 10, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(10, 6, 3, stride=2),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.double().eval()


def _batches(n_batches=3, size=16, seed=1, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    # Correlated channels, a non-zero mean: a covariance far from the identity.
    mix = torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64)
    out = []
    for _ in range(n_batches):
        z = torch.randn(size, *shape, generator=g, dtype=torch.float64)
        out.append((torch.einsum("ij,bjhw->bihw", mix, z) + 0.5, torch.zeros(size)))
    return out


def _layer_output(model, name, x):
    """Output of submodule ``name`` when ``model`` runs on ``x``."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _output_mse(original, compressed, name, batches):
    total, count = 0.0, 0
    for x, _ in batches:
        a = _layer_output(original, name, x)
        b = _layer_output(compressed, name, x)
        total += float(((a - b) ** 2).sum())
        count += a.numel()
    return total / count


# --------------------------------------------------------------------------------------------
# Equivalences and optimality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
def test_one_layer_equals_compress(method):
    net = _conv_net()
    batches = _batches()
    rank = {"tucker2": (4, 3), "cp": 5, "svd": 3}[method]
    kwargs = dict(ranks={"3": rank}, layers=["3"], progress=False, n_iter_max=15, random_state=0)
    seq = compress_sequential(net, batches, method, **kwargs)
    stats = collect_covariances(net, batches, ["3"], progress=False)
    one = compress(net, stats, method, **kwargs)
    for (k, a), (k2, b) in zip(seq.state_dict().items(), one.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_streaming_equals_one_big_batch():
    net = _conv_net()
    batches = _batches(n_batches=4, size=8)
    big = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    kwargs = dict(ranks={"0": (4, 2), "3": (5, 4), "5": (3, 4)}, layers=["0", "3", "5"], progress=False, n_iter_max=10)
    a = compress_sequential(net, batches, "tucker2", **kwargs)
    b = compress_sequential(net, big, "tucker2", **kwargs)
    for (k, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(ta, tb, rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.parametrize("method,rank", [("svd", 3), ("tucker2", (5, 4))])
def test_sequential_fit_beats_one_shot_on_its_objective(method, rank):
    """Given the same compressed first layer, the second layer's output error on the
    calibration data is smallest for the sequential fit (exact for the SVD)."""
    net = _conv_net()
    batches = _batches()
    ranks = {"0": (3, 2), "3": rank} if method == "tucker2" else {"0": 2, "3": rank}
    common = dict(ranks=ranks, layers=["0", "3"], progress=False, n_iter_max=50, damping=0.0)
    seq = compress_sequential(net, batches, method, **common)
    stats = collect_covariances(net, batches, ["0", "3"], progress=False)
    one = compress(net, stats, method, **common)
    # Same first layer in both (x~ = x there).
    torch.testing.assert_close(seq[0].state_dict(), one[0].state_dict())
    mse_seq = _output_mse(net, seq, "3", batches)
    mse_one = _output_mse(net, one, "3", batches)
    assert mse_seq < 0.9 * mse_one
    # Any perturbation of the fitted layer (same structure) does worse.
    worse = copy.deepcopy(seq)
    with torch.no_grad():
        for p in worse[3].parameters():
            p.add_(1e-3 * torch.randn_like(p))
    assert _output_mse(net, worse, "3", batches) > mse_seq


def test_full_rank_gives_best_linear_predictor():
    """A full-rank second layer reproduces the least-squares affine predictor of the
    original output from the compressed network's own inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    batches = [x[:100], x[100:]]
    small = compress_sequential(
        net, batches, "svd", ranks={"0": 2, "2": 4}, progress=False, damping=0.0
    )
    with torch.no_grad():
        target = net(x).numpy()
        inputs = small[1](small[0](x)).numpy()  # what the compressed network feeds layer 2
        got = small(x).numpy()
    design = np.hstack([inputs, np.ones((len(inputs), 1))])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(got, design @ coef, rtol=1e-7, atol=1e-9)


def test_uncentred_variant_runs_and_differs():
    net = _conv_net()
    batches = _batches()
    kwargs = dict(ranks={"0": (3, 2), "3": (4, 3)}, layers=["0", "3"], progress=False, n_iter_max=10)
    a = compress_sequential(net, batches, **kwargs)
    b = compress_sequential(net, batches, centered=False, bias_correction=False, **kwargs)
    sa, sb = a[3].state_dict(), b[3].state_dict()
    assert any(not torch.allclose(sa[k], sb[k]) for k in sa)
    # Without bias correction the bias is the layer's own.
    torch.testing.assert_close(b[3].last.bias, net[3].bias)


# --------------------------------------------------------------------------------------------
# Contracts: the user's model, batches, options
# --------------------------------------------------------------------------------------------


def test_model_left_exactly_as_it_was():
    net = _conv_net().train()  # BatchNorm in train mode would update its running stats
    net[2].training = False  # mixed flags must come back as they were
    before = copy.deepcopy(net.state_dict())
    flags = {n: m.training for n, m in net.named_modules()}
    small, report = compress_sequential(
        net, _batches(), ratio=0.5, progress=False, n_iter_max=5, return_report=True
    )
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert all(not m._forward_pre_hooks for m in small.modules())
    assert type(net[3]) is nn.Conv2d
    # The compressed copy keeps the original flags, its new modules too.
    assert small.training and not small[2].training and small[3].training
    assert [r.name for r in report] == ["0", "3", "5", "7"]
    assert all("sequential" in r.notes for r in report)
    assert report[-1].method == "svd"  # the Linear layer


def test_inplace_modifies_the_model():
    net = _conv_net()
    out = compress_sequential(net, _batches(), ratio=0.5, layers=["3"], inplace=True, progress=False, n_iter_max=5)
    assert out is net and type(net[3]).__name__ == "Tucker2Conv2d"


def test_layers_compressed_in_call_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 3)
            self.early = nn.Linear(5, 4)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    net = Reordered().double()
    order, counts = layer_call_order(net, torch.zeros(2, 5, dtype=torch.float64), ["late", "early"])
    assert order == ["early", "late"] and counts == {"late": 1, "early": 1}
    x = torch.randn(50, 5, dtype=torch.float64)
    _, report = compress_sequential(net, [x], "svd", ranks={"early": 2, "late": 2}, progress=False, return_report=True)
    assert [r.name for r in report] == ["early", "late"]


def test_layer_call_order_changes_nothing():
    """The probe runs like collect_covariances: eval mode, no_grad, every module's training
    flag restored (also on error), no BatchNorm statistics updated, no random numbers drawn."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 4, 3))
    net.train()
    net[1].eval()  # a mixed model (frozen BatchNorm): each module keeps its own flag
    flags = {name: m.training for name, m in net.named_modules()}
    seen = []
    net[4].register_forward_hook(lambda m, a, out: seen.append((torch.is_grad_enabled(), m.training)))
    x = torch.randn(2, 3, 8, 8)
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    order, counts = layer_call_order(net, x, ["4", "0"])
    assert order == ["0", "4"] and counts == {"4": 1, "0": 1}
    assert seen == [(False, False)]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert {name: m.training for name, m in net.named_modules()} == flags
    # A string is one name (not the names "0", "." and "4"); an unknown name is a clear error.
    assert layer_call_order(nn.Sequential(net), x, "0.4") == (["0.4"], {"0.4": 1})
    with pytest.raises(ValueError, match="'nope'"):
        layer_call_order(net, x, ["0", "nope"])
    # On error too: flags restored, hooks removed.
    with pytest.raises(RuntimeError):
        layer_call_order(net, torch.zeros(2, 5, 8, 8), ["0", "4"])
    assert {name: m.training for name, m in net.named_modules()} == flags
    assert not net[0]._forward_pre_hooks and not net[4]._forward_pre_hooks

def test_layer_called_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(torch.tanh(self.a(x))))

    net = Shared().double()
    x = [torch.randn(20, 4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="called 2 times"):
        compress_sequential(net, x, "svd", ranks={"a": 2}, layers=["a"], progress=False)
    with pytest.warns(UserWarning, match="called 2 times"):
        small = compress_sequential(net, x, "svd", ratio=0.5, progress=False)
    assert type(small.a) is nn.Linear and type(small.b).__name__ == "LowRankLinear"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(ratio=0.5, layers=[]), ValueError, "empty"),
        (dict(ratio=0.5, layers=["nope"]), ValueError, "not a module"),
        (dict(ratio=0.5, layers=["1"]), ValueError, "BatchNorm2d"),
        (dict(ratio=True), TypeError, "ratio"),
        (dict(ratio=0.5, energy=0.5), ValueError, "at most one"),
        (dict(), ValueError, "Give `ranks`"),
        (dict(ratio=0.5, ranks={"typo": 2}), ValueError, "typo"),
        (dict(ranks={"3": 0.5}, layers=["3"]), TypeError, r"ranks\['3'\]"),
        (dict(ranks={"3": (2, 2)}, layers=["3"], method="cp"), TypeError, "pair"),
        (dict(ratio=0.5, method="qr"), ValueError, "method"),
        (dict(ratio=0.5, norm="l1"), ValueError, "norm"),
        (dict(ratio=0.5, max_batches=0), ValueError, "max_batches"),
        (dict(ratio=0.5, bogus_option=1), TypeError, "bogus_option"),
        (dict(ratio=0.5, norm="frobenius", cg_tol=1e-3), TypeError, "cg_tol"),
        (dict(ratio=0.5, damping=-1.0), ValueError, "damping"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    net = _conv_net()
    before = copy.deepcopy(net.state_dict())
    method = kwargs.pop("method", "tucker2")
    with pytest.raises(error, match=match):
        compress_sequential(net, _batches(1), method, progress=False, **kwargs)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_batches():
    net = _conv_net()
    with pytest.raises(TypeError, match="one-shot iterator"):
        compress_sequential(net, (b for b in _batches()), ratio=0.5, progress=False)
    with pytest.raises(TypeError, match="iterable"):
        compress_sequential(net, 3, ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        compress_sequential(net, [], ratio=0.5, progress=False)
    bad = _batches(2)
    bad[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress_sequential(net, bad, ratio=0.5, progress=False)


def test_unavailable_device():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        compress_sequential(_conv_net(), _batches(1), ratio=0.5, device="cuda", progress=False)


def test_budget_and_energy():
    net = _conv_net()
    batches = _batches()
    small, report = compress_sequential(net, batches, budget=0.4, progress=False, n_iter_max=5, return_report=True)
    kept = sum(r.params_after for r in report) / sum(r.params_before for r in report)
    assert kept <= 0.4 + 1e-9
    small, report = compress_sequential(net, batches, energy=0.9, progress=False, n_iter_max=5, return_report=True)
    assert len(report) == 4


def test_float32_model_and_max_batches():
    net = _conv_net().float()
    batches = [(x.float(), y) for x, y in _batches(3)]
    small, report = compress_sequential(
        net, batches, "cp", ratio=0.5, max_batches=2, progress=False, n_iter_max=5, random_state=0, return_report=True,
    )
    assert next(small.parameters()).dtype == torch.float32
    with torch.no_grad():
        out = small(batches[0][0])
    assert torch.isfinite(out).all()


def _disable_replay(monkeypatch):
    """From now on, every pass of the compressed network is recomputed from the input."""
    from tensorly_dataaware.torch import sequential

    monkeypatch.setattr(
        sequential._PrefixCache, "capture",
        lambda self, module, x, name, index: sequential._capture_input(self.model, module, x, name),
    )


def _assert_same_models(a, b):
    """Bit-identical parameters and buffers."""
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value), key


class _Block(nn.Module):
    """A residual block with a shared in-place ReLU (called twice), an in-place addition and
    a tuple output: what the replay of finished module calls must get right."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out += x
        return self.relu(out), out.mean()


class _ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([_Block(6), _Block(6)])
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        stem = self.stem(x)
        stem.add_(0.5)  # modifies the stem's output in place: a replayed output must be a copy
        x, total = stem, 0
        for block in self.blocks:
            x, aux = block(x)
            total = total + aux
        return self.head((x + stem).mean((2, 3))) + total  # the stem's output also reaches the head


@pytest.mark.parametrize("kind", ["residual", "sequential"])
def test_replayed_prefix_changes_nothing_and_skips_work(monkeypatch, kind):
    """The partly compressed network's finished module calls are replayed in later passes:
    the result is exactly that of recomputing them, and the early modules run far less.
    ``residual``: a custom forward (shared in-place ReLU, in-place additions, tuple outputs,
    an early output reused at the end); ``sequential``: an nn.Sequential, whose children
    before the previous layer are not called at all."""
    if kind == "residual":
        net = _ResidualNet().double().eval()
        layers = ["blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "head"]
        early = "stem.0"  # a replayed stem does not call it (the stem's own hooks still fire)
    else:
        torch.manual_seed(0)
        # Each compressed layer follows a BatchNorm, which (unlike a ReLU) changes its input
        # if it is applied twice: a replay that resumed one child too early would show.
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10),
            nn.Conv2d(10, 6, 3, stride=2), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
        )
        with torch.no_grad():
            for bn in (net[1], net[3], net[5]):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        net = net.double().eval()
        layers = ["2", "4", "7"]
        early = "1"  # the BatchNorm before the first compressed layer
    batches = _batches(n_batches=2, size=8)
    kwargs = dict(ratio=0.5, layers=layers, progress=False, n_iter_max=10, random_state=0)
    calls = {"early": 0}

    def count(*_):
        calls["early"] += 1

    def run():
        calls["early"] = 0
        model = copy.deepcopy(net)
        model.get_submodule(early).register_forward_pre_hook(count)  # copied into the compressed network too
        return compress_sequential(model, batches, "tucker2", **kwargs), calls["early"]

    replayed, early_replayed = run()
    # The same run with every pass of the compressed network recomputed from the input.
    _disable_replay(monkeypatch)
    recomputed, early_recomputed = run()
    _assert_same_models(replayed, recomputed)
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(replayed(x), recomputed(x))
    # Recomputing runs the early module once per batch in each of the passes for the layers
    # after the first; the replay runs it in the first of those passes only.
    assert early_recomputed - early_replayed == 2 * (len(layers) - 2)


class _DataDependentNet(nn.Module):
    """Calls ``mix`` once for some batches and twice for others: the call counts of the
    first batch do not hold for every batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 6, 1)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        h = self.mix(torch.relu(self.conv0(x)))
        if float(x[0, 0, 0, 0]) > 0:
            h = h + self.mix(h)  # the first call's output is used too
        return self.conv2(torch.relu(self.conv1(h))).mean((2, 3))


def test_replay_with_input_dependent_call_counts(monkeypatch):
    batches = _batches(n_batches=4, size=4)
    signs = [float(x[0, 0, 0, 0]) > 0 for x, _ in batches]
    assert any(signs) and not all(signs)  # both branches are taken
    kwargs = dict(ratio=0.5, layers=["conv0", "conv1", "conv2"], progress=False, n_iter_max=10, random_state=0)
    net = _DataDependentNet().double().eval()
    replayed = compress_sequential(net, batches, "tucker2", **kwargs)
    _disable_replay(monkeypatch)
    recomputed = compress_sequential(net, batches, "tucker2", **kwargs)
    _assert_same_models(replayed, recomputed)


class _Stem(nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = mix  # shared with the parent

    def forward(self, x):
        return self.mix(torch.relu(self.conv(x)))


class _SharedAcrossBlocks(nn.Module):
    """``mix`` is called inside ``stem`` and again by the root between the two layers of
    ``second``. In the pass for ``second.1`` the replayed ``stem`` does not call it, so its
    first call there is the root's: only the call count of a whole pass tells that it is
    shared, and its output of the earlier pass must not be replayed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv2d(6, 6, 1)
        self.stem = _Stem(self.mix)
        self.second = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)])

    def forward(self, x):
        h = self.stem(x)
        h = self.mix(torch.relu(self.second[0](h)))
        return self.second[1](h).mean((2, 3))


def test_replay_with_a_module_shared_across_blocks(monkeypatch):
    batches = _batches(n_batches=2, size=4)
    kwargs = dict(ratio=0.5, layers=["stem.conv", "second.0", "second.1"], progress=False, n_iter_max=10, random_state=0)
    net = _SharedAcrossBlocks().double().eval()
    replayed = compress_sequential(net, batches, "tucker2", **kwargs)
    _disable_replay(monkeypatch)
    recomputed = compress_sequential(net, batches, "tucker2", **kwargs)
    _assert_same_models(replayed, recomputed)


class _ReluInPlaceTimesTwo(nn.Module):
    """Modifies its argument in place and returns a new tensor."""

    def forward(self, x):
        return 2 * x.relu_()


class _AliasedNet(nn.Module):
    """A shortcut that holds the tensor an in-place operation of a later module call
    changes, so that the shortcut sees the change: a replay that only returns a copy of the
    call's output would leave it unchanged.

    ``inplace``: ``skip = y; y = relu_(y)`` with an ``nn.ReLU(inplace=True)`` (it modifies
    its argument and returns it); ``argument``: the same with a module that modifies its
    argument and returns a new tensor; ``identity``: ``skip = y; y = identity(y); y.relu_()``
    (the module's output is its argument).
    """

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        acts = {"inplace": nn.ReLU(inplace=True), "argument": _ReluInPlaceTimesTwo(), "identity": nn.Identity()}
        self.act = acts[kind]
        self.c1 = nn.Conv2d(6, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.c0(x)
        skip = y
        y = self.act(y)
        if self.kind == "identity":
            y.relu_()
        return self.c2(self.c1(y) + skip)


@pytest.mark.parametrize("kind", ["inplace", "argument", "identity"])
def test_replay_keeps_in_place_changes_seen_through_aliases(monkeypatch, kind):
    """A module call whose in-place effect reaches a tensor the network still holds (an
    in-place activation, an output that is its own input) is not replayed but run in every
    pass: the result is exactly that of recomputing, and at full rank the compressed network
    is the original (the replayed copy once fed the last layer the un-activated shortcut:
    49% relative output error)."""
    net = _AliasedNet(kind).double().eval()
    batches = _batches(n_batches=2, size=8)
    kwargs = dict(ranks={"c0": (6, 3), "c1": (6, 6), "c2": (6, 6)}, progress=False, n_iter_max=10, random_state=0)
    replayed = compress_sequential(net, batches, "tucker2", **kwargs)
    x = batches[0][0]
    with torch.no_grad():
        y = net(x)
        assert float((replayed(x) - y).norm() / y.norm()) < 1e-6
    _disable_replay(monkeypatch)
    recomputed = compress_sequential(net, batches, "tucker2", **kwargs)
    _assert_same_models(replayed, recomputed)


class _Counted(nn.Module):
    """Counts its calls in a buffer and adds the count to its input: a module with state."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x + self.calls


class _CountedStem(nn.Module):
    """A stem with state, called by a custom forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _Counted())
        self.c1 = nn.Conv2d(6, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(self.stem(x))))


@pytest.mark.parametrize("where", ["call", "sequential"])
def test_replay_keeps_buffer_updates(monkeypatch, where):
    """A module call that updates a buffer runs in every pass, be it called by a custom
    forward or a child of an nn.Sequential ancestor of the layer: a replay would skip the
    update."""
    if where == "call":
        net, layers = _CountedStem(), ["stem.0", "c1", "c2"]
    else:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), _Counted(), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        )
        layers = ["0", "2", "3"]
    net = net.double().eval()
    batches = _batches(n_batches=2, size=4)
    kwargs = dict(ratio=0.5, layers=layers, progress=False, n_iter_max=10, random_state=0)
    # Copies: the original network's passes update its buffers too.
    replayed = compress_sequential(copy.deepcopy(net), batches, "tucker2", **kwargs)
    _disable_replay(monkeypatch)
    recomputed = compress_sequential(copy.deepcopy(net), batches, "tucker2", **kwargs)
    _assert_same_models(replayed, recomputed)


_Pair = collections.namedtuple("_Pair", "features aux")


class _ContainerStem(nn.Module):
    """Returns its features and their mean in a container of type ``kind``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.kind is _Pair:
            return _Pair(y, y.mean())
        if issubclass(self.kind, dict):
            return self.kind(features=y, aux=y.mean())
        return self.kind([y, y.mean()])


class _ContainerNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.stem = _ContainerStem(kind)
        self.c1 = nn.Conv2d(6, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        out = self.stem(x)
        assert type(out) is self.stem.kind  # also when the stem is replayed
        features = out["features"] if isinstance(out, dict) else out[0]
        return self.c2(torch.relu(self.c1(features)))


@pytest.mark.parametrize("kind", [_Pair, tuple, list, dict, collections.OrderedDict])
def test_replay_keeps_the_type_of_container_outputs(monkeypatch, kind):
    """A module's tuple, list or dict output is replayed with its own type: a namedtuple
    (whose constructor takes one argument per field) once made the replay crash."""
    net = _ContainerNet(kind).double().eval()
    batches = _batches(n_batches=2, size=4)
    kwargs = dict(ratio=0.5, layers=["c1", "c2"], progress=False, n_iter_max=10, random_state=0)
    replayed = compress_sequential(net, batches, "tucker2", **kwargs)
    _disable_replay(monkeypatch)
    recomputed = compress_sequential(net, batches, "tucker2", **kwargs)
    _assert_same_models(replayed, recomputed)


def test_copied_outputs_keep_their_types():
    """Copies of module outputs keep the container types, and the containers whose type an
    iterable of items cannot rebuild are not copied (their calls then run in every pass)."""
    from tensorly_dataaware.torch.sequential import _clone_output, _replayed

    t = torch.arange(3.0)
    for value in (_Pair(t, 1), (t, None), [t, "a"], {"a": t}, collections.OrderedDict(b=(t, 2.0), a=t)):
        copied, size = _clone_output(value)
        assert size == t.numel() * t.element_size() * (2 if isinstance(value, collections.OrderedDict) else 1)
        for result in (copied, _replayed(copied)):
            # The same type, keys and values (repr shows them all), in new tensors.
            assert type(result) is type(value) and repr(result) == repr(value)
            first = result["a"] if isinstance(result, dict) else result[0]
            assert first is not t and first.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()

    class Tensors(list):
        pass

    assert _clone_output(Tensors([t])) is None
    assert _clone_output(collections.defaultdict(list, a=t)) is None
    assert _clone_output(object()) is None


def test_missing_rank_refused_before_any_fit(monkeypatch):
    """A rank that ``ranks`` lacks or gets wrong for a late layer is refused before the first
    layer's pass, with the message of ``compress`` (it once came after every earlier layer
    was fitted)."""
    from tensorly_dataaware.torch import sequential

    def no_pass(*args, **kwargs):
        raise AssertionError("a layer's pass ran before the ranks were checked")

    monkeypatch.setattr(sequential, "_layer_moments", no_pass)
    net = _conv_net()
    batches = _batches(1)
    stats = collect_covariances(net, batches, progress=False)
    for ranks in ({"0": (4, 2), "3": (5, 4), "5": (3, 4)}, {"0": (4, 2), "3": (5, 4), "5": (3, 4), "7": 99}):
        with pytest.raises(ValueError) as one_shot:
            compress(net, stats, "tucker2", ranks=ranks, progress=False)
        with pytest.raises(ValueError) as late:
            compress_sequential(net, batches, "tucker2", ranks=ranks, progress=False)
        assert str(late.value) == str(one_shot.value) and "'7'" in str(late.value)
    # With `ratio`, a layer without an entry in `ranks` is fine.
    with pytest.raises(AssertionError, match="pass ran"):
        compress_sequential(net, batches, "tucker2", ranks={"0": (4, 2)}, ratio=0.5, progress=False)


class _AlternatingOrder:
    """Re-iterable that yields its batches forward, then backward, then forward...: like a
    shuffling loader, every pass sees the same data in another order."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes % 2 else self.batches[::-1])


@pytest.mark.parametrize("reorder", [False, True])
def test_cached_original_inputs_change_nothing(reorder):
    net = _conv_net()
    batches = _batches(n_batches=3, size=8)
    kwargs = dict(ranks={"0": (4, 2), "3": (5, 4), "5": (3, 4)}, layers=["0", "3", "5"], progress=False, n_iter_max=10)
    source = (lambda: _AlternatingOrder(batches)) if reorder else (lambda: batches)
    cached = compress_sequential(net, source(), "tucker2", **kwargs)
    recomputed = compress_sequential(net, source(), "tucker2", cache_bytes=0, **kwargs)
    for (k, a), b in zip(cached.state_dict().items(), recomputed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.parametrize("sequential", [False, True])
def test_grouped_layers_kept_dense_and_reported(sequential):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    ).double().eval()
    batches = _batches(2)
    with pytest.warns(UserWarning, match="kept dense"):
        if sequential:
            small, report = compress_sequential(net, batches, ratio=0.5, progress=False, n_iter_max=3, return_report=True)
        else:
            stats = collect_covariances(net, batches, progress=False)
            small, report = compress(net, stats, ratio=0.5, progress=False, n_iter_max=3, return_report=True)
    assert [r.name for r in report] == ["0", "2", "4", "6"]
    dense = {r.name: r for r in report if r.method == "dense"}
    assert set(dense) == {"2", "4"}
    assert all("grouped" in r.notes[0] and r.params_after == r.params_before for r in dense.values())
    assert type(small[2]) is nn.Conv2d and type(small[0]).__name__ == "Tucker2Conv2d"
    with torch.no_grad():
        assert torch.isfinite(small(batches[0][0])).all()


def test_refit_keeps_a_layer_dense_and_fits_it():
    """A refitted layer keeps its size and becomes the best affine predictor of its
    original output from the compressed network's inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    small, report = compress_sequential(
        net, [x[:150], x[150:]], "svd", ranks={"0": 2}, refit=["2"], progress=False, damping=0.0, return_report=True,
        refit_damping=None,  # that is, `damping`
    )
    assert type(small[2]) is nn.Linear and small[2].weight.shape == net[2].weight.shape
    assert [(r.name, r.method) for r in report] == [("0", "svd"), ("2", "refit")]
    assert report[1].params_after == report[1].params_before
    with torch.no_grad():
        design = torch.cat([small[1](small[0](x)), torch.ones(300, 1, dtype=torch.float64)], 1).numpy()
        target, got = net(x).numpy(), small(x).numpy()
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(got, design @ coef, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="refit"):
        compress_sequential(net, [x], "svd", ranks={"2": 2}, refit=["2"], progress=False)
    with pytest.raises(ValueError, match="refit"):
        compress_sequential(net, [x], "svd", ratio=0.5, layers=["0"], refit=["1"], progress=False)


def test_refit_true_refits_the_layers_left_dense_after_the_first_compressed_one():
    net = _conv_net()
    batches = _batches()
    small, report = compress_sequential(
        net, batches, ranks={"3": (4, 3)}, layers=["3"], refit=True, progress=False, n_iter_max=5,
        return_report=True,
    )
    # "0" runs before the compressed layer: its inputs do not change, it is left alone.
    assert [(r.name, r.method) for r in report] == [("3", "tucker2"), ("5", "refit"), ("7", "refit")]
    torch.testing.assert_close(small[0].state_dict(), net[0].state_dict(), rtol=0, atol=0)
    assert type(small[5]) is nn.Conv2d and not torch.allclose(small[5].weight, net[5].weight)
    assert all(any("cross-validated" in note for note in r.notes) for r in report[1:])
    with pytest.raises(ValueError, match="refit=True"):
        compress_sequential(net, batches, ratio=0.5, refit=True, progress=False)


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal"])
def test_refit_of_parametrized_layers(kind):
    """A parametrized layer's weight is a property: the refit assigned a Parameter to it and
    failed after every earlier layer was fitted. Now the refitted copy is a plain layer of the
    original class with the fitted (effective) weight; the user's model keeps its
    parametrization, and the refit is the same as for the unparametrized layer."""
    from torch.nn.utils import parametrizations, parametrize

    net = _conv_net()
    plain = copy.deepcopy(net)
    if kind == "weight_norm":
        parametrizations.weight_norm(net[5])
    else:
        net[7] = parametrizations.orthogonal(net[7])
        plain[7].weight.data.copy_(net[7].weight.detach())
    batches = _batches()
    kwargs = dict(ranks={"3": (4, 3)}, layers=["3"], refit=True, progress=False, n_iter_max=5)
    small = compress_sequential(net, batches, **kwargs)
    reference = compress_sequential(plain, batches, **kwargs)
    for name in ("5", "7"):
        layer = small.get_submodule(name)
        assert not parametrize.is_parametrized(layer) and type(layer) in (nn.Conv2d, nn.Linear)
        torch.testing.assert_close(layer.weight, reference.get_submodule(name).weight, rtol=1e-6, atol=1e-8)
    assert parametrize.is_parametrized(net[5] if kind == "weight_norm" else net[7])  # the user's model
    x = batches[0][0]
    torch.testing.assert_close(net(x), plain(x))  # unchanged by the refit of its copy


def test_bias_correction_none_and_flags():
    """``bias_correction=None`` means what it means in compress (it was falsy here, and
    turned the correction off); yes/no options refuse non-bool values (``inplace='no'`` is
    truthy and modified the user's model)."""
    net = _conv_net()
    batches = _batches()
    kwargs = dict(ranks={"3": (4, 3)}, layers=["3"], progress=False, n_iter_max=5)
    auto = compress_sequential(net, batches, bias_correction=None, **kwargs)
    on = compress_sequential(net, batches, bias_correction=True, **kwargs)
    torch.testing.assert_close(auto[3].last.bias, on[3].last.bias, rtol=0, atol=0)
    off = compress_sequential(net, batches, bias_correction=False, **kwargs)
    assert not torch.allclose(off[3].last.bias, on[3].last.bias)
    for flag in ("inplace", "centered", "bias_correction", "return_report", "progress"):
        with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
            compress_sequential(net, batches, **{**kwargs, flag: "no"})
    assert type(net[3]) is nn.Conv2d
    stats = collect_covariances(net, [b[0] for b in batches], progress=False)
    with pytest.raises(TypeError, match="`inplace` must be True or False"):
        compress(net, stats, "tucker2", ranks={"3": (4, 3)}, layers=["3"], inplace="no", progress=False)
    assert type(net[3]) is nn.Conv2d


def _refit_brute_force(w, b0, x, y, folds, grid, centered, bias_correction):
    """Held-out squared error of the ridge refit for every relative ridge, by explicit fits."""
    n = y.shape[1]
    eye = torch.eye(n, dtype=torch.float64)
    out = []
    for rel in grid:
        total = 0.0
        for k in range(folds):
            test = torch.arange(len(x)) % folds == k
            xt, yt = x[~test], y[~test]
            mx, my = xt.mean(0), yt.mean(0)
            xc, yc = (xt - mx, yt - my) if centered else (xt, yt)
            c_yy, c_xy = yc.T @ yc / len(xt), xc.T @ yc / len(xt)
            delta = rel * torch.trace(c_yy) / n
            fit = w @ (c_xy + delta * eye) @ torch.linalg.inv(c_yy + delta * eye)
            bias = b0 + (w @ mx - fit @ my if bias_correction else 0)
            err = x[test] @ w.T + b0 - (y[test] @ fit.T + bias)
            total += float((err**2).sum())
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("centered,bias_correction", [(True, True), (True, False), (False, True)])
def test_cross_validation_scores_equal_explicit_held_out_fits(centered, bias_correction):
    """The moment formula of the held-out error equals refitting on the other folds and
    measuring on the held-out one, for every ridge of the grid (up to the constant E||Wx||^2)."""
    from tensorly_dataaware.torch import sequential as seq
    from tensorly_dataaware.torch.statistics import CrossStatistics

    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) + 0.5
    mix = torch.eye(5, dtype=torch.float64) + 0.3 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    y = x @ mix + 0.2 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    folds = [CrossStatistics(5) for _ in range(4)]
    for k, part in enumerate(folds):
        part.update(x[k::4], y[k::4])
    got = seq._cv_scores(layer, folds, centered, bias_correction, torch.device("cpu"))
    want = _refit_brute_force(
        layer.weight.detach(), layer.bias.detach(), x, y, 4, seq._CV_GRID, centered, bias_correction
    )
    torch.testing.assert_close(got - got[0], want - want[0], rtol=1e-8, atol=1e-9)
    assert seq._cross_validated_damping(layer, folds, centered, bias_correction, torch.device("cpu")) == (
        seq._CV_GRID[int(torch.argmin(want))]
    )
    assert seq._cv_scores(layer, folds[:1] + [CrossStatistics(5)], centered, bias_correction, "cpu") is None


def _few_images_net(out_features: int):
    """Two linear layers with 40 correlated inputs, 32 calibration samples (fewer than the
    second layer's inputs) in two batches, and 2000 fresh samples to measure generalization."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, out_features)).double().eval()
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(40, 40, generator=g, dtype=torch.float64) / 40**0.5
    calib = [torch.randn(16, 40, generator=g, dtype=torch.float64) @ mix for _ in range(2)]
    fresh = torch.randn(2000, 40, generator=g, dtype=torch.float64) @ mix
    return net, calib, fresh


@torch.no_grad()
def _held_out_mse(model, net, x) -> float:
    return float(((model(x) - net(x)) ** 2).mean())


def test_cross_validated_refit_does_not_overfit_few_images():
    """A refitted layer with more inputs than calibration samples: the least-squares fit
    interpolates the calibration data; the cross-validated ridge generalizes far better."""
    net, calib, fresh = _few_images_net(3)
    kwargs = dict(ranks={"0": 8}, refit=["2"], progress=False, return_report=True)
    # The advice names the refitted layer's own ridge (it named `damping` and
    # `target_damping`, which a refitted layer does not use).
    with pytest.warns(RuntimeWarning, match="overfit.*larger `refit_damping` or `refit_damping='cv'`"):
        plain, _ = compress_sequential(net, calib, "svd", refit_damping=1e-6, **kwargs)
    cv, report = compress_sequential(net, calib, "svd", **kwargs)
    assert "cross-validated" in report[-1].notes[-1]
    assert _held_out_mse(cv, net, fresh) < 0.5 * _held_out_mse(plain, net, fresh)


@pytest.mark.parametrize("value", [-1.0, float("inf"), "gcv", True])
def test_bad_refit_damping(value):
    with pytest.raises(ValueError, match="refit_damping"):
        compress_sequential(_conv_net(), _batches(1), ratio=0.5, refit_damping=value, progress=False)


# --------------------------------------------------------------------------------------------
# target_damping: the ridge of the compressed layers' regression target
# --------------------------------------------------------------------------------------------


def test_target_damping_sets_the_ridge_of_the_target_only():
    """A full-rank compressed layer reproduces the ridge predictor W (C_xy + dI)(C_yy + dI)^-1
    with ``d`` from ``target_damping`` (and its best bias), whatever the weight's ``damping``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    kwargs = dict(ranks={"0": 2, "2": 4}, progress=False)
    small = compress_sequential(net, [x[:100], x[100:]], "svd", damping=1e-9, target_damping=0.3, **kwargs)
    with torch.no_grad():
        y = small[1](small[0](x))  # what the compressed network feeds layer 2
        h = net[1](net[0](x))  # ... and the original one
    yc, hc = y - y.mean(0), h - h.mean(0)
    c_yy, c_xy = yc.T @ yc / len(x), hc.T @ yc / len(x)
    delta = 0.3 * torch.trace(c_yy) / 5
    eye = torch.eye(5, dtype=torch.float64)
    w = net[2].weight.detach()
    want = w @ (c_xy + delta * eye) @ torch.linalg.inv(c_yy + delta * eye)
    got = small[2].last.weight @ small[2].first.weight
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    want_bias = net[2].bias + w @ h.mean(0) - want @ y.mean(0)
    torch.testing.assert_close(small[2].last.bias, want_bias.detach(), rtol=1e-6, atol=1e-9)
    # None means `damping`, for the target and the weight alike.
    a = compress_sequential(net, [x], "svd", damping=0.3, **kwargs)
    b = compress_sequential(net, [x], "svd", damping=0.3, target_damping=0.3, **kwargs)
    for (k, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), k


def test_cross_validated_target_damping_is_the_chosen_fixed_one():
    """``target_damping='cv'`` notes the ridge it chose (none for the first compressed
    layer, whose target is W whatever the ridge) and fits exactly as that fixed ridge."""
    from tensorly_dataaware.torch import sequential as seq

    net = _conv_net()
    batches = _batches(n_batches=2, size=12)
    kwargs = dict(ranks={"0": (4, 2), "3": (5, 4)}, layers=["0", "3"], progress=False, n_iter_max=10,
                  random_state=0, return_report=True)
    cv, report = compress_sequential(net, batches, "tucker2", target_damping="cv", **kwargs)
    assert not any("target damping" in note for note in report[0].notes)
    (note,) = [note for note in report[1].notes if note.startswith("target damping")]
    assert note.endswith("(cross-validated)")
    ridge = min(seq._CV_GRID, key=lambda v: abs(v - float(note.split()[2])))
    fixed, _ = compress_sequential(net, batches, "tucker2", target_damping=ridge, **kwargs)
    for (k, a), b in zip(cv.state_dict().items(), fixed.state_dict().values()):
        # Equal up to round-off: the folds' moments are summed in another order.
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=k)
    # The weight of the low-rank fit keeps `damping`: another target ridge changes the model.
    other = seq._CV_GRID[0] if ridge != seq._CV_GRID[0] else seq._CV_GRID[-1]
    moved, _ = compress_sequential(net, batches, "tucker2", target_damping=other, **kwargs)
    assert not torch.allclose(moved[3].core.weight, cv[3].core.weight)


def test_cross_validated_target_does_not_overfit_few_images():
    """A compressed second layer with more inputs than calibration samples: its least-squares
    target interpolates the calibration data; the cross-validated ridge generalizes better,
    and the default ('auto') cross-validates exactly such layers."""
    net, calib, fresh = _few_images_net(12)
    kwargs = dict(ranks={"0": 8, "2": 6}, progress=False, return_report=True)
    with pytest.warns(RuntimeWarning, match="overfit"):
        plain, plain_report = compress_sequential(net, calib, "svd", target_damping=None, **kwargs)
    # The report says so too (a warning is easily lost in a log).
    assert any("few samples" in note and "target_damping='cv'" in note for note in plain_report[-1].notes)
    cv, report = compress_sequential(net, calib, "svd", target_damping="cv", **kwargs)
    assert any("cross-validated" in note for note in report[-1].notes)
    assert not any("few samples" in note for note in report[-1].notes)
    assert _held_out_mse(cv, net, fresh) < 0.5 * _held_out_mse(plain, net, fresh)
    auto, auto_report = compress_sequential(net, calib, "svd", **kwargs)
    assert any("target_damping='auto'" in note for note in auto_report[-1].notes), auto_report[-1].notes
    assert not any("target_damping='auto'" in note for note in auto_report[0].notes)  # the first layer: W' = W
    for a, b in zip(auto.state_dict().values(), cv.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_auto_target_damping_is_the_fixed_ridge_on_well_sampled_layers():
    """With many samples per input feature, 'auto' collects no folds and gives the model of the
    fixed ridge exactly."""
    net, batches = _conv_net(), _batches(4)
    # The convolutions see 64 images x 9-64 positions for 27-90 inputs (the classifier, 64
    # samples for 54 inputs, would be cross-validated).
    kwargs = dict(ratio=0.5, layers=["0", "3", "5"], progress=False, return_report=True, random_state=0)
    auto, report = compress_sequential(net, batches, "tucker2", **kwargs)
    fixed, _ = compress_sequential(net, batches, "tucker2", target_damping=None, **kwargs)
    assert not any("target_damping='auto'" in note for row in report for note in row.notes)
    _assert_same_models(auto, fixed)


@pytest.mark.parametrize("value", [-1.0, float("inf"), "gcv", True])
def test_bad_target_damping(value):
    with pytest.raises(ValueError, match="target_damping.*'cv', 'auto' or None"):
        compress_sequential(_conv_net(), _batches(1), ratio=0.5, target_damping=value, progress=False)


class _Mobile(nn.Module):
    """MobileNet-like: BatchNorm, ReLU6, a depthwise and a grouped convolution (kept dense),
    a pointwise one, a strided one and global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6())
        self.dw = nn.Conv2d(12, 12, 3, 1, 1, groups=12, bias=False)
        self.pw = nn.Conv2d(12, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, 1, 1, groups=4)
        self.conv = nn.Conv2d(16, 20, 3, 2, 1)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.pw(self.dw(x)))
        x = torch.relu(self.conv(torch.relu(self.grouped(x))))
        return self.head(x.mean((2, 3)))


class _Tokens(nn.Module):
    """Transformer-style MLP block: Linear layers on (batch, tokens, features) inputs,
    LayerNorm, GELU and a residual connection."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 24)
        self.norm = nn.LayerNorm(24)
        self.mlp = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24))
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        h = self.norm(self.inp(x))
        return self.out((h + self.mlp(h)).mean(1))


@pytest.mark.parametrize("arch", ["mobile", "tokens"])
@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
def test_other_architectures(arch, method):
    """Networks unlike the embedded ones run through every method, leave the original as it
    was, and at half the parameters reproduce the original output on the calibration data
    better than the one-shot fit at the same ranks (mobile: 0.5-0.6% against 0.7-0.8%
    relative error, tokens: 56% against 69%)."""
    torch.manual_seed(0)
    if arch == "mobile":
        net, shape, dense = _Mobile().double().eval(), (3, 12, 12), {"dw", "grouped"}
    else:
        net, shape, dense = _Tokens().double().eval(), (7, 6), set()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(12, *shape, generator=g, dtype=torch.float64) for _ in range(3)]
    state = copy.deepcopy(net.state_dict())
    small, report = compress_sequential(net, batches, method, ratio=0.5, progress=False, random_state=0, return_report=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    rows = {row.name: row for row in report}
    assert {name for name, row in rows.items() if row.method == "dense"} == dense
    assert all(row.params_after < row.params_before for row in report if row.method != "dense")
    ranks = {name: row.rank for name, row in rows.items() if row.method != "dense"}
    stats = collect_covariances(net, batches, progress=False)
    one_shot = compress(net, stats, method, ranks=ranks, layers=list(ranks), progress=False, random_state=0)
    x = torch.cat(batches)
    with torch.no_grad():
        y_ref = net(x)
        errors = [float((m(x) - y_ref).norm() / y_ref.norm()) for m in (small, one_shot)]
    assert errors[0] < errors[1], errors


def test_conv1d_layers_reported_as_kept_dense():
    """Conv1d layers are not factorized; the sequential report lists them as kept dense, as
    the one-shot report does (they were silently left out of it before)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 10, 5)).double().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 4, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    _, report = compress_sequential(net, batches, "tucker2", ratio=0.5, progress=False, return_report=True)
    rows = {row.name: row for row in report}
    assert rows["0"].method == "dense" and "Conv1d layers are not supported" in rows["0"].notes[0]
    assert rows["3"].method == "svd"
    one_shot = compress(net, collect_covariances(net, batches, progress=False), "tucker2", ratio=0.5, progress=False,
                        return_report=True)[1]
    assert [row.name for row in one_shot] == [row.name for row in report]


class _ScalesItsInput(nn.Module):
    """An in-place preprocessing at the top of forward (x.mul_(0.5))."""

    def __init__(self):
        super().__init__()
        self.body = _conv_net()

    def forward(self, x):
        x.mul_(0.5)
        return self.body(x)


def test_a_model_that_changes_its_input_in_place(monkeypatch):
    """Every pass fed the same batch tensor, so each pass scaled it again: the original and the
    compressed network saw differently scaled images (full-rank output error ~1) and the
    user's batches came back scaled by 0.5**passes."""
    torch.manual_seed(0)
    net = _ScalesItsInput().eval()
    batches = _batches(n_batches=2, size=16)
    before = [x.clone() for x, _ in batches]
    ranks = {"body.0": 8, "body.3": 10}  # full rank: the model must come back unchanged
    small = compress_sequential(net, batches, "svd", ranks=ranks, layers=list(ranks), progress=False,
                                target_damping=1e-9)
    for (x, _), x0 in zip(batches, before):
        assert torch.equal(x, x0)
    fresh = _batches(n_batches=1, size=8, seed=5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(small(fresh.clone()), net(fresh.clone()), rtol=1e-7, atol=1e-8)


def test_cross_validation_folds_count_images_over_batches():
    """Folds were 'image k of every batch': with one image per batch every image fell in fold
    0, and the cross-validated ridge silently became the fixed fallback. Batches of 1 and of
    12 now give the same folds' moments, hence the same ridge and the same model."""
    net = _conv_net()
    batches = _batches(n_batches=2, size=12)
    single = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(len(x))]
    kwargs = dict(ranks={"0": (4, 2), "3": (5, 4)}, layers=["0", "3"], progress=False, n_iter_max=10,
                  random_state=0, return_report=True, target_damping="cv")
    big, big_report = compress_sequential(net, batches, "tucker2", **kwargs)
    one, one_report = compress_sequential(net, single, "tucker2", **kwargs)
    (note,) = [n for n in one_report[1].notes if n.startswith("target damping")]
    assert note.endswith("(cross-validated)"), one_report[1].notes
    assert note in big_report[1].notes
    for (k, a), b in zip(big.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=k)
