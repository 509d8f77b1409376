"""Time covariance collection against a plain forward pass, in one process (issue 10, item 4).

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/collect_speed.py [--models resnet20 vgg] [--images 500]
        [--batch-size 250] [--repeats 5] [--threads N] [--skip-old] [--rev REV] [--per-layer]
        [--out benchmarks/results/collect_speed.json]

For each embedded model (``tensorly_dataaware.models.load_pretrained``; ``separable``, a
MobileNet-style network with depthwise and grouped layers and random weights, is defined here)
and the embedded calibration images (``tensorly_dataaware.data.load_embedded_subset``), every repeat times, in
turn (interleaved, so that a change of machine load hits all variants alike):

``forward``
    the model over the batches under ``torch.no_grad()``;
``old exact``
    the collection as it was before issue 10.4: forward pre-hooks that form every patch
    vector in float64 (:func:`patches_for`) and accumulate ``P^T P`` in float64
    (:meth:`LayerStatistics.update` with ``precision='float64'``);
``collect float64``
    :func:`collect_covariances` with ``precision='float64'`` (exact products);
``collect auto``
    :func:`collect_covariances` with the default ``precision='auto'`` (float32 products of
    the float32 activations, accumulated in float64).

``collect auto at REV`` (with ``--rev REV``)
    the same, with the stride-1 route (``_shift_moments``) of the git revision ``REV``
    swapped in: an in-process A/B of a change. The report then also gives the largest
    difference between the two covariances of every layer, relative to its largest entry.

All variants keep every position (full statistics).  ``--per-layer`` also prints, for every
convolution / linear layer and the first batch, the median time of the layer itself and of
its statistics (``_batch_moments``, the route the collection takes).  The report gives, per
variant, the median time and its spread (min-max) over the repeats, and the ratio of
medians to the forward pass; the thread settings are printed and saved with the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
from torch import nn

from tensorly_dataaware.data import load_embedded_subset, normalize
from tensorly_dataaware.models import load_pretrained
from tensorly_dataaware.torch import statistics as statistics_module
from tensorly_dataaware.torch.statistics import LayerStatistics, collect_covariances, patches_for


def old_exact_collect(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, LayerStatistics]:
    """The pre-10.4 collection: float64 patches, float64 ``P^T P``, for every conv/linear layer."""
    stats: dict[str, LayerStatistics] = {}
    handles = []

    def make_hook(name):
        def hook(module, args):
            patches = patches_for(module, args[0].detach().to(torch.float64))
            if name not in stats:
                stats[name] = LayerStatistics.from_module(module)
            stats[name].update(patches, precision="float64")

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def separable_net() -> nn.Module:
    """A MobileNet-style network with random weights (not shipped; timing does not depend on
    the weights): depthwise 3x3 layers (one channel per group), pointwise 1x1 layers and two
    grouped 3x3 layers (4 and 16 channels per group), for the 1-channel 28x28 embedded images."""
    def separable(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
        layers += separable(32, 64, 1) + separable(64, 128, 2)
        layers += [nn.Conv2d(128, 128, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(128), nn.ReLU()]
        layers += separable(128, 128, 1) + separable(128, 256, 2)
        layers += [nn.Conv2d(256, 256, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(256), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
        return nn.Sequential(*layers).eval()


#: Networks defined here rather than embedded in the package (``--models`` accepts them too).
SYNTHETIC = {"separable": separable_net}


def thread_settings() -> dict[str, object]:
    return {
        "torch.get_num_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def shift_moments_at(rev: str):
    """``_shift_moments`` as it was at git revision ``rev`` (its module loaded from ``git show``)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:tensorly_dataaware/torch/statistics.py"], check=True, capture_output=True, text=True
    ).stdout
    # Its one relative import, made absolute so that the file loads outside the package.
    source = source.replace("from .._atomic import", "from tensorly_dataaware._atomic import")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "statistics_at_rev.py")
        with open(path, "w") as handle:
            handle.write(source)
        spec = importlib.util.spec_from_file_location("statistics_at_rev", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module._shift_moments


def collect_with(shift_moments, model, batches):
    """:func:`collect_covariances` with ``shift_moments`` as the stride-1 route."""
    current = statistics_module._shift_moments
    statistics_module._shift_moments = shift_moments
    try:
        return collect_covariances(model, batches, progress=False)
    finally:
        statistics_module._shift_moments = current


def per_layer(model, batch, repeats: int) -> list[dict]:
    """Median time of every conv / linear layer on ``batch``'s inputs against its statistics."""
    inputs = {}
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules() if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    rows = []
    for name, x in inputs.items():
        module = modules[name]

        def layer():
            with torch.no_grad():
                module(x)

        def moments():
            statistics_module._batch_moments(module, x, max_positions_per_image=None, generator=None,
                                             precision="auto")

        times = {"layer": [], "statistics": []}
        for _ in range(repeats):
            for label, fn in (("layer", layer), ("statistics", moments)):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        layer_s, stats_s = statistics.median(times["layer"]), statistics.median(times["statistics"])
        rows.append({"layer": name, "input": list(x.shape), "kind": type(module).__name__,
                     "stride": list(getattr(module, "stride", ())), "layer_s": layer_s, "statistics_s": stats_s})
        print(f"    {name:<24} {str(tuple(x.shape)):<20} stride {str(getattr(module, 'stride', '-')):<7} "
              f"layer {layer_s * 1e3:7.1f} ms  statistics {stats_s * 1e3:7.1f} ms  ({stats_s / layer_s:4.1f}x)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg"])
    parser.add_argument("--images", type=int, default=500, help="calibration images (embedded subset)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-old", action="store_true", help="do not time the pre-10.4 path")
    parser.add_argument("--rev", default=None, help="also time the stride-1 route of this git revision (A/B)")
    parser.add_argument("--per-layer", action="store_true", help="also time every layer against its statistics")
    parser.add_argument("--out", default=None, help="optional JSON output path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = thread_settings()
    shift_moments_rev = shift_moments_at(args.rev) if args.rev else None
    images = torch.from_numpy(normalize(load_embedded_subset()["calib_images"][: args.images]))
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads: {threads}")
    print(f"{len(images)} embedded calibration images in batches of {args.batch_size}, "
          f"{args.repeats} interleaved repeats, all positions kept")
    results = {"command": "python benchmarks/collect_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v not in (None, False)), "threads": threads, "models": {}}

    for name in args.models:
        model = SYNTHETIC[name]() if name in SYNTHETIC else load_pretrained(name).eval()

        def forward():
            with torch.no_grad():
                for x in batches:
                    model(x)

        variants = {"forward": forward}
        if not args.skip_old:
            variants["old exact"] = lambda: old_exact_collect(model, batches)
        variants["collect float64"] = lambda: collect_covariances(model, batches, progress=False, precision="float64")
        variants["collect auto"] = lambda: collect_covariances(model, batches, progress=False)
        difference = None
        if shift_moments_rev is not None:
            label_rev = f"collect auto at {args.rev}"
            variants[label_rev] = lambda: collect_with(shift_moments_rev, model, batches)
            before, after = variants[label_rev](), variants["collect auto"]()
            difference = max(
                float((before[k].covariance - after[k].covariance).abs().max() / before[k].covariance.abs().max())
                for k in before
            )
        for fn in variants.values():  # warm-up (allocator, oneDNN kernels)
            fn()
        times = {label: [] for label in variants}
        for _ in range(args.repeats):
            for label, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        forward_median = statistics.median(times["forward"])
        print(f"\n{name}")
        print(f"  {'variant':<18} {'median s':>9} {'min-max s':>17} {'x forward':>10}")
        rows = {}
        for label, ts in times.items():
            median = statistics.median(ts)
            rows[label] = {"median_s": median, "min_s": min(ts), "max_s": max(ts), "ratio": median / forward_median,
                           "times_s": ts}
            print(f"  {label:<18} {median:9.3f} {min(ts):8.3f}-{max(ts):<8.3f} {median / forward_median:10.2f}")
        if difference is not None:
            print(f"  largest covariance difference against {args.rev}: {difference:.2e} of the largest entry")
            rows["max_relative_difference_vs_rev"] = difference
        if args.per_layer:
            print("  per layer, first batch:")
            rows["per_layer"] = per_layer(model, batches[0], args.repeats)
        results["models"][name] = rows
    results["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(results, handle, indent=2)
        os.replace(tmp, args.out)
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
