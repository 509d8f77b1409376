"""Latency of one Tucker-2 layer against its ranks: is a CPU chain bound by arithmetic or memory?

For each activation shape (the three stages of the embedded ResNet-20 on 28x28 inputs by
default) the script times, interleaved in one process, the Tucker-2 chain (1x1 S->R, 3x3
R->R, 1x1 R->S with bias) at several ranks ``R``, its ``merged`` form (1x1 S->R, 3x3 R->S),
the dense 3x3 S->S convolution it replaces, and one ReLU over the same activations (a pure
memory pass, for scale).  All tensors are channels-last (the layout
``optimize_for_inference`` picks on CPU).  If time grows with ``R`` the layer is
arithmetic-bound and rounding ranks up to hardware-friendly multiples would cost time; if it
is flat, the chain is bound by the passes over the activations and only fewer passes
(merged forms, folded BatchNorm) make it faster.

    OMP_NUM_THREADS=1 python benchmarks/chain_latency.py --out benchmarks/results/chain_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

from tensorly_dataaware.torch.deploy import time_interleaved


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def run_shape(batch: int, channels: int, size: int, ranks: list[int], repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = _cl(torch.randn(batch, channels, size, size, generator=gen))
    bias = torch.randn(channels, generator=gen)
    calls = {
        "dense": lambda w=_cl(torch.randn(channels, channels, 3, 3, generator=gen)): F.conv2d(x, w, bias, padding=1),
        "relu": lambda: torch.relu(x),
    }
    for r in ranks:
        if r > channels:
            continue
        first = _cl(torch.randn(r, channels, 1, 1, generator=gen))
        core = _cl(torch.randn(r, r, 3, 3, generator=gen))
        last = _cl(torch.randn(channels, r, 1, 1, generator=gen))
        merged = _cl(torch.randn(channels, r, 3, 3, generator=gen))
        calls[f"chain r={r}"] = lambda a=first, c=core, b=last: F.conv2d(F.conv2d(F.conv2d(x, a), c, padding=1), b, bias)
        calls[f"merged r={r}"] = lambda a=first, m=merged: F.conv2d(F.conv2d(x, a), m, bias, padding=1)
    times = time_interleaved(calls, repeats)
    return {key: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t)} for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["256x16x28", "256x32x14", "256x64x7"],
                        help="BATCHxCHANNELSxSIZE activation shapes")
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 3, 4, 8, 12, 16, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
        "platform": platform.platform(), "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "shapes": {},
    }
    for shape in args.shapes:
        batch, channels, size = (int(v) for v in shape.split("x"))
        res = run_shape(batch, channels, size, args.ranks, args.repeats)
        results["shapes"][shape] = res
        print(f"{shape}: " + ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in res.items()) + " (ms, median)", flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as handle:
            json.dump(results, handle, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
