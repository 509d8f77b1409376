"""Tests of tensorly_dataaware.torch.tltorch (conversion to tensorly-torch factorized convolutions)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tltorch")  # (sets TensorLy's global backend to pytorch: restored below)

from tensorly_dataaware.torch.layers import CPConv2d, LowRankLinear, Tucker2Conv2d  # noqa: E402
from tensorly_dataaware.torch.tltorch import to_tltorch  # noqa: E402

import tensorly as tl  # noqa: E402

# tensorly-torch's import set the process-wide backend to pytorch: undo it for the other test
# modules, and give its layers the backend they need in this module's tests only.
tl.set_backend("numpy")


@pytest.fixture(autouse=True)
def _pytorch_backend():
    with tl.backend_context("pytorch"):
        yield

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _layers(stride, padding, dilation, bias, gen):
    b = torch.randn(5, generator=gen) if bias else None
    hyper = {"stride": stride, "padding": padding, "dilation": dilation, "bias": b}
    tucker = Tucker2Conv2d(torch.randn(3, 2, 3, 2, generator=gen), torch.randn(4, 2, generator=gen),
                           torch.randn(5, 3, generator=gen), **hyper)
    factors = [torch.randn(n, 4, generator=gen) for n in (5, 4, 3, 2)]
    cp = CPConv2d(torch.rand(4, generator=gen) + 0.5, factors, **hyper)
    return tucker, cp


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_outputs_match(implementation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 8, generator=gen)
    for stride, padding, dilation, bias in [(1, 1, 1, True), (2, (2, 1), 1, False), (1, 2, 2, True)]:
        for module in _layers(stride, padding, dilation, bias, gen):
            converted = to_tltorch(module, implementation)
            torch.testing.assert_close(converted(x), module(x), rtol=1e-4, atol=1e-4)
            # The tltorch weight is the same tensor as our reconstruction.
            torch.testing.assert_close(converted.weight.to_tensor(), module.weight_approx(), rtol=1e-5, atol=1e-5)


def test_unsupported():
    gen = torch.Generator().manual_seed(1)
    tucker, _ = _layers(1, 1, 1, False, gen)
    with pytest.raises(TypeError, match="module"):
        to_tltorch(LowRankLinear(torch.randn(2, 3), torch.randn(4, 2)))
    with pytest.raises(ValueError, match="implementation"):
        to_tltorch(tucker, "fast")
    reflect = Tucker2Conv2d(torch.randn(3, 2, 3, 3), torch.randn(4, 2), torch.randn(5, 3), padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="zero padding"):
        to_tltorch(reflect)
