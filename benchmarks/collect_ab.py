"""A/B check of the covariance collection against an earlier revision, in one process.

Run from the repository root::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python benchmarks/collect_ab.py --rev 3d76ac4 \\
        [--models resnet20 vgg] [--repeats 5] [--out benchmarks/results/collect_ab.json]

The ``tensorly_dataaware/torch/statistics.py`` of ``--rev`` (read with ``git show``) is loaded
as a separate module; its ``_shift_moments`` (the stride-1 route) is swapped into the current
module for the "old" runs, so everything else is the current code. Reports the largest
difference between the two covariances of every layer relative to that layer's largest
entry, and the interleaved median times of the forward pass, the old and the new collection.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from tensorly_dataaware.data import load_embedded_subset, normalize
from tensorly_dataaware.models import load_pretrained
from tensorly_dataaware.torch import statistics as current


def load_revision(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:tensorly_dataaware/torch/statistics.py"], check=True, capture_output=True, text=True
    ).stdout
    # Its one relative import, made absolute so that the file loads outside the package.
    source = source.replace("from .._atomic import", "from tensorly_dataaware._atomic import")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("statistics_at_rev", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision to compare against")
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg"])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    old_module = load_revision(args.rev)
    new_fn = current._shift_moments
    images = torch.from_numpy(normalize(load_embedded_subset()["calib_images"][: args.images]))
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    print(f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()}")
    results = {"command": " ".join(sys.argv), "rev": args.rev, "models": {}}
    for name in args.models:
        model = load_pretrained(name).eval()

        def forward():
            with torch.no_grad():
                for x in batches:
                    model(x)

        def collect(fn):
            current._shift_moments = fn
            try:
                return current.collect_covariances(model, batches, progress=False)
            finally:
                current._shift_moments = new_fn

        old_stats, new_stats = collect(old_module._shift_moments), collect(new_fn)
        difference = max(
            float((old_stats[k].covariance - new_stats[k].covariance).abs().max() / old_stats[k].covariance.abs().max())
            for k in old_stats
        )
        variants = {"forward": forward, "old": lambda: collect(old_module._shift_moments), "new": lambda: collect(new_fn)}
        times = {label: [] for label in variants}
        for _ in range(args.repeats):
            for label, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(ts) for label, ts in times.items()}
        print(f"{name}: max relative covariance difference {difference:.2e}")
        for label, ts in times.items():
            print(f"  {label:<8} {medians[label]:7.3f} s ({min(ts):.3f}-{max(ts):.3f})  "
                  f"{medians[label] / medians['forward']:.2f}x forward")
        results["models"][name] = {"max_relative_difference": difference, "times_s": times, "medians_s": medians}
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(results, handle, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
