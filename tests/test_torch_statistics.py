"""Tests of the streaming input-patch statistics (tensorly_dataaware.torch.statistics)."""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import statistics as stats_module  # noqa: E402
from tensorly_dataaware.torch.statistics import (  # noqa: E402
    LayerStatistics,
    collect_covariances,
    load_statistics,
    merge_statistics,
    patches_for,
    save_statistics,
)

F64 = torch.float64

# nn.Conv2d's own notice about the asymmetric 'same' padding of even kernels (the reference).
_FILTER = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


# Tiny tensors: one thread (see the fixture in conftest.py).
pytestmark = [_FILTER, pytest.mark.usefixtures("torch_single_thread")]


KERNELS = [(3, 3), (3, 1), (1, 3), (5, 3), (2, 3)]
# (stride, padding, padding_mode, dilation, groups); 'same' needs stride 1.  The kernels are a
# pytest parameter and the rest a loop inside the test: 300 tiny cases as separate pytest items
# would cost more in per-item overhead than in computation.
SETTINGS = [
    setting
    for setting in itertools.product([1, 2], [0, 1, "same"], ["zeros", "reflect", "circular"], [1, 2], [1, 2])
    if not (setting[1] == "same" and setting[0] != 1)
]


def _conv(kernel, stride, padding, mode, dilation, groups, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(
        4, 6, kernel, stride=stride, padding=padding, padding_mode=mode, dilation=dilation, groups=groups,
        bias=False, dtype=F64,
    )


def _brute_force_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches by F.unfold on an input padded the way nn.Conv2d pads it, split per group."""
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        pads = []
        for k, d in zip(conv.kernel_size[::-1], conv.dilation[::-1]):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, pads, mode=mode)
    cols = F.unfold(padded, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # (B, C*K, L)
    g = conv.groups
    n = cols.shape[1] // g
    return torch.stack([cols[:, i * n:(i + 1) * n, :].transpose(1, 2).reshape(-1, n) for i in range(g)])


def _centered_cov(p: torch.Tensor) -> torch.Tensor:
    centered = p - p.mean(dim=0, keepdim=True)
    return centered.T @ centered / p.shape[0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_conv_patches_and_covariance_match_brute_force(kernel):
    x = torch.randn(2, 4, 9, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    for stride, padding, mode, dilation, groups in SETTINGS:
        config = f"kernel={kernel} stride={stride} padding={padding!r} mode={mode} dilation={dilation} groups={groups}"
        conv = _conv(kernel, stride, padding, mode, dilation, groups)
        patches = patches_for(conv, x)
        # Column order: every group's patches times its weight block reproduce the conv output.
        y = conv(x)
        batch, t, ho, wo = y.shape
        w = conv.weight.reshape(groups, t // groups, -1)
        expected = y.reshape(batch, groups, t // groups, ho * wo).permute(1, 0, 3, 2)
        got = torch.bmm(patches, w.transpose(1, 2)).reshape(groups, batch, ho * wo, t // groups)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{config}: {m}")

        brute = _brute_force_patches(conv, x)
        stats = LayerStatistics.from_module(conv)
        stats.update(patches)
        assert stats.count == brute.shape[1], config
        for g in range(groups):
            torch.testing.assert_close(
                stats.covariance[g], _centered_cov(brute[g]), rtol=1e-10, atol=1e-12, msg=lambda m: f"{config}: {m}"
            )
            torch.testing.assert_close(
                stats.second_moment[g], brute[g].T @ brute[g] / brute.shape[1], msg=lambda m: f"{config}: {m}"
            )
            torch.testing.assert_close(stats.mean[g], brute[g].mean(0), msg=lambda m: f"{config}: {m}")


def test_conv1d_patches_match_output():
    for padding, mode in [(1, "zeros"), ("same", "reflect"), (2, "circular"), ("valid", "zeros")]:
        conv = nn.Conv1d(4, 6, 3, stride=1 if padding == "same" else 2, padding=padding, padding_mode=mode,
                         dilation=2, groups=2, bias=False, dtype=F64)
        x = torch.randn(3, 4, 13, dtype=F64)
        patches = patches_for(conv, x)
        y = conv(x)  # (B, T, L)
        w = conv.weight.reshape(2, 3, -1)
        got = torch.bmm(patches, w.transpose(1, 2)).reshape(2, 3, y.shape[-1], 3)
        expected = y.reshape(3, 2, 3, y.shape[-1]).permute(1, 0, 3, 2)
        torch.testing.assert_close(got, expected)
        # An unbatched input gives the patches of a batch of one.
        torch.testing.assert_close(patches_for(conv, x[0]), patches_for(conv, x[:1]))


def test_linear_with_3d_input():
    lin = nn.Linear(5, 2, dtype=F64)
    x = torch.randn(3, 7, 5, dtype=F64)
    p = patches_for(lin, x)
    assert p.shape == (1, 21, 5)
    stats = LayerStatistics.from_module(lin)
    stats.update(p)
    flat = x.reshape(-1, 5)
    torch.testing.assert_close(stats.sigma(), _centered_cov(flat))
    torch.testing.assert_close(stats.sigma(centered=False), flat.T @ flat / 21)
    with pytest.raises(ValueError, match="in_features|5"):
        patches_for(lin, torch.randn(3, 4, dtype=F64))


def test_sigma_matches_uncentered_norm_identity():
    # E||dW x||^2 = tr(dW M dW^T) with M the uncentered second moment.
    conv = _conv((3, 3), 1, 1, "zeros", 1, 1)
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    stats = LayerStatistics.from_module(conv)
    p = patches_for(conv, x)
    stats.update(p)
    dw = torch.randn(6, 36, dtype=F64)
    lhs = ((p[0] @ dw.T) ** 2).sum(1).mean()
    torch.testing.assert_close(lhs, torch.trace(dw @ stats.sigma(centered=False) @ dw.T))


def test_subsampled_positions_are_a_seeded_subset_and_unbiased():
    x = torch.randn(2, 4, 9, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    for conv in (_conv((3, 3), 1, 1, "reflect", 1, 2), _conv((5, 3), 2, 1, "circular", 2, 1)):
        full = patches_for(conv, x)
        groups, per_image = conv.groups, full.shape[1] // 2
        sub = patches_for(conv, x, max_positions_per_image=4, generator=torch.Generator().manual_seed(3))
        assert sub.shape == (groups, 8, full.shape[2])
        for g in range(groups):
            # Each sampled patch of image b is one of image b's patches, and they are distinct.
            for b in range(2):
                rows = full[g, b * per_image:(b + 1) * per_image]
                dist = (sub[g, b * 4:(b + 1) * 4, None, :] - rows[None]).abs().sum(-1)
                assert float(dist.min(1).values.max()) == 0.0
                assert len(set(dist.argmin(1).tolist())) == 4
        again = patches_for(conv, x, max_positions_per_image=4, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sub, again)
        # Asking for at least all positions returns the full patches.
        torch.testing.assert_close(patches_for(conv, x, max_positions_per_image=per_image), full)
    # Unbiased: the sub-sampled second moment over many draws approaches the full one.  Copies
    # of the images get independent draws, so one call makes many draws at once.
    conv = _conv((3, 3), 1, 1, "reflect", 1, 2)
    x = x[..., :5, :5]
    acc = LayerStatistics.from_module(conv)
    acc.update(patches_for(conv, x.repeat(2000, 1, 1, 1), max_positions_per_image=4, generator=torch.Generator().manual_seed(0)))
    exact = LayerStatistics.from_module(conv)
    exact.update(patches_for(conv, x))
    err = (acc.second_moment - exact.second_moment).abs().max() / exact.second_moment.abs().max()
    assert err < 0.03  # 0.014 measured; always drawing the first positions gives 0.71


def test_merge_of_two_halves_equals_whole():
    conv = _conv((3, 3), 2, 1, "zeros", 1, 2)
    x = torch.randn(6, 4, 9, 9, dtype=F64)
    whole, first, second = (LayerStatistics.from_module(conv) for _ in range(3))
    whole.update(patches_for(conv, x))
    first.update(patches_for(conv, x[:2]))
    second.update(patches_for(conv, x[2:]))
    merged = first + second
    assert merged.count == whole.count
    torch.testing.assert_close(merged.covariance, whole.covariance)
    torch.testing.assert_close(merged.sum_outer, whole.sum_outer)
    assert first.count == 2 * 25  # operands untouched
    torch.testing.assert_close(sum([first, second]).covariance, whole.covariance)
    with pytest.raises(ValueError, match="different layers"):
        first.merge(LayerStatistics.from_module(_conv((3, 3), 1, 1, "zeros", 1, 2)))
    # Mapping version.
    merged_map = merge_statistics({"c": first}, {"c": second})
    torch.testing.assert_close(merged_map["c"].sum, whole.sum)
    with pytest.raises(ValueError, match="different layer sets"):
        merge_statistics({"c": first}, {"d": second})


def test_save_load_round_trip(tmp_path):
    conv = _conv((5, 3), 1, "same", "circular", 2, 2)
    stats = LayerStatistics.from_module(conv)
    stats.update(patches_for(conv, torch.randn(2, 4, 9, 8, dtype=F64)))
    path = tmp_path / "layer.pt"
    stats.save(path)
    loaded = LayerStatistics.load(path)
    assert (loaded.kind, loaded.weight_shape, loaded.groups, loaded.count) == (
        stats.kind, stats.weight_shape, stats.groups, stats.count)
    assert loaded.hyper_parameters == stats.hyper_parameters
    assert torch.equal(loaded.sum_outer, stats.sum_outer) and torch.equal(loaded.sum, stats.sum)
    loaded.merge(stats)  # metadata still compatible after the round trip

    lin = nn.Linear(3, 2)
    lin_stats = LayerStatistics.from_module(lin)
    lin_stats.update(torch.randn(5, 3))
    mapping = {"conv": stats, "fc": lin_stats}
    save_statistics(mapping, tmp_path / "all.pt")
    back = load_statistics(tmp_path / "all.pt")
    assert list(back) == ["conv", "fc"]
    torch.testing.assert_close(back["fc"].covariance, lin_stats.covariance)
    with pytest.raises(ValueError, match="save_statistics"):
        load_statistics(path)
    with pytest.raises(ValueError, match="LayerStatistics"):
        LayerStatistics.load(tmp_path / "all.pt")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    stats = LayerStatistics.from_module(nn.Linear(3, 2))
    stats.update(torch.randn(4, 3))
    path = tmp_path / "stats.pt"
    stats.save(path)
    before = path.read_bytes()

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(stats_module.torch, "save", broken_save)
    stats.update(torch.randn(4, 3))
    with pytest.raises(OSError, match="disk full"):
        stats.save(path)
    with pytest.raises(OSError, match="disk full"):
        save_statistics({"x": stats}, tmp_path / "new.pt")
    assert path.read_bytes() == before  # the previous file is intact
    assert sorted(os.listdir(tmp_path)) == ["stats.pt"]  # no temporary or partial file left


def test_update_rejects_bad_input_and_stays_unchanged():
    stats = LayerStatistics.from_module(_conv((3, 3), 1, 1, "zeros", 1, 2))
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.randn(5, 18))  # groups=2 needs a group axis
    with pytest.raises(ValueError, match="No data"):
        stats.covariance
    p = torch.randn(2, 5, 18, dtype=F64)
    p[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.update(p)
    assert stats.count == 0 and not stats.sum_outer.any()
    with pytest.raises(ValueError, match="group"):
        stats.sigma()
    stats.update(torch.randn(2, 5, 18))
    assert stats.sigma(group=1).shape == (18, 18)
    with pytest.raises(TypeError, match="Linear"):
        patches_for(nn.ReLU(), torch.randn(2, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        LayerStatistics.from_module(nn.ConvTranspose2d(2, 2, 3))


# --------------------------------------------------------------------------------------------
# collect_covariances
# --------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, (3, 1), stride=2, groups=2)
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.conv2(self.act(self.conv1(x)))
        return self.fc(self.drop(self.pool(x)).flatten(1))


def _data(n_batches=3, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=gen), torch.zeros(batch)) for _ in range(n_batches)]


def _manual(model, data):
    """Reference statistics computed by running the layers by hand."""
    ref = {name: LayerStatistics.from_module(getattr(model, name)) for name in ("conv1", "conv2", "fc")}
    with torch.no_grad():
        for x, _ in data:
            h1 = x
            h2 = model.act(model.conv1(h1))
            h3 = model.pool(model.conv2(h2)).flatten(1)  # dropout is the identity in eval mode
            for name, h in (("conv1", h1), ("conv2", h2), ("fc", h3)):
                ref[name].update(patches_for(getattr(model, name), h.double()))
    return ref


def _assert_within_float32_bound(fast, ref):
    """Each entry within 4 * gamma * sqrt(s_i s_j) (the documented bound; s from the diagonal).

    The documented bound uses the sums of squares over the whole padded input, which are at
    least the patch Gram diagonal. On these tests' dense 8x8 inputs the diagonal is close to
    them, and the extra factor 2 covers the difference; that does not hold in general (a
    channel can be zero at every position one kernel offset visits: see
    ``test_collect_grouped_and_depthwise_layers_match_patches``, which checks the documented
    bound itself).
    """
    from tensorly_dataaware.torch.statistics import float32_error_bound

    for name in ref:
        exact = ref[name].sum_outer
        d = exact.diagonal(dim1=1, dim2=2)
        bound = 8 * float32_error_bound() * torch.sqrt(d[:, :, None] * d[:, None, :])
        assert bool(((fast[name].sum_outer - exact).abs() <= bound).all()), name
        assert fast[name].count == ref[name].count


def test_collect_grouped_and_depthwise_layers_match_patches():
    """collect_covariances on a small MobileNet-style network (depthwise 3x3 at strides 1 and
    2, grouped 3x3 with 2, 4 and 12 channels per group, a pointwise 1x1): every layer's moments
    equal those of its float64 patches (float64 products), and are within the float32 bound
    by default."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise, shift route
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),  # depthwise, patch route
        nn.Conv2d(8, 48, 3, padding=1, groups=4), nn.ReLU(),  # 2 channels per group
        nn.Conv2d(48, 48, 3, padding=1, groups=12), nn.ReLU(),  # 4 per group: two super-groups
        nn.Conv2d(48, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),  # 12 per group, patches
        nn.Conv2d(16, 12, 1),
    ).eval()
    data = _data(n_batches=2, batch=5)
    ref, squares = {}, {}
    with torch.no_grad():
        for x, _ in data:
            h = x
            for name, layer in model.named_children():
                if isinstance(layer, nn.Conv2d):
                    ref.setdefault(name, LayerStatistics.from_module(layer)).update(patches_for(layer, h.double()))
                    squares[name] = squares.get(name, 0) + (h.double() ** 2).sum((0, 2, 3))
                h = layer(h)
    exact = collect_covariances(model, data, progress=False, precision="float64")
    assert list(exact) == list(ref)
    for name in ref:
        assert exact[name].groups == ref[name].groups and exact[name].count == ref[name].count
        torch.testing.assert_close(exact[name].sum_outer, ref[name].sum_outer, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(exact[name].sum, ref[name].sum, rtol=1e-10, atol=1e-9)
    # The documented float32 bound, 4 * gamma * sqrt(s_i s_j) with s the sums of squares of
    # the input channels (zero padding adds nothing). Not the patch Gram diagonal: on these
    # 4x4 maps a channel can be zero at every position one kernel offset visits, and that
    # offset's entries are then the difference of two nonzero float32 products.
    from tensorly_dataaware.torch.statistics import float32_error_bound

    fast = collect_covariances(model, data, progress=False)
    for name in ref:
        groups, k = ref[name].groups, math.prod(ref[name].weight_shape[2:])
        s = squares[name].view(groups, -1).repeat_interleave(k, dim=1)
        bound = 4 * float32_error_bound() * torch.sqrt(s[:, :, None] * s[:, None, :])
        assert bool(((fast[name].sum_outer - ref[name].sum_outer).abs() <= bound).all()), name
        assert float((fast[name].sum_outer - ref[name].sum_outer).abs().max()) > 0  # really float32


def test_collect_matches_manual_and_cleans_up():
    torch.manual_seed(0)
    model = _Net()
    model.train()
    model.pool.eval()  # a mixed-mode model: every flag must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    data = _data()
    result = collect_covariances(model, data, progress=False, precision="float64")
    assert list(result) == ["conv1", "conv2", "fc"]
    ref = _manual(model, data)
    for name in result:
        assert result[name].count == ref[name].count
        torch.testing.assert_close(result[name].sum_outer, ref[name].sum_outer)
        torch.testing.assert_close(result[name].sum, ref[name].sum)
    # The default multiplies the float32 activations in float32: within the documented bound.
    fast = collect_covariances(model, data, progress=False)
    _assert_within_float32_bound(fast, ref)
    assert result["conv2"].groups == 2
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(not m._forward_pre_hooks for m in model.modules())
    # Selection by name, single string allowed.
    only = collect_covariances(model, data, ["fc"], progress=False)
    assert list(only) == ["fc"]
    assert list(collect_covariances(model, data, "conv2", progress=False)) == ["conv2"]


def test_collect_limits_and_generator_input():
    model = _Net()
    data = _data(n_batches=4, batch=4)
    res = collect_covariances(model, data, ["fc"], max_batches=2, progress=False)
    assert res["fc"].count == 8
    res = collect_covariances(model, data, ["fc"], max_samples=6, progress=False)
    assert res["fc"].count == 6
    ref = _manual(model, [(data[0][0], None), (data[1][0][:2], None)])
    torch.testing.assert_close(res["fc"].sum_outer, ref["fc"].sum_outer)
    # A generator (no len) of bare tensors works too.
    res = collect_covariances(model, (x for x, _ in data), ["conv1"], progress=False, max_positions_per_image=10)
    assert res["conv1"].count == 16 * 10
    res2 = collect_covariances(model, (x for x, _ in data), ["conv1"], progress=False, max_positions_per_image=10)
    torch.testing.assert_close(res["conv1"].sum_outer, res2["conv1"].sum_outer)  # seeded
    # NumPy integers (e.g. from a config array) are ordinary ints to the limits.
    import numpy as np

    res = collect_covariances(model, data, ["fc"], max_batches=np.int64(2), max_samples=np.int32(6), progress=False)
    assert res["fc"].count == 6 and type(res["fc"].count) is int


def test_collect_bad_inputs_raise_and_clean_up():
    model = _Net()
    model.train()
    data = _data()
    with pytest.raises(ValueError, match="conv1") as info:
        collect_covariances(model, data, ["nope"], progress=False)
    assert "unknown" in str(info.value)
    with pytest.raises(ValueError, match="unsupported type"):
        collect_covariances(model, data, ["act"], progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        collect_covariances(model, data, max_batches=0, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        collect_covariances(model, [], progress=False)
    with pytest.raises(TypeError, match="first item"):
        collect_covariances(model, [{"x": data[0][0]}], progress=False)
    bad = [(data[0][0].clone(), None), (data[1][0].clone(), None)]
    bad[1][0][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="Batch 1 contains NaN or Inf"):
        collect_covariances(model, bad, progress=False)
    # A non-finite value produced inside the model is caught at the layer.
    model.conv1.weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv2.*NaN"):
        collect_covariances(model, data, ["conv2"], progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("api", ["collect", "compress", "sequential"])
def test_torchscript_model_is_refused_with_a_clear_error(api):
    """A scripted model (an nn.Module whose layers are script modules) gets an error that
    says so, not a misleading "no layer"; a non-module gets a TypeError too."""
    from tensorly_dataaware.torch import compress, compress_sequential

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    batches = [torch.randn(2, 3, 8, 8)]
    stats = collect_covariances(model, batches, progress=False)
    calls = {
        "collect": lambda m: collect_covariances(m, batches, progress=False),
        "compress": lambda m: compress(m, stats, ratio=0.5, progress=False),
        "sequential": lambda m: compress_sequential(m, batches, ratio=0.5, progress=False),
    }
    with pytest.raises(TypeError, match="TorchScript"):
        calls[api](torch.jit.script(model))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        calls[api]({"not": "a module"})


def test_collect_float64_model_and_unused_layer_warning():
    model = _Net().double()
    model.extra = nn.Linear(2, 2)  # never called in forward
    data = [x.double() for x, _ in _data(n_batches=1)]
    with pytest.warns(RuntimeWarning, match="extra"):
        res = collect_covariances(model, data, progress=False)
    assert "extra" not in res and res["conv1"].sum.dtype == F64


# --------------------------------------------------------------------------------------------
# Precision policy of the products
# --------------------------------------------------------------------------------------------


def test_float32_products_meet_documented_bound_and_float64_is_exact():
    from tensorly_dataaware.torch.statistics import FLOAT32_BLOCK_ROWS, float32_error_bound

    gen = torch.Generator().manual_seed(0)
    m, n = 2 * FLOAT32_BLOCK_ROWS + 123, 7  # several blocks and a ragged last one
    # Positive data (post-ReLU-like, mean >> 0): no cancellation, the hardest case for the bound.
    p32 = (torch.rand(m, n, generator=gen) * 3 + 0.5).to(torch.float32)
    exact = p32.double().T @ p32.double()
    fast, slow = LayerStatistics("linear", (1, n)), LayerStatistics("linear", (1, n))
    fast.update(p32, precision="float32")
    slow.update(p32, precision="float64")
    bound = float32_error_bound() * (p32.double().abs().T @ p32.double().abs())
    err = (fast.sum_outer[0] - exact).abs()
    assert bool((err <= bound).all())
    # Typical error: random-sign roundings, about sqrt(rows) * u, far inside the worst case.
    assert float((err / exact.abs()).max()) < 2e-5
    torch.testing.assert_close(slow.sum_outer[0], exact, rtol=1e-13, atol=0)
    torch.testing.assert_close(fast.sum[0], p32.double().sum(0), rtol=1e-5, atol=0)
    # 'auto' takes the float32 path for float32 data, float64 for float64 data.
    auto = LayerStatistics("linear", (1, n))
    auto.update(p32)
    assert torch.equal(auto.sum_outer, fast.sum_outer)
    auto64 = LayerStatistics("linear", (1, n))
    auto64.update(p32.double())
    assert torch.equal(auto64.sum_outer, slow.sum_outer)
    with pytest.raises(ValueError, match="precision"):
        auto.update(p32, precision="half")


# --------------------------------------------------------------------------------------------
# CrossStatistics
# --------------------------------------------------------------------------------------------


def _np_cross_reference(x, y):
    import numpy as np

    x, y = x.double().numpy(), y.double().numpy()
    mx, my = x.mean(0), y.mean(0)
    return {
        "mean_x": mx,
        "mean_y": my,
        "cov_yy": (y - my).T @ (y - my) / len(y),
        "cov_xy": (x - mx).T @ (y - my) / len(y),
        "second_moment_yy": y.T @ y / len(y),
        "cross_moment_xy": x.T @ y / len(y),
        "np": np,
    }


@pytest.mark.parametrize("dtype,precision", [(F64, "auto"), (torch.float32, "auto"), (torch.float32, "float64")])
def test_cross_statistics_streaming_equals_one_batch_and_numpy(dtype, precision):
    from tensorly_dataaware.torch.statistics import CrossStatistics

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 300, 6, generator=gen, dtype=dtype) + 1.0
    y = 0.7 * x + 0.2 * torch.randn(2, 300, 6, generator=gen, dtype=dtype) - 0.5  # correlated, not equal
    whole = CrossStatistics(6, groups=2)
    whole.update(x, y, precision=precision)
    streamed = CrossStatistics(6, groups=2)
    for start in range(0, 300, 70):
        streamed.update(x[:, start:start + 70], y[:, start:start + 70], precision=precision)
    assert streamed.count == whole.count == 300
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 or precision == "float64" else dict(rtol=1e-5, atol=1e-5)
    for name in ("mean_x", "mean_y", "cov_yy", "cov_xy", "second_moment_yy", "cross_moment_xy"):
        torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), **tol)
        for g in range(2):
            ref = _np_cross_reference(x[g], y[g])
            torch.testing.assert_close(getattr(streamed, name)[g], torch.from_numpy(ref[name]), **tol)
    assert torch.equal(streamed.cov_yy, streamed.cov_yy.transpose(1, 2))
    # Rows of cov_xy index x: not symmetric, and its transpose is the (y, x) covariance.
    assert not torch.allclose(streamed.cov_xy, streamed.cov_xy.transpose(1, 2))


def test_state_dicts_are_snapshots_and_rebuilt_statistics_are_independent():
    """``state_dict()`` is a snapshot, and statistics rebuilt from it are a new object: they
    used to share the sums' memory (a CPU tensor's ``.cpu()`` is itself), so updating one
    changed the other and the snapshot (sums of 144 patches beside a count of 72)."""
    from tensorly_dataaware.torch.statistics import CrossStatistics

    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(40, 5, generator=gen, dtype=F64), torch.randn(40, 5, generator=gen, dtype=F64)
    layer = LayerStatistics("linear", (3, 5))
    layer.update(x[:20])
    cross = CrossStatistics(5)
    cross.update(x[:20], y[:20])
    cases = ((layer, ("sum", "sum_outer"), lambda s: s.update(x[20:])),
             (cross, ("sum_x", "sum_y", "sum_yy", "sum_xy"), lambda s: s.update(x[20:], y[20:])))
    for original, names, more in cases:
        before = {name: getattr(original, name).clone() for name in names}
        snapshot = original.state_dict()
        rebuilt = type(original).from_state_dict(snapshot)
        more(rebuilt)
        assert rebuilt.count == 40 and original.count == 20
        for name in names:
            assert torch.equal(getattr(original, name), before[name]), f"{name}: the original changed"
        more(original)
        for name in names:
            assert torch.equal(snapshot[name], before[name]), f"{name}: the snapshot followed an update"


def test_cross_statistics_merge_state_and_errors(tmp_path):
    from tensorly_dataaware.torch.statistics import CrossStatistics

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 4, generator=gen, dtype=F64), torch.randn(50, 4, generator=gen, dtype=F64)
    a, b, whole = CrossStatistics(4), CrossStatistics(4), CrossStatistics(4)
    a.update(x[:20], y[:20])
    b.update(x[20:], y[20:])
    whole.update(x, y)
    merged = a + b
    assert merged.count == 50 and a.count == 20  # operands untouched
    for mine, ref in zip(merged.sum_tensors(), whole.sum_tensors()):
        torch.testing.assert_close(mine, ref)
    # The raw sums are the live accumulators (what an all_reduce updates in place).
    a.sum_tensors()[0].mul_(0)
    assert not a.sum_x.any()
    back = CrossStatistics.from_state_dict(whole.state_dict())
    assert back.count == 50 and torch.equal(back.sum_xy, whole.sum_xy)
    torch.save(whole.state_dict(), tmp_path / "cross.pt")
    assert torch.equal(CrossStatistics.from_state_dict(torch.load(tmp_path / "cross.pt", weights_only=True)).sum_yy,
                       whole.sum_yy)
    state = whole.state_dict()
    state["sum_yy"] = state["sum_yy"].clone()
    state["sum_yy"][0, 0, 1] += 100.0
    with pytest.raises(ValueError, match="symmetric"):
        CrossStatistics.from_state_dict(state)
    with pytest.raises(ValueError, match="count is 0"):
        CrossStatistics.from_state_dict({**whole.state_dict(), "count": 0})
    with pytest.raises(ValueError, match="same shape"):
        whole.update(x, y[:10])
    with pytest.raises(ValueError, match="shape"):
        whole.update(x[:, :3], y[:, :3])
    bad = y.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        whole.update(x, bad)
    assert whole.count == 50
    with pytest.raises(ValueError, match="count == 0"):
        CrossStatistics(4).cov_xy
    with pytest.raises(ValueError, match="n, groups"):
        whole.merge(CrossStatistics(5))


def test_cross_statistics_all_reduce_single_process(tmp_path):
    import torch.distributed as dist

    from tensorly_dataaware.torch.statistics import CrossStatistics

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cross = CrossStatistics(3)
        cross.update(torch.randn(10, 3, dtype=F64), torch.randn(10, 3, dtype=F64))
        before = [t.clone() for t in cross.sum_tensors()]
        assert cross.all_reduce_() is cross
        assert cross.count == 10
        for t, ref in zip(cross.sum_tensors(), before):
            torch.testing.assert_close(t, ref)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Shift-structure moments (stride-1 convolutions, no patch matrix)
# --------------------------------------------------------------------------------------------


def _assert_moments_match_patches(conv, x, p, config):
    """The exact-route float64 moments of ``x`` equal ``P^T P`` and the column sums of ``p``."""
    from tensorly_dataaware.torch.statistics import _batch_moments

    count, total, outer = _batch_moments(conv, x, max_positions_per_image=None, generator=None,
                                         precision="float64")
    assert count == p.shape[1], config
    torch.testing.assert_close(outer, torch.bmm(p.transpose(1, 2), p), rtol=1e-12, atol=1e-11,
                               msg=lambda m: f"{config}: {m}")
    torch.testing.assert_close(total, p.sum(1), rtol=1e-12, atol=1e-11, msg=lambda m: f"{config}: {m}")


@pytest.fixture(params=["direct", "dft"])
def full_frame_route(request, monkeypatch):
    """Force one route for the full-frame shift products of ungrouped stride-1 layers: the
    direct GEMM per shift, or the DFT along the image rows (_dft_products)."""
    monkeypatch.setattr(stats_module, "_dft_pays", lambda *args: request.param == "dft")
    return request.param


@pytest.mark.parametrize("kernel", KERNELS)
def test_shift_moments_equal_patch_moments(kernel, full_frame_route):
    """Every padding mode / dilation / groups (one GEMM, a batched GEMM over two groups, the
    elementwise products of a depthwise layer), with either full-frame route: same sums as
    P^T P of the patches, same column order."""
    x = torch.randn(2, 4, 9, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    for padding, mode, dilation, groups in itertools.product(
        [0, 1, "same", (2, 0)], ["zeros", "reflect", "circular", "replicate"], [1, 2, (2, 1)], [1, 2, 4]
    ):
        config = f"kernel={kernel} padding={padding!r} mode={mode} dilation={dilation} groups={groups}"
        conv = nn.Conv2d(4, 2 * groups, kernel, padding=padding, padding_mode=mode, dilation=dilation, groups=groups,
                         dtype=F64)
        try:
            p = patches_for(conv, x)
        except (ValueError, RuntimeError):
            continue  # padding larger than the input for reflect, or kernel larger than the input
        _assert_moments_match_patches(conv, x, p, config)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_shift_moments_of_strided_inputs(layout, full_frame_route):
    """The DFT route reads each image row's slice of the input where it lies: channels-last
    and sliced (non-contiguous) inputs give the same moments as contiguous ones."""
    gen = torch.Generator().manual_seed(12)
    if layout == "channels_last":
        x = torch.randn(3, 5, 7, 9, dtype=F64, generator=gen).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(3, 8, 9, 12, dtype=F64, generator=gen)[:, 2:7, 1:8, 2:11]
    for padding, dilation in ((1, 1), (0, 2), ("same", 1)):
        conv = nn.Conv2d(5, 3, 3, padding=padding, dilation=dilation, dtype=F64)
        _assert_moments_match_patches(conv, x, patches_for(conv, x.contiguous()), f"{layout} {padding} {dilation}")


def test_shift_moments_random_geometries(full_frame_route):
    """Random small geometries, including 1-pixel-high or -wide inputs, even and
    rectangular kernels, asymmetric padding and mixed dilations: the stride-1 route (border
    products only for the shifts that can matter; full-frame products direct or by DFT)
    equals P^T P of patches_for."""
    rng = random.Random(0)
    checked = 0
    for _ in range(200):
        kernel = (rng.choice([1, 2, 3, 4, 5]), rng.choice([1, 2, 3, 5]))
        if kernel == (1, 1):
            continue
        channels = rng.choice([1, 2, 3, 4, 20])
        groups = rng.choice([1, 2]) if channels % 2 == 0 else 1
        x = torch.randn(rng.randint(1, 3), channels, rng.randint(1, 9), rng.randint(1, 9), dtype=F64,
                        generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
        padding = rng.choice([0, 1, 2, (0, 2), (3, 1), "same"])
        mode = rng.choice(["zeros", "zeros", "reflect", "circular", "replicate"])
        dilation = rng.choice([1, 2, (1, 3)])
        config = f"kernel={kernel} x={tuple(x.shape)} padding={padding!r} mode={mode} dilation={dilation} groups={groups}"
        try:
            conv = nn.Conv2d(channels, 2 * groups, kernel, padding=padding, padding_mode=mode, dilation=dilation,
                             groups=groups, dtype=F64)
            p = patches_for(conv, x)
        except (ValueError, RuntimeError):
            continue  # padding larger than the input for reflect, or kernel larger than the input
        if p.shape[1] == 0:
            continue
        _assert_moments_match_patches(conv, x, p, config)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_major_moments_equal_patch_moments(kernel):
    """Strided convolutions (kernel-major patches, permuted moments): the same sums as P^T P
    of patches_for, in its column order, for every padding mode / dilation / groups."""
    x = torch.randn(2, 4, 9, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    checked = 0
    for stride, padding, mode, dilation, groups in itertools.product(
        [2, (1, 2), (3, 2)], [0, 1, (2, 0)], ["zeros", "reflect", "circular"], [1, (2, 1)], [1, 2, 4]
    ):
        config = f"kernel={kernel} stride={stride} padding={padding!r} mode={mode} dilation={dilation} groups={groups}"
        conv = nn.Conv2d(4, 2 * groups, kernel, stride=stride, padding=padding, padding_mode=mode, dilation=dilation,
                         groups=groups, dtype=F64)
        try:
            p = patches_for(conv, x)
        except (ValueError, RuntimeError):
            continue
        _assert_moments_match_patches(conv, x, p, config)
        checked += 1
    assert checked > 20


def test_shift_moments_conv1d_and_float32_bound():
    from tensorly_dataaware.torch.statistics import _batch_moments, float32_error_bound

    conv = nn.Conv1d(3, 5, 3, padding=2, dilation=2, padding_mode="reflect")
    x = torch.randn(4, 3, 17, generator=torch.Generator().manual_seed(6)) + 2.0  # mean >> std
    p = patches_for(conv, x.double())
    exact = torch.bmm(p.transpose(1, 2), p)
    count, total, outer = _batch_moments(conv, x, max_positions_per_image=None, generator=None, precision="auto")
    assert count == p.shape[1]
    # Documented bound: 4 * gamma * sqrt(s_i s_j), s = sums of squares over the padded input.
    padded = F.pad(x.double(), (2, 2), mode="reflect")
    s = (padded**2).sum((0, 2))  # per channel
    s = s.repeat_interleave(3)  # column order: channel-major, then kernel tap
    bound = 4 * float32_error_bound() * torch.sqrt(s[:, None] * s[None, :])
    assert bool(((outer[0] - exact[0]).abs() <= bound).all())
    assert float((outer[0] - exact[0]).abs().max()) > 0  # really the float32 path
    torch.testing.assert_close(total, p.sum(1), rtol=1e-5, atol=1e-4)


def test_dft_route_float32_meets_its_bound(monkeypatch):
    """A layer the cost model sends through the DFT route, on positive float32 data (no
    cancellation): within 4 (full frame, border row, border column, corner) times the
    documented bound of one product, and the route was really taken (the error is not 0)."""
    from tensorly_dataaware.torch.statistics import _batch_moments, dft_error_bound, float32_error_bound

    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.rand(48, 16, 14, 13, generator=torch.Generator().manual_seed(8)) * 3 + 0.5
    calls = []
    real = stats_module._dft_products
    monkeypatch.setattr(stats_module, "_dft_products", lambda *a: calls.append(1) or real(*a))
    count, total, outer = _batch_moments(conv, x, max_positions_per_image=None, generator=None, precision="auto")
    assert calls, "the cost model did not choose the DFT route for a 16-channel 14x13 layer"
    p = patches_for(conv, x.double())
    exact = torch.bmm(p.transpose(1, 2), p)[0]
    s = (x.double() ** 2).sum((0, 2, 3)).repeat_interleave(9)  # channel-major, then kernel offset
    assert dft_error_bound(13) <= float32_error_bound()
    err = (outer[0] - exact).abs()
    assert bool((err <= 4 * float32_error_bound() * torch.sqrt(s[:, None] * s[None, :])).all())
    assert 0 < float((err / exact.abs()).max()) < 2e-5  # typical: random-sign roundings
    torch.testing.assert_close(total[0], p[0].sum(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale", [1e-25, 1e-21, 1e17, 1e20])
def test_float32_activations_of_extreme_magnitude_are_collected_exactly(scale):
    """Finite float32 activations whose products leave float32's range (squares below its
    smallest normal number, or block sums beyond its largest) were 100% wrong, or refused as
    "NaN or Inf", with the default precision; such batches are now formed with float64
    products, on every route: stride-1 (DFT and direct), strided, Linear, the LayerStatistics
    and CrossStatistics updates."""
    from tensorly_dataaware.torch.statistics import CrossStatistics, collect_covariances

    gen = torch.Generator().manual_seed(13)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 4))
    for layer in model:
        if hasattr(layer, "weight"):
            with torch.no_grad():  # keep the activations at the input's scale
                layer.weight.mul_(1.0 / layer.weight.abs().max())
                layer.bias.zero_()
    x = (torch.rand(20, 6, 9, 9, generator=gen) + 0.5) * scale
    auto = collect_covariances(model, [x], progress=False)
    exact = collect_covariances(model, [x], progress=False, precision="float64")
    for name in exact:
        for a, b in ((auto[name].sum_outer, exact[name].sum_outer), (auto[name].sum, exact[name].sum)):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-5, name
    p = torch.rand(300, 7, generator=gen) * scale
    stats = LayerStatistics("linear", (2, 7))
    stats.update(p)
    torch.testing.assert_close(stats.sum_outer[0], p.double().T @ p.double(), rtol=1e-5, atol=0)
    cross = CrossStatistics(7)
    cross.update(p, p.flip(0))
    torch.testing.assert_close(cross.sum_xy[0], p.double().T @ p.flip(0).double(), rtol=1e-5, atol=0)
    conv = model[0]
    cross_conv = CrossStatistics(6 * 9)
    cross_conv.update_from_inputs(conv, x, x.flip(0))
    patches = patches_for(conv, x.double())
    reference = torch.bmm(patches.transpose(1, 2), patches_for(conv, x.flip(0).double()))[0]
    assert float((cross_conv.sum_xy[0] - reference).abs().max() / reference.abs().max()) < 1e-5


def test_centred_covariance_of_mean_dominated_float32_inputs_is_exact():
    """Inputs 1e3 + N(0, 1) in float32: the products' rounding (~1e-6 of the mean square
    1e6) is as large as the variance, and the default precision gave centred covariances
    8-54% wrong on every route. A batch whose largest variance is that small against its
    largest mean square is now formed in float64."""
    from tensorly_dataaware.torch.statistics import CrossStatistics

    gen = torch.Generator().manual_seed(17)
    # No padding: zeros at the border would give those patch entries a large variance, and
    # the accuracy asked for is relative to the covariance's largest entry.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, stride=2))
    x = 1e3 + torch.randn(24, 3, 9, 9, generator=gen)
    stats = collect_covariances(model, [x], layers=["0"], progress=False)["0"]
    patches = patches_for(model[0], x.double())[0]
    reference = torch.cov(patches.T, correction=0)
    assert float((stats.sigma(True) - reference).abs().max() / reference.abs().max()) < 1e-6
    p = 1e3 + torch.randn(400, 5, generator=gen)
    linear = LayerStatistics("linear", (2, 5))
    linear.update(p)
    torch.testing.assert_close(linear.sigma(True), torch.cov(p.double().T, correction=0), rtol=1e-6, atol=1e-9)
    cross = CrossStatistics(5)
    q = p + 0.1 * torch.randn(400, 5, generator=gen)
    cross.update(p, q)
    xc, yc = p.double() - p.double().mean(0), q.double() - q.double().mean(0)
    torch.testing.assert_close(cross.sum_xy[0] / 400 - torch.outer(cross.sum_x[0], cross.sum_y[0]) / 400**2,
                               xc.T @ yc / 400, rtol=1e-6, atol=1e-8)


def test_collect_covariances_checks_its_device_like_compress():
    """An unavailable device failed inside the first batch with torch's own error, and
    'meta' (no values) with "Tensor.item() cannot be called on meta tensors"."""
    from tensorly_dataaware.torch.statistics import collect_covariances

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="'meta' holds no values"):
        collect_covariances(model, [torch.rand(2, 3, 6, 6)], device="meta", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            collect_covariances(model, [torch.rand(2, 3, 6, 6)], device="cuda", progress=False)
    with pytest.raises(ValueError, match="not a valid torch device"):
        collect_covariances(model, [torch.rand(2, 3, 6, 6)], device="banana", progress=False)


def test_collect_covariances_seed_types_and_range():
    """NumPy integer seeds are ints; seeds torch's generator cannot take are refused by name
    (they failed with "Overflow when unpacking long long")."""
    import numpy as np

    from tensorly_dataaware.torch.statistics import collect_covariances

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    kwargs = dict(progress=False, max_positions_per_image=3)
    a = collect_covariances(model, [x], seed=np.int64(5), **kwargs)["0"].sum_outer
    torch.testing.assert_close(a, collect_covariances(model, [x], seed=5, **kwargs)["0"].sum_outer, rtol=0, atol=0)
    for bad in (2**70, -(2**64)):
        with pytest.raises(ValueError, match="`seed` must be in"):
            collect_covariances(model, [x], seed=bad, **kwargs)
    with pytest.raises(TypeError, match="`seed` must be an int"):
        collect_covariances(model, [x], seed=1.5, **kwargs)


def test_ordinary_float32_activations_keep_float32_products(monkeypatch):
    """The float64 repeat is for extreme magnitudes only: ordinary activations keep the
    (cheaper) float32 products, whose rounding shows as a small non-zero difference."""
    from tensorly_dataaware.torch.statistics import collect_covariances

    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1))
    x = torch.rand(20, 6, 9, 9, generator=torch.Generator().manual_seed(14)) * 3
    auto = collect_covariances(model, [x], progress=False)["0"].sum_outer
    exact = collect_covariances(model, [x], progress=False, precision="float64")["0"].sum_outer
    assert 0 < float((auto - exact).abs().max() / exact.abs().max()) < 2e-5


def test_reduced_float32_matmul_precision_is_not_used_for_the_statistics():
    """A process that allows reduced-precision float32 products
    (``torch.set_float32_matmul_precision('medium')``: bfloat16 on CPUs with oneDNN support,
    TF32 on GPUs) still gets IEEE float32 statistics, on the stride-1 route and the patch
    route, and its setting is left as it was."""
    from tensorly_dataaware.torch.statistics import _batch_moments

    gen = torch.Generator().manual_seed(10)
    a = torch.randn(256, 256, generator=gen)
    exact_a = a.double() @ a.double()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        reduced = float(((a @ a).double() - exact_a).abs().max() / exact_a.abs().max())
        if reduced < 1e-5:
            pytest.skip("'medium' does not reduce float32 products on this machine: nothing to guard")
        conv = nn.Conv2d(16, 8, 3, padding=1)
        x = torch.rand(48, 16, 14, 13, generator=gen) * 3 + 0.5
        _, _, outer = _batch_moments(conv, x, max_positions_per_image=None, generator=None, precision="auto")
        p = torch.rand(3000, 40, generator=gen) + 0.5
        stats = LayerStatistics("linear", (1, 40))
        stats.update(p)
        cross = stats_module.CrossStatistics(40)
        cross.update(p, p.flip(1))
        cross_conv = stats_module.CrossStatistics(16 * 9)
        cross_conv.update_from_inputs(conv, x, x.flip(1))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    patches = patches_for(conv, x.double())
    exact = torch.bmm(patches.transpose(1, 2), patches)[0]
    assert float(((outer[0] - exact).abs() / exact.abs()).max()) < 2e-5
    exact_p = p.double().T @ p.double()
    assert float(((stats.sum_outer[0] - exact_p).abs() / exact_p).max()) < 2e-5
    exact_xy = p.double().T @ p.flip(1).double()
    assert float(((cross.sum_xy[0] - exact_xy).abs() / exact_xy).max()) < 2e-5
    exact_conv = torch.bmm(patches.transpose(1, 2), patches_for(conv, x.flip(1).double()))[0]
    assert float(((cross_conv.sum_xy[0] - exact_conv).abs() / exact_conv.abs()).max()) < 2e-5


def test_ieee_float32_scope_on_pytorch_without_per_backend_settings(monkeypatch):
    """PyTorch versions before the per-backend ``fp32_precision`` settings: the legacy
    ``set_float32_matmul_precision`` is raised to 'highest' inside and restored after, also
    when the block raises."""
    from types import SimpleNamespace

    from tensorly_dataaware.torch.statistics import _ieee_float32_matmul

    for name in ("mkldnn", "cuda"):
        monkeypatch.setattr(getattr(torch.backends, name), "matmul", SimpleNamespace(), raising=False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with _ieee_float32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(RuntimeError, match="inside"), _ieee_float32_matmul():
            raise RuntimeError("inside")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_dft_route_blocks_of_rows(monkeypatch):
    """The DFT route's float32 products summed over several blocks of rows with a ragged last
    one (blocks of 50 here): the same moments as the float64 route, within round-off."""
    from tensorly_dataaware.torch.statistics import _batch_moments

    monkeypatch.setattr(stats_module, "DFT_BLOCK_ROWS", 50)
    monkeypatch.setattr(stats_module, "_dft_pays", lambda *args: True)
    conv = nn.Conv2d(5, 4, (3, 2), padding=(1, 0), dilation=(2, 1))
    x = torch.rand(13, 5, 9, 7, generator=torch.Generator().manual_seed(9)) + 0.5  # 13 * rows: ragged blocks
    _, _, fast = _batch_moments(conv, x, max_positions_per_image=None, generator=None, precision="auto")
    _, _, exact = _batch_moments(conv, x.double(), max_positions_per_image=None, generator=None, precision="auto")
    torch.testing.assert_close(fast, exact, rtol=2e-6, atol=0)
    assert not torch.equal(fast, exact)


def test_dft_route_choice():
    """Where the DFT route is (not) taken: never where its float32 bound would exceed the
    direct products' (rows wider than 76 pixels; float64 has no such limit), nor for
    products with fewer rows than columns or spectra beyond its memory cap; taken for
    ResNet-20-like layers."""
    from tensorly_dataaware.torch.statistics import _dft_pays, _shift_plan

    shifts = _shift_plan(3, 3, 1, 1, 1, 1, 28, 28, 28, 28).shifts
    assert _dft_pays(shifts, 16, 28, 250, 28, 1, torch.float32)
    assert _dft_pays(shifts, 64, 7, 250, 7, 1, torch.float32)
    assert not _dft_pays(shifts, 64, 100, 8, 100, 1, torch.float32)
    assert _dft_pays(shifts, 64, 100, 8, 100, 1, torch.float64)
    assert not _dft_pays(shifts, 512, 4, 250, 4, 1, torch.float32)
    assert not _dft_pays(shifts, 1, 28, 250, 28, 1, torch.float32)
    # A batch whose spectra would not fit in the route's memory cap (56x56, 64 channels,
    # 1024 images: about 0.9 GB) stays with the direct products.
    assert not _dft_pays(shifts, 64, 56, 1024, 56, 1, torch.float32)
    assert _dft_pays(shifts, 64, 56, 64, 56, 1, torch.float32)


@pytest.mark.parametrize("stride", [1, 2], ids=["shift-route", "patch-route"])
@pytest.mark.parametrize("groups", [2, 6], ids=["grouped", "depthwise"])
def test_shift_moments_groups_float32_blocks(groups, stride, monkeypatch):
    """Grouped and depthwise layers in float32, with blocks of a few rows: within the
    documented bound of the float64 result (blocked sums really taken: the error is not 0)."""
    from tensorly_dataaware.torch import statistics
    from tensorly_dataaware.torch.statistics import _batch_moments, float32_error_bound

    monkeypatch.setattr(statistics, "FLOAT32_BLOCK_ROWS", 64)
    monkeypatch.setattr(statistics, "_ELEMENTWISE_SCRATCH", 6 * 40)  # 40-row elementwise blocks
    conv = nn.Conv2d(6, 6, 3, stride=stride, padding=1, groups=groups)
    x = torch.randn(3, 6, 10, 9, generator=torch.Generator().manual_seed(9)) + 1.5
    count, total, outer = _batch_moments(conv, x, max_positions_per_image=None, generator=None, precision="auto")
    p = patches_for(conv, x.double())
    exact = torch.bmm(p.transpose(1, 2), p)
    assert count == p.shape[1] and outer.shape == exact.shape
    d = exact.diagonal(dim1=1, dim2=2)
    bound = 8 * float32_error_bound(64) * torch.sqrt(d[:, :, None] * d[:, None, :])
    assert bool(((outer - exact).abs() <= bound).all())
    assert float((outer - exact).abs().max()) > 0
    torch.testing.assert_close(total, p.sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize(
    "channels, groups",
    [(40, 1), (96, 3), (12, 6), (40, 10), (42, 14), (48, 48), (1, 1), (3, 3)],
    ids=["one-group", "wide-groups", "one-super-group", "super-groups-of-5", "super-groups-of-7", "depthwise",
         "one-channel", "depthwise-3"],
)
@pytest.mark.parametrize("scratch", [7, 5 * 16], ids=["small-chunks", "chunks-of-5-blocks"])
def test_group_products_equal_per_group_products(channels, groups, precision, scratch, monkeypatch):
    """_group_products against one float64 product per group, on strided (m, C) views, for
    every route (super-groups whose size must divide the group count included), with
    blocks of a few rows; the elementwise route (one channel per group) also with chunks of
    several blocks and a ragged last chunk."""
    from tensorly_dataaware.torch.statistics import _group_products

    monkeypatch.setattr(stats_module, "FLOAT32_BLOCK_ROWS", 16)
    monkeypatch.setattr(stats_module, "_ELEMENTWISE_SCRATCH", scratch * channels)
    gen = torch.Generator().manual_seed(channels + groups)
    a = torch.randn(2 * channels, 101, generator=gen).T[:, :channels]  # strided views
    b = torch.randn(101, 2 * channels, generator=gen)[:, channels:]
    got = _group_products(a, b, groups, precision)
    c_g = channels // groups
    expected = torch.stack([
        a[:, g * c_g:(g + 1) * c_g].double().T @ b[:, g * c_g:(g + 1) * c_g].double() for g in range(groups)
    ])
    assert got.dtype == F64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5 if precision == "float32" else 1e-12, atol=1e-4)


@pytest.mark.parametrize("same", [False, True])
def test_accumulate_products_positions_innermost(same, monkeypatch):
    """Patches stored with the positions innermost (transposed views, the layout of grouped
    kernel-major patches) give the products and sums of the same patches stored row-major,
    in float32 blocks of a few rows (so the block loop really runs)."""
    from tensorly_dataaware.torch.statistics import _accumulate_products

    monkeypatch.setattr(stats_module, "FLOAT32_BLOCK_ROWS", 16)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 7, 101, generator=gen).transpose(1, 2)  # (groups, m, n), stride(1) == 1
    b = a if same else torch.randn(3, 7, 101, generator=gen).transpose(1, 2)
    results = []
    for x, y in ((a, b), (a.contiguous(), a.contiguous() if same else b.contiguous())):
        out, sum_a, sum_b = torch.zeros(3, 7, 7, dtype=F64), torch.zeros(3, 7, dtype=F64), torch.zeros(3, 7, dtype=F64)
        _accumulate_products(out, x, y, "float32", sums=(sum_a, sum_b))
        results.append((out, sum_a, sum_b))
    expected = torch.bmm(a.double().transpose(1, 2), b.double())
    for out, sum_a, sum_b in results:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sum_a, a.double().sum(1), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sum_b, b.double().sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["row-major", "positions-innermost"])
@pytest.mark.parametrize("n", [95, 96, 150, 301])
def test_symmetric_products_split_in_block_rows(precision, layout, n, monkeypatch):
    """``a^T a`` with many columns is formed from its upper block rows and mirrored: the
    result is the full product, exactly symmetric, with the column sums, on both patch
    layouts, across float32 blocks and a ragged last block (and below the split size)."""
    from tensorly_dataaware.torch.statistics import _accumulate_products, _symmetric_spans

    monkeypatch.setattr(stats_module, "FLOAT32_BLOCK_ROWS", 64)
    gen = torch.Generator().manual_seed(n)
    data = torch.randn(2, n, 150, generator=gen)  # (groups, n, m)
    a = data.transpose(1, 2) if layout == "positions-innermost" else data.transpose(1, 2).contiguous()
    out = torch.full((2, n, n), 1.5, dtype=F64)  # accumulates onto what is there
    total = torch.zeros(2, n, dtype=F64)
    _accumulate_products(out, a, a, precision, sums=(total,))
    expected = 1.5 + torch.bmm(a.double().transpose(1, 2), a.double())
    tol = dict(rtol=1e-5, atol=1e-4) if precision == "float32" else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(total, a.double().sum(1), **tol)
    if _symmetric_spans(n) is not None:
        assert torch.equal(out, out.transpose(1, 2))
    assert (_symmetric_spans(n) is None) == (n < 96)


# --------------------------------------------------------------------------------------------
# Issue 9 item 8: bad statistics files and empty batches
# --------------------------------------------------------------------------------------------


def _saved_stats(tmp_path):
    conv = _conv((3, 3), 1, 1, "zeros", 1, 1)
    stats = LayerStatistics.from_module(conv)
    stats.update(patches_for(conv, torch.randn(2, 4, 6, 6, dtype=F64)))
    save_statistics({"c": stats}, tmp_path / "all.pt")
    stats.save(tmp_path / "one.pt")
    return stats


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", "truncate"])
def test_unreadable_statistics_files_raise_value_error_naming_the_path(tmp_path, content):
    _saved_stats(tmp_path)
    for name, loader in (("all.pt", load_statistics), ("one.pt", LayerStatistics.load)):
        path = tmp_path / f"bad-{name}"
        good = (tmp_path / name).read_bytes()
        path.write_bytes(good[: len(good) // 2] if content == "truncate" else content)
        with pytest.raises(ValueError, match="bad-" + name):
            loader(path)
    with pytest.raises(FileNotFoundError):
        load_statistics(tmp_path / "missing.pt")


def _edited(state, **changes):
    layer = dict(state["layers"]["c"])
    layer.update(changes)
    return {**state, "layers": {"c": layer}}


def test_hand_edited_statistics_are_rejected(tmp_path):
    stats = _saved_stats(tmp_path)
    state = torch.load(tmp_path / "all.pt", weights_only=True)
    outer = stats.sum_outer.clone()
    asym = outer.clone()
    asym[0, 0, 1] += 0.5 * float(outer[0, 0, 0])
    nan_sum = stats.sum.clone()
    nan_sum[0, 2] = float("nan")
    cases = {
        "not symmetric": dict(sum_outer=asym),
        "NaN": dict(sum=nan_sum),
        "count is 0": dict(count=0),
        "'count'": dict(count="12"),
        "'sum_outer'": dict(sum_outer=outer.tolist()),
        "shape": dict(sum=stats.sum[:, :5].clone()),
        "weight_shape": dict(weight_shape="6x4x3x3"),
        "hyper_parameters": dict(hyper_parameters=None),
        "negative": dict(sum_outer=-outer),
        "too large": dict(sum=stats.sum * 1e3),
        "kind": dict(kind=["conv2d"]),
        "groups": dict(groups=2.0),
    }
    for i, (message, change) in enumerate(cases.items()):
        path = tmp_path / f"edit{i}.pt"
        torch.save(_edited(state, **change), path)
        with pytest.raises(ValueError, match=message) as info:
            load_statistics(path)
        assert f"edit{i}.pt" in str(info.value), message
    layer_without_count = dict(state["layers"]["c"])
    del layer_without_count["count"]
    with pytest.raises(ValueError, match="count"):
        LayerStatistics.from_state_dict(layer_without_count)
    torch.save({**state, "layers": ["c"]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        load_statistics(tmp_path / "list.pt")


def test_statistics_with_offsets_that_never_see_data_round_trip(tmp_path):
    """A 3x3 kernel on 3x1 maps: two kernel columns only ever see padding, so their entries
    are exactly 0. The shift route leaves rounding residue there (of either sign, at the
    scale of the largest entries), and load_statistics refused the file save_statistics had
    just written ("negative diagonal entry")."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1, dtype=torch.float64)
    stats = collect_covariances(conv, [torch.randn(4, 1, 3, 1, dtype=torch.float64)], progress=False)
    save_statistics(stats, tmp_path / "s.pt")
    loaded = load_statistics(tmp_path / "s.pt")[""]
    torch.testing.assert_close(loaded.sum_outer, stats[""].sum_outer, rtol=0, atol=0)
    # A negative diagonal beyond rounding is still refused.
    state = stats[""].state_dict()
    state["sum_outer"] = state["sum_outer"].clone()
    state["sum_outer"][0, 4, 4] = -1e-2 * float(state["sum_outer"][0].diagonal().max())
    with pytest.raises(ValueError, match="negative diagonal"):
        LayerStatistics.from_state_dict(state)


def test_empty_batch_into_linear_and_conv():
    lin = nn.Linear(5, 2)
    assert patches_for(lin, torch.randn(0, 5)).shape == (1, 0, 5)
    assert patches_for(lin, torch.randn(0, 3, 5)).shape == (1, 0, 5)
    stats = LayerStatistics.from_module(lin)
    stats.update(patches_for(lin, torch.randn(0, 5)))
    assert stats.count == 0
    model = _Net()
    data = _data()
    empty_first = [(data[0][0][:0], None)] + data
    res = collect_covariances(model, empty_first, progress=False, precision="float64")
    ref = collect_covariances(model, data, progress=False, precision="float64")
    for name in ref:
        assert res[name].count == ref[name].count
        torch.testing.assert_close(res[name].sum_outer, ref[name].sum_outer)
    with pytest.raises(ValueError, match="no samples"):
        collect_covariances(model, [(data[0][0][:0], None)], progress=False)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1), padding_mode="reflect"),
        dict(kernel_size=3, padding="same", padding_mode="circular"),
        dict(kernel_size=3, stride=2, padding=1),  # patch route
        dict(kernel_size=1),  # patch route
    ],
)
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_cross_update_from_inputs_equals_patches(conv, same, groups):
    from tensorly_dataaware.torch.statistics import CrossStatistics

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 3 * groups, groups=groups, **conv).double()
    x = torch.randn(2, 6, 7, 6, dtype=torch.float64) + 0.5
    y = None if same else x + 0.3 * torch.randn_like(x)
    n = layer.weight[0].numel()
    fast, slow = CrossStatistics(n, groups=groups), CrossStatistics(n, groups=groups)
    fast.update_from_inputs(layer, x, y)
    px = patches_for(layer, x)
    slow.update(px, px if same else patches_for(layer, y))
    assert fast.count == slow.count
    for a, b in zip(fast.sum_tensors(), slow.sum_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
