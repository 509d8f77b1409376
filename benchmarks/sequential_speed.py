"""Wall time of sequential calibration against the one-shot pipeline, in one process.

For each embedded model, alternately (to share the machine's load fairly) times

* one-shot: ``collect_covariances`` + ``compress`` (statistics included), and
* sequential: ``compress_sequential`` (which streams its own statistics, running both
  networks over the calibration batches once per compressed layer),

with the same layers (every ``k x k`` convolution but the first), method, ratio, solver
options and calibration images, and prints the medians, the spread and their ratio.

python benchmarks/sequential_speed.py --models resnet20 vgg --repeats 3 --out benchmarks/results/sequential_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from tensorly_dataaware.data import load_embedded_subset, make_loader
from tensorly_dataaware.models import load_pretrained
from tensorly_dataaware.torch import collect_covariances, compress, compress_sequential

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import conv_layers  # noqa: E402


def one_shot(model, loader, layers, method, ratio, options):
    start = time.perf_counter()
    stats = collect_covariances(model, loader, layers=layers, progress=False)
    compress(model, stats, method, ratio=ratio, layers=layers, progress=False, **options)
    return time.perf_counter() - start


def sequential(model, loader, layers, method, ratio, options):
    start = time.perf_counter()
    compress_sequential(model, loader, method, ratio=ratio, layers=layers, progress=False, **options)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg"])
    p.add_argument("--method", default="tucker2")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--calib", type=int, default=500)
    p.add_argument("--n-iter-max", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_embedded_subset()
    loader = make_loader(data["calib_images"][: args.calib], data["calib_labels"][: args.calib], batch_size=250)
    options = dict(n_iter_max=args.n_iter_max, tol=1e-6, random_state=0)
    info = {
        "command": " ".join(["python", "benchmarks/sequential_speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "method": args.method, "ratio": args.ratio, "calib": args.calib,
        "n_iter_max": args.n_iter_max,
    }
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.models:
        model = load_pretrained(name).eval()
        layers = conv_layers(model)
        times = {"one_shot": [], "sequential": []}
        for _ in range(args.repeats):
            times["one_shot"].append(one_shot(model, loader, layers, args.method, args.ratio, options))
            times["sequential"].append(sequential(model, loader, layers, args.method, args.ratio, options))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "model": name, "layers": len(layers), "seconds": times, "median": med,
            "ratio_sequential_to_one_shot": med["sequential"] / med["one_shot"],
            # Per-repeat ratios: each pair ran back to back, under the same load.
            "paired_ratios": [s / o for s, o in zip(times["sequential"], times["one_shot"])],
        }
        rows.append(row)
        print(
            f"{name:9s} {len(layers):2d} layers  one-shot {med['one_shot']:7.1f}s  sequential {med['sequential']:7.1f}s  "
            f"ratio {row['ratio_sequential_to_one_shot']:.2f}x  (paired: "
            + ", ".join(f"{r:.2f}" for r in row["paired_ratios"]) + ")",
            flush=True,
        )
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
