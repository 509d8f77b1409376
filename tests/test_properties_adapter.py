"""Property-based tests of the PyTorch adapter (issue 9 item 14, adapter half).

Random convolution geometries (kernel, stride, padding and its mode, dilation, groups, bias),
methods, rank options and corrupted arguments, through ``collect_covariances``, ``compress``
and ``compress_sequential``. Every outcome must be either a correct result (a model of the
same input/output behaviour shape, finite outputs, the original model untouched, each report
row within its rank budget) or a ``ValueError`` / ``TypeError`` whose message names the
offending argument. Bounded for CI by the ``ci`` profile registered in
``test_properties_solvers.py`` (a fixed number of derandomized examples, no deadline).
"""

from __future__ import annotations

import copy
import os
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import collect_covariances, compress, compress_sequential  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

settings.register_profile(
    "adapter-ci", max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = "adapter-ci" if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else os.environ["HYPOTHESIS_PROFILE"]

ARGUMENTS = ("ratio", "energy", "budget", "ranks", "layers", "method", "norm", "damping", "max_batches", "batches", "stats")


def _names_an_argument(exc: Exception) -> bool:
    return any(re.search(rf"`{name}`|\b{name}\b", str(exc)) for name in ARGUMENTS)


@st.composite
def conv_nets(draw):
    """A two-layer network whose second layer has a random geometry, and its input size."""
    c_in = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    mid = 2 * draw(st.integers(1, 4))
    out = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    if padding == "same":
        stride = 1  # PyTorch refuses 'same' with stride > 1
    bias = draw(st.booleans())
    size = draw(st.integers(5, 8))
    torch.manual_seed(draw(st.integers(0, 1000)))
    net = nn.Sequential(
        nn.Conv2d(c_in, mid, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(mid, out, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups,
                  padding_mode=mode, bias=bias),
        nn.Flatten(),
    ).double().eval()
    return net, c_in, size


def _data(c_in, size, n_batches=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, c_in, size, size, generator=g, dtype=torch.float64) + 0.3 for _ in range(n_batches)]


@settings.get_profile(PROFILE)
@given(spec=conv_nets(), method=st.sampled_from(["tucker2", "cp", "svd"]),
       ratio=st.floats(0.05, 1.0), sequential=st.booleans())
def test_compress_any_geometry(spec, method, ratio, sequential):
    net, c_in, size = spec
    batches = _data(c_in, size)
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        reference = net(batches[0])
    try:
        if sequential:
            small, report = compress_sequential(net, batches, method, ratio=ratio, progress=False, n_iter_max=3,
                                                return_report=True)
        else:
            stats = collect_covariances(net, batches, progress=False)
            small, report = compress(net, stats, method, ratio=ratio, progress=False, n_iter_max=3, return_report=True)
    except (ValueError, TypeError) as exc:  # e.g. a padding that the kernel does not fit
        assert _names_an_argument(exc) or "kernel" in str(exc) or "padding" in str(exc), exc
        return
    with torch.no_grad():
        out = small(batches[0])
    assert out.shape == reference.shape and torch.isfinite(out).all()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert {r.name for r in report} == {"0", "2"}
    for row in report:
        if row.method != "dense":
            # ratio caps every layer's weights (rank 1 is the floor, even above the ratio)
            assert row.params_after <= ratio * row.params_before + 1e-9 or row.rank in (1, (1, 1)), row
        else:
            assert "kept dense" in row.notes[0]


@settings.get_profile(PROFILE)
@given(
    bad=st.sampled_from([
        dict(ratio=0.0), dict(ratio=1.5), dict(ratio=float("nan")), dict(ratio=True), dict(ratio="0.5"),
        dict(energy=-0.1), dict(budget=2.0), dict(ratio=0.5, energy=0.5), dict(),
        dict(ratio=0.5, layers=[]), dict(ratio=0.5, layers=["9"]), dict(ratio=0.5, layers=["1"]),
        dict(ranks={"0": 0}), dict(ranks={"0": -3}), dict(ranks={"0": 2.5}), dict(ranks={"0": "2"}),
        dict(ranks={"0": (1, 2, 3)}), dict(ranks={"zz": 2}), dict(ranks=[2]), dict(ranks={0: 2}),
        dict(ratio=0.5, method="tt"), dict(ratio=0.5, norm="nuclear"), dict(ratio=0.5, damping=-1.0),
        dict(ratio=0.5, n_iter_max=0), dict(ratio=0.5, tol=float("nan")), dict(ratio=0.5, unknown_option=3),
    ]),
    sequential=st.booleans(),
)
def test_bad_arguments_are_named(bad, sequential):
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3)).double().eval()
    batches = _data(2, 6)
    bad = dict(bad)
    method = bad.pop("method", "tucker2")
    before = copy.deepcopy(net.state_dict())
    with pytest.raises((ValueError, TypeError)) as info:
        if sequential:
            compress_sequential(net, batches, method, progress=False, **bad)
        else:
            compress(net, collect_covariances(net, batches, progress=False), method, progress=False, **bad)
    text = str(info.value)
    assert _names_an_argument(info.value) or any(k in text for k in ("n_iter_max", "tol", "unknown_option", "rank")), text
    assert "\n" not in text.strip() or len(text) < 2000
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
