"""Paired replicates of an option of sequential calibration, on disjoint calibration sets.

One accuracy on 2000 test images is uncertain by about +-0.9 point, and the options of
``compress_sequential`` move accuracy by tenths of a point: a single run cannot tell them
apart. This script compares fit weightings *paired*: for each of ``--offsets`` (the first
calibration image of a set of ``--calib`` consecutive embedded calibration images, so the
sets are disjoint), every ``--fit-weightings`` variant is run on the same images, and each
model is evaluated on two test sets:

* ``embedded``: the 2000 embedded test images, where earlier settings were chosen;
* ``heldout``: the 8000 other images of Fashion-MNIST's 10k test split (Debian package
  ``dataset-fashion-mnist``), on which nothing was chosen.

Every run: ``budget`` allocation with ``budget_weighting='fisher'`` (``--budget-weighting``),
``target_damping`` as given by ``--target-damping`` (default: ``damping``), ``refit=True``, every
``k x k`` convolution but the first, ``n_iter_max=30``, ``tol=1e-6``, ``random_state=0``,
no fine-tuning, one thread.

python benchmarks/fisher_replicates.py --model vgg --methods cp --out benchmarks/results/kfac_vgg_cp.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Benchmark this checkout's package, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accuracy import accuracy, conv_layers, ridge_option, test_set  # noqa: E402

from tensorly_dataaware._atomic import atomic_write_text  # noqa: E402
from tensorly_dataaware.data import load_embedded_subset, make_loader  # noqa: E402
from tensorly_dataaware.models import load_pretrained  # noqa: E402
from tensorly_dataaware.torch import compress_sequential  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg")
    p.add_argument("--methods", nargs="+", default=["tucker2", "cp"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1])
    p.add_argument("--fit-weightings", nargs="+", default=["fisher", "kfac"])
    p.add_argument("--offsets", nargs="+", type=int, default=[0, 500, 1000, 1500])
    p.add_argument("--calib", type=int, default=500)
    p.add_argument("--budget-weighting", default="fisher", choices=["relative", "fisher"])
    p.add_argument("--target-damping", default=None, help="compress_sequential's target_damping (a number, or 'cv')")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sub = load_embedded_subset()
    if max(args.offsets) + args.calib > len(sub["calib_images"]):
        p.error(f"--offsets + --calib exceed the {len(sub['calib_images'])} embedded calibration images")
    loaders = {which: make_loader(*test_set(sub, which), batch_size=500) for which in ("embedded", "heldout")}
    target_damping = None if args.target_damping is None else ridge_option(args.target_damping)
    model = load_pretrained(args.model).eval()
    layers = conv_layers(model)
    info = {
        "command": " ".join(["python", "benchmarks/fisher_replicates.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model, "original": {k: accuracy(model, v) for k, v in loaders.items()},
        "machine": platform.platform(), "torch": torch.__version__, "threads": args.threads,
    }
    print(json.dumps(info), flush=True)
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            for offset in args.offsets:
                calib = make_loader(sub["calib_images"][offset:offset + args.calib],
                                    sub["calib_labels"][offset:offset + args.calib], batch_size=250)
                for weighting in args.fit_weightings:
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    small = compress_sequential(
                        model, calib, method, budget=budget, layers=layers, refit=True,
                        budget_weighting=args.budget_weighting, fit_weighting=weighting, target_damping=target_damping,
                        n_iter_max=30, tol=1e-6, random_state=0, progress=False,
                    ).eval()
                    row = {"budget": budget, "method": method, "offset": offset, "fit_weighting": weighting,
                           "seconds": time.perf_counter() - start,
                           **{k: accuracy(small, v) for k, v in loaders.items()}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
