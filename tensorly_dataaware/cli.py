"""The ``tensorly-dataaware`` command line: a thin shell over the library.

Subcommands (``tensorly-dataaware SUBCOMMAND --help`` for each):

* ``demo`` (the default): compress the embedded Fashion-MNIST network with the data-aware
  (``sigma``) and the classical (``frobenius``) decompositions and compare test accuracies;
* ``compress``: compress your own model with your own calibration data and save it (also
  across processes: ``torchrun ... -m tensorly_dataaware compress --distributed ...``);
* ``collect``: only collect and save the input statistics (covariances) of the layers;
* ``info``: versions, backends, CUDA, embedded models.

This module parses the arguments and prints; reading the user's files (data, models,
``--ranks``) and checking and writing outputs live in :mod:`tensorly_dataaware._cli_io`.
Every error a user can cause (a bad path, a bad argument, a model the library cannot
handle) is reported as one line on stderr with exit code 2, without a traceback. No output
path may resolve to an input or to another output. ``torch`` is imported only by the
subcommands that need it, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import platform
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from ._cli_io import (
    InputError,
    _one_line,
    check_outputs,
    data_input_paths,
    is_fashion_dir,
    load_data,
    load_model,
    model_input_paths,
    check_model_options,
    parse_ranks,
    ranks_file,
    table_paths,
    write_table,
)

PROG = "tensorly-dataaware"
DEFAULT_RATIOS = (0.5, 0.2, 0.1)
DEMO_NORMS = ("sigma", "frobenius", "sequential")
DEFAULT_CALIB = 1000
DEFAULT_BATCH = 250
DEFAULT_DAMPING = 1e-6
DEFAULT_EVAL = 2000
# 10 sweeps, not 30: on the embedded ResNet-20 the demo's accuracies at 5, 10 and 30 sweeps
# agree within 0.1 %, and 30 sweeps triple the time of the sigma rows (over 3 minutes on 2 cores).
DEFAULT_N_ITER = 10
# One thread by default: the layers' matrices are small (at most a few thousand wide), so
# extra threads gain little even on an idle machine, and on a busy one they wait for each
# other. Measured on this project's 2-core machine under load (load average 5-6), `compress`
# of three ResNet-20 layers, 3 interleaved runs each: 1 thread median 21.0 s (16.6-38.9),
# 2 threads median 28.7 s (23.1-29.5).
DEFAULT_THREADS = 1
THREADS_HELP = (
    "CPU threads of torch and of the BLAS behind NumPy/SciPy (set through threadpoolctl). 1 by default: "
    "the decompositions' matrices are small, and on a machine busy with other work extra threads compete for "
    "the cores (measured here: 1 thread about 1.4x faster than 2 on a loaded 2-core machine). Give more for "
    "big layers on an idle many-core machine"
)

# Kept for code that caught the CLI's own error type.
CLIError = InputError


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
def _eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def _ridge(text: str):
    """``'cv'``, ``'auto'`` or a finite number >= 0 (a relative ridge)."""
    if text in ("cv", "auto"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'cv', 'auto' or a number >= 0, got {text!r}") from None
    if not (value >= 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected 'cv', 'auto' or a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _thread_count(text: str) -> int:
    from .decomposition._threads import MAX_THREADS

    value = _positive_int(text)
    if value > MAX_THREADS:
        # torch.set_num_threads overflows on such values (an uncaught traceback, with the
        # thread limits left changed).
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if math.isnan(value) or not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def _split_layers(values: Sequence[str] | None) -> list[str] | None:
    """``--layers a b,c`` -> ``['a', 'b', 'c']``."""
    if values is None:
        return None
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        raise CLIError("--layers was given without any layer name.")
    return names


@contextlib.contextmanager
def _torch_session(threads: int, seed: int | None, device: str) -> Iterator[Any]:
    """Threads, seed and device for one command; the thread settings are restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    limiter: Any = None
    try:  # NumPy/SciPy's BLAS (OpenBLAS, MKL) ignore torch.set_num_threads
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=threads)
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay usable without it
        pass
    try:
        # After threadpoolctl, which also sets the OpenMP runtime that torch shares; inside
        # the try, so that the limits above are restored whatever happens.
        torch.set_num_threads(threads)
        if seed is not None:
            torch.manual_seed(seed)
        yield _check_device(device)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        torch.set_num_threads(previous)


def _check_device(device: str):
    """``torch.device(device)``, refused (as a CLIError) unless tensors can live there.

    Checked before any work: a device whose backend this torch lacks (``xpu``, ``mps``, a
    ``cuda`` without CUDA or past the last GPU) used to end in a traceback, after the
    statistics had been collected and the layers decomposed. ``meta`` holds no data: the
    statistics and the accuracy cannot be computed there.
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu.")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CLIError(f"--device {device!r} is not a valid torch device: {_one_line(exc)}") from None
    if dev.type == "meta":
        raise CLIError(f"--device {device}: meta tensors hold no data, so nothing can be computed there; use --device cpu.")
    try:
        # Whether the backend is usable, for any device type: torch raises RuntimeError,
        # AssertionError ("not compiled with ..."), NotImplementedError or ImportError.
        torch.empty(1, device=dev)
    except Exception as exc:  # noqa: BLE001 - any failure means the device cannot be used
        reason = _one_line(exc)
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise CLIError(
            f"--device {device}: not available in this torch ({torch.__version__}): {reason}; use --device cpu."
        ) from None
    return dev


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
def _default_candidates(model, include_first: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """k x k convolutions the library can factorize, and the others with the reason."""
    from torch import nn

    # The library's own rule, so that the default follows what `compress` supports.
    from .torch.compress import _unsupported_reason

    selected: list[str] = []
    skipped: list[tuple[str, str]] = []
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first = convs[0][0] if convs else None
    for name, module in convs:
        if tuple(module.kernel_size) == (1, 1):
            continue  # by design: only k x k convolutions by default (name 1x1 ones with --layers)
        if name == first and not include_first:
            continue
        reason = _unsupported_reason(module)
        if reason:
            skipped.append((name, reason.rstrip(".")))
        else:
            selected.append(name)
    return selected, skipped


def default_layers(model, include_first: bool = False) -> list[str]:
    """Every ``k x k`` (not ``1 x 1``) ``nn.Conv2d`` that the library can factorize, in module order.

    The first convolution of the network is left out unless ``include_first``: it sees the
    raw image through very few input channels, so it holds few weights and compresses badly.
    Layers the library cannot factorize (e.g. grouped convolutions) are left out; the
    commands print which and why.
    """
    return _default_candidates(model, include_first)[0]


def _select_layers(model, layers: list[str] | None, include_first: bool, origin: str = "--layers") -> list[str]:
    from torch import nn

    if layers is None:
        selected, skipped = _default_candidates(model, include_first)
        if skipped:
            shown = "; ".join(f"{name} ({reason})" for name, reason in skipped[:20])
            more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
            print(f"kept dense {len(skipped)} layer(s) the default selection cannot compress: {shown}{more}", flush=True)
        if not selected:
            raise CLIError(
                "the model has no k x k nn.Conv2d layer to compress by default; name the layers "
                "with --layers (nn.Conv2d or nn.Linear modules)."
            )
        return selected
    modules = dict(model.named_modules())
    candidates = sorted(n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n)
    bad = [n for n in layers if n not in modules or not isinstance(modules[n], (nn.Conv2d, nn.Linear))]
    if bad:
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise CLIError(f"unknown or unsupported layer(s) {bad} in {origin}; the model's conv/linear layers: {shown}")
    from .torch.compress import _unsupported_reason

    # Checked here, before the statistics are collected, not when the library meets them.
    refused = [(n, reason) for n in layers if (reason := _unsupported_reason(modules[n])) is not None]
    if refused:
        raise CLIError(f"{origin} names layer(s) that cannot be compressed: "
                       + "; ".join(f"{n} ({reason})" for n, reason in refused))
    return list(dict.fromkeys(layers))


def _drop_repeated_layers(model, sample, layers: list[str], device) -> list[str]:
    """The default selection minus the layers not called exactly once per forward pass.

    Sequential calibration fits each layer to one input per position, so a module called
    several times (shared weights) or never is refused when named; the default selection
    keeps such layers dense instead, as ``compress_sequential(layers=None)`` does, and says so.
    """
    from .torch import layer_call_order

    # layer_call_order runs the model in eval mode under no_grad and restores every
    # module's training flag itself.
    _, counts = layer_call_order(model, sample.to(device), layers)
    repeated = [name for name in layers if counts.get(name, 0) != 1]
    if repeated:
        shown = "; ".join(
            f"{name} ({'never called' if counts.get(name, 0) == 0 else f'called {counts[name]} times'} per forward pass)"
            for name in repeated
        )
        print(f"kept dense {len(repeated)} layer(s) sequential calibration cannot compress: {shown}", flush=True)
    kept = [name for name in layers if name not in repeated]
    if not kept:
        raise CLIError("no layer of the default selection is called exactly once per forward pass; name layers with --layers.")
    return kept


def _check_ranks(ranks: dict | None, model, layers: list[str], method: str) -> None:
    """Each explicit rank fits its layer's factorization and shape (before any work starts)."""
    if ranks is None:
        return
    from torch import nn

    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise CLIError(f"--ranks names layers that are not compressed: {unknown} (compressed: {layers}).")
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        module = modules[name]
        if isinstance(module, nn.Linear):
            kind, (t, cols), s = "svd", (module.out_features, module.in_features), module.in_features
        else:
            kh, kw = module.kernel_size
            t, s = module.out_channels, module.in_channels // module.groups
            cols = s * kh * kw
            kind = "svd" if (kh, kw) == (1, 1) else method
        if kind == "cp" and isinstance(rank, list):
            raise CLIError(f"--ranks: {name!r} is decomposed with cp, which takes one rank (an int), got {rank}.")
        if kind == "tucker2" and isinstance(rank, list) and (rank[0] > t or rank[1] > s):
            raise CLIError(f"--ranks: {name!r} has {t} output and {s} input channels; [R_out, R_in] = {rank} is too large.")
        if kind == "svd" and min(rank if isinstance(rank, list) else [rank]) > min(t, cols):
            raise CLIError(f"--ranks: {name!r} is a {t} x {cols} matrix (truncated SVD); rank {rank} is too large.")


def _conv_params(model) -> int:
    """Weights of every convolution of ``model`` (dense or factorized, biases excluded)."""
    from torch import nn

    from .torch import CPConv2d, LowRankConv2d, Tucker2Conv2d

    total = 0
    factorized = (Tucker2Conv2d, CPConv2d, LowRankConv2d)
    inside = set()
    for name, module in model.named_modules():
        if isinstance(module, factorized):
            for pname, p in module.named_parameters():
                if not pname.endswith("bias"):
                    total += p.numel()
            inside.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    for name, module in model.named_modules():
        if name in inside:
            continue
        if isinstance(module, nn.Conv2d) and not isinstance(module, factorized):
            total += module.weight.numel()
    return total


# ---------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------
def _batches(x, batch_size: int, limit: int | None = None):
    n = x.shape[0] if limit is None else min(limit, x.shape[0])
    for start in range(0, n, batch_size):
        yield x[start : min(start + batch_size, n)]


def evaluate(model, x, y, *, batch_size: int = 500, device=None) -> float | None:
    """Top-1 accuracy of ``model`` on ``(x, y)``; None if the outputs are not class scores."""
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size]
                if device is not None:
                    xb = xb.to(device)
                try:
                    out = model(xb)
                except Exception as exc:  # noqa: BLE001 - the user's model on the user's images
                    raise CLIError(f"running the model on the evaluation images failed: {_one_line(exc)}") from None
                if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != xb.shape[0]:
                    return None
                yb = y[start : start + batch_size]
                if yb.numel() and int(yb.max()) >= out.shape[1]:
                    # Such a label can never be predicted: the accuracy would be silently low.
                    raise CLIError(f"the labels go up to {int(yb.max())} but the model has {out.shape[1]} classes.")
                correct += int((out.argmax(1).cpu() == yb).sum())
    finally:
        model.train(was_training)
    return correct / x.shape[0]


def _collect(model, x, layers, *, samples, batch_size, device, progress, seed=0, positions=None):
    from .torch import collect_covariances

    n = min(samples, x.shape[0])
    try:
        return collect_covariances(
            model,
            list(_batches(x, batch_size, n)),  # a list (of views): the progress bar knows its length
            layers,
            max_samples=n,
            device=device,
            progress=progress,
            seed=seed,
            max_positions_per_image=positions or None,
        )
    except (ValueError, TypeError) as exc:
        raise CLIError(f"collecting statistics failed: {_one_line(exc)}") from None
    except RuntimeError as exc:  # e.g. 3-channel images into a 1-channel model
        raise CLIError(
            f"running the model on the calibration images {tuple(x.shape[1:])} failed: {_one_line(exc)}"
        ) from None


def _load_stats(path: str, layers: list[str]):
    from .torch import load_statistics

    if not Path(path).is_file():
        raise CLIError(f"--stats-in {path!r} does not exist or is not a file.")
    try:
        stats = load_statistics(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise CLIError(f"cannot read statistics from --stats-in {path!r}: {_one_line(exc)}") from None
    missing = [name for name in layers if name not in stats]
    if missing:
        raise CLIError(f"--stats-in {path!r} has no statistics for {missing}; it covers {sorted(stats)}.")
    return stats


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------
DEMO_COLUMNS = (
    "model", "ratio", "method", "norm", "params_before", "params_after", "kept_fraction",
    "model_conv_params", "accuracy", "accuracy_drop", "seconds",
)


def _demo_line(row: dict) -> str:
    if row["norm"] == "original":
        return (
            f"{'-':>6} {'(none)':<8} {'original':<10} {row['params_before']:>9} {'100.0%':>7} "
            f"{row['accuracy']:>9.4f} {'-':>7} {'-':>7}"
        )
    return (
        f"{row['ratio']:>6.3g} {row['method']:<8} {row['norm']:<10} {row['params_after']:>9} "
        f"{row['kept_fraction']:>7.1%} {row['accuracy']:>9.4f} {row['accuracy_drop']:>+7.4f} "
        f"{row['seconds']:>6.1f}s"
    )


DEMO_HEADER = f"{'ratio':>6} {'method':<8} {'norm':<10} {'params':>9} {'kept':>7} {'accuracy':>9} {'drop':>7} {'time':>7}"


def cmd_demo(args) -> int:
    output = None
    if args.output is not None:
        if Path(args.output).is_dir():
            raise CLIError(f"--output {args.output!r} is a folder; give a file name (PATH.json and PATH.csv are written).")
        # Both files are checked (against each other, the package's embedded files) before any work.
        json_path, csv_path = table_paths(Path(args.output))
        check_outputs([("--output (JSON)", str(json_path)), ("--output (CSV)", str(csv_path))], [])
        output = Path(args.output)
    layers_arg = _split_layers(args.layers)
    device = args.torch_device
    progress = not args.no_progress

    from .models import load_metadata
    from .torch import compress, compress_sequential

    model = load_model(name=args.model).to(device)
    data = load_data(None, True, "fashion")
    n_calib = min(args.calib_samples, data.calib_x.shape[0])
    n_eval = min(args.eval_samples, data.eval_x.shape[0])
    eval_x, eval_y = data.eval_x[:n_eval], data.eval_y[:n_eval]
    layers = _select_layers(model, layers_arg, args.include_first)

    stored = load_metadata(args.model).get("test_accuracy")
    print(
        f"{PROG} demo: {args.model} on Fashion-MNIST"
        + (f" (stored full test accuracy {stored:.4f})" if stored is not None else "")
        + f"; {len(layers)} conv layers compressed "
        f"({'first conv included' if args.include_first else 'first conv kept dense'}), device {device}",
        flush=True,
    )
    start = time.perf_counter()
    stats = None
    if any(norm != "sequential" for norm in args.norms):
        stats = _collect(model, data.calib_x, layers, samples=n_calib, batch_size=args.batch_size,
                         device=device, progress=progress, seed=args.seed, positions=args.positions_per_image)
    collect_seconds = time.perf_counter() - start
    base_acc = evaluate(model, eval_x, eval_y, device=device)
    total_conv = _conv_params(model)
    modules = dict(model.named_modules())
    selected_params = sum(modules[n].weight.numel() for n in layers)
    print(
        f"covariances of {len(layers)} layers from {n_calib} calibration images"
        + (f" ({args.positions_per_image} random patches per image and layer)" if args.positions_per_image else "")
        + " in "
        f"{_fmt_seconds(collect_seconds)}; accuracy on {n_eval} test images, no fine-tuning; "
        f"params = weights of the compressed layers ({selected_params} dense, "
        f"{total_conv} in all convs)\n",
        flush=True,
    )
    rows = [
        {
            "model": args.model, "ratio": 1.0, "method": "none", "norm": "original",
            "params_before": selected_params, "params_after": selected_params, "kept_fraction": 1.0,
            "model_conv_params": total_conv, "accuracy": base_acc, "accuracy_drop": 0.0, "seconds": 0.0,
        }
    ]
    print(DEMO_HEADER)
    print("-" * len(DEMO_HEADER))
    print(_demo_line(rows[0]), flush=True)
    calib_batches = list(_batches(data.calib_x, args.batch_size, n_calib))
    for ratio in args.ratios:
        for method in args.methods:
            for norm in args.norms:
                t0 = time.perf_counter()
                options = dict(
                    ratio=ratio, layers=layers, device=device, progress=progress, return_report=True,
                    n_iter_max=args.n_iter_max, random_state=args.seed,
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. non-monotone sweeps: the report has the errors
                    try:
                        if norm == "sequential":
                            # Streams its own statistics; its time includes them.
                            compressed, report = compress_sequential(model, calib_batches, method, **options)
                        else:
                            compressed, report = compress(model, stats, method, norm=norm, **options)
                    except ValueError as exc:
                        raise CLIError(f"compress ({method}, {norm}, ratio {ratio}) failed: {exc}") from None
                seconds = time.perf_counter() - t0
                acc = evaluate(compressed, eval_x, eval_y, device=device)
                before = sum(r.params_before for r in report)
                after = sum(r.params_after for r in report)
                row = {
                    "model": args.model, "ratio": ratio, "method": method, "norm": norm,
                    "params_before": before, "params_after": after, "kept_fraction": after / before,
                    "model_conv_params": _conv_params(compressed), "accuracy": acc,
                    "accuracy_drop": base_acc - acc, "seconds": round(seconds, 3),
                    "mean_sigma_error": sum(r.sigma_error for r in report) / len(report),
                    "layers": [r.as_dict() for r in report],
                }
                rows.append(row)
                print(_demo_line(row), flush=True)
    total_seconds = time.perf_counter() - start
    print(
        f"\ndrop = original accuracy - compressed accuracy (lower is better); time = decomposition of "
        f"all {len(layers)} layers (sequential: including its layer-by-layer statistics). "
        f"Total {_fmt_seconds(total_seconds)}.",
        flush=True,
    )
    if output is not None:
        payload = {
            "command": "demo",
            "model": args.model,
            "config": {
                "ratios": list(args.ratios), "methods": list(args.methods), "norms": list(args.norms),
                "calib_samples": n_calib,
                "positions_per_image": args.positions_per_image or None,
                "eval_samples": n_eval, "n_iter_max": args.n_iter_max, "seed": args.seed,
                "device": str(device), "layers": layers, "include_first": args.include_first,
            },
            "original_accuracy": base_acc,
            "stored_test_accuracy": stored,
            "collect_seconds": round(collect_seconds, 3),
            "total_seconds": round(total_seconds, 3),
            "rows": rows,
        }
        for path in write_table(output, payload, DEMO_COLUMNS):
            print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------
# collect / compress
# ---------------------------------------------------------------------------------------
def _input_paths(args) -> list[tuple[str, Path]]:
    """Every file the command reads, for the guard against overwriting an input."""
    paths = model_input_paths(args.model_file, getattr(args, "model_class", None)) + data_input_paths(args.data_dir)
    if getattr(args, "stats_in", None) is not None:
        paths.append(("--stats-in", Path(args.stats_in)))
    ranks_path = ranks_file(getattr(args, "ranks", None))
    if ranks_path is not None:
        paths.append(("--ranks", ranks_path))
    return paths


def _prepare_model_and_data(args):
    check_model_options(args.model, args.model_class, args.model_kwargs, args.allow_pickle)
    layers_arg = _split_layers(args.layers)
    data = load_data(args.data_dir, args.embedded, args.normalize)
    model = load_model(
        name=args.model, model_file=args.model_file, model_class=args.model_class,
        model_kwargs=args.model_kwargs, allow_pickle=args.allow_pickle,
    )
    try:
        model = model.to(args.torch_device)
    except RuntimeError as exc:
        raise CLIError(f"cannot move the model to --device {args.device}: {_one_line(exc)}") from None
    return args.torch_device, layers_arg, data, model


# The options of `collect` and `compress` that only shape the collection of statistics.
COLLECTION_OPTIONS = (
    ("--calib-samples", "calib_samples", DEFAULT_CALIB),
    ("--batch-size", "batch_size", DEFAULT_BATCH),
    ("--positions-per-image", "positions_per_image", 0),
)


def _collection_defaults(args) -> None:
    """Fill in the collection options the user did not give (their parser default is None)."""
    for _flag, attr, default in COLLECTION_OPTIONS:
        if getattr(args, attr) is None:
            setattr(args, attr, default)


def cmd_collect(args) -> int:
    _collection_defaults(args)
    (output,) = check_outputs([("--output", args.output)], _input_paths(args))
    device, layers_arg, data, model = _prepare_model_and_data(args)
    if args.all_layers:
        if layers_arg is not None:
            raise CLIError("give either --layers or --all-layers, not both.")
        layers = None
    else:
        layers = _select_layers(model, layers_arg, args.include_first)
    start = time.perf_counter()
    stats = _collect(model, data.calib_x, layers, samples=args.calib_samples, batch_size=args.batch_size,
                     device=device, progress=not args.no_progress, seed=args.seed,
                     positions=args.positions_per_image)
    seconds = time.perf_counter() - start
    if not stats:
        raise CLIError("the forward passes never called the selected layers: nothing to save.")
    missing = [name for name in (layers or []) if name not in stats]
    if missing:
        # As `compress` does: a statistics file without a layer that was asked for would
        # only fail later, in `compress --stats-in`.
        raise CLIError(f"the forward passes never called {missing}: drop them from --layers.")
    from .torch import save_statistics

    save_statistics(stats, output)
    # samples: patch vectors that entered the statistics (images x positions per image)
    print(f"{'layer':<32} {'weight shape':<18} {'patch dim':>9} {'samples':>10}")
    for name, st in stats.items():
        print(f"{name:<32} {'x'.join(map(str, st.weight_shape)):<18} {st.n:>9} {st.count:>10}")
    print(f"collected {len(stats)} layers from {min(args.calib_samples, data.calib_x.shape[0])} images "
          f"({data.source}) in {_fmt_seconds(seconds)}; wrote {output}")
    return 0


def _sizes(args, ranks) -> float | None:
    """The --ratio to use: 0.5 when no size option (and no --ranks) is given."""
    if ranks is None and args.ratio is None and args.energy is None and args.budget is None:
        return 0.5
    return args.ratio


def cmd_compress(args) -> int:
    output, stats_out, onnx_out = check_outputs(
        [("--output", args.output), ("--stats-out", args.stats_out), ("--export-onnx", args.export_onnx)],
        _input_paths(args),
    )
    if onnx_out is not None and args.distributed:
        raise CLIError("--export-onnx is not available with --distributed: export the saved model afterwards.")
    ranks = parse_ranks(args.ranks)
    ratio = _sizes(args, ranks)
    if args.distributed and args.stats_in is not None:
        raise CLIError("--distributed collects its own statistics: drop --stats-in.")
    if args.sequential and (args.stats_in is not None or args.stats_out is not None):
        raise CLIError("--sequential streams its own statistics layer by layer: drop --stats-in/--stats-out.")
    if args.positions_per_image and args.sequential:
        # The sequential passes stream every patch of every calibration image.
        raise CLIError("--positions-per-image sub-samples one-shot statistics; --sequential streams every "
                       "patch: drop one of them.")
    if args.stats_in is not None:
        # Statistics read from a file were collected before: these options would be ignored.
        given = [flag for flag, attr, _default in COLLECTION_OPTIONS if getattr(args, attr) is not None]
        if given:
            raise CLIError(f"--stats-in reads statistics collected before, so {' and '.join(given)} would be "
                           "ignored: give them to `collect`, or drop --stats-in.")
    _collection_defaults(args)
    if args.norm == "frobenius" and not args.sequential:
        # The one-shot Frobenius fit reads no covariance: a ridge on it changes nothing, and
        # the centring matters only to --energy / --budget, which rank by the whitened spectra.
        if args.damping is not None:
            raise CLIError("--damping regularizes the covariance of a data-aware fit; --norm frobenius "
                           "uses none: drop it.")
        if args.uncentered and args.energy is None and args.budget is None:
            raise CLIError("--uncentered chooses the covariance of a data-aware fit (or of --energy/--budget); "
                           "--norm frobenius with these ranks uses none: drop it.")
    if args.damping is None:
        args.damping = DEFAULT_DAMPING
    if args.refit and not args.sequential:
        raise CLIError("--refit refits layers during sequential calibration: add --sequential.")
    if args.fisher and not args.sequential:
        raise CLIError("--fisher weights the sequential calibration: add --sequential.")
    sequential_options = dict(budget_weighting="fisher", fit_weighting=args.fisher) if args.fisher else {}
    if args.target_damping is not None and not args.sequential:
        raise CLIError("--target-damping regularizes the sequential calibration's targets: add --sequential.")
    if args.target_damping is not None:
        sequential_options["target_damping"] = args.target_damping
    if not args.distributed:
        for flag, value in (("--max-memory", args.max_memory), ("--backend", args.backend), ("--timeout", args.timeout)):
            if value is not None:
                raise CLIError(f"{flag} applies to --distributed runs only.")
    max_memory = None
    if args.max_memory is not None:
        from .torch.distributed import parse_bytes

        try:
            max_memory = args.max_memory if args.max_memory == "auto" else parse_bytes(args.max_memory)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"--max-memory {args.max_memory!r}: {_one_line(exc)}") from None
    device, layers_arg, data, model = _prepare_model_and_data(args)
    origin = "--layers"
    if layers_arg is None and ranks is not None and args.ratio is None and args.energy is None and args.budget is None:
        layers_arg, origin = list(ranks), "--ranks"  # only the layers with explicit ranks
    layers = _select_layers(model, layers_arg, args.include_first, origin)
    if args.sequential and layers_arg is None:
        layers = _drop_repeated_layers(model, data.calib_x[:1], layers, device)
    _check_ranks(ranks, model, layers, args.method)
    progress = not args.no_progress
    evaluation = None if args.distributed else data.evaluation()
    before = None
    if evaluation is not None:
        # The original model's accuracy first: labels it can never predict fail here, before
        # the statistics and the decompositions, not after them.
        ex, ey, what = evaluation
        n_eval = min(args.eval_samples, ex.shape[0])
        before = evaluate(model, ex[:n_eval], ey[:n_eval], device=device)
    if args.distributed:
        from .torch.dist_main import run_distributed

        n = min(args.calib_samples, data.calib_x.shape[0])
        return run_distributed(
            model, data.calib_x[:n], layers, method=args.method, ratio=ratio, energy=args.energy, budget=args.budget,
            ranks=ranks, norm=args.norm, centered=not args.uncentered, damping=args.damping,
            n_iter_max=args.n_iter_max, seed=args.seed, calib_samples=n, batch_size=args.batch_size,
            output=output, stats_out=stats_out, max_memory=max_memory, progress=progress,
            backend=args.backend or "auto", timeout_s=args.timeout or 1800.0, sequential=args.sequential,
            refit=args.refit, fisher=args.fisher,
            target_damping="auto" if args.target_damping is None else args.target_damping,
            positions_per_image=args.positions_per_image,
        )

    if args.sequential:
        stats = None
    elif args.stats_in is not None:
        stats = _load_stats(args.stats_in, layers)
        print(f"statistics of {len(layers)} layers read from {args.stats_in}")
    else:
        start = time.perf_counter()
        stats = _collect(model, data.calib_x, layers, samples=args.calib_samples, batch_size=args.batch_size,
                         device=device, progress=progress, seed=args.seed, positions=args.positions_per_image)
        n = min(args.calib_samples, data.calib_x.shape[0])
        missing = [name for name in layers if name not in stats]
        if missing:
            raise CLIError(f"the forward passes never called {missing}; they cannot be compressed.")
        print(f"statistics of {len(layers)} layers from {n} images ({data.source}) in "
              f"{_fmt_seconds(time.perf_counter() - start)}")
    if stats_out is not None:
        from .torch import save_statistics

        save_statistics({name: stats[name] for name in layers}, stats_out)
        print(f"wrote statistics to {stats_out}")

    from .torch import compress, compress_sequential, format_report, save_compressed

    options = dict(
        ranks=ranks, ratio=ratio, energy=args.energy, budget=args.budget, norm=args.norm,
        centered=not args.uncentered, layers=layers, device=device, damping=args.damping, progress=progress,
        return_report=True, n_iter_max=args.n_iter_max, random_state=args.seed,
    )
    try:
        if args.sequential:
            n = min(args.calib_samples, data.calib_x.shape[0])
            start = time.perf_counter()
            compressed, report = compress_sequential(
                model, list(_batches(data.calib_x, args.batch_size, n)), args.method,
                refit=True if args.refit else None, **sequential_options, **options,
            )
            print(f"sequential calibration of {len(layers)} layers on {n} images ({data.source}) in "
                  f"{_fmt_seconds(time.perf_counter() - start)}")
        else:
            compressed, report = compress(model, stats, args.method, **options)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"compression failed: {_one_line(exc)}") from None
    # The files first, the report after: output piped into `head` (a broken pipe) or an
    # interrupted evaluation must not lose the compressed model.
    if output is not None:
        save_compressed(compressed, output)
    if onnx_out is not None:
        from .torch.export import export_onnx

        example = data.calib_x[: min(2, data.calib_x.shape[0])].to(device)
        try:
            export_onnx(compressed, onnx_out, example)
        except ImportError as exc:
            raise CLIError(f"--export-onnx needs onnx and onnxruntime (pip install 'tensorly-dataaware[onnx]'): {exc}") from None
        except (RuntimeError, TypeError, ValueError) as exc:  # TypeError: an output ONNX cannot hold
            raise CLIError(f"--export-onnx {str(onnx_out)!r} failed: {_one_line(exc)}") from None
    print()
    print(format_report(report))
    if evaluation is not None:
        after = evaluate(compressed, ex[:n_eval], ey[:n_eval], device=device)
        if before is None or after is None:
            print("\naccuracy: the model's outputs are not (N, classes) scores; skipped.")
        else:
            print(f"\naccuracy on {n_eval} {what}: before {before:.4f}, after {after:.4f} "
                  f"(drop {before - after:+.4f}, no fine-tuning)")
    else:
        print("\naccuracy: the data has no labels; skipped.")
    if output is not None:
        print(f"wrote the compressed model to {output} (load it with "
              "tensorly_dataaware.torch.load_compressed(fresh_model, path))")
    else:
        print("no --output given: the compressed model was not saved.")
    if onnx_out is not None:
        print(f"wrote the ONNX model to {onnx_out} (ONNX Runtime output checked against PyTorch)")
    return 0


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def cmd_info(args) -> int:
    from . import __version__

    print(f"tensorly-dataaware {__version__}")
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    for dist in ("numpy", "scipy", "tensorly", "torch", "jax", "jaxlib", "opt_einsum"):
        print(f"  {dist:<11} {_version(dist) or 'not installed'}")
    print("TensorLy backends (importable?):")
    for backend, module in (("numpy", "numpy"), ("pytorch", "torch"), ("jax", "jax")):
        ok = importlib.util.find_spec(module) is not None
        print(f"  {backend:<8} {'yes' if ok else 'no'}")
    if importlib.util.find_spec("torch") is None:
        print("CUDA: torch not installed (pip install -e '.[torch]')")
        return 0
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA: available, {torch.cuda.device_count()} device(s): {names}")
    else:
        print(f"CUDA: not available (torch {torch.__version__}); use --device cpu")
    from .data.fashion import DEFAULT_FASHION_ROOT, FASHION_ROOT_ENV, SUBSET_PATH
    from .models import available_models, load_metadata, weights_path

    print("embedded models (Fashion-MNIST):")
    for name in available_models():
        meta = load_metadata(name)
        present = weights_path(name).is_file()
        acc = meta.get("test_accuracy")
        extra = f", {meta['parameters']} parameters" if "parameters" in meta else ""
        state = f"test accuracy {acc:.4f} on {meta.get('test_images', '?')} images{extra}" if acc is not None else "no metadata"
        print(f"  {name:<9} {'weights present' if present else 'weights MISSING'}; {state}")
    print(f"embedded data subset: {'present' if SUBSET_PATH.is_file() else 'MISSING'} ({SUBSET_PATH})")
    root = Path(os.environ.get(FASHION_ROOT_ENV) or DEFAULT_FASHION_ROOT)
    if is_fashion_dir(root):
        print(f"full Fashion-MNIST: found in {root}")
    else:
        print(f"full Fashion-MNIST: not found in {root} "
              f"(set {FASHION_ROOT_ENV}, or apt-get install dataset-fashion-mnist)")
    return 0


# ---------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' line breaks; show defaults that say something (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        if isinstance(default, list):
            return text + " (default: " + " ".join(map(str, default)) + ")"
        return text + " (default: %(default)s)"


MAIN_EPILOG = f"""\
examples:
  {PROG}                                   # the demo (same as `{PROG} demo`)
  {PROG} demo --ratios 0.3 --methods tucker2 cp
  {PROG} compress --model-file sd.pt --model-class mypkg.nets:Net --data-dir calib.npz --ratio 0.3 --output small.pt
  {PROG} collect --model resnet20 --embedded --output stats.pt
  {PROG} info
  python -m {PROG.replace('-', '_')} --help         # the same program

The objective of every decomposition is ||(W - W~) Sigma^(1/2)||_F, with Sigma the covariance
of the layer's input patches: the error is measured where the data lives.
"""

DEMO_DESCRIPTION = """\
Compress the embedded network trained on Fashion-MNIST with the data-aware (sigma), the
classical (frobenius) and the sequentially calibrated (sequential) decomposition at several
parameter ratios and compare the test accuracy without any fine-tuning. Covariances are
collected once, on the embedded calibration images (drawn from the training split), for the
one-shot fits; the sequential fit streams its own, layer by layer. Accuracy is measured on the
embedded test images. Needs no download. With the defaults it takes about a minute on two CPU
cores (51-61 s measured on the development machine).

The table: ratio (target fraction of the weights kept in each compressed layer), method,
norm, params (weights of the compressed layers after factorization) and kept (their fraction
of the dense weights), accuracy, drop (original accuracy - compressed accuracy) and time
(the decompositions of all layers)."""

DEMO_EPILOG = f"""\
examples:
  {PROG} demo
  {PROG} demo --ratios 0.3 0.1 --methods tucker2 cp --output results.json
  {PROG} demo --model vgg --device cuda --calib-samples 2000
  {PROG} demo --layers layer3.0.conv1 layer3.0.conv2 --ratios 0.2
"""

COMPRESS_DESCRIPTION = """\
Compress your own model: collect the input covariances of its layers on your calibration
data (or read them with --stats-in), replace each selected layer by a factorized one fitted in
the chosen norm, print the per-layer report and, when the data has labels, the accuracy before
and after. The result is saved with tensorly_dataaware.torch.save_compressed; rebuild it with

    model = MyNet(); tensorly_dataaware.torch.load_compressed(model, "small.pt")

Model (one of):
  --model-file sd.pt --model-class pkg.mod:MyNet [--model-kwargs JSON]
                                        a state_dict saved with torch.save(model.state_dict(), path)
                                        (read with torch.load(weights_only=True): no code runs)
  --model-file net.pt --allow-pickle    a whole module saved with torch.save(model, path); unpickling
                                        runs code from the file: only for files you trust (its class
                                        must be importable)
  --model resnet20|vgg                  an embedded pretrained network
TorchScript files cannot be compressed (their layers cannot be replaced): pass an eager model.
The working folder is added to the import path, as with `python -m`.

Data (one of):
  --data-dir FOLDER                     Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] ...;
                                        calibration on train, accuracy on t10k when present), or
                                        images.npy (+ labels.npy), or a single .npz
  --data-dir file.npz                   arrays 'images' (N,C,H,W or N,H,W) and optional 'labels',
                                        optional 'eval_images'/'eval_labels' for the accuracy
  --data-dir images.npy                 images only
  --embedded                            the embedded Fashion-MNIST subset
uint8 images are standardized like Fashion-MNIST by default (--normalize).

No output (--output, --stats-out) may be the same file as an input or as another output
(symbolic and hard links included): such a run stops before doing anything.

Across processes (torchrun; every rank runs this same command, rank 0 prints and writes):
  torchrun --standalone --nproc_per_node=4 -m tensorly_dataaware compress --distributed \\
      --model resnet20 --embedded --ratio 0.3 --output small.pt
--distributed takes the options of a plain run except --stats-in (it collects its own
statistics) and --export-onnx (export the saved model afterwards), and prints no accuracy."""

COMPRESS_EPILOG = f"""\
examples:
  {PROG} compress --model resnet20 --embedded --ratio 0.25 --output resnet20_small.pt
  {PROG} compress --model-file net.pt --allow-pickle --data-dir calib.npz --energy 0.95 --output small.pt
  {PROG} compress --model-file sd.pt --model-class mypkg.nets:Net --model-kwargs '{{"width": 32}}' \\
      --data-dir /usr/share/datasets/fashion-mnist --budget 0.3 --method cp --output small.pt
  {PROG} compress --model resnet20 --embedded --ranks '{{"layer3.2.conv2": [16, 16]}}'
  {PROG} compress --model resnet20 --embedded --stats-in stats.pt --norm frobenius --ratio 0.3
  torchrun --standalone --nproc_per_node=2 -m tensorly_dataaware compress --distributed \\
      --model resnet20 --embedded --ratio 0.3 --output resnet20_small.pt
"""

COLLECT_EPILOG = f"""\
examples:
  {PROG} collect --model resnet20 --embedded --output stats.pt
  {PROG} collect --model-file sd.pt --model-class mypkg.nets:Net --data-dir calib.npz --all-layers --output stats.pt
  {PROG} compress --model-file sd.pt --model-class mypkg.nets:Net --data-dir calib.npz --stats-in stats.pt \\
      --ratio 0.3 --output small.pt
"""


def _add_common(p: argparse.ArgumentParser, work: str = "collection, decompositions and evaluation") -> None:
    p.add_argument("--device", default="cpu", help=f"torch device for {work} (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=_thread_count, default=DEFAULT_THREADS, metavar="N", help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the solvers' random choices")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only when stderr is a terminal, never into a log file)")


def _add_layers(p: argparse.ArgumentParser, verb: str = "compress") -> None:
    p.add_argument(
        "--layers", nargs="+", metavar="NAME", default=None,
        help=f"module names to {verb} (space- or comma-separated); default: every k x k nn.Conv2d except the first conv",
    )
    p.add_argument("--include-first", action="store_true", help=f"also {verb} the first conv (default selection only)")


def _add_model_and_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model-file", metavar="PATH",
                     help="a state_dict (with --model-class) saved with torch.save; a whole pickled nn.Module needs --allow-pickle")
    src.add_argument("--model", choices=("resnet20", "vgg"), default=None, help="an embedded pretrained network instead")
    g.add_argument("--model-class", metavar="MODULE:CLASS", help="class that --model-file's state_dict belongs to, e.g. mypkg.nets:Net")
    g.add_argument("--model-kwargs", metavar="JSON", help="constructor arguments of --model-class as a JSON object")
    g.add_argument(
        "--allow-pickle", action="store_true",
        help="read --model-file with full unpickling (torch.load(weights_only=False)), as needed for a whole module "
             "saved with torch.save(model, path). Unpickling RUNS ARBITRARY CODE stored in the file: use it only for "
             "files you trust. Without it the file is read with weights_only=True (tensors and plain containers only)",
    )
    d = p.add_argument_group("data")
    dsrc = d.add_mutually_exclusive_group()
    dsrc.add_argument("--data-dir", metavar="PATH", help="Fashion-MNIST IDX folder, a folder with images.npy or one .npz, or a .npz/.npy file")
    dsrc.add_argument("--embedded", action="store_true", help="use the embedded Fashion-MNIST subset")
    d.add_argument(
        "--normalize", choices=("auto", "fashion", "unit", "none"), default="auto",
        help="auto: uint8 -> fashion, float -> none; fashion: (x/255 - 0.286)/0.353; unit: x/255; none: as stored",
    )
    # Default None, resolved by _collection_defaults: `compress --stats-in` refuses these
    # options only when the user gave them, which a real default would hide.
    d.add_argument("--calib-samples", type=_positive_int, default=None,
                   help=f"calibration images used for the statistics (default: {DEFAULT_CALIB})")
    d.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"images per forward pass (default: {DEFAULT_BATCH})")
    d.add_argument("--positions-per-image", type=_nonnegative_int, default=None, metavar="N",
                   help="patches per image and layer entering the statistics, drawn at random (unbiased); 0: all "
                        "(default: 0)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the subcommand parsers inherit the class)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        # argparse prints the whole usage (20-30 lines here) before the message; the other
        # errors of the command line are one line, and --help has the usage.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Compress trained CNNs with data-aware (covariance-weighted) Tucker-2 and CP "
            "decompositions. Without a subcommand, runs `demo`."
        ),
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,compress,collect,info}")

    demo = sub.add_parser(
        "demo", help="compress the embedded network one-shot (sigma, Frobenius) and sequentially and compare accuracies (default)",
        description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG, formatter_class=_Formatter,
    )
    demo.add_argument("--model", choices=("resnet20", "vgg"), default="resnet20", help="embedded network")
    demo.add_argument("--ratios", type=_fraction, nargs="+", default=list(DEFAULT_RATIOS), metavar="R",
                      help="fractions of each compressed layer's weights to keep")
    demo.add_argument("--methods", nargs="+", choices=("tucker2", "cp"), default=["tucker2"], help="decompositions to compare")
    demo.add_argument("--norms", nargs="+", choices=DEMO_NORMS, default=list(DEMO_NORMS),
                      help="fits to compare: one-shot data-aware (sigma), classical (frobenius), and sequential "
                           "calibration (sequential: layer by layer, each fitted to the original output from the "
                           "compressed network's own inputs)")
    demo.add_argument("--calib-samples", type=_positive_int, default=DEFAULT_CALIB, help="embedded calibration images (at most 2000)")
    demo.add_argument("--eval-samples", type=_positive_int, default=DEFAULT_EVAL, help="embedded test images (at most 2000)")
    demo.add_argument("--batch-size", type=_positive_int, default=250, help="images per forward pass during collection")
    demo.add_argument("--positions-per-image", type=_nonnegative_int, default=64, metavar="N",
                      help="patches per image and layer entering the statistics, drawn at random (an unbiased "
                           "estimate that halves the collection time here, with the same accuracies); 0: all")
    demo.add_argument("--n-iter-max", type=_positive_int, default=DEFAULT_N_ITER,
                      help="maximum ALS sweeps of the sigma solvers (10 keeps the demo fast: 30 gives the same "
                           "accuracies within 0.1%% here, in three times the time)")
    demo.add_argument("--output", metavar="PATH", help="also write the table to PATH.json and PATH.csv (a .json/.csv suffix is replaced)")
    _add_layers(demo)
    _add_common(demo)
    demo.set_defaults(func=cmd_demo)

    comp = sub.add_parser(
        "compress", help="compress your own model with your calibration data and save it",
        description=COMPRESS_DESCRIPTION, epilog=COMPRESS_EPILOG, formatter_class=_Formatter,
    )
    _add_model_and_data(comp)
    r = comp.add_argument_group("decomposition")
    r.add_argument("--method", choices=("tucker2", "cp", "svd"), default="tucker2",
                   help="factorization of k x k convolutions (linear and 1x1 layers always use the whitened SVD)")
    r.add_argument("--norm", choices=("sigma", "frobenius"), default="sigma", help="data-aware, or the classical baseline")
    sizes = r.add_mutually_exclusive_group()
    sizes.add_argument("--ratio", type=_fraction, help="fraction of each layer's weights kept (0.5 when no size option is given)")
    sizes.add_argument("--energy", type=_fraction, help="fraction of each layer's whitened output energy kept")
    sizes.add_argument("--budget", type=_fraction, help="fraction of the selected layers' total weights, spread where it helps most")
    r.add_argument("--ranks", metavar="JSON", help='explicit ranks as JSON (or a JSON file): {"name": R or [R_out, R_in]}; '
                                                   "alone, it also selects the layers")
    r.add_argument("--sequential", action="store_true",
                   help="sequential calibration (compress_sequential): fit the layers one after the other, each to "
                        "the original output from the partly compressed network's own inputs. Much more accurate "
                        "below ~20%% kept; reads the calibration images once per layer (2.4-2.5x the one-shot time on the embedded ResNet-20); "
                        "collects its own statistics, so --stats-in/--stats-out do not apply")
    r.add_argument("--refit", action="store_true",
                   help="with --sequential: also refit every dense conv/linear layer that runs after the first "
                        "compressed one (shortcuts, classifier) to the original outputs, at no parameter cost, with a "
                        "ridge chosen by cross-validation; best combined with --budget below ~20%% kept")
    r.add_argument("--fisher", nargs="?", const="fisher", choices=["fisher", "kfac"], default=None,
                   help="with --sequential: weight the --budget allocation and each layer's fit by the label-free "
                        "Fisher of the layers' output channels (the model must return logits); '--fisher kfac' fits "
                        "with the full channel-by-channel Fisher matrix instead of its diagonal (measured +0.3 "
                        "point for CP on the embedded VGG at 10%% kept); opt-in")
    r.add_argument("--target-damping", type=_ridge, metavar="{auto,cv,RIDGE}",
                   help="with --sequential: relative ridge of each compressed layer's regression target, 'cv' to "
                        "choose it per layer by cross-validation over the calibration images, or 'auto' (default): "
                        "'cv' for the layers with fewer calibration samples than twice their inputs, --damping elsewhere")
    r.add_argument("--uncentered", action="store_true", help="weight with the uncentred second moment instead of the covariance")
    r.add_argument("--damping", type=_nonnegative_float, default=None,
                   help=f"relative ridge added to each covariance (default: {DEFAULT_DAMPING})")
    r.add_argument("--n-iter-max", type=_positive_int, default=30, help="maximum ALS sweeps of the solvers")
    r.add_argument("--eval-samples", type=_positive_int, default=DEFAULT_EVAL, help="labelled images used for the accuracy")
    io_ = comp.add_argument_group("files")
    io_.add_argument("--stats-in", metavar="PATH", help="read statistics (from `collect` or --stats-out) instead of collecting")
    io_.add_argument("--stats-out", metavar="PATH", help="also save the statistics used")
    io_.add_argument("--output", metavar="PATH", help="save the compressed model here (save_compressed, atomic)")
    io_.add_argument("--export-onnx", metavar="PATH",
                     help="also export the compressed model to ONNX (batch size dynamic), checked against PyTorch "
                          "with ONNX Runtime to 1e-4 relative; needs the `onnx` extra: pip install 'tensorly-dataaware[onnx]'")
    dist = comp.add_argument_group("distributed (torchrun)")
    dist.add_argument(
        "--distributed", action="store_true",
        help="shard the statistics and the decompositions over all ranks of torchrun "
             "(torchrun --nproc_per_node=N -m tensorly_dataaware compress --distributed ...); without torchrun, a "
             "world of one process. Rank 0 writes --output and --stats-out, only if every rank succeeded",
    )
    dist.add_argument("--backend", choices=("auto", "nccl", "gloo"), default=None,
                      help="process-group backend (default auto: nccl with CUDA, else gloo)")
    dist.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                      help="process-group timeout (default 1800)")
    dist.add_argument("--max-memory", metavar="BYTES", default=None,
                      help="per-process budget of one decomposition (e.g. 20GiB, or auto); checked before any decomposition "
                           "(after the statistics, which the ranks of --energy/--budget need)")
    _add_layers(comp)
    _add_common(comp)
    comp.set_defaults(func=cmd_compress)

    coll = sub.add_parser(
        "collect", help="collect and save the layers' input statistics only",
        description="Run the model over calibration data and save the float64 input-patch statistics "
                    "(mean and second moment) of the selected layers with save_statistics.",
        epilog=COLLECT_EPILOG, formatter_class=_Formatter,
    )
    _add_model_and_data(coll)
    coll.add_argument("--output", metavar="PATH", required=True, help="statistics file to write (atomic)")
    coll.add_argument("--all-layers", action="store_true", help="every nn.Conv2d, nn.Conv1d and nn.Linear")
    _add_layers(coll, "collect the statistics of")
    _add_common(coll, "the collection")
    coll.set_defaults(func=cmd_collect)

    info = sub.add_parser(
        "info", help="versions, backends, CUDA and the embedded models",
        description="Print versions, which TensorLy backends are importable, CUDA availability and the "
                    "embedded models with their stored test accuracy.",
        formatter_class=_Formatter,
    )
    info.set_defaults(func=cmd_info)
    return parser


def _run(args) -> int:
    if not hasattr(args, "threads"):  # info
        return int(args.func(args) or 0)
    if importlib.util.find_spec("torch") is None:
        raise CLIError(f"`{args.command}` needs PyTorch: pip install 'tensorly-dataaware[torch]'.")
    # Bars redrawn with carriage returns belong on a terminal; in a log file they are noise.
    args.no_progress = args.no_progress or not _stderr_is_terminal()
    with _torch_session(args.threads, args.seed, args.device) as device:
        args.torch_device = device
        return int(args.func(args) or 0)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 2 usage or input error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse prints them)
        return exc.code if isinstance(exc.code, int) else 2
    # SIGTERM (kill, a batch scheduler, torchrun stopping its workers) unwinds like Ctrl-C, so
    # that half-written temporary files are removed; the handler is the caller's again after.
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():
        previous, installed = signal.signal(signal.SIGTERM, _terminated), True
    try:
        return _run(args)
    except _Terminated:
        _eprint(f"{PROG}: terminated")
        return 143
    except CLIError as exc:
        message = " ".join(str(exc).split("\n"))
        _eprint(f"{PROG} {args.command}: error: {message}")
        return 2
    except KeyboardInterrupt:
        _eprint(f"{PROG}: interrupted")
        return 130
    except OSError as exc:  # e.g. a full disk or a permission problem while writing an output
        _eprint(f"{PROG} {args.command}: error: {_one_line(exc)}")
        return 2
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: every ``finally`` and clean-up runs."""


def _terminated(signum, frame):
    raise _Terminated()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
