"""Inference latency of compressed models, before and after ``optimize_for_inference``.

For each embedded model (``resnet20``, ``vgg``) every ``k x k`` convolution but the first is
compressed with Tucker-2 and CP at the kept fractions ``--ratios`` (statistics from
``--calib`` embedded calibration images, ``--n-iter-max`` sweeps; ``--sequential`` uses
sequential calibration, whose ranks at a ratio are the same, for the accuracy axis),
and for every (threads, batch) setting the script times, interleaved in one process:

* ``original``: the model as shipped (NCHW);
* ``original+channels_last``: the same with channels-last weights, a generic inference
  trick shown so that the gain of the compressed models is not credited to the layout alone;
* ``original optimized``: the original after ``optimize_for_inference`` (BatchNorm folded,
  best layout): the fair baseline, every generic trick the compressed models get;
* each compressed model as ``compress`` returns it (``as compressed``);
* each compressed model after :func:`tensorly_dataaware.torch.optimize_for_inference`
  (``optimized``), optimized for that very thread count and batch.

Medians and inter-quartile ranges over ``--repeats`` round-robin runs are recorded with the
per-layer report of ``optimize_for_inference`` (params, MACs, latency before/after), the
test accuracy on the 2000 embedded test images, and an ONNX Runtime check of every
optimized model (relative tolerance 1e-4). A Pareto plot (accuracy vs latency at one thread,
batch ``max(--batches)``) goes to ``--plot``.

python benchmarks/latency.py --models vgg resnet20 --threads 1 2 --batches 1 256 \\
    --out benchmarks/results/latency.json --plot benchmarks/plots/latency_pareto.png
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

from tensorly_dataaware.data import load_embedded_subset, make_loader
from tensorly_dataaware.models import load_pretrained
from tensorly_dataaware.torch import collect_covariances, compress, compress_sequential
from tensorly_dataaware.torch.deploy import optimize_for_inference, time_interleaved


def conv_layers(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    return names[1:]


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "q1_ms": ordered[len(ordered) // 4],
        "q3_ms": ordered[(3 * len(ordered)) // 4],
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "runs": len(ordered),
    }


def onnx_check(model: nn.Module, x: torch.Tensor) -> float | None:
    try:
        from tensorly_dataaware.torch.export import export_onnx, check_onnx
    except ImportError:
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, os.path.join(folder, "m.onnx"), x, check=False)
        return check_onnx(path, model, x)


def run_model(name: str, args) -> dict:
    torch.set_num_threads(1)
    sub = load_embedded_subset()
    model = load_pretrained(name).eval()
    layers = conv_layers(model)
    calib = make_loader(sub["calib_images"][: args.calib], sub["calib_labels"][: args.calib], batch_size=100)
    test = make_loader(sub["eval_images"], sub["eval_labels"], batch_size=500)
    stats = collect_covariances(model, calib, layers=layers, progress=False)
    variants = {"original": model}
    info = {"original": {"accuracy": accuracy(model, test), "params": sum(p.numel() for p in model.parameters())}}
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants["original+channels_last"] = cl
    info["original+channels_last"] = dict(info["original"])
    compressed = {}
    for method in args.methods:
        for ratio in args.ratios:
            key = f"{method}@{ratio:g}"
            start = time.perf_counter()
            if args.sequential:  # same ranks as one-shot at a ratio: the same latency, better accuracy
                small, report = compress_sequential(model, calib, method, ratio=ratio, layers=layers, progress=False,
                                                    return_report=True, n_iter_max=args.n_iter_max, random_state=0)
            else:
                small, report = compress(model, stats, method, ratio=ratio, layers=layers, progress=False,
                                         return_report=True, n_iter_max=args.n_iter_max, random_state=0)
            compressed[key] = small
            info[key] = {
                "method": method, "ratio": ratio, "accuracy": accuracy(small, test),
                "mode": "sequential" if args.sequential else "one-shot",
                "params": sum(p.numel() for p in small.parameters()),
                "conv_macs_per_pos": [sum(r.macs_after for r in report), sum(r.macs_before for r in report)],
                "compress_seconds": time.perf_counter() - start,
            }
            print(f"{name} {key}: accuracy {info[key]['accuracy']:.4f}", flush=True)
    settings = []
    for threads in args.threads:
        for batch in args.batches:
            torch.set_num_threads(threads)
            x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
            setting = {"threads": threads, "batch": batch, "deploy": {}}
            models = dict(variants)
            start = time.perf_counter()
            models["original optimized"], report = optimize_for_inference(
                model, x, threads=threads, repeats=args.opt_repeats, return_report=True)
            setting["deploy"]["original"] = {**report.as_dict(), "optimize_seconds": time.perf_counter() - start}
            for key, small in compressed.items():
                start = time.perf_counter()
                fast, report = optimize_for_inference(small, x, threads=threads, repeats=args.opt_repeats, return_report=True)
                setting["deploy"][key] = {**report.as_dict(), "optimize_seconds": time.perf_counter() - start}
                models[f"{key} as compressed"] = small
                models[f"{key} optimized"] = fast
            times = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.repeats)
            setting["whole_model"] = {k: summary(t) for k, t in times.items()}
            base = setting["whole_model"]["original"]["median_ms"]
            fair = setting["whole_model"]["original optimized"]["median_ms"]
            setting["loadavg"] = os.getloadavg()
            for k, s in setting["whole_model"].items():
                s["speedup_vs_original"] = base / s["median_ms"]
                s["speedup_vs_original_optimized"] = fair / s["median_ms"]
                print(f"{name} threads={threads} batch={batch} {k:28s} {s['median_ms']:9.2f} ms "
                      f"[{s['q1_ms']:.2f}, {s['q3_ms']:.2f}] x{s['speedup_vs_original']:.2f} "
                      f"(x{s['speedup_vs_original_optimized']:.2f} vs original optimized)", flush=True)
            settings.append(setting)
    torch.set_num_threads(1)
    checks = {}
    if args.onnx:
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        for key, small in compressed.items():
            fast = optimize_for_inference(small, x, threads=1, repeats=1)
            checks[key] = {"chain": onnx_check(small, x), "optimized": onnx_check(fast, x)}
            print(f"{name} {key} ONNX Runtime relative difference {checks[key]}", flush=True)
    return {"info": info, "settings": settings, "onnx_rel_diff": checks, "layers": layers}


def pareto_plot(results: dict, path: str, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = results["models"][name]
        setting = next((s for s in res["settings"] if s["threads"] == 1 and s["batch"] == batch), None)
        if setting is None:
            continue
        whole = setting["whole_model"]
        ax.scatter(whole["original"]["median_ms"], res["info"]["original"]["accuracy"], marker="*", s=200,
                   color="k", label="original", zorder=3)
        ax.scatter(whole["original+channels_last"]["median_ms"], res["info"]["original"]["accuracy"], marker="*",
                   s=120, color="grey", label="original, channels-last", zorder=3)
        if "original optimized" in whole:
            ax.scatter(whole["original optimized"]["median_ms"], res["info"]["original"]["accuracy"], marker="*",
                       s=120, color="tab:green", label="original, optimized (BN folded, layout)", zorder=3)
        for method, color in (("tucker2", "tab:blue"), ("cp", "tab:orange")):
            keys = [k for k in res["info"] if res["info"][k].get("method") == method]
            for suffix, marker, fill in ((" as compressed", "o", "none"), (" optimized", "o", color)):
                xs = [whole[k + suffix]["median_ms"] for k in keys]
                ys = [res["info"][k]["accuracy"] for k in keys]
                errs = [[whole[k + suffix]["median_ms"] - whole[k + suffix]["q1_ms"] for k in keys],
                        [whole[k + suffix]["q3_ms"] - whole[k + suffix]["median_ms"] for k in keys]]
                ax.errorbar(xs, ys, xerr=errs, fmt=marker, mfc=fill, color=color, label=f"{method}{suffix}")
                for k, xv, yv in zip(keys, xs, ys):
                    ax.annotate(f"{res['info'][k]['ratio']:g}", (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"latency, ms (median, IQR bars; 1 thread, batch {batch})")
        ax.set_ylabel("test accuracy (2000 embedded images, no fine-tuning)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_json(payload: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg"])
    parser.add_argument("--methods", nargs="+", default=["tucker2", "cp"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--n-iter-max", type=int, default=5)
    parser.add_argument("--sequential", action="store_true",
                        help="compress with compress_sequential (accuracy of the recommended mode below ~20%% kept)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved whole-model runs per variant")
    parser.add_argument("--opt-repeats", type=int, default=5, help="repeats inside optimize_for_inference")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--out", default="benchmarks/results/latency.json")
    parser.add_argument("--plot", default="benchmarks/plots/latency_pareto.png")
    args = parser.parse_args()
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "models": {},
    }
    for name in args.models:
        results["models"][name] = run_model(name, args)
        write_json(results, args.out)  # partial results survive an interrupted run
    if args.plot:
        pareto_plot(results, args.plot, max(args.batches))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
