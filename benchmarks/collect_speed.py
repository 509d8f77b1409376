"""Time :func:`collect_covariances` against a plain forward pass over the same batches.

Run from the repository root::

    python benchmarks/collect_speed.py [--batches 8] [--batch-size 32] [--threads 2]

The network is a small CIFAR-sized CNN (3x32x32 inputs, four 3x3 convolutions and a linear
head) with random weights: the cost of collecting statistics depends on the layer shapes,
not on the weight values.  The printed ratio is collection time / forward time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from tensorly_dataaware.torch.statistics import collect_covariances


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = small_cnn().eval()
    batches = [torch.randn(args.batch_size, 3, 32, 32) for _ in range(args.batches)]

    def forward() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    forward()  # warm-up
    t_forward = best_of(forward, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.batches} batches of {args.batch_size} x 3 x 32 x 32")
    print(f"{'plain forward':<52} {t_forward:8.3f} s")
    for positions in (None, 64):
        t = best_of(lambda: collect_covariances(model, batches, progress=False, max_positions_per_image=positions),
                    args.repeats)
        label = "collect_covariances" + ("" if positions is None else f" (max_positions_per_image={positions})")
        print(f"{label:<52} {t:8.3f} s   ({t / t_forward:5.1f} x forward)")


if __name__ == "__main__":
    main()
