"""Fisher sensitivity: the output Fisher, the weighted budget allocation and the weighted fit."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import collect_covariances, compress_sequential, plan_compression  # noqa: E402
from tensorly_dataaware.torch.compress import _budget_ranks  # noqa: E402
from tensorly_dataaware.torch.sensitivity import fisher_matrix_roots, fisher_row_weights, output_fisher  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 7, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(7, 5, 3, stride=2),
        nn.Flatten(),
        nn.Linear(5 * 3 * 3, 4),
    ).double()


def _batches(n_batches=3, size=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g, dtype=torch.float64), torch.zeros(size)) for _ in range(n_batches)]


def _explicit_fisher(net, batches, names, full=False):
    """One image at a time: the gradient of CE(own argmax) w.r.t. each layer output
    (``full``: the sum over positions of its outer products)."""
    sums = {n: 0.0 for n in names}
    images = 0
    for x, _ in batches:
        for i in range(x.shape[0]):
            outs = {}

            def keep(_m, _a, o, n):
                o.retain_grad()
                outs[n] = o

            handles = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)) for n in names]
            xi = x[i : i + 1].clone().requires_grad_(True)
            logits = net(xi)
            for h in handles:
                h.remove()
            loss = nn.functional.cross_entropy(logits, logits.argmax(1))
            loss.backward()
            for n in names:
                g = outs[n].grad[0]
                g = g.reshape(g.shape[0], -1) if g.dim() > 1 else g[:, None]  # (channels, positions)
                sums[n] = sums[n] + (g @ g.T if full else (g**2).sum(1))
            images += 1
    return {n: s / images for n, s in sums.items()}


def test_output_fisher_equals_per_image_gradients():
    net = _net().eval()
    batches = _batches()
    names = ["3", "5", "7"]
    got = output_fisher(net, batches, names)
    want = _explicit_fisher(net, batches, names)
    for n in names:
        assert got[n].dtype == torch.float64 and got[n].shape == (net.get_submodule(n).weight.shape[0],)
        torch.testing.assert_close(got[n], want[n].detach(), rtol=1e-10, atol=1e-14)
        assert float(got[n].sum()) > 0


def test_full_output_fisher_equals_per_image_outer_products():
    net = _net().eval()
    batches = _batches()
    names = ["3", "5", "7"]
    got = output_fisher(net, batches, names, full=True)
    want = _explicit_fisher(net, batches, names, full=True)
    diagonal = output_fisher(net, batches, names)
    for n in names:
        t = net.get_submodule(n).weight.shape[0]
        assert got[n].dtype == torch.float64 and got[n].shape == (t, t)
        torch.testing.assert_close(got[n], want[n].detach(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got[n].diagonal(), diagonal[n], rtol=1e-12, atol=1e-15)
        assert float(got[n].sub(got[n].diagonal().diag()).abs().max()) > 0  # not merely diagonal


def test_fisher_matrix_roots():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    fisher = a @ a.T  # rank 3 of 5: two eigenvalues at the floor
    root, inverse = fisher_matrix_roots(fisher, floor=1e-2)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(root @ inverse, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(root, root.T)
    eigvals = torch.linalg.eigvalsh(root @ root)
    floor = 1e-2 * float(torch.linalg.eigvalsh(fisher).mean())
    assert float(eigvals.min()) == pytest.approx(floor, rel=1e-8)
    # Above the floor the square root is exact.
    top = torch.linalg.eigvalsh(fisher)[-3:]
    torch.testing.assert_close(eigvals[-3:], top)
    root0, inverse0 = fisher_matrix_roots(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(root0, torch.eye(4, dtype=torch.float64)) and torch.equal(inverse0, root0)


def test_output_fisher_leaves_the_model_alone():
    net = _net().train()
    net[0].weight.grad = None
    before = {k: v.clone() for k, v in net.state_dict().items()}
    output_fisher(net, _batches(), ["3", "7"])
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    # Eval mode inside: BatchNorm's running statistics are not updated.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # And it also works when nothing requires grad (a frozen model).
    for p in net.parameters():
        p.requires_grad_(False)
    assert float(output_fisher(net.eval(), _batches(), ["3"])["3"].sum()) > 0


def test_output_fisher_refuses_non_logits_and_empty_batches():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).sum()

    with pytest.raises(ValueError, match="classifier"):
        output_fisher(Scalar(), [torch.randn(4, 3)], ["fc"])
    with pytest.raises(ValueError, match="no batch"):
        output_fisher(_net(), [], ["3"])
    with pytest.raises(ValueError, match="not an nn.Conv2d"):
        output_fisher(_net(), _batches(), ["1"])


def test_output_fisher_refuses_a_layer_called_twice():
    """A shared layer's second call replaced its first call's probe: the Fisher silently
    counted the last call only. It is refused, and the model keeps no hook and its mode."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.block(torch.relu(self.block(x)))))

    net = Shared().train()
    with pytest.raises(ValueError, match="'block' is called more than once"):
        output_fisher(net, [torch.randn(5, 4)], ["block"])
    assert net.training and not net.block._forward_hooks
    assert output_fisher(net, [torch.randn(5, 4)], ["head"])["head"].shape == (3,)


class _NoBatches:
    """Batches that fail the test if iterated: argument errors come before any forward pass."""

    def __iter__(self):
        raise AssertionError("output_fisher iterated the batches before checking its arguments")


def test_output_fisher_layers_and_max_batches_arguments():
    net = _net().eval()
    batches = _batches(n_batches=2, size=3)
    single = output_fisher(net, batches, ["3"])
    # A string is one name (as in collect_covariances), not the names of its characters.
    by_string = output_fisher(net, batches, "3")
    assert list(by_string) == ["3"] and torch.equal(by_string["3"], single["3"])
    with pytest.raises(ValueError, match="no module named '37'"):
        output_fisher(net, batches, "37")
    # A repeated name is measured once: the layer is hooked once and its Fisher not doubled.
    repeated = output_fisher(net, batches, ["3", "7", "3"])
    assert list(repeated) == ["3", "7"]
    torch.testing.assert_close(repeated["3"], single["3"], rtol=1e-12, atol=0)
    for layers, error in [([], ValueError), ((), ValueError), ([3], TypeError)]:
        with pytest.raises(error, match="`layers`"):
            output_fisher(net, _NoBatches(), layers)
    for max_batches, error in [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]:
        with pytest.raises(error, match="`max_batches`"):
            output_fisher(net, _NoBatches(), ["3"], max_batches=max_batches)


class _Branches(nn.Module):
    """``c1`` feeds both the returned logits and ``aux``, whose output is dropped; with
    ``frozen``, ``c1`` runs under ``torch.no_grad()`` (a frozen backbone)."""

    def __init__(self, frozen=False):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = frozen
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 2, 1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        with torch.set_grad_enabled(not self.frozen):
            h = torch.relu(self.c1(x))
        self.aux(h)  # an auxiliary head: computed, not returned
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


class _NoGrad(nn.Module):
    """The whole forward under ``torch.no_grad()``: the logits do not require grad."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.no_grad():
            return self.inner(x)


def test_output_fisher_of_layers_the_loss_does_not_depend_on():
    net = _Branches().double().eval()
    batches = _batches(n_batches=2, size=4)
    # Such a layer has a zero Fisher (not an autograd error), with a warning naming it.
    with pytest.warns(UserWarning, match=r"\['aux'\]"):
        got = output_fisher(net, batches, ["c1", "aux", "c2"])
    assert torch.equal(got["aux"], torch.zeros(2, dtype=torch.float64))
    reached = output_fisher(net, batches, ["c1", "c2"])
    for name in ("c1", "c2"):
        assert float(got[name].sum()) > 0
        torch.testing.assert_close(got[name], reached[name], rtol=1e-12, atol=0)
    # The weightings fall back to no weighting there.
    assert torch.equal(fisher_row_weights(got)["aux"], torch.ones(2, dtype=torch.float64))
    with pytest.warns(UserWarning, match="aux"):
        full = output_fisher(net, batches, ["aux", "c2"], full=True)
    root, inverse = fisher_matrix_roots(full["aux"])
    assert torch.equal(root, torch.eye(2, dtype=torch.float64)) and torch.equal(inverse, root)
    # A frozen backbone: its layer has a zero Fisher, the trainable head does not.
    frozen = _Branches(frozen=True).double().eval()
    with pytest.warns(UserWarning, match=r"\['c1'\]"):
        got = output_fisher(frozen, batches, ["c1", "c2"])
    assert float(got["c1"].abs().sum()) == 0 and float(got["c2"].sum()) > 0
    # No layer reaches the loss: nothing to measure.
    with pytest.raises(ValueError, match="does not depend on the output of any"):
        output_fisher(frozen, batches, ["c1", "aux"])
    with pytest.raises(ValueError, match="does not depend on the output of any"):
        output_fisher(_NoGrad(_net()), batches, ["inner.3"])
    # And so compress_sequential's Fisher options run, rather than fail in autograd.
    for fit_weighting in ("fisher", "kfac"):
        with pytest.warns(UserWarning, match=r"\['aux'\]"):
            compress_sequential(
                net, batches, "tucker2", ratio=0.5, layers=["c1", "aux", "c2"], fit_weighting=fit_weighting,
                progress=False, n_iter_max=5, random_state=0,
            )


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_output_fisher_refuses_a_single_output(head):
    # The cross-entropy of a single class is identically 0: the Fisher would be silently zero.
    torch.manual_seed(0)
    body = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    if head == "linear":
        net = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    else:
        net = nn.Sequential(*body, nn.Conv2d(4, 1, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        output_fisher(net.double().eval(), _batches(n_batches=1, size=2), ["0"])


def test_fisher_row_weights_floor():
    w = fisher_row_weights({"a": torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64), "b": torch.zeros(2)})
    assert float(w["a"][0]) == pytest.approx(1e-3 * 4 / 3)
    assert torch.equal(w["b"], torch.ones(2))


def _two_layer_prepared():
    torch.manual_seed(0)
    weight = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    a = torch.randn(144, 144, dtype=torch.float64)
    sigma = a @ a.T / 144 + 0.1 * torch.eye(144, dtype=torch.float64)
    # Two identical layers: only their sensitivity differs.
    return [(name, None, "tucker2", weight, sigma) for name in ("low", "high")]


def test_weighted_allocation_prefers_the_sensitive_layer():
    prepared = _two_layer_prepared()
    plain = _budget_ranks(prepared, 0.25)
    assert plain["low"] == plain["high"]  # identical curves: no preference
    ones = torch.ones(16, dtype=torch.float64)
    weighted = _budget_ranks(prepared, 0.25, {"low": ones, "high": 100 * ones})
    assert weighted["high"][0] > weighted["low"][0]
    # Swapping the sensitivities swaps the ranks.
    swapped = _budget_ranks(prepared, 0.25, {"low": 100 * ones, "high": ones})
    assert swapped["low"] == weighted["high"] and swapped["high"] == weighted["low"]


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_kfac_weighted_fit_lowers_the_kfac_weighted_error(method):
    net = _net().eval()
    with torch.no_grad():
        # The classifier reads channels 0 and 1 of layer 5's output only through their
        # difference, strongly: the Fisher is far from diagonal (channels 0 and 1 are
        # perfectly anti-correlated in it), which the diagonal weighting cannot express.
        net[7].weight[:, :9] *= 20
        net[7].weight[:, 9:18] = -net[7].weight[:, :9]
    batches = _batches(n_batches=4, size=16)
    fisher = output_fisher(net, batches, ["5"], full=True)["5"]
    ranks = {"tucker2": (2, 3), "cp": 3, "svd": 2}[method]
    common = dict(ranks={"5": ranks}, layers=["5"], progress=False, n_iter_max=200, tol=1e-12, random_state=0)
    diagonal = compress_sequential(net, batches, method, fit_weighting="fisher", **common)
    kfac, report = compress_sequential(net, batches, method, fit_weighting="kfac", return_report=True, **common)
    assert any("K-FAC" in note for note in report[0].notes)
    e_diagonal = _weighted_output_error(diagonal, net, "5", batches, fisher)
    e_kfac = _weighted_output_error(kfac, net, "5", batches, fisher)
    assert e_kfac < 0.8 * e_diagonal


def _weighted_output_error(small, net, name, batches, fisher):
    """Mean over positions of ``delta^T F delta``, ``delta`` the layer's output error, for a
    per-channel Fisher vector (``F`` diagonal) or a full Fisher matrix ``F``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, _ in batches:
            outs = []
            h1 = net.get_submodule(name).register_forward_hook(lambda m, a, o: outs.append(o))
            net(x)
            h1.remove()
            h2 = small.get_submodule(name).register_forward_hook(lambda m, a, o: outs.append(o))
            small(x)
            h2.remove()
            diff = (outs[0] - outs[1]).transpose(0, 1).reshape(outs[0].shape[1], -1)
            weighted = fisher @ diff if fisher.dim() == 2 else fisher[:, None] * diff
            total += float((weighted * diff).sum())
            count += diff.shape[1]
    return total / count


@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_fisher_weighted_fit_lowers_the_weighted_error(method):
    net = _net().eval()
    with torch.no_grad():
        # Make channel 0 of layer 5's output 20x more influential on the logits, so that its
        # Fisher stands out and the weighted fit has something to prefer.
        net[7].weight[:, :9] *= 20
    batches = _batches(n_batches=4, size=16)
    # The first compressed layer: x~ = x and the fit is the plain weighted problem.
    fisher = fisher_row_weights(output_fisher(net, batches, ["5"]))["5"]
    common = dict(ranks={"5": (2, 3) if method == "tucker2" else 2}, layers=["5"], progress=False,
                  n_iter_max=200, tol=1e-12, random_state=0)
    plain = compress_sequential(net, batches, method, **common)
    weighted = compress_sequential(net, batches, method, fit_weighting="fisher", **common)
    e_plain = _weighted_output_error(plain, net, "5", batches, fisher)
    e_weighted = _weighted_output_error(weighted, net, "5", batches, fisher)
    assert e_weighted < 0.8 * e_plain


def test_budget_weighting_fisher_uses_the_output_fisher():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4),
    ).double().eval()
    batches = _batches()
    layers = ["2", "4"]
    small, report = compress_sequential(
        net, batches, "tucker2", budget=0.5, layers=layers, budget_weighting="fisher",
        return_report=True, progress=False, n_iter_max=5, random_state=0,
    )
    got = {r.name: r.rank for r in report if r.method == "tucker2"}
    stats = collect_covariances(net, batches, layers=layers, progress=False)
    weights = fisher_row_weights(output_fisher(net, batches, layers))
    jobs = plan_compression(net, stats, "tucker2", budget=0.5, layers=layers, budget_weights=weights)
    assert got == {job.name: job.rank for job in jobs}
    relative = plan_compression(net, stats, "tucker2", budget=0.5, layers=layers)
    # The weighting changes the allocation on this network (else the test above proves nothing).
    assert {job.name: job.rank for job in relative} != got


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget_weighting": "loss"}, "budget_weighting"),
        ({"fit_weighting": "relative"}, "fit_weighting"),
    ],
)
def test_bad_weighting_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress_sequential(_net().eval(), _batches(), "tucker2", budget=0.3, progress=False, **kwargs)
