"""Tests of the factorized modules (tensorly_dataaware.torch.layers)."""

from __future__ import annotations

import copy
import itertools
import json

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from tensorly_dataaware.torch.layers import (  # noqa: E402
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    build_from_spec,
)

F64 = torch.float64
S, T = 4, 5

# nn.Conv2d's own notice about the asymmetric 'same' padding of even kernels (the reference).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    # Tiny tensors: one thread (see the fixture in conftest.py).
    pytest.mark.usefixtures("torch_single_thread"),
]




KERNELS = [(3, 3), (3, 1), (1, 3), (5, 3), (2, 3)]
# (stride, padding, padding_mode, dilation), looped inside one test per kernel and module type:
# as separate pytest items these tiny cases would cost more in overhead than in compute.
SETTINGS = [
    setting
    for setting in itertools.product([1, 2], [0, 1, "same", (2, 1)], ["zeros", "reflect", "replicate", "circular"], [1, 2])
    if not (setting[1] == "same" and setting[0] != 1)
]


def _randn(*shape, gen):
    return torch.randn(*shape, dtype=F64, generator=gen)


def _make(kind, kernel, stride, padding, mode, dilation, bias, gen):
    """A factorized module, and the dense weight computed independently from its factors."""
    kh, kw = kernel
    hyper = {"stride": stride, "padding": padding, "padding_mode": mode, "dilation": dilation, "bias": bias}
    if kind == "tucker2":
        core, first, last = _randn(3, 2, kh, kw, gen=gen), _randn(S, 2, gen=gen), _randn(T, 3, gen=gen)
        weight = torch.einsum("ta,sb,abij->tsij", last, first, core)
        return Tucker2Conv2d(core, first, last, **hyper), weight
    if kind == "cp":
        w, a, b, c, d = _randn(6, gen=gen), _randn(T, 6, gen=gen), _randn(S, 6, gen=gen), _randn(kh, 6, gen=gen), _randn(kw, 6, gen=gen)
        weight = torch.einsum("r,tr,sr,ir,jr->tsij", w, a, b, c, d)
        return CPConv2d(w, [a, b, c, d], **hyper), weight
    first, last = _randn(3, S * kh * kw, gen=gen), _randn(T, 3, gen=gen)
    weight = (last @ first).reshape(T, S, kh, kw)
    return LowRankConv2d(first, last, kernel_size=kernel, **hyper), weight


def _reference(x, weight, bias, stride, padding, mode, dilation):
    """F.conv2d with the weight, padding the way nn.Conv2d does for the padding mode."""
    if mode == "zeros":
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation)
    kh, kw = weight.shape[-2:]
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        pads = [pw, pw, ph, ph]
    return F.conv2d(F.pad(x, pads, mode=mode), weight, bias, stride=stride, dilation=dilation)


@pytest.mark.parametrize("kind", ["tucker2", "cp", "lowrank"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_factorized_conv_is_exact(kind, kernel):
    gen = torch.Generator().manual_seed(0)
    x = _randn(2, S, 11, 10, gen=gen)
    for stride, padding, mode, dilation in SETTINGS:
        # Alternating the bias this way still gives every (padding, mode) pair both cases.
        has_bias = (stride + dilation) % 2 == 0
        config = f"{kind} kernel={kernel} stride={stride} padding={padding!r} mode={mode} dilation={dilation} bias={has_bias}"
        bias = _randn(T, gen=gen) if has_bias else None
        module, weight = _make(kind, kernel, stride, padding, mode, dilation, bias, gen)
        torch.testing.assert_close(module.weight_approx(), weight, msg=lambda m: f"{config}: {m}")
        expected = _reference(x, weight, bias, stride, padding, mode, dilation)
        # Every inference form (chain, merged CP depthwise, dense kernel) computes the same layer.
        for form in module.forms:
            module.set_form(form).eval()
            torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{config} form={form}: {m}")
        assert (module.last.bias is not None) == has_bias, config


@pytest.mark.parametrize("kind", ["tucker2", "cp", "lowrank"])
def test_state_dict_round_trip_via_spec(kind):
    gen = torch.Generator().manual_seed(1)
    x = _randn(2, S, 9, 9, gen=gen)
    for padding, mode, has_bias in [("same", "reflect", True), ((2, 1), "zeros", False), (1, "circular", True)]:
        module, _ = _make(kind, (3, 2) if padding != "same" else (3, 3), 1, padding, mode, 2,
                          _randn(T, gen=gen) if has_bias else None, gen)
        spec = module.spec()
        assert json.loads(json.dumps(spec)) == spec  # plain python types only
        rebuilt = build_from_spec(json.loads(json.dumps(spec)))
        assert type(rebuilt) is type(module) and rebuilt.spec() == spec
        assert rebuilt.weight_approx().abs().max() == 0  # empty before loading
        rebuilt.load_state_dict(module.state_dict())
        torch.testing.assert_close(rebuilt(x), module(x), rtol=0, atol=0)
        assert str(rebuilt) == str(module)


def test_low_rank_linear_exact_and_round_trip():
    gen = torch.Generator().manual_seed(2)
    first, last, bias = _randn(3, 7, gen=gen), _randn(4, 3, gen=gen), _randn(4, gen=gen)
    x = _randn(2, 5, 7, gen=gen)  # extra leading dimensions
    for b in (bias, None):
        module = LowRankLinear(first, last, b)
        torch.testing.assert_close(module(x), F.linear(x, last @ first, b), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.weight_approx(), last @ first)
        rebuilt = build_from_spec(module.spec())
        rebuilt.load_state_dict(module.state_dict())
        torch.testing.assert_close(rebuilt(x), module(x), rtol=0, atol=0)
        assert "rank=3" in repr(module)


@pytest.mark.parametrize("kind", ["tucker2", "cp", "lowrank", "linear"])
def test_weight_and_bias_read_like_the_dense_layer(kind):
    """Code that reads a layer's ``weight`` / ``bias`` instead of calling it (as
    ``nn.TransformerEncoderLayer`` does) sees the dense weight the layer computes with and its
    bias; ``weight`` is not a parameter (the factors are) and TorchScript still compiles."""
    gen = torch.Generator().manual_seed(3)
    if kind == "linear":
        first, last, bias = _randn(3, 7, gen=gen), _randn(4, 3, gen=gen), _randn(4, gen=gen)
        module, weight = LowRankLinear(first, last, bias), last @ first
    else:
        module, weight = _make(kind, (3, 3), 1, 1, "zeros", 1, _randn(T, gen=gen), gen)
        bias = module.last.bias
    torch.testing.assert_close(module.weight, weight, rtol=1e-12, atol=1e-12)
    assert module.bias is module.last.bias and bias is not None
    assert "weight" not in dict(module.named_parameters())
    torch.jit.script(module)
    # Assigning them would do nothing (or fail obscurely for a Parameter): a clear error.
    for name, value in (("weight", torch.nn.Parameter(weight.clone())), ("weight", weight.clone()),
                        ("bias", torch.nn.Parameter(torch.zeros_like(bias)))):
        with pytest.raises(AttributeError, match=f"{name} .*(factors|last factor)"):
            setattr(module, name, value)
    torch.testing.assert_close(module.weight, weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["tucker2", "cp", "lowrank", "linear"])
def test_construction_leaves_the_global_rng_alone(kind):
    """The factors are copied in at construction: the submodules are built without their
    random initialization, which advanced the global RNG (code seeded before compressing
    then shuffled or dropped out differently)."""
    gen = torch.Generator().manual_seed(4)
    args = (_randn(3, 7, gen=gen), _randn(4, 3, gen=gen)) if kind == "linear" else None
    state = torch.get_rng_state()
    module = LowRankLinear(*args) if kind == "linear" else _make(kind, (3, 3), 1, 1, "zeros", 1, None, gen)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_compressed_transformer_encoder_layer_runs_and_matches():
    """``nn.TransformerEncoderLayer.forward`` reads ``linear1.weight`` (and its fused path
    computes with it): compressed at full rank, the layer gives the original output, with and
    without autograd."""
    from tensorly_dataaware.torch import collect_covariances, compress

    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).double().eval()
    x = torch.randn(3, 5, 16, dtype=F64)
    stats = collect_covariances(model, [x], progress=False)
    assert set(stats) == {"linear1", "linear2"}
    small = compress(model, stats, "svd", ranks={"linear1": 16, "linear2": 16}, progress=False)
    assert type(small.linear1).__name__ == "LowRankLinear"
    torch.testing.assert_close(small(x), model(x), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-9, atol=1e-9)
        # Scripted too (its forward reads linear1.weight and .bias as tensors); one linear
        # layer without bias types its `bias` as None.
        torch.testing.assert_close(torch.jit.script(small)(x), model(x), rtol=1e-9, atol=1e-9)
        nobias = LowRankLinear(small.linear2.first.weight, small.linear2.last.weight)
        y = torch.randn(5, 32, dtype=F64)
        torch.testing.assert_close(torch.jit.script(nobias)(y), nobias(y), rtol=1e-12, atol=1e-12)


def test_low_rank_conv_accepts_4d_first_and_dtype_follows_input():
    gen = torch.Generator().manual_seed(3)
    first = _randn(2, S, 3, 3, gen=gen).float()
    module = LowRankConv2d(first, _randn(T, 2, gen=gen), padding=1)
    assert module.first.weight.dtype == torch.float32 and module.last.weight.dtype == torch.float32
    assert module.spec()["dtype"] == "float32"
    assert build_from_spec(module.spec(), dtype=F64).last.weight.dtype == F64


def test_bad_arguments_raise():
    gen = torch.Generator().manual_seed(4)
    core, first, last = _randn(3, 2, 3, 3, gen=gen), _randn(S, 2, gen=gen), _randn(T, 3, gen=gen)
    with pytest.raises(ValueError, match="groups"):
        Tucker2Conv2d(core, first, last, groups=2)
    with pytest.raises(ValueError, match="groups"):
        CPConv2d(None, [_randn(T, 2, gen=gen), _randn(S, 2, gen=gen), _randn(3, 2, gen=gen), _randn(3, 2, gen=gen)], groups=2)
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d(_randn(2, S, 3, 3, gen=gen), _randn(T, 2, gen=gen), groups=4)
    with pytest.raises(ValueError, match="R_in"):
        Tucker2Conv2d(core, _randn(S, 3, gen=gen), last)
    with pytest.raises(ValueError, match="R_out"):
        Tucker2Conv2d(core, first, _randn(T, 2, gen=gen))
    with pytest.raises(ValueError, match="4-D"):
        Tucker2Conv2d(core[0], first, last)
    with pytest.raises(TypeError, match="torch.Tensor"):
        Tucker2Conv2d(core.numpy(), first, last)
    with pytest.raises(TypeError, match="floating"):
        Tucker2Conv2d(core.long(), first, last)
    with pytest.raises(ValueError, match="NaN"):
        Tucker2Conv2d(core * float("nan"), first, last)
    with pytest.raises(ValueError, match="bias"):
        Tucker2Conv2d(core, first, last, bias=_randn(T + 1, gen=gen))
    with pytest.raises(ValueError, match="stride 1"):
        Tucker2Conv2d(core, first, last, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        Tucker2Conv2d(core, first, last, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' or 'valid'"):
        CPConv2d(None, [_randn(T, 2, gen=gen), _randn(S, 2, gen=gen), _randn(3, 2, gen=gen), _randn(3, 2, gen=gen)], padding="full")
    with pytest.raises(TypeError, match="stride"):
        Tucker2Conv2d(core, first, last, stride=1.5)
    with pytest.raises(ValueError, match="columns"):
        CPConv2d(None, [_randn(T, 2, gen=gen), _randn(S, 3, gen=gen), _randn(3, 2, gen=gen), _randn(3, 2, gen=gen)])
    with pytest.raises(TypeError, match="4 tensors"):
        CPConv2d(None, [_randn(T, 2, gen=gen)])
    with pytest.raises(ValueError, match="weights"):
        CPConv2d(_randn(3, gen=gen), [_randn(T, 2, gen=gen), _randn(S, 2, gen=gen), _randn(3, 2, gen=gen), _randn(3, 2, gen=gen)])
    with pytest.raises(ValueError, match="kernel_size"):
        LowRankConv2d(_randn(2, S * 9, gen=gen), _randn(T, 2, gen=gen))
    with pytest.raises(ValueError, match="multiple"):
        LowRankConv2d(_randn(2, 10, gen=gen), _randn(T, 2, gen=gen), kernel_size=3)
    with pytest.raises(ValueError, match="does not match"):
        LowRankConv2d(_randn(2, S, 3, 3, gen=gen), _randn(T, 2, gen=gen), kernel_size=(3, 1))
    with pytest.raises(ValueError, match="out_features"):
        LowRankLinear(_randn(2, 7, gen=gen), _randn(4, 3, gen=gen))
    with pytest.raises(ValueError, match="Unknown"):
        build_from_spec({"class": "Conv2d"})
    with pytest.raises(ValueError, match="lacks"):
        build_from_spec({"class": "LowRankLinear", "rank": 2})


@pytest.mark.parametrize("kind", ["tucker2", "cp", "lowrank", "linear"])
def test_inference_forms_spec_cache_and_training(kind):
    gen = torch.Generator().manual_seed(5)
    if kind == "linear":
        module, x = LowRankLinear(_randn(3, 7, gen=gen), _randn(4, 3, gen=gen), _randn(4, gen=gen)), _randn(2, 7, gen=gen)
    else:
        module, _ = _make(kind, (3, 3), 1, 1, "reflect", 1, _randn(T, gen=gen), gen)
        x = _randn(2, S, 8, 8, gen=gen)
    expected = module(x)
    assert module.spec().get("form") is None  # the chain keeps the old spec format
    for form in module.forms[1:]:
        module.set_form(form).eval()
        spec = module.spec()
        assert spec["form"] == form and f"form={form!r}" in repr(module)
        # Old readers ignore the extra key; new readers rebuild the form and refresh its cache on load.
        rebuilt = build_from_spec(json.loads(json.dumps(spec)))
        assert rebuilt.form == form and set(rebuilt.state_dict()) == set(module.state_dict())
        rebuilt.load_state_dict(module.state_dict())
        torch.testing.assert_close(rebuilt.eval()(x), expected, rtol=1e-10, atol=1e-10)
        # Training runs the chain (gradients reach the factors); eval() rebuilds the stale cache.
        rebuilt.train()
        with torch.no_grad():
            rebuilt.last.weight.mul_(2.0)
        doubled = rebuilt(x)
        assert not torch.allclose(doubled, expected)
        torch.testing.assert_close(rebuilt.eval()(x), doubled, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="form"):
        module.set_form("winograd")


def _forms_of(kind):
    return {"tucker2": Tucker2Conv2d, "cp": CPConv2d, "lowrank": LowRankConv2d}[kind].forms


@pytest.mark.parametrize("kind", ["tucker2", "cp", "lowrank", "linear"])
def test_cached_kernels_follow_every_change_of_the_factors(kind):
    """The dense / merged kernel was rebuilt only by set_form, a whole-module load_state_dict
    and eval(): an in-place update (an EMA, an optimizer step in eval mode), a submodule's
    load_state_dict, functional_call with other tensors, a dtype round trip and a kernel
    made under inference_mode (later autograd failed) all gave stale or failing outputs."""
    gen = torch.Generator().manual_seed(5)
    if kind == "linear":
        module, forms = LowRankLinear(_randn(3, 7, gen=gen), _randn(4, 3, gen=gen), _randn(4, gen=gen)), ("dense",)
        x = _randn(2, 7, gen=gen).float()
    else:
        module, forms = _make(kind, (3, 3), 1, 1, "zeros", 1, _randn(T, gen=gen), gen)[0], _forms_of(kind)
        x = _randn(2, S, 6, 6, gen=gen).float()
    module = module.float().eval()

    def expected(m, inputs=x):
        ref = m.weight_approx()
        if kind == "linear":
            return F.linear(inputs, ref, m.last.bias)
        return F.conv2d(inputs, ref, m.last.bias, padding=1)

    for form in forms:
        if form == "chain":
            continue
        module.set_form(form)
        with torch.no_grad():
            for p in module.parameters():  # EMA-style in-place update
                p.mul_(0.5).add_(0.1)
        torch.testing.assert_close(module(x), expected(module), rtol=1e-4, atol=1e-5)
        sub = module.first
        sub.load_state_dict({k: v * 2 for k, v in sub.state_dict().items()})  # one factor only
        torch.testing.assert_close(module(x), expected(module), rtol=1e-4, atol=1e-5)
        other = {name: p.detach() * -1.5 for name, p in module.named_parameters()}
        got = torch.func.functional_call(module, other, (x,))
        swapped = copy.deepcopy(module)
        with torch.no_grad():
            for name, p in swapped.named_parameters():
                p.copy_(other[name])
        torch.testing.assert_close(got, expected(swapped), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module(x), expected(module), rtol=1e-4, atol=1e-5)  # back to its own
        wide = copy.deepcopy(module).to(F64)
        torch.testing.assert_close(wide(x.double()), expected(wide, x.double()), rtol=1e-10, atol=1e-12)
        with torch.inference_mode():
            module.eval()  # rebuilds the kernel inside inference mode
            module.set_form(form)
        xg = x.clone().requires_grad_(True)
        module(xg).sum().backward()
        assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())
