"""Accuracy impact of the fast covariance collection (issue 10, item 4).

Compresses the embedded ResNet-20 with ``compress(model, stats, method="tucker2", ratio=r)``
(every ``k x k`` convolution except the first, as in ``benchmarks/accuracy.py``) using
statistics from

``old exact``
    the pre-10.4 collection: float64 patches and float64 ``P^T P`` (see
    ``benchmarks/collect_speed.py``, :func:`old_exact_collect`);
``fast``
    :func:`collect_covariances` with its default ``precision='auto'`` (float32 products
    accumulated in float64, shift-structure moments for stride-1 convolutions),

and reports the test accuracy on the embedded 2000 test images, with no fine-tuning, and
the largest relative difference between the two sets of statistics.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/collect_accuracy.py \
        [--ratios 0.5 0.25 0.1] [--calib 500] [--n-iter-max 30] \
        [--out benchmarks/results/collect_accuracy_resnet20.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import accuracy, conv_layers  # noqa: E402
from collect_speed import old_exact_collect  # noqa: E402

from tensorly_dataaware.data import load_embedded_subset, make_loader, normalize  # noqa: E402
from tensorly_dataaware.models import load_pretrained  # noqa: E402
from tensorly_dataaware.torch import collect_covariances, compress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--calib", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--n-iter-max", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/collect_accuracy_resnet20.json")
    args = parser.parse_args()
    subset = load_embedded_subset()
    model = load_pretrained("resnet20").eval()
    layers = conv_layers(model)
    images = torch.from_numpy(normalize(subset["calib_images"][: args.calib]))
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    test = make_loader(subset["eval_images"], subset["eval_labels"], batch_size=500)

    start = time.perf_counter()
    old = old_exact_collect(model, batches)
    t_old = time.perf_counter() - start
    start = time.perf_counter()
    fast = collect_covariances(model, batches, progress=False)
    t_fast = time.perf_counter() - start
    max_rel = max(
        float((fast[n].covariance - old[n].covariance).abs().max() / old[n].covariance.abs().max()) for n in layers
    )
    result = {
        "command": "python benchmarks/collect_accuracy.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "calib_images": args.calib,
        "collect_seconds": {"old exact": t_old, "fast": t_fast},
        "max_relative_covariance_difference": max_rel,
        "original_accuracy": accuracy(model, test),
        "rows": [],
    }
    print(f"collection: old exact {t_old:.1f} s, fast {t_fast:.1f} s; "
          f"max |cov_fast - cov_old| / max |cov_old| over layers = {max_rel:.2e}")
    print(f"original accuracy {result['original_accuracy']:.4f}")
    print(f"{'ratio':>6} {'old exact':>10} {'fast':>8}")
    for ratio in args.ratios:
        accs = {}
        for label, stats in (("old exact", old), ("fast", fast)):
            small = compress(model, stats, "tucker2", ratio=ratio, layers=layers, progress=False,
                             n_iter_max=args.n_iter_max, tol=1e-6, random_state=0)
            accs[label] = accuracy(small, test)
        result["rows"].append({"ratio": ratio, **accs})
        print(f"{ratio:6.2f} {accs['old exact']:10.4f} {accs['fast']:8.4f}", flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(tmp, args.out)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
