"""How many CG iterations the input-factor solve should get per ALS sweep (issue 10).

The ALS solvers start each run with a budget of ``CG_ITERATIONS_START`` conjugate-gradient
iterations per sweep for the input-channel system (doubling it when the run would otherwise
stop while the solve is still truncated, see ``tensorly_dataaware.decomposition._als``).
This script measures that choice on *real* layer covariances: the embedded ResNet-20 and
VGG, input statistics of every ``k x k`` convolution but the first from the first ``--calib``
embedded calibration images, ranks from ``ranks_for_ratio`` at ``--ratio``. For every layer
and method it runs the solver with each budget in ``--starts`` (``0`` stands for the
previous policy: every solve to its tolerance, i.e. a start budget of ``cg_maxiter``),
interleaved, and reports the total time, sweeps and the final error relative to the first
budget in the list.

The budget is a module constant, not an option of the public functions, so this script sets
``_als.CG_ITERATIONS_START`` for each run (and restores it).

``--compare extrapolation`` compares the first extrapolation factor of the Tucker-2 sweeps
instead (``_tucker2.EXTRAPOLATION_START``, values in ``--betas``; 0 = plain ALS), with the
default CG budget.

Examples
--------
OMP_NUM_THREADS=1 python benchmarks/inner_iterations.py --models resnet20 vgg --methods tucker2 cp
OMP_NUM_THREADS=1 python benchmarks/inner_iterations.py --methods tucker2 --compare extrapolation --betas 0 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tensorly_dataaware import parafac_sigma, tucker2_sigma  # noqa: E402
from tensorly_dataaware.data.fashion import load_embedded_subset, make_loader  # noqa: E402
from tensorly_dataaware.decomposition import _als, _tucker2  # noqa: E402
from tensorly_dataaware.models import load_pretrained  # noqa: E402
from tensorly_dataaware.torch import collect_covariances  # noqa: E402
from tensorly_dataaware.torch.ranks import ranks_for_ratio  # noqa: E402


def layer_problems(name: str, calib: int):
    """``[(layer, W, sigma)]`` for every ``k x k`` convolution of the model but the first."""
    model = load_pretrained(name)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)][1:]
    sub = load_embedded_subset()
    loader = make_loader(sub["calib_images"][:calib], sub["calib_labels"][:calib], batch_size=250)
    stats = collect_covariances(model, loader, layers=layers, progress=False)
    modules = dict(model.named_modules())
    return [
        (layer, modules[layer].weight.detach().double().numpy(), stats[layer].sigma(centered=True).double().numpy())
        for layer in layers
    ]


def run(fn, W, rank, sigma, start, options: dict, compare: str = "cg"):
    """One solve with the CG start budget (``compare='cg'``) or the first Tucker-2
    extrapolation factor (``compare='extrapolation'``) set to ``start``."""
    module, name = (_als, "CG_ITERATIONS_START") if compare == "cg" else (_tucker2, "EXTRAPOLATION_START")
    saved = getattr(module, name)
    setattr(module, name, (start if start > 0 else options["cg_maxiter"]) if compare == "cg" else start)
    try:
        t0 = time.perf_counter()
        _, errors, details = fn(W, rank, sigma, return_errors=True, return_details=True, **options)
        seconds = time.perf_counter() - t0
    finally:
        setattr(module, name, saved)
    matvecs = sum(s.iterations for s in details["solves"])
    return {"seconds": seconds, "sweeps": len(errors), "error": errors[-1], "cg_iterations": matvecs,
            "stop_reason": details["stop_reason"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg"])
    parser.add_argument("--methods", nargs="+", default=["tucker2", "cp"], choices=["tucker2", "cp"])
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--calib", type=int, default=500)
    parser.add_argument("--starts", nargs="+", type=int, default=[0, 2, 4], help="budgets to compare; 0 = solve to tolerance")
    parser.add_argument("--compare", choices=["cg", "extrapolation"], default="cg")
    parser.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.5],
                        help="with --compare extrapolation: first extrapolation factors to compare (0 = plain ALS)")
    parser.add_argument("--n-iter-max", type=int, default=30)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--damping", type=float, default=1e-6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.compare == "extrapolation":
        if args.methods != ["tucker2"]:
            parser.error("--compare extrapolation is for --methods tucker2")
        args.starts = args.betas
    torch.set_num_threads(1)
    options = dict(n_iter_max=args.n_iter_max, tol=args.tol, damping=args.damping, random_state=0, cg_maxiter=500)
    info = {"command": " ".join(["python", "benchmarks/inner_iterations.py"] + (argv or sys.argv[1:])),
            "machine": platform.platform(), "torch": torch.__version__, "options": options}
    print(json.dumps(info), flush=True)
    rows, summary = [], []
    for model in args.models:
        problems = layer_problems(model, args.calib)
        for method in args.methods:
            fn = tucker2_sigma if method == "tucker2" else parafac_sigma
            totals = {s: {"seconds": 0.0, "sweeps": 0, "cg_iterations": 0, "rel": []} for s in args.starts}
            for layer, W, sigma in problems:
                rank = ranks_for_ratio(method, W.shape, args.ratio)
                results = {}
                # Alternate the order between layers so that no budget always runs first.
                order = args.starts if len(rows) % 2 == 0 else args.starts[::-1]
                for start in order:
                    results[start] = run(fn, W, rank, sigma, start, options, args.compare)
                first = results[args.starts[0]]["error"]
                for start in args.starts:
                    r = results[start]
                    rows.append({"model": model, "method": method, "layer": layer, "shape": list(W.shape),
                                 "rank": rank, "start": start, **r})
                    t = totals[start]
                    t["seconds"] += r["seconds"]
                    t["sweeps"] += r["sweeps"]
                    t["cg_iterations"] += r["cg_iterations"]
                    t["rel"].append(r["error"] / first - 1)
                print(f"{model} {method} {layer} {tuple(W.shape)} rank {rank}: " + " | ".join(
                    f"start {s}: {results[s]['seconds']:.3f}s {results[s]['sweeps']} sweeps err {results[s]['error']:.6f}"
                    for s in args.starts), flush=True)
            base = totals[args.starts[0]]["seconds"]
            for start in args.starts:
                t = totals[start]
                rel = np.array(t["rel"])
                line = {"model": model, "method": method, "start": start, "seconds": t["seconds"],
                        "time_vs_first": t["seconds"] / base, "sweeps": t["sweeps"], "cg_iterations": t["cg_iterations"],
                        "error_change_mean": float(rel.mean()), "error_change_max": float(rel.max()),
                        "error_change_min": float(rel.min())}
                summary.append(line)
                label = start if args.compare == "extrapolation" else (start if start else "to tolerance")
                print(f"  {model} {method} {'beta' if args.compare == 'extrapolation' else 'start'} {label:>12}: {t['seconds']:.2f}s "
                      f"({line['time_vs_first']:.2f}x), {t['sweeps']} sweeps, {t['cg_iterations']} CG iterations, "
                      f"final error vs first: mean {100 * rel.mean():+.3f}% [{100 * rel.min():+.3f}%, {100 * rel.max():+.3f}%]",
                      flush=True)
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"info": info, "summary": summary, "rows": rows}, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main()
