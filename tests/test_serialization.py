"""save_compressed / load_compressed: atomic writes, and loads that check everything first."""

import os
import stat

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import compress, collect_covariances, load_compressed, save_compressed  # noqa: E402
from tensorly_dataaware.torch import serialization  # noqa: E402

from ._factorized_models import SharedStem  # noqa: E402


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def saved(tmp_path, torch_single_thread):
    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    stats = collect_covariances(model, batches, ["conv2", "conv3", "fc"], progress=False)
    small = compress(model, stats, "tucker2", ratio=0.5, progress=False, n_iter_max=3)
    path = tmp_path / "small.pt"
    save_compressed(small, path)
    return small, path


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_untouched(model, snapshot):
    state, types = snapshot
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_round_trip(saved):
    small, path = saved
    fresh = load_compressed(Net(), path)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fresh(x), small(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_factorized_layers_take_the_dtype_of_the_model_they_are_loaded_into(saved, dtype):
    """A float32 file loaded into a model of another dtype: the factorized layers follow the
    model (as its dense layers do through load_state_dict) instead of keeping the file's
    dtype, which made the forward pass fail on mixed dtypes."""
    small, path = saved
    fresh = load_compressed(Net().to(dtype), path)
    assert {p.dtype for p in fresh.parameters()} == {dtype}
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fresh(x.to(dtype)).float(), small(x), rtol=2e-2, atol=2e-2)


def test_other_widths_fail_cleanly_and_leave_the_model_untouched(saved):
    _, path = saved
    other = Net(width=12)
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match="small.pt") as info:
        load_compressed(other, path)
    assert "does not fit" in str(info.value)
    _assert_untouched(other, snapshot)


def _tampered(path, tmp_path, edit):
    payload = torch.load(path, weights_only=True)
    edit(payload)
    out = tmp_path / "tampered.pt"
    torch.save(payload, out)
    return out


@pytest.mark.parametrize(
    "edit, match",
    [
        # a huge rank must be refused before anything is allocated
        (lambda p: p["spec"]["conv2"].update(ranks=[10**9, 10**9]), "R_out"),
        (lambda p: p["spec"]["conv2"].update(ranks=[True, 2]), "R_out"),
        (lambda p: p["spec"]["fc"].update(rank=10**12), "rank"),
        # attribute paths: only existing layers, of the right type
        (lambda p: p["spec"].update({"__class__": p["spec"]["conv2"]}), "not a module"),
        (lambda p: p["spec"].update({"": p["spec"]["conv2"]}), "invalid layer name"),
        (lambda p: p["spec"].update({"fc": p["spec"]["conv2"]}), "Linear"),
        (lambda p: p["spec"]["conv2"].update({"class": "os.system"}), "unknown factorized"),
        (lambda p: p["spec"]["conv2"].update(kernel_size=[5, 5]), "kernel_size"),
        (lambda p: p["spec"]["conv2"].pop("stride"), "stride"),
        (lambda p: p.update(spec=["conv2"]), "spec"),
        # the state_dict must fit exactly
        (lambda p: p["state_dict"].pop("conv1.weight"), "missing keys"),
        (lambda p: p["state_dict"].update({"extra": torch.zeros(1)}), "unexpected keys"),
        (lambda p: p["state_dict"].update({"conv1.weight": torch.zeros(2, 2)}), "shape"),
        (lambda p: p["state_dict"].update({"conv1.weight": torch.zeros(8, 3, 3, 3, dtype=torch.complex64)}), "dtype"),
        (lambda p: p["state_dict"].update({"conv1.weight": "text"}), "not a tensor"),
        (lambda p: p.update(state_dict=None), "not a dict"),
    ],
)
def test_tampered_files_are_refused_before_any_change(saved, tmp_path, edit, match):
    _, path = saved
    bad = _tampered(path, tmp_path, edit)
    model = Net()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        load_compressed(model, bad)
    assert "tampered.pt" in str(info.value)
    _assert_untouched(model, snapshot)


def test_unreadable_files(tmp_path):
    for name, content in [("empty.pt", b""), ("text.pt", b"hello"), ("trunc.pt", b"PK\x03\x04abc")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            load_compressed(Net(), tmp_path / name)
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_compressed"):
        load_compressed(Net(), tmp_path / "other.pt")
    torch.save(Net(), tmp_path / "pickled.pt")  # a full module would need unpickling: refused
    with pytest.raises(ValueError, match="pickled.pt"):
        load_compressed(Net(), tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        load_compressed(Net(), tmp_path / "missing.pt")


@pytest.mark.parametrize("bad_model", [None, "net", {"conv1": 1}])
def test_wrong_types(tmp_path, bad_model):
    with pytest.raises(TypeError, match="model"):
        save_compressed(bad_model, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="model"):
        load_compressed(bad_model, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="path"):
        save_compressed(Net(), None)
    with pytest.raises(TypeError, match="path"):
        load_compressed(Net(), 3)
    assert os.listdir(tmp_path) == []


def test_save_is_atomic_fsynced_with_plain_open_permissions(tmp_path, monkeypatch):
    model = Net()
    plain = tmp_path / "plain"
    plain.write_bytes(b"")

    def no_umask_flip(*args):  # flipping the process-wide umask races with other threads
        raise AssertionError("os.umask must not be called")

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "umask", no_umask_flip)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "m.pt"
    save_compressed(model, path)
    assert synced
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)

    # a failing save leaves neither a partial file nor a temporary one, and names the path
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization.torch, "save", fail)
    with pytest.raises(OSError, match="m2.pt"):
        save_compressed(model, tmp_path / "m2.pt")
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "plain"]


def test_round_trip_of_a_layer_registered_under_two_names(tmp_path):
    """compress replaces such a layer under both names; load_compressed refused the file
    (the state_dict has its factors under both names, the check expected one)."""
    torch.manual_seed(0)
    model, x = SharedStem().eval(), torch.randn(6, 3, 8, 8)
    small = compress(model, collect_covariances(model, [x], progress=False), "tucker2", ratio=0.5, progress=False)
    assert small.stem is small.layers[0]
    save_compressed(small, tmp_path / "shared.pt")
    loaded = load_compressed(SharedStem(), tmp_path / "shared.pt").eval()
    assert loaded.stem is loaded.layers[0] and type(loaded.stem) is type(small.stem)
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
