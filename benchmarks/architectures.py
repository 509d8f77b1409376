"""Robustness on networks unlike the embedded ones: every method and rank rule, one-shot and
sequential, on small random-weight models with the layer configurations users bring.

Run from the repository root::

    python benchmarks/architectures.py [--models mobile audio tokens inception odd dead]
        [--out benchmarks/results/architectures.json]

Models (random weights, random inputs; what is checked is that the pipeline runs and what it
returns, not accuracy):

``mobile``
    MobileNet-like: BatchNorm, ReLU6, depthwise and grouped convolutions (kept dense), a
    strided convolution, global pooling, a Linear head.
``audio``
    ``Conv1d`` layers (kept dense: only ``Conv2d`` and ``Linear`` are factorized), dilation,
    reflect padding, a Linear head.
``tokens``
    Linear layers on ``(batch, tokens, features)`` inputs, LayerNorm, GELU, a residual.
``inception``
    A 7x7 stride-2 stem, max pooling, ``(1, 3)`` and ``(3, 1)`` kernels, a dilated 5x5 with
    ``padding='same'`` and circular padding on 10x9 maps (repeated pixels: a singular
    covariance), a layer called twice, dropout; the model is in train mode.
``odd``
    A 4x4 stride-4 patchify stem on one input channel, a 2x2 kernel, anisotropic stride and
    dilation with replicate padding, residual blocks in a ``ModuleList``, a batch of one image.
``dead``
    A convolution whose inputs are all zero (after a ReLU that is dead on the data).

For each model, method (``tucker2``, ``cp``, ``svd``) and rank rule (``ratio=0.3``,
``budget=0.3``, ``energy=0.9``, ``ratio=0.01``), ``compress`` (one-shot, statistics from
``collect_covariances``) and ``compress_sequential`` (default options; with the fixed
target ridge of earlier versions, ``target_damping=None``: ``sequential-fixed``; with
``target_damping='cv'``: ``sequential-cv``) are run. A row records ``ok`` or the error, the
relative output error on the calibration batches and on held-out batches of the same kind,
the parameter counts, whether the original model was left unchanged (weights and train/eval
mode), the report notes that flag a repair and the library's warnings. One thread; about
ten minutes on the 2-core development machine (``--pipelines`` runs a subset).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import time
import warnings
from pathlib import Path

# Run this checkout's package, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tensorly_dataaware.torch import collect_covariances, compress, compress_sequential  # noqa: E402


class Mobile(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.pw = nn.Conv2d(16, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, 1, 1, groups=4)
        self.conv = nn.Conv2d(32, 48, 3, 2, 1)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.pw(self.dw(x)))
        x = F.relu(self.conv(F.relu(self.grouped(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Audio(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 24, 5, padding=2)
        self.c2 = nn.Conv1d(24, 32, 3, dilation=2, padding=2, padding_mode="reflect")
        self.c3 = nn.Conv1d(32, 32, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.mean(-1))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 64)
        self.ln = nn.LayerNorm(64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.out = nn.Linear(64, 7)

    def forward(self, x):
        h = self.ln(self.inp(x))
        return self.out((h + self.mlp(h)).mean(1))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 7, 2, 3)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Conv2d(24, 32, (1, 3), padding=(0, 1))
        self.b = nn.Conv2d(32, 32, (3, 1), padding=(1, 0))
        self.c = nn.Conv2d(32, 40, 5, padding="same", dilation=2, padding_mode="circular")
        self.shared = nn.Conv2d(40, 40, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.stem(x)))
        x = F.relu(self.b(F.relu(self.a(x))))
        x = F.relu(self.c(x))
        x = F.relu(self.shared(F.relu(self.shared(x))))  # one module called twice
        return self.fc(self.drop(x.mean((2, 3))))


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 4, stride=4)
        self.even = nn.Conv2d(16, 24, 2)
        self.aniso = nn.Conv2d(24, 24, 3, stride=(2, 1), padding=1, dilation=(1, 2), padding_mode="replicate")
        self.blocks = nn.ModuleList([nn.Conv2d(24, 24, 3, padding=1) for _ in range(2)])
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.aniso(F.relu(self.even(F.relu(self.patch(x))))))
        for block in self.blocks:
            x = x + F.relu(block(x))
        return self.fc(x.mean((2, 3)))


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 12, 3, padding=1)
        self.third = nn.Conv2d(12, 6, 3, padding=1)
        with torch.no_grad():
            self.first.weight.zero_()
            self.first.bias.fill_(-1.0)  # ReLU of it is zero everywhere

    def forward(self, x):
        return self.third(F.relu(self.second(F.relu(self.first(x)))))


MODELS = {
    # name: (constructor, batch maker, train mode)
    "mobile": (Mobile, lambda g: [torch.randn(16, 3, 32, 32, generator=g) for _ in range(3)], False),
    "audio": (Audio, lambda g: [torch.randn(16, 4, 50, generator=g) for _ in range(3)], False),
    "tokens": (Tokens, lambda g: [torch.randn(16, 9, 12, generator=g) for _ in range(3)], False),
    "inception": (Inception, lambda g: [torch.randn(16, 3, 40, 36, generator=g) for _ in range(3)], True),
    "odd": (Odd, lambda g: [torch.randn(5, 1, 28, 28, generator=g) for _ in range(3)] + [torch.randn(1, 1, 28, 28, generator=g)], False),
    "dead": (Dead, lambda g: [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)], False),
}
RULES = ({"ratio": 0.3}, {"budget": 0.3}, {"energy": 0.9}, {"ratio": 0.01})
METHODS = ("tucker2", "cp", "svd")
REPAIRS = ("made PSD", "Frobenius norm", "zero weight")
PIPELINES = ("one-shot", "sequential", "sequential-fixed", "sequential-cv")


def _relative_error(model, out, batches):
    with torch.no_grad():
        x = torch.cat(batches)
        y_ref = model(x)
        return float((out(x) - y_ref).norm() / y_ref.norm())


def run_case(name, make_model, batches, held_out, train, pipeline, method, rule):
    torch.manual_seed(0)
    model = make_model().train(train)
    state = copy.deepcopy(model.state_dict())
    row = {"model": name, "pipeline": pipeline, "method": method, "rule": rule}
    start = time.perf_counter()
    caught = warnings.catch_warnings(record=True)
    log = caught.__enter__()
    warnings.simplefilter("always")
    try:
        if pipeline == "one-shot":
            stats = collect_covariances(model, batches, progress=False)
            out, report = compress(model, stats, method, progress=False, return_report=True, random_state=0, **rule)
        else:
            extra = {"sequential-cv": {"target_damping": "cv"}, "sequential-fixed": {"target_damping": None}}.get(pipeline, {})
            out, report = compress_sequential(
                model, batches, method, progress=False, return_report=True, random_state=0, **extra, **rule
            )
    except Exception as exc:  # the point of the script: record what fails and why
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300], seconds=time.perf_counter() - start)
        return row
    finally:
        caught.__exit__(None, None, None)
    # The library's own warnings (e.g. few calibration samples per input feature).
    row["warnings"] = sorted({str(w.message)[:200] for w in log if "tensorly_dataaware" in w.filename or "Layer" in str(w.message)})
    unchanged = model.training == train and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.eval(), out.eval()
    with torch.no_grad():
        finite = bool(torch.isfinite(out(torch.cat(batches))).all())
    row.update(
        status="ok" if finite and unchanged else "bad",
        seconds=time.perf_counter() - start,
        relative_output_error=_relative_error(model, out, batches),
        heldout_output_error=_relative_error(model, out, held_out),
        params=[sum(p.numel() for p in out.parameters()), sum(p.numel() for p in model.parameters())],
        original_unchanged=unchanged,
        finite=finite,
        repairs=sorted({f"{r.name}: {n}" for r in report for n in r.notes if any(k in n for k in REPAIRS)}),
        kept_dense=sorted(r.name for r in report if r.method == "dense"),
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.models:
        make_model, make_batches, train = MODELS[name]
        batches = make_batches(torch.Generator().manual_seed(1))
        held_out = make_batches(torch.Generator().manual_seed(7))
        for pipeline, method, rule in itertools.product(args.pipelines, METHODS, RULES):
            row = run_case(name, make_model, batches, held_out, train, pipeline, method, rule)
            rows.append(row)
            detail = row.get("error") or (
                f"rel. output error {row['relative_output_error']:.3g} (held out {row['heldout_output_error']:.3g}), "
                f"params {row['params'][0]}/{row['params'][1]}"
                + (f", repairs {row['repairs']}" if row["repairs"] else "")
                + (f", {len(row['warnings'])} warning(s)" if row["warnings"] else "")
            )
            print(f"{row['status']:5s} {name:9s} {pipeline:13s} {method:7s} {str(rule):17s} {detail}", flush=True)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} ok", flush=True)
    if args.out:
        info = {
            "command": " ".join(["python", "benchmarks/architectures.py"] + (argv if argv is not None else sys.argv[1:])),
            "torch": torch.__version__, "machine": platform.platform(), "threads": 1,
        }
        out = Path(args.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        tmp.replace(out)
    return rows


if __name__ == "__main__":
    main()
