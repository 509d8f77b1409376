"""Files of the command line: calibration data, models, ``--ranks``, output paths and tables.

:mod:`tensorly_dataaware.cli` parses arguments and prints messages; everything that reads
or writes a user's file lives here. Every problem a user can cause raises
:class:`InputError` with a one-line message that names the option and the path; the CLI
prints it and exits with code 2. Writes go through :mod:`tensorly_dataaware._atomic`.
``torch`` is imported only inside the functions that need it.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_text

__all__ = [
    "InputError",
    "Data",
    "load_data",
    "data_input_paths",
    "load_model",
    "model_input_paths",
    "check_model_options",
    "parse_ranks",
    "check_outputs",
    "write_table",
    "is_fashion_dir",
]

_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_PACKAGE_DIR = Path(__file__).resolve().parent


class InputError(Exception):
    """A problem with the user's files or arguments: one line on stderr, exit code 2."""


def _one_line(exc: BaseException) -> str:
    """The first line of an exception message (torch's errors often span several)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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
        raise InputError(f"{what}: images must have shape (N, H, W) or (N, C, H, W), got {images.shape}.")
    if images.shape[0] == 0 or 0 in images.shape:
        raise InputError(f"{what}: no images (shape {images.shape}).")
    if images.dtype == np.bool_ or not (
        np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    ):
        raise InputError(f"{what}: images must be numeric, got dtype {images.dtype}.")
    mode = normalize
    if mode == "auto":
        mode = "fashion" if images.dtype == np.uint8 else "none"
    if mode in ("fashion", "unit") and images.dtype != np.uint8:
        raise InputError(f"{what}: --normalize {mode} needs uint8 images in 0..255, got {images.dtype}.")
    if mode == "fashion":
        if images.shape[1] != 1:
            raise InputError(
                f"{what}: --normalize fashion is for one-channel images, got {images.shape[1]} channels; "
                "use --normalize unit or none."
            )
        array = fashion_normalize(images)
    elif mode == "unit":
        array = images.astype(np.float32) / np.float32(255.0)
    else:
        array = images.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what}: images contain NaN or Inf (or values too large for float32).")
    x = torch.from_numpy(np.ascontiguousarray(array))
    y = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise InputError(f"{what}: {images.shape[0]} images but labels of shape {labels.shape}.")
        if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{what}: labels must be integers, got dtype {labels.dtype}.")
        if labels.size and int(labels.min()) < 0:
            # A class index is never negative: the accuracy would count them as misses.
            raise InputError(f"{what}: labels must be class indices >= 0, got {int(labels.min())}.")
        y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _check_signature(path: Path, signature: bytes, what: str) -> None:
    """Refuse a file that does not start like ``what``: np.load would otherwise treat any
    other file as a pickle and answer that it "contains pickled data", suggesting to load it
    with ``allow_pickle=True``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(signature))
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {_one_line(exc)}") from None
    if head != signature:
        raise InputError(f"{str(path)!r} is not a {what} (it does not start with its signature).")


def _load_npz(path: Path, normalize: str) -> Data:
    import numpy as np

    _check_signature(path, b"PK", "NumPy .npz archive (a zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable archive (zip, header, pickle refused)
        raise InputError(f"cannot read {str(path)!r} as a .npz archive: {_one_line(exc)}") from None
    if "images" not in arrays:
        raise InputError(f"{str(path)!r} has no array named 'images' (found {sorted(arrays)}).")
    calib_x, calib_y = _as_float_images(arrays["images"], arrays.get("labels"), normalize, str(path))
    eval_x = eval_y = None
    if "eval_images" in arrays:
        eval_x, eval_y = _as_float_images(arrays["eval_images"], arrays.get("eval_labels"), normalize, f"{path} (eval)")
    return Data(calib_x, calib_y, eval_x, eval_y, source=str(path))


def _np_load(path: Path):
    import numpy as np

    _check_signature(path, b"\x93NUMPY", "NumPy .npy file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or object arrays
        raise InputError(f"cannot read {str(path)!r} as a .npy array: {_one_line(exc)}") from None


def _load_npy(path: Path, normalize: str) -> Data:
    images = _np_load(path)
    labels = None
    sibling = path.with_name("labels.npy")
    if path.name == "images.npy" and sibling.is_file():
        labels = _np_load(sibling)
    x, y = _as_float_images(images, labels, normalize, str(path))
    return Data(x, y, source=str(path))


def is_fashion_dir(folder: Path) -> bool:
    """Whether ``folder`` holds the Fashion-MNIST training images (IDX, plain or gzipped)."""
    return any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))


def load_data(data_dir: str | None, embedded: bool, normalize: str) -> Data:
    """The calibration (and evaluation) data named by ``--data-dir`` or ``--embedded``."""
    if embedded:
        from .data import load_embedded_subset

        try:
            subset = load_embedded_subset()
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"cannot read the embedded data subset: {_one_line(exc)}") from None
        cx, cy = _as_float_images(subset["calib_images"], subset["calib_labels"], normalize, "embedded subset")
        ex, ey = _as_float_images(subset["eval_images"], subset["eval_labels"], normalize, "embedded subset")
        return Data(cx, cy, ex, ey, source="embedded Fashion-MNIST subset (2000 train + 2000 test images)")
    if data_dir is None:
        raise InputError("give calibration data: --data-dir PATH or --embedded.")
    path = Path(data_dir)
    if not path.exists():
        raise InputError(f"--data-dir {data_dir!r} does not exist.")
    if path.is_file():
        if path.suffix == ".npz":
            return _load_npz(path, normalize)
        if path.suffix == ".npy":
            return _load_npy(path, normalize)
        raise InputError(f"--data-dir {data_dir!r}: expected a folder, a .npz or a .npy file.")
    if not path.is_dir():
        raise InputError(f"--data-dir {data_dir!r} is neither a file nor a folder.")
    if is_fashion_dir(path):
        from .data import load_fashion_mnist

        try:
            images, labels = load_fashion_mnist("train", root=path)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read the Fashion-MNIST files in {data_dir!r}: {_one_line(exc)}") from None
        cx, cy = _as_float_images(images, labels, normalize, str(path))
        ex = ey = None
        try:
            test_images, test_labels = load_fashion_mnist("test", root=path)
            ex, ey = _as_float_images(test_images, test_labels, normalize, str(path))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read the Fashion-MNIST test files in {data_dir!r}: {_one_line(exc)}") from None
        return Data(cx, cy, ex, ey, source=f"Fashion-MNIST IDX files in {path}")
    if (path / "images.npy").is_file():
        return _load_npy(path / "images.npy", normalize)
    npz = sorted(p for p in path.glob("*.npz") if p.is_file())
    if len(npz) == 1:
        return _load_npz(npz[0], normalize)
    if len(npz) > 1:
        raise InputError(f"--data-dir {data_dir!r} holds several .npz files ({[p.name for p in npz]}); pass one of them.")
    raise InputError(
        f"--data-dir {data_dir!r} holds no usable data: expected the Fashion-MNIST IDX files "
        "(train-images-idx3-ubyte[.gz], ...), images.npy (+ labels.npy) or one .npz with 'images'."
    )


def data_input_paths(data_dir: str | None) -> list[tuple[str, Path]]:
    """Every file ``load_data`` may read for ``--data-dir`` (existing or not), for the overwrite guard."""
    if data_dir is None:
        return []
    path = Path(data_dir)
    if not path.is_dir():
        paths = [path]
        if path.name == "images.npy":
            paths.append(path.with_name("labels.npy"))
        return [("--data-dir", p) for p in paths]
    names = [f"{stem}{ext}" for stem in _IDX_STEMS for ext in ("", ".gz")] + ["images.npy", "labels.npy"]
    paths = [path / name for name in names] + sorted(path.glob("*.npz"))
    return [("--data-dir", p) for p in paths]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
def _add_cwd_to_path() -> None:
    # Like `python -m`, look for the user's modules in the working folder too.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def _import_class(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--model-class must look like package.module:ClassName, got {spec!r}.")
    _add_cwd_to_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or any error raised while importing the user's module
        raise InputError(f"--model-class {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {_one_line(exc)}).") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"--model-class {spec!r}: {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"--model-class {spec!r} is not a class (got a {type(obj).__name__}).")
    return obj


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder and ``constants.pkl``; torch.save files do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _parse_kwargs(text: str | None, model_class: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    if model_class is None:
        raise InputError("--model-kwargs needs --model-class.")
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--model-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise InputError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'.")
    return kwargs


def _torch_load(path: Path, option: str, *, allow_pickle: bool):
    """``torch.load``: tensors and plain containers only, unless the user allowed pickle."""
    import torch

    if allow_pickle:
        _add_cwd_to_path()  # the class of a pickled module must be importable
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            raise InputError(f"cannot unpickle {option} {str(path)!r}: {_one_line(exc)}") from None
        raise InputError(
            f"{option} {str(path)!r} holds pickled Python objects (e.g. a whole module saved with "
            "torch.save(model, path)); loading them can run arbitrary code from the file. Save "
            "model.state_dict() instead and pass --model-class, or add --allow-pickle if you trust the file."
        ) from None
    except (ModuleNotFoundError, AttributeError) as exc:
        raise InputError(
            f"cannot unpickle the model in {str(path)!r}: {_one_line(exc)}. The class of a torch.save'd module "
            "must be importable (run from the folder of its module, or set PYTHONPATH)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated, empty or foreign files
        raise InputError(f"cannot read {option} {str(path)!r} with torch.load: {_one_line(exc)}") from None


def check_model_options(name: str | None, model_class: str | None, model_kwargs: str | None,
                        allow_pickle: bool) -> None:
    """Refuse the options of ``--model-file`` next to an embedded ``--model`` (they were ignored)."""
    if name is None:
        return
    given = [flag for flag, value in (("--model-class", model_class), ("--model-kwargs", model_kwargs),
                                      ("--allow-pickle", allow_pickle)) if value]
    if given:
        raise InputError(f"{' and '.join(given)} describe a --model-file; the embedded --model {name} "
                         "needs none of them: drop them, or give --model-file instead of --model.")


def load_model(
    *,
    name: str | None = None,
    model_file: str | None = None,
    model_class: str | None = None,
    model_kwargs: str | None = None,
    allow_pickle: bool = False,
) -> Any:
    """The eager ``nn.Module`` named by ``--model``, or ``--model-file`` (+ ``--model-class``).

    ``--model-file`` is read with ``torch.load(weights_only=True)``, which runs no code from
    the file; a whole pickled module needs ``allow_pickle=True`` (``--allow-pickle``).
    """
    import torch
    from torch import nn

    check_model_options(name, model_class, model_kwargs, allow_pickle)
    if name is not None:
        from .models import load_pretrained

        try:
            return load_pretrained(name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(_one_line(exc)) from None
    if model_file is None:
        raise InputError("give the model: --model-file PATH (with --model-class for a state_dict) or --model NAME.")
    path = Path(model_file)
    if not path.is_file():
        raise InputError(f"--model-file {model_file!r} does not exist or is not a file.")
    if _is_torchscript(path):
        raise InputError(
            f"{model_file!r} is a TorchScript file (torch.jit.save). TorchScript modules cannot be "
            "modified, so their layers cannot be replaced by factorized ones. Pass an eager model "
            "instead: a state_dict saved with torch.save(model.state_dict(), path) together with "
            "--model-class package.module:ClassName."
        )
    kwargs = _parse_kwargs(model_kwargs, model_class)
    if model_class is not None:
        cls = _import_class(model_class)
        try:
            model = cls(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything
            raise InputError(f"cannot build {model_class}(**{kwargs}): {type(exc).__name__}: {_one_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise InputError(f"--model-class {model_class!r} did not build a torch.nn.Module.")
        state = _torch_load(path, "--model-file", allow_pickle=allow_pickle)
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise InputError(f"{model_file!r} does not hold a state_dict (got {type(state).__name__}).")
        try:
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - RuntimeError for keys/shapes, TypeError for odd values
            # load_state_dict lists the missing / unexpected keys and the shapes on the lines
            # after its first: keep them, on one line.
            details = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            if len(details) > 1500:
                details = details[:1500] + " ..."
            raise InputError(f"the state_dict in {model_file!r} does not fit {model_class}: {details}") from None
        return model.eval()
    obj = _torch_load(path, "--model-file", allow_pickle=allow_pickle)
    if isinstance(obj, nn.Module):
        if isinstance(obj, torch.jit.ScriptModule):
            raise InputError(f"{model_file!r} holds a TorchScript module; pass an eager nn.Module.")
        return obj.eval()
    if isinstance(obj, dict):
        raise InputError(
            f"{model_file!r} holds a state_dict, not a module: also pass --model-class "
            "package.module:ClassName (and --model-kwargs JSON if its constructor needs arguments)."
        )
    raise InputError(f"{model_file!r} holds a {type(obj).__name__}, not a torch.nn.Module.")


def _module_source(module_name: str) -> Path | None:
    """The source file of ``module_name`` as ``--model-class`` would import it, found without
    running any of the user's code (``None`` if it cannot be found that way)."""
    from importlib.machinery import PathFinder

    search: list[str] | None = [os.getcwd()] + [p for p in sys.path if p != os.getcwd()]
    spec = None
    for part in module_name.split("."):
        try:
            spec = PathFinder.find_spec(part, search)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and os.path.isfile(origin) else None


def model_input_paths(model_file: str | None, model_class: str | None = None) -> list[tuple[str, Path]]:
    """The files the model options read: the weights and the source of ``--model-class``."""
    paths = [] if model_file is None else [("--model-file", Path(model_file))]
    if model_class and ":" in model_class:
        source = _module_source(model_class.partition(":")[0])
        if source is not None:
            paths.append(("--model-class", source))
    return paths


# ---------------------------------------------------------------------------------------
# --ranks
# ---------------------------------------------------------------------------------------
_RANKS_HELP = 'e.g. \'{"layer1.0.conv1": [8, 8], "fc": 4}\''


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def ranks_file(text: str | None) -> Path | None:
    """The file that ``--ranks`` names, if it is not inline JSON."""
    if text is None or text.lstrip().startswith("{"):
        return None
    return Path(text)


def parse_ranks(text: str | None) -> dict[str, int | list[int]] | None:
    """``--ranks`` (inline JSON or a JSON file) -> ``{name: R or [R_out, R_in]}``, types checked."""
    if text is None:
        return None
    path = ranks_file(text)
    if path is not None:
        if path.is_dir():
            raise InputError(f"--ranks {text!r} is a folder; give a JSON object or a JSON file.")
        if not path.is_file():
            raise InputError(f"--ranks {text!r} is neither a JSON object (it starts with '{{') nor an existing file.")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --ranks file {str(path)!r}: {_one_line(exc)}") from None
    try:
        ranks = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"file {str(path)!r}" if path is not None else "value"
        raise InputError(f"--ranks {where} is not valid JSON: {exc}") from None
    if not isinstance(ranks, dict) or not ranks:
        raise InputError(f"--ranks must be a non-empty JSON object mapping layer names to ranks, {_RANKS_HELP}.")
    for name, value in ranks.items():
        ok = _is_rank(value) or (isinstance(value, list) and len(value) == 2 and all(_is_rank(v) for v in value))
        if not ok:
            raise InputError(
                f"--ranks: the rank of {name!r} must be a positive int or a pair [R_out, R_in] of positive ints, "
                f"got {json.dumps(value)}; {_RANKS_HELP}."
            )
    return ranks


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------
def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same file: symlinks resolved, hard links via samefile."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _inside(path: Path, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def check_outputs(outputs: Sequence[tuple[str, str | None]], inputs: Iterable[tuple[str, Path]]) -> list[Path | None]:
    """Check the output paths before any work: folder exists, not a folder, no clash.

    An output may not resolve (symbolic links followed, hard links detected) to an input
    file, to another output, or into the installed package (the embedded weights and data).
    Returns the outputs as ``Path`` (None where not given), in order.
    """
    inputs = list(inputs)
    checked: list[Path | None] = []
    seen: list[tuple[str, Path]] = []
    for option, text in outputs:
        if text is None:
            checked.append(None)
            continue
        if not text:
            raise InputError(f"{option} is empty; give a file name.")
        out = Path(text)
        if out.is_dir():
            raise InputError(f"{option} {text!r} is a folder; give a file name.")
        if text.endswith(("/", os.sep)):
            raise InputError(f"{option} {text!r} ends with a path separator; give a file name.")
        if out.exists() and not out.is_file():
            raise InputError(f"{option} {text!r} exists and is not a regular file (a device, pipe or socket); "
                             "give the path of a regular file.")
        folder = Path(os.path.realpath(out)).parent
        if not folder.is_dir():
            raise InputError(f"{option} {text!r}: folder {str(folder)!r} does not exist.")
        for in_option, in_path in inputs:
            if _same(out, in_path):
                raise InputError(
                    f"{option} {text!r} is the same file as the input {in_option} {str(in_path)!r}; "
                    "writing it would destroy the input: choose another output path."
                )
        for other_option, other in seen:
            if _same(out, other):
                raise InputError(f"{option} {text!r} is the same file as {other_option} {str(other)!r}; give two different paths.")
        if _inside(out, _PACKAGE_DIR):
            raise InputError(f"{option} {text!r} is inside the installed package ({_PACKAGE_DIR}); write it elsewhere.")
        seen.append((option, out))
        checked.append(out)
    return checked


def table_paths(path: Path) -> tuple[Path, Path]:
    """``--output`` of the demo -> the JSON and the CSV paths (a .json/.csv suffix is replaced)."""
    base = path.with_suffix("") if path.suffix.lower() in (".json", ".csv") else path
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")


def write_table(path: Path, payload: dict, columns: Sequence[str]) -> list[Path]:
    """Write ``payload`` as JSON and its rows as CSV, each atomically; return the paths."""
    json_path, csv_path = table_paths(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in payload["rows"]:
        writer.writerow(row)
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(csv_path, buffer.getvalue())
    return [json_path, csv_path]
