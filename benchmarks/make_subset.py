"""(Re)create ``tensorly_dataaware/data/fashion_subset.npz``, the subset shipped in the package.

It holds ``--n-calib`` images drawn from the Fashion-MNIST *train* split (for covariance
statistics) and ``--n-eval`` images from the *test* split (for accuracy), both stratified:
the same number of images per class, chosen by a seeded random permutation. Keeping the
calibration images out of the test split means accuracy is never measured on data the
compression has seen.

Usage::

    python benchmarks/make_subset.py [--root /usr/share/datasets/fashion-mnist] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

try:
    import tensorly_dataaware  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorly_dataaware._atomic import atomic_write
from tensorly_dataaware.data.fashion import SUBSET_PATH, load_fashion_mnist


def stratified_indices(labels: np.ndarray, n_total: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n_total`` indices with an equal share per class, returned in sorted order."""
    classes = np.unique(labels)
    if n_total % len(classes):
        raise ValueError(f"{n_total} is not a multiple of the {len(classes)} classes")
    per_class = n_total // len(classes)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder of the IDX files (default: library default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-calib", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=SUBSET_PATH)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    train_x, train_y = load_fashion_mnist("train", args.root)
    test_x, test_y = load_fashion_mnist("test", args.root)
    calib = stratified_indices(train_y, args.n_calib, rng)
    evaluation = stratified_indices(test_y, args.n_eval, rng)

    # The package's atomic-write helper: a reader never sees a half-written file.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda handle: np.savez_compressed(
        handle,
        calib_images=train_x[calib],
        calib_labels=train_y[calib].astype(np.uint8),
        calib_indices=calib.astype(np.int32),
        eval_images=test_x[evaluation],
        eval_labels=test_y[evaluation].astype(np.uint8),
        eval_indices=evaluation.astype(np.int32),
        seed=np.int64(args.seed),
    ))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"{len(calib)} train-split calibration + {len(evaluation)} test-split evaluation images")


if __name__ == "__main__":
    main()
