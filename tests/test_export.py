"""Tests of tensorly_dataaware.torch.export: TorchScript and ONNX (checked with ONNX Runtime)."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import export  # noqa: E402
from tensorly_dataaware.torch.export import ONNX_RTOL, export_onnx, script, trace  # noqa: E402

from ._factorized_models import SmallFactorized, small_input  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

def _model(forms: str, channels_last: bool = False):
    """Every layer in the chain, 'merged' (CP; the others dense) or 'last' (dense) form."""
    model = SmallFactorized()
    for module in model.modules():
        if hasattr(module, "set_form"):
            if forms == "chain":
                module.set_form("chain")
            elif forms == "merged" and "merged" in module.forms:
                module.set_form("merged")
            else:
                module.set_form(module.forms[-1])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


@pytest.mark.parametrize("forms", ["chain", "merged", "last"])
def test_script_and_trace(forms):
    model, x = _model(forms), small_input()
    expected = model(x)
    scripted, traced = script(model), trace(model, x)
    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)
    # Scripting keeps control flow and shapes symbolic: another batch and image size work.
    other = small_input(batch=3, size=17, seed=4)
    torch.testing.assert_close(scripted(other), model(other), rtol=1e-5, atol=1e-6)
    assert model.training is False and all(not m.training for m in model.modules())


def test_script_keeps_callers_mode():
    model = SmallFactorized().train()
    script(model)
    assert model.training


@pytest.mark.parametrize("forms,channels_last", [("chain", False), ("merged", True), ("last", False)])
def test_onnx_runtime_matches_pytorch(tmp_path, forms, channels_last):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, x = _model(forms, channels_last), small_input()
    path = export_onnx(model, tmp_path / "small.onnx", x)
    assert os.path.isfile(path) and sorted(os.listdir(tmp_path)) == ["small.onnx"]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    other = small_input(batch=5, seed=7)  # dynamic batch
    got = torch.from_numpy(session.run(None, {"input": other.numpy()})[0])
    expected = model(other).detach()
    assert float((got - expected).abs().max()) <= ONNX_RTOL * float(expected.abs().max())


def test_export_is_atomic_and_checked(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, x = _model("chain"), small_input()
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    def failing_check(*args, **kwargs):
        raise ValueError("ONNX Runtime output differs")

    monkeypatch.setattr(export, "_compare_with_onnx_runtime", failing_check)
    with pytest.raises(ValueError, match="differs"):
        export_onnx(model, target, x)
    # The destination is untouched and no temporary file is left behind.
    assert target.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["model.onnx"]
    # The real check catches a model that does not match the file.
    monkeypatch.undo()
    path = export_onnx(model, target, x, check=False)
    other = SmallFactorized(seed=5)
    with pytest.raises(ValueError, match="relative difference"):
        export.check_onnx(path, other, x)


def test_export_writes_like_the_packages_atomic_writer(tmp_path, monkeypatch):
    """A symlink is written through, an existing file keeps its mode, the umask is never
    flipped, and neither a failed nor a successful export leaves a temporary file."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    scratch = tmp_path / "tmp"  # where the exporter's scratch folder goes
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def no_umask(mask):
        raise AssertionError("os.umask called: flipping it races with other threads")

    monkeypatch.setattr(os, "umask", no_umask)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(2, 3, 8, 8)
    store = tmp_path / "store"
    store.mkdir()
    target = store / "net.onnx"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    link = tmp_path / "net.onnx"
    link.symlink_to(target)

    def leftovers():
        return sorted(os.listdir(tmp_path)), os.listdir(store), os.listdir(scratch)

    real_check = export._compare_with_onnx_runtime

    def check_then_fail(*args, **kwargs):
        real_check(*args, **kwargs)  # the exported file is complete and correct, but ...
        raise ValueError("ONNX Runtime output differs")  # ... a failed check writes nothing

    monkeypatch.setattr(export, "_compare_with_onnx_runtime", check_then_fail)
    with pytest.raises(ValueError, match="differs"):
        export_onnx(model, link, x)
    assert link.is_symlink() and target.read_bytes() == b"old"
    assert leftovers() == (["net.onnx", "store", "tmp"], ["net.onnx"], [])

    monkeypatch.setattr(export, "_compare_with_onnx_runtime", real_check)
    assert export_onnx(model, link, x) == str(link)
    assert link.is_symlink() and target.read_bytes() != b"old"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert export.check_onnx(link, model, x) <= ONNX_RTOL
    assert leftovers() == (["net.onnx", "store", "tmp"], ["net.onnx"], [])


def test_bad_arguments(tmp_path):
    model, x = _model("chain"), small_input()
    with pytest.raises(TypeError, match="model"):
        export_onnx("model", tmp_path / "a.onnx", x)
    with pytest.raises(TypeError, match="example_input"):
        trace(model, x.numpy())
    with pytest.raises(ValueError, match="folder"):
        export_onnx(model, tmp_path / "missing" / "a.onnx", x)
    with pytest.raises(ValueError, match="opset_version"):
        export_onnx(model, tmp_path / "a.onnx", x, opset_version="17")


class _Heads(nn.Module):
    """SmallFactorized's features and head, returning several tensors in a tuple or a dict."""

    def __init__(self, structure: str, aux: str = "features") -> None:
        super().__init__()
        self.body, self.structure, self.aux = SmallFactorized(), structure, aux

    def forward(self, x):
        features = self.body.features(x)
        logits = self.body.head(torch.flatten(self.body.pool(features), 1))
        # `aux` "none" / "number": leaves that neither exporter can put in an ONNX output.
        other = {"features": features, "none": None, "number": 3}[self.aux]
        if self.structure == "tuple":
            return logits, other
        if self.structure == "empty":
            return ()
        return {"logits": logits, "aux": [other, (logits * 2).sum()]}  # nested, and a 0-d tensor


@pytest.mark.parametrize("structure,names", [
    ("tuple", ["output.0", "output.1"]),
    ("dict", ["output.logits", "output.aux.0", "output.aux.1"]),
])
def test_onnx_nested_outputs_are_flattened_named_and_checked(tmp_path, structure, names):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, x = _Heads(structure).eval(), small_input()
    path = export_onnx(model, tmp_path / "heads.onnx", x)  # checked tensor by tensor
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    other = small_input(batch=3, seed=7)  # every output with a batch dimension is dynamic
    got = session.run(None, {"input": other.numpy()})
    with torch.no_grad():
        expected = model(other)
    expected = list(expected) if structure == "tuple" else [expected["logits"], *expected["aux"]]
    assert len(got) == len(expected)
    for array, want in zip(got, expected):
        assert array.shape == tuple(want.shape)
        assert float((torch.from_numpy(array) - want).abs().max()) <= ONNX_RTOL * float(want.abs().max())
    assert export.check_onnx(path, model, x) <= ONNX_RTOL
    # One name per tensor is used as given; another count of names is refused before exporting.
    explicit = [f"out{i}" for i in range(len(names))]
    path = export_onnx(model, tmp_path / "named.onnx", x, output_names=explicit, check=False)
    assert [o.name for o in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_outputs()] == explicit
    with pytest.raises(ValueError, match="output_names"):
        export_onnx(model, tmp_path / "bad.onnx", x, output_names=["a", "b", "c", "d"])


@pytest.mark.parametrize("structure,aux,error,match", [
    ("tuple", "none", TypeError, r"output\[1\] has type NoneType"),
    ("dict", "number", TypeError, r"output\['aux'\]\[0\] has type int"),
    ("empty", "features", ValueError, "contains no tensor"),
])
def test_unsupported_outputs_fail_before_exporting(tmp_path, monkeypatch, structure, aux, error, match):
    def no_export(*args, **kwargs):
        raise AssertionError("torch.onnx.export called")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    model, x = _Heads(structure, aux).eval(), small_input()
    with pytest.raises(error, match=match):
        export_onnx(model, tmp_path / "m.onnx", x)
    assert os.listdir(tmp_path) == []
    with pytest.raises(error, match=match):  # before onnxruntime is even imported
        export.check_onnx(tmp_path / "m.onnx", model, x)


def test_onnx_check_tolerance_and_float64_message(tmp_path):
    """float16 models failed the fixed 1e-4 check (their rounding is ~5e-4); float64 models
    got ONNX Runtime's raw NOT_IMPLEMENTED without a word on why."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    export_onnx(net.half(), tmp_path / "half.onnx", x.half())
    with pytest.raises(ValueError, match="no float64 convolution: export a float32 copy"):
        export_onnx(net.double(), tmp_path / "double.onnx", x.double())
    assert not (tmp_path / "double.onnx").exists()
