"""Does the rank allocation hold the embedded VGG below its issue-8 target? Three checks.

Run from the repository root (one thread; each check takes 2-10 minutes on a 2-core CPU)::

    PYTHONPATH=. python benchmarks/allocation_checks.py split --alphas 0.6 0.8 1.25 1.6
    PYTHONPATH=. python benchmarks/allocation_checks.py measured
    PYTHONPATH=. python benchmarks/allocation_checks.py twopass [--method cp]

Every check starts from the setting of ``benchmarks/RESULTS.md`` section 6: ``compress_sequential``
with ``budget=0.1``, ``refit=True``, ``budget_weighting='fisher'``, ``fit_weighting='fisher'``,
500 embedded calibration images, every conv but the first, 30 sweeps, accuracy on the 2000
embedded test images, no fine-tuning.

``split``
    Keeps each Tucker-2 layer's parameter count from the budget allocation but tilts its
    split between input and output rank: ``(R_in / S) / (R_out / T) = alpha``.
``measured``
    Allocates the budget from measured Fisher-weighted sigma-error curves (``tucker2_sigma``,
    15 sweeps per candidate, one-shot statistics of the original network) instead of the
    whitened-spectrum proxy of ``plan_compression``.
``twopass``
    Measures the curves on the *sequential* targets of a first pass (``W' = W Cov(x, x~)
    Cov(x~)^-1`` and ``Cov(x~)`` from the first pass's compressed network) and runs a second
    sequential pass with the allocation they give.

Each check prints the ranks and accuracies and writes them to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tensorly as tl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import calibration_set, conv_layers, data  # noqa: E402

from tensorly_dataaware import parafac_sigma, tucker2_sigma  # noqa: E402
from tensorly_dataaware._atomic import atomic_write_text  # noqa: E402
from tensorly_dataaware.data import make_loader  # noqa: E402
from tensorly_dataaware.models import load_pretrained  # noqa: E402
from tensorly_dataaware.torch import collect_covariances, compress_sequential, output_fisher  # noqa: E402
from tensorly_dataaware.torch import ranks as rk  # noqa: E402
from tensorly_dataaware.torch.statistics import CrossStatistics  # noqa: E402

FRACTIONS = [0.02 * i for i in range(1, 26)]


def accuracy(model, loader) -> float:
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def error_curve(method, weight, sigma, row_weights):
    """Candidate (params, absolute Fisher-weighted squared sigma-error, rank) for one layer."""
    shape = tuple(weight.shape)
    n = sigma.shape[0]
    sigma = sigma + 1e-6 * sigma.diagonal().mean() * torch.eye(n, dtype=sigma.dtype)
    scaled = row_weights.sqrt()[:, None] * weight.reshape(shape[0], -1)
    ref = float((scaled @ sigma * scaled).sum())
    solver = tucker2_sigma if method == "tucker2" else parafac_sigma
    curve = []
    for frac in FRACTIONS:
        rank = rk.ranks_for_ratio(method, shape, frac)
        params = rk.factorized_params(method, shape, rank)
        if curve and params <= curve[-1][0]:
            continue
        _, errors = solver(scaled.reshape(shape), rank, sigma, n_iter_max=15, tol=1e-5, return_errors=True)
        curve.append((params, float(errors[-1]) ** 2 * ref, rank))
    return curve


def sequential_moments(model, small, name, loader):
    """``(W', Cov(x~))`` of layer ``name``: original input ``x``, compressed network's ``x~``."""
    original, compressed = dict(model.named_modules())[name], dict(small.named_modules())[name]
    weight = original.weight.detach().double()
    cross = CrossStatistics(weight[0].numel())
    seen = {}
    hooks = [original.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach())),
             compressed.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0].detach()))]
    try:
        with torch.no_grad():
            for x, _ in loader:
                model(x)
                small(x)
                cross.update_from_inputs(original, seen["x"], seen["y"])
    finally:
        for h in hooks:
            h.remove()
    cov = cross.cov_yy[0]
    damped = cov + 1e-6 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    target = weight.reshape(weight.shape[0], -1) @ torch.linalg.solve(damped, cross.cov_xy[0].T).T
    return target.reshape(weight.shape), cov


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("check", choices=["split", "measured", "twopass"])
    p.add_argument("--method", choices=["tucker2", "cp"], default="tucker2")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.6, 0.8, 1.25, 1.6])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.check == "split" and args.method != "tucker2":
        p.error("the split check is for Tucker-2")
    torch.set_num_threads(1)
    tl.set_backend("pytorch")

    class Options:  # what accuracy.data reads
        full_test, eval, finetune_images = False, 2000, 10

    calib, test, _, _ = data(Options)
    model = load_pretrained("vgg").eval()
    layers = conv_layers(model)
    test_loader = make_loader(*test, batch_size=500)
    calib_loader = make_loader(*calibration_set(calib, 500), batch_size=250)
    options = dict(layers=layers, progress=False, return_report=True, n_iter_max=30, tol=1e-6, random_state=0,
                   refit=True, fit_weighting="fisher")

    def run(**kw):
        torch.manual_seed(0)
        start = time.perf_counter()
        small, report = compress_sequential(model, calib_loader, args.method, **options, **kw)
        rows = [r for r in report if r.method == args.method]
        result = {"ranks": {r.name: r.rank for r in rows}, "params": sum(r.params_after for r in rows),
                  "accuracy": accuracy(small, test_loader), "seconds": time.perf_counter() - start}
        print(json.dumps(result), flush=True)
        return small, result

    small, base = run(budget=0.1, budget_weighting="fisher")
    results = {"command": " ".join(["python", "benchmarks/allocation_checks.py"] + sys.argv[1:]),
               "budget_allocation": base}
    shapes = {name: tuple(dict(model.named_modules())[name].weight.shape) for name in layers}
    if args.check == "split":
        for alpha in args.alphas:
            ranks = {}
            for name, (r_out, r_in) in base["ranks"].items():
                T, S = shapes[name][:2]
                cap = rk.factorized_params("tucker2", shapes[name], (r_out, r_in))
                pairs = [(max(1, min(T, round(i / S * T / alpha))), i) for i in range(1, S + 1)]
                fitting = [(rk.factorized_params("tucker2", shapes[name], pr), pr) for pr in pairs]
                ranks[name] = max((c for c in fitting if c[0] <= cap), key=lambda c: c[0])[1]
            results[f"alpha {alpha}"] = run(ranks=ranks)[1]
    else:
        fisher = output_fisher(model, calib_loader, layers)
        if args.check == "measured":
            stats = collect_covariances(model, calib_loader, layers=layers, progress=False)
            moments = {name: (dict(model.named_modules())[name].weight.detach().double(),
                              stats[name].sigma(centered=True).double()) for name in layers}
        else:
            moments = {name: sequential_moments(model, small, name, calib_loader) for name in layers}
        curves = {name: error_curve(args.method, w, s, fisher[name].double()) for name, (w, s) in moments.items()}
        total = sum(rk.dense_params(shapes[name]) for name in layers)
        ranks = rk.allocate_budget(curves, int(0.1 * total))
        results["measured_allocation"] = run(ranks=ranks)[1]
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
