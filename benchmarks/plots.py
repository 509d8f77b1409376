"""Regenerate the benchmark plots from the JSON results, in one command.

python benchmarks/plots.py            # reads benchmarks/results/*.json, writes benchmarks/plots/*.png

* ``accuracy_vs_params.png``: test accuracy without fine-tuning against the fraction of
  conv weights kept, for Tucker-2 / CP x sigma / Frobenius (Frobenius with bias
  correction dashed) / sequential calibration (squares; with the budget allocation
  dash-dotted; stars: budget allocation and every dense layer refitted), from every
  ``accuracy_<model>*.json``;
* ``sigma_error_per_layer.png``: relative sigma-error of each layer at one ratio, sigma vs
  Frobenius Tucker-2;
* ``solver_time.png``: solver wall time against layer size on the GPU, ours against
  TensorLy's Frobenius solvers and the reference MINRES approach, from ``speed_*.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401

from tensorly_dataaware._atomic import atomic_write  # noqa: E402
from tables import is_headline  # noqa: E402  (benchmarks/, the script's folder)

HERE = Path(__file__).resolve().parent


def _save(fig, path: Path):
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    print(f"wrote {path}")


def accuracy_plot(results: Path, out: Path):
    # Several sweeps of one model (e.g. two ratio ranges) share a panel.
    by_model = {}
    for path in sorted(results.glob("accuracy_*.json")):
        data = json.loads(path.read_text())
        merged = by_model.setdefault(data["info"]["model"], {"info": data["info"], "rows": []})
        merged["rows"].extend(r for r in data["rows"] if is_headline(r, data["info"], merged["info"]["eval_images"]))
    if not by_model:
        return
    fig, axes = plt.subplots(1, len(by_model), figsize=(6 * len(by_model), 4.2), squeeze=False)
    for ax, data in zip(axes[0], by_model.values()):
        rows = data["rows"]
        styles = {
            ("tucker2", "sigma"): ("tab:blue", "-", "o"),
            ("tucker2", "frobenius"): ("tab:blue", ":", "x"),
            ("tucker2", "frobenius+bias"): ("tab:blue", "--", "+"),
            ("cp", "sigma"): ("tab:red", "-", "o"),
            ("cp", "frobenius"): ("tab:red", ":", "x"),
            ("cp", "frobenius+bias"): ("tab:red", "--", "+"),
            ("tucker2", "sequential"): ("tab:cyan", "-", "s"),
            ("tucker2", "sequential-budget"): ("tab:cyan", "-.", "D"),
            ("cp", "sequential"): ("tab:orange", "-", "s"),
            ("cp", "sequential-budget"): ("tab:orange", "-.", "D"),
            ("tucker2", "sequential-budget+refit-all"): ("navy", "-", "*"),
            ("cp", "sequential-budget+refit-all"): ("darkred", "-", "*"),
        }

        def variant_of(r):  # refit runs differ by what they refit (see tables.py)
            return r["variant"] + ("-all" if r.get("refit") == ["all"] else "")

        for (method, variant), (color, ls, marker) in styles.items():
            pts = sorted(
                (r["conv_params"] / r["conv_params_dense"], r["accuracy"])
                for r in rows if r["method"] == method and variant_of(r) == variant
            )
            if pts:
                ax.plot(*zip(*pts), color=color, ls=ls, marker=marker, label=f"{method} {variant}")
        ax.axhline(data["info"]["original_accuracy"], color="k", lw=0.8, label="original")
        ax.set_xscale("log")
        ticks = [0.02, 0.03, 0.05, 0.1, 0.2, 0.33, 0.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("fraction of conv weights kept")
        ax.set_ylabel("test accuracy, no fine-tuning")
        ax.set_title(f"{data['info']['model']} on Fashion-MNIST ({data['info']['eval_images']} test images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out / "accuracy_vs_params.png")


def layer_error_plot(results: Path, out: Path, ratio: float):
    path = results / "accuracy_resnet20.json"
    if not path.exists():
        return
    rows = json.loads(path.read_text())["rows"]
    pick = {r["variant"]: r for r in rows if r["method"] == "tucker2" and abs(r["ratio"] - ratio) < 1e-9}
    if "sigma" not in pick or "frobenius" not in pick:
        return
    names = list(pick["sigma"]["layer_errors"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [pick["frobenius"]["layer_errors"][n] for n in names], 0.4, label="Frobenius Tucker-2")
    ax.bar([i + 0.2 for i in x], [pick["sigma"]["layer_errors"][n] for n in names], 0.4, label="sigma Tucker-2")
    ax.set_xticks(list(x), names, rotation=70, fontsize=7)
    ax.set_ylabel("relative sigma-error")
    ax.set_title(f"ResNet-20 per-layer sigma-error, {ratio:.0%} of conv weights kept")
    ax.legend()
    _save(fig, out / "sigma_error_per_layer.png")


def solver_time_plot(results: Path, out: Path):
    path = results / "speed_h200_pytorch_cuda.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["dtype"] == "float64"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, style in (
        ("tucker2_sigma", "o-"), ("tensorly partial_tucker", "x:"), ("reference MINRES", "s--"),
        ("parafac_sigma", "o-"), ("tensorly parafac", "x:"),
    ):
        pts = [(int(r["shape"].split("x")[0]), r["seconds"]) for r in rows if r["method"] == method]
        if pts:
            label = method + (" (time budget, lower bound)" if method.startswith("reference") else "")
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("channels T = S of a T x S x 3 x 3 layer")
    ax.set_ylabel("wall time to convergence (s)")
    device = data["info"].get("gpu", data["info"].get("device"))
    ax.set_title(f"float64 solver time, {data['info']['backend']} on {device}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out / "solver_time.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=str(HERE / "plots"))
    p.add_argument("--layer-ratio", type=float, default=0.2)
    args = p.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accuracy_plot(results, out)
    layer_error_plot(results, out, args.layer_ratio)
    solver_time_plot(results, out)


if __name__ == "__main__":
    main()
