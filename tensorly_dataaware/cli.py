"""The ``tensorly-dataaware`` command line: a thin shell over the library.

Subcommands (``tensorly-dataaware SUBCOMMAND --help`` for each):

* ``demo`` (the default): compress the embedded Fashion-MNIST network with the data-aware
  (``sigma``) and the classical (``frobenius``) decompositions and compare test accuracies;
* ``compress``: compress your own model with your own calibration data and save it;
* ``collect``: only collect and save the input statistics (covariances) of the layers;
* ``info``: versions, backends, CUDA, embedded models.

Every error a user can cause (a bad path, a bad argument, a model the library cannot
handle) is reported as one line on stderr with exit code 2, without a traceback.  ``torch``
is imported only by the subcommands that need it, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

PROG = "tensorly-dataaware"
DEFAULT_RATIOS = (0.5, 0.25, 0.15)
DEFAULT_CALIB = 1000
DEFAULT_EVAL = 2000
# 10 sweeps, not 30: on the embedded ResNet-20 the demo's accuracies at 5, 10 and 30 sweeps
# agree within 0.1 %, and 30 sweeps triple the time of the sigma rows (over 3 minutes on 2 cores).
DEFAULT_N_ITER = 10


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
def _eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
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
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _split_layers(values: Sequence[str] | None) -> list[str] | None:
    """``--layers a b,c`` -> ``['a', 'b', 'c']``."""
    if values is None:
        return None
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        raise CLIError("--layers was given without any layer name.")
    return names


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then ``os.replace`` it."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CLIError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_output_path(path: str | None, what: str = "--output") -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{what} {path!r} is a folder; give a file name.")
    if not out.resolve().parent.is_dir():
        raise CLIError(f"{what} {path!r}: folder {str(out.resolve().parent)!r} does not exist.")
    return out


def _setup_torch(threads: int | None, seed: int | None, device: str):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu.")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise CLIError(f"--device {device!r} is not a valid torch device: {exc}") from None


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
def default_layers(model, include_first: bool = False) -> list[str]:
    """Every ``k x k`` (not ``1 x 1``) ``nn.Conv2d`` with ``groups == 1``, in module order.

    The first convolution of the network is left out unless ``include_first``: it sees the
    raw image through very few input channels, so it holds few weights and compresses badly.
    """
    from torch import nn

    convs = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d and tuple(module.kernel_size) != (1, 1) and module.groups == 1
    ]
    if convs and not include_first:
        first = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
        convs = [name for name in convs if name != first]
    return convs


def _select_layers(model, layers: list[str] | None, include_first: bool, origin: str = "--layers") -> list[str]:
    from torch import nn

    if layers is None:
        selected = default_layers(model, include_first)
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
    return list(dict.fromkeys(layers))


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
# Data
# ---------------------------------------------------------------------------------------
class Data:
    """Calibration images (and optional labels) plus an optional separate evaluation set."""

    def __init__(self, calib_x, calib_y=None, eval_x=None, eval_y=None, source: str = ""):
        self.calib_x, self.calib_y = calib_x, calib_y
        self.eval_x, self.eval_y = eval_x, eval_y
        self.source = source

    def evaluation(self):
        """(images, labels, description) used for accuracy, or None without labels."""
        if self.eval_x is not None and self.eval_y is not None:
            return self.eval_x, self.eval_y, "evaluation images"
        if self.calib_y is not None:
            return self.calib_x, self.calib_y, "calibration images (no separate evaluation set)"
        return None


def _as_float_images(images, labels, normalize: str, what: str):
    """numpy images -> float32 torch tensor (N, C, H, W); labels -> int64 tensor or None."""
    import numpy as np
    import torch

    from .data import normalize as fashion_normalize

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise CLIError(f"{what}: images must have shape (N, H, W) or (N, C, H, W), got {images.shape}.")
    if images.shape[0] == 0:
        raise CLIError(f"{what}: no images.")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise CLIError(f"{what}: images must be numeric, got dtype {images.dtype}.")
    mode = normalize
    if mode == "auto":
        mode = "fashion" if images.dtype == np.uint8 else "none"
    if mode in ("fashion", "unit") and images.dtype != np.uint8:
        raise CLIError(f"{what}: --normalize {mode} needs uint8 images in 0..255, got {images.dtype}.")
    if mode == "fashion":
        if images.shape[1] != 1:
            raise CLIError(
                f"{what}: --normalize fashion is for one-channel images, got {images.shape[1]} channels; "
                "use --normalize unit or none."
            )
        array = fashion_normalize(images)
    elif mode == "unit":
        array = images.astype(np.float32) / np.float32(255.0)
    else:
        array = images.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise CLIError(f"{what}: images contain NaN or Inf.")
    x = torch.from_numpy(np.ascontiguousarray(array))
    y = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise CLIError(f"{what}: {images.shape[0]} images but labels of shape {labels.shape}.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise CLIError(f"{what}: labels must be integers, got dtype {labels.dtype}.")
        y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _load_npz(path: Path, normalize: str) -> Data:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CLIError(f"cannot read {str(path)!r} as a .npz archive: {exc}") from None
    if "images" not in arrays:
        raise CLIError(f"{str(path)!r} has no array named 'images' (found {sorted(arrays)}).")
    calib_x, calib_y = _as_float_images(arrays["images"], arrays.get("labels"), normalize, str(path))
    eval_x = eval_y = None
    if "eval_images" in arrays:
        eval_x, eval_y = _as_float_images(arrays["eval_images"], arrays.get("eval_labels"), normalize, f"{path} (eval)")
    return Data(calib_x, calib_y, eval_x, eval_y, source=str(path))


def _load_npy(path: Path, normalize: str) -> Data:
    import numpy as np

    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {str(path)!r} as a .npy array: {exc}") from None
    labels = None
    sibling = path.with_name("labels.npy")
    if path.name == "images.npy" and sibling.is_file():
        labels = np.load(sibling, allow_pickle=False)
    x, y = _as_float_images(images, labels, normalize, str(path))
    return Data(x, y, source=str(path))


def _is_fashion_dir(folder: Path) -> bool:
    return any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))


def load_data(data_dir: str | None, embedded: bool, normalize: str) -> Data:
    """The calibration (and evaluation) data named by ``--data-dir`` or ``--embedded``."""
    if embedded:
        from .data import load_embedded_subset

        subset = load_embedded_subset()
        cx, cy = _as_float_images(subset["calib_images"], subset["calib_labels"], normalize, "embedded subset")
        ex, ey = _as_float_images(subset["eval_images"], subset["eval_labels"], normalize, "embedded subset")
        return Data(cx, cy, ex, ey, source="embedded Fashion-MNIST subset (2000 train + 2000 test images)")
    if data_dir is None:
        raise CLIError("give calibration data: --data-dir PATH or --embedded.")
    path = Path(data_dir)
    if not path.exists():
        raise CLIError(f"--data-dir {data_dir!r} does not exist.")
    if path.is_file():
        if path.suffix == ".npz":
            return _load_npz(path, normalize)
        if path.suffix == ".npy":
            return _load_npy(path, normalize)
        raise CLIError(f"--data-dir {data_dir!r}: expected a folder, a .npz or a .npy file.")
    if _is_fashion_dir(path):
        from .data import load_fashion_mnist

        try:
            images, labels = load_fashion_mnist("train", root=path)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot read the Fashion-MNIST files in {data_dir!r}: {exc}") from None
        cx, cy = _as_float_images(images, labels, normalize, str(path))
        ex = ey = None
        try:
            test_images, test_labels = load_fashion_mnist("test", root=path)
            ex, ey = _as_float_images(test_images, test_labels, normalize, str(path))
        except FileNotFoundError:
            pass
        return Data(cx, cy, ex, ey, source=f"Fashion-MNIST IDX files in {path}")
    if (path / "images.npy").is_file():
        return _load_npy(path / "images.npy", normalize)
    npz = sorted(path.glob("*.npz"))
    if len(npz) == 1:
        return _load_npz(npz[0], normalize)
    if len(npz) > 1:
        raise CLIError(f"--data-dir {data_dir!r} holds several .npz files ({[p.name for p in npz]}); pass one of them.")
    raise CLIError(
        f"--data-dir {data_dir!r} holds no usable data: expected the Fashion-MNIST IDX files "
        "(train-images-idx3-ubyte[.gz], ...), images.npy (+ labels.npy) or one .npz with 'images'."
    )


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
                out = model(xb)
                if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != xb.shape[0]:
                    return None
                correct += int((out.argmax(1).cpu() == y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / x.shape[0]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
def _import_class(spec: str):
    if ":" not in spec:
        raise CLIError(f"--model-class must look like package.module:ClassName, got {spec!r}.")
    module_name, _, attr = spec.partition(":")
    # Like `python -m`, look for the user's modules in the working folder too.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"--model-class {spec!r}: cannot import {module_name!r} ({exc}).") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--model-class {spec!r}: {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder and ``constants.pkl``; torch.save files do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_model(args) -> Any:
    """The eager ``nn.Module`` named by ``--model`` or ``--model-file`` (+ ``--model-class``)."""
    import torch
    from torch import nn

    if getattr(args, "model", None) is not None:
        from .models import load_pretrained

        try:
            return load_pretrained(args.model)
        except FileNotFoundError as exc:
            raise CLIError(str(exc)) from None
    if args.model_file is None:
        raise CLIError("give the model: --model-file PATH (with --model-class for a state_dict) or --model NAME.")
    path = Path(args.model_file)
    if not path.is_file():
        raise CLIError(f"--model-file {args.model_file!r} does not exist or is not a file.")
    if _is_torchscript(path):
        raise CLIError(
            f"{args.model_file!r} is a TorchScript file (torch.jit.save). TorchScript modules cannot be "
            "modified, so their layers cannot be replaced by factorized ones. Pass an eager model "
            "instead: a file written by torch.save(model, path), or a state_dict saved with "
            "torch.save(model.state_dict(), path) together with --model-class package.module:ClassName."
        )
    kwargs: dict[str, Any] = {}
    if args.model_kwargs is not None:
        if args.model_class is None:
            raise CLIError("--model-kwargs needs --model-class.")
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise CLIError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'.")
    if args.model_class is not None:
        cls = _import_class(args.model_class)
        try:
            model = cls(**kwargs)
        except TypeError as exc:
            raise CLIError(f"cannot build {args.model_class}(**{kwargs}): {exc}") from None
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model-class {args.model_class!r} did not build a torch.nn.Module.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CLIError(f"cannot read a state_dict from {args.model_file!r}: {exc}") from None
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CLIError(f"{args.model_file!r} does not hold a state_dict (got {type(state).__name__}).")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CLIError(f"the state_dict in {args.model_file!r} does not fit {args.model_class}: {exc}") from None
        return model.eval()
    # A full pickled module: needs its class importable, and runs pickle (trusted files only).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CLIError(
            f"cannot unpickle the model in {args.model_file!r}: {exc}. The class of a torch.save'd module "
            "must be importable (run from the folder of its module, or set PYTHONPATH)."
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"cannot read {args.model_file!r} with torch.load: {exc}") from None
    if isinstance(obj, nn.Module):
        if isinstance(obj, torch.jit.ScriptModule):
            raise CLIError(f"{args.model_file!r} holds a TorchScript module; pass an eager nn.Module.")
        return obj.eval()
    if isinstance(obj, dict):
        raise CLIError(
            f"{args.model_file!r} holds a state_dict, not a module: also pass --model-class "
            "package.module:ClassName (and --model-kwargs JSON if its constructor needs arguments)."
        )
    raise CLIError(f"{args.model_file!r} holds a {type(obj).__name__}, not a torch.nn.Module.")


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------
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
        raise CLIError(f"collecting statistics failed: {exc}") from None


def _load_stats(path: str, layers: list[str]):
    from .torch import load_statistics

    if not Path(path).is_file():
        raise CLIError(f"--stats-in {path!r} does not exist.")
    try:
        stats = load_statistics(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise CLIError(f"cannot read statistics from {path!r}: {exc}") from None
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


def _write_table(path: Path, payload: dict) -> list[Path]:
    """Write ``payload`` as JSON and its rows as CSV, each atomically; return the paths."""
    if path.suffix.lower() in (".json", ".csv"):
        base = path.with_suffix("")
    else:
        base = path
    json_path, csv_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")
    _atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=DEMO_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in payload["rows"]:
        writer.writerow(row)
    _atomic_write_text(csv_path, buffer.getvalue())
    return [json_path, csv_path]


def cmd_demo(args) -> int:
    output = _check_output_path(args.output)
    layers_arg = _split_layers(args.layers)
    device = _setup_torch(args.threads, args.seed, args.device)
    progress = not args.no_progress

    from .models import load_metadata, load_pretrained
    from .torch import compress

    try:
        model = load_pretrained(args.model).to(device)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
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
    for ratio in args.ratios:
        for method in args.methods:
            for norm in ("sigma", "frobenius"):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. non-monotone sweeps: the report has the errors
                    try:
                        compressed, report = compress(
                            model, stats, method, ratio=ratio, norm=norm, layers=layers,
                            device=device, progress=progress, return_report=True,
                            n_iter_max=args.n_iter_max, random_state=args.seed,
                        )
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
        f"all {len(layers)} layers. Total {_fmt_seconds(total_seconds)}.",
        flush=True,
    )
    if output is not None:
        payload = {
            "command": "demo",
            "model": args.model,
            "config": {
                "ratios": list(args.ratios), "methods": list(args.methods), "calib_samples": n_calib,
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
        for path in _write_table(output, payload):
            print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------
# collect / compress
# ---------------------------------------------------------------------------------------
def _prepare_model_and_data(args):
    device = _setup_torch(args.threads, args.seed, args.device)
    layers_arg = _split_layers(args.layers)
    data = load_data(args.data_dir, args.embedded, args.normalize)
    model = load_model(args).to(device)
    return device, layers_arg, data, model


def cmd_collect(args) -> int:
    output = _check_output_path(args.output)
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
    from .torch import save_statistics

    save_statistics(stats, output)
    print(f"{'layer':<32} {'weight shape':<18} {'patch dim':>9} {'samples':>10}")
    for name, st in stats.items():
        print(f"{name:<32} {'x'.join(map(str, st.weight_shape)):<18} {st.mean.shape[-1]:>9} {st.n:>10}")
    print(f"collected {len(stats)} layers from {min(args.calib_samples, data.calib_x.shape[0])} images "
          f"({data.source}) in {_fmt_seconds(seconds)}; wrote {output}")
    return 0


def cmd_compress(args) -> int:
    output = _check_output_path(args.output)
    stats_out = _check_output_path(args.stats_out, "--stats-out")
    ranks = None
    if args.ranks is not None:
        text = args.ranks
        if Path(text).is_file():
            text = Path(text).read_text()
        try:
            ranks = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--ranks is neither a JSON object nor a JSON file: {exc}") from None
        if not isinstance(ranks, dict) or not all(
            isinstance(v, int) or (isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) for i in v))
            for v in ranks.values()
        ):
            raise CLIError('--ranks must map layer names to an int or a pair [R_out, R_in], e.g. \'{"layer1.0.conv1": [8, 8]}\'.')
    ratio = args.ratio
    if ranks is None and args.ratio is None and args.energy is None and args.budget is None:
        ratio = 0.5
    device, layers_arg, data, model = _prepare_model_and_data(args)
    origin = "--layers"
    if layers_arg is None and ranks is not None and args.ratio is None and args.energy is None and args.budget is None:
        layers_arg, origin = list(ranks), "--ranks"  # only the layers with explicit ranks
    layers = _select_layers(model, layers_arg, args.include_first, origin)
    if ranks is not None:
        unknown = sorted(set(ranks) - set(layers))
        if unknown:
            raise CLIError(f"--ranks names layers that are not compressed: {unknown} (compressed: {layers}).")
    progress = not args.no_progress
    if args.distributed:
        if args.stats_in is not None:
            raise CLIError("--distributed collects its own statistics: drop --stats-in.")
        from .torch.dist_main import run_distributed

        return run_distributed(
            model, data.calib_x, layers, method=args.method, ratio=ratio, energy=args.energy, budget=args.budget,
            ranks=ranks, norm=args.norm, centered=not args.uncentered, damping=args.damping,
            n_iter_max=args.n_iter_max, seed=args.seed, calib_samples=args.calib_samples,
            batch_size=args.batch_size, output=output, progress=progress,
        )

    if args.stats_in is not None:
        stats = _load_stats(args.stats_in, layers)
        print(f"statistics of {len(layers)} layers read from {args.stats_in}")
    else:
        start = time.perf_counter()
        stats = _collect(model, data.calib_x, layers, samples=args.calib_samples, batch_size=args.batch_size,
                         device=device, progress=progress, seed=args.seed, positions=args.positions_per_image)
        n = min(args.calib_samples, data.calib_x.shape[0])
        print(f"statistics of {len(layers)} layers from {n} images ({data.source}) in "
              f"{_fmt_seconds(time.perf_counter() - start)}")
        missing = [name for name in layers if name not in stats]
        if missing:
            raise CLIError(f"the forward passes never called {missing}; they cannot be compressed.")
    if stats_out is not None:
        from .torch import save_statistics

        save_statistics({name: stats[name] for name in layers}, stats_out)
        print(f"wrote statistics to {stats_out}")

    from .torch import compress, format_report, save_compressed

    options = {"n_iter_max": args.n_iter_max, "random_state": args.seed}
    try:
        compressed, report = compress(
            model, stats, args.method, ranks=ranks, ratio=ratio, energy=args.energy, budget=args.budget,
            norm=args.norm, centered=not args.uncentered, layers=layers, device=device,
            damping=args.damping, progress=progress, return_report=True, **options,
        )
    except ValueError as exc:
        raise CLIError(f"compression failed: {exc}") from None
    print()
    print(format_report(report))
    evaluation = data.evaluation()
    if evaluation is not None:
        ex, ey, what = evaluation
        n_eval = min(args.eval_samples, ex.shape[0])
        before = evaluate(model, ex[:n_eval], ey[:n_eval], device=device)
        after = evaluate(compressed, ex[:n_eval], ey[:n_eval], device=device)
        if before is None or after is None:
            print("\naccuracy: the model's outputs are not (N, classes) scores; skipped.")
        else:
            print(f"\naccuracy on {n_eval} {what}: before {before:.4f}, after {after:.4f} "
                  f"(drop {before - after:+.4f}, no fine-tuning)")
    else:
        print("\naccuracy: the data has no labels; skipped.")
    if output is not None:
        save_compressed(compressed, output)
        print(f"wrote the compressed model to {output} (load it with "
              "tensorly_dataaware.torch.load_compressed(fresh_model, path))")
    else:
        print("no --output given: the compressed model was not saved.")
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
    print(f"full Fashion-MNIST: {'found' if _is_fashion_dir(root) else 'not found'} in {root} "
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
  {PROG} compress --model-file net.pt --data-dir calib.npz --ratio 0.3 --output net_small.pt
  {PROG} collect --model resnet20 --embedded --output stats.pt
  {PROG} info
  python -m {PROG.replace('-', '_')} --help         # the same program

The objective of every decomposition is ||(W - W~) Sigma^(1/2)||_F, with Sigma the covariance
of the layer's input patches: the error is measured where the data lives.
"""

DEMO_DESCRIPTION = """\
Compress the embedded network trained on Fashion-MNIST with the data-aware (sigma) and the
classical (frobenius) decomposition at several parameter ratios and compare the test accuracy
without any fine-tuning. Covariances are collected once, on the embedded calibration images
(drawn from the training split); accuracy is measured on the embedded test images. Needs no
download. With the defaults it takes about a minute on two CPU cores.

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
  --model-file net.pt                   a module saved with torch.save(model, path) (unpickled:
                                        only load files you trust; its class must be importable)
  --model-file sd.pt --model-class pkg.mod:MyNet [--model-kwargs JSON]
                                        a state_dict saved with torch.save(model.state_dict(), path)
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
uint8 images are standardized like Fashion-MNIST by default (--normalize)."""

COMPRESS_EPILOG = f"""\
examples:
  {PROG} compress --model resnet20 --embedded --ratio 0.25 --output resnet20_small.pt
  {PROG} compress --model-file net.pt --data-dir calib.npz --energy 0.95 --output small.pt
  {PROG} compress --model-file sd.pt --model-class mypkg.nets:Net --model-kwargs '{{"width": 32}}' \\
      --data-dir /usr/share/datasets/fashion-mnist --budget 0.3 --method cp --output small.pt
  {PROG} compress --model resnet20 --embedded --ranks '{{"layer3.2.conv2": [16, 16]}}'
  {PROG} compress --model resnet20 --embedded --stats-in stats.pt --norm frobenius --ratio 0.3
"""

COLLECT_EPILOG = f"""\
examples:
  {PROG} collect --model resnet20 --embedded --output stats.pt
  {PROG} collect --model-file net.pt --data-dir calib.npz --all-layers --output stats.pt
  {PROG} compress --model-file net.pt --data-dir calib.npz --stats-in stats.pt --ratio 0.3 --output small.pt
"""


def _add_common(p: argparse.ArgumentParser, threads: int | None = None, threads_help: str = "torch CPU threads (default: torch's own choice)") -> None:
    p.add_argument("--device", default="cpu", help="torch device for collection, decompositions and evaluation (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=_positive_int, default=threads, help=threads_help)
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the solvers' random choices")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layers", nargs="+", metavar="NAME", default=None,
        help="module names to compress (space- or comma-separated); default: every k x k nn.Conv2d except the first conv",
    )
    p.add_argument("--include-first", action="store_true", help="also compress the first conv (default selection only)")


def _add_model_and_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model-file", metavar="PATH", help="torch.save'd nn.Module, or a state_dict with --model-class")
    src.add_argument("--model", choices=("resnet20", "vgg"), default=None, help="an embedded pretrained network instead")
    g.add_argument("--model-class", metavar="MODULE:CLASS", help="class that --model-file's state_dict belongs to, e.g. mypkg.nets:Net")
    g.add_argument("--model-kwargs", metavar="JSON", help="constructor arguments of --model-class as a JSON object")
    d = p.add_argument_group("data")
    dsrc = d.add_mutually_exclusive_group()
    dsrc.add_argument("--data-dir", metavar="PATH", help="Fashion-MNIST IDX folder, a folder with images.npy or one .npz, or a .npz/.npy file")
    dsrc.add_argument("--embedded", action="store_true", help="use the embedded Fashion-MNIST subset")
    d.add_argument(
        "--normalize", choices=("auto", "fashion", "unit", "none"), default="auto",
        help="auto: uint8 -> fashion, float -> none; fashion: (x/255 - 0.286)/0.353; unit: x/255; none: as stored",
    )
    d.add_argument("--calib-samples", type=_positive_int, default=DEFAULT_CALIB, help="calibration images used for the statistics")
    d.add_argument("--batch-size", type=_positive_int, default=250, help="images per forward pass")
    d.add_argument("--positions-per-image", type=_nonnegative_int, default=0, metavar="N",
                   help="patches per image and layer entering the statistics, drawn at random (unbiased); 0: all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        "demo", help="compress the embedded network with both norms and compare accuracies (default)",
        description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG, formatter_class=_Formatter,
    )
    demo.add_argument("--model", choices=("resnet20", "vgg"), default="resnet20", help="embedded network")
    demo.add_argument("--ratios", type=_fraction, nargs="+", default=list(DEFAULT_RATIOS), metavar="R",
                      help="fractions of each compressed layer's weights to keep")
    demo.add_argument("--methods", nargs="+", choices=("tucker2", "cp"), default=["tucker2"], help="decompositions to compare")
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
    _add_common(demo, threads=1, threads_help=(
        "torch CPU threads. 1 by default: the demo's small decompositions gain little from more, and on a "
        "machine busy with other work, extra threads that compete for the cores slowed it down 4-5x here"))
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
    r.add_argument("--uncentered", action="store_true", help="weight with the uncentred second moment instead of the covariance")
    r.add_argument("--damping", type=float, default=1e-6, help="relative ridge added to each covariance")
    r.add_argument("--n-iter-max", type=_positive_int, default=30, help="maximum ALS sweeps of the solvers")
    r.add_argument("--eval-samples", type=_positive_int, default=DEFAULT_EVAL, help="labelled images used for the accuracy")
    io_ = comp.add_argument_group("files")
    io_.add_argument("--stats-in", metavar="PATH", help="read statistics (from `collect` or --stats-out) instead of collecting")
    io_.add_argument("--stats-out", metavar="PATH", help="also save the statistics used")
    io_.add_argument("--output", metavar="PATH", help="save the compressed model here (save_compressed, atomic)")
    io_.add_argument(
        "--distributed", action="store_true",
        help="under torchrun: shard the statistics and the decompositions over all ranks; rank 0 writes --output "
             "(torchrun --nproc_per_node=N -m tensorly_dataaware compress --distributed ...)",
    )
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
    _add_layers(coll)
    _add_common(coll)
    coll.set_defaults(func=cmd_collect)

    info = sub.add_parser(
        "info", help="versions, backends, CUDA and the embedded models",
        description="Print versions, which TensorLy backends are importable, CUDA availability and the "
                    "embedded models with their stored test accuracy.",
        formatter_class=_Formatter,
    )
    info.set_defaults(func=cmd_info)
    return parser


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
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        _eprint(f"{PROG} {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _eprint(f"{PROG}: interrupted")
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        _eprint(f"{PROG} {args.command}: error: {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
