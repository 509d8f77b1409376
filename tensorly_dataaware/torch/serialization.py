"""Save a compressed model and rebuild it into a fresh instance of its architecture.

:func:`save_compressed` writes ``{"spec": compression_spec(model), "state_dict": ...}``
atomically; :func:`load_compressed` reads it with ``torch.load(weights_only=True)`` (no code
from the file runs) and checks *everything* against the target model before it changes
anything: each spec name must be a layer of the model whose type and geometry match the
factorized layer, each rank must fit the layer's shape (so a tampered file cannot make it
allocate more than a small multiple of the dense layer), and the keys, shapes and dtypes of
the saved ``state_dict`` must be exactly those of the rebuilt model. Only then are the
modules swapped and the weights copied: a file that does not fit leaves the model untouched
and raises a :class:`ValueError` naming the file.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write
from .compress import _FACTORIZED, _set_module, is_plain_conv2d
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d, build_from_spec

__all__ = ["compression_spec", "save_compressed", "load_compressed"]

_CONV_CLASSES = {"Tucker2Conv2d": Tucker2Conv2d, "CPConv2d": CPConv2d, "LowRankConv2d": LowRankConv2d}
_LINEAR_CLASSES = {"LowRankLinear": LowRankLinear}


def _check_path(path: Any) -> str:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike; got {type(path).__name__}.")
    return os.fspath(path)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")


def compression_spec(model: nn.Module) -> dict[str, dict]:
    """Structure of every factorized module of ``model``.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    dict
        Module name -> ``module.spec()``.
    """
    _check_model(model)
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, _FACTORIZED)}


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the factorized structure and the ``state_dict``, atomically.

    Load with :func:`load_compressed` into a freshly built instance of the original
    architecture.

    Parameters
    ----------
    model : nn.Module
        A model returned by :func:`~tensorly_dataaware.torch.compress`.
    path : str or os.PathLike
        Destination; written to a temporary file in the same folder, fsync-ed, then renamed
        (the permissions are those a plain ``open`` would give).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``path`` not a path.
    OSError
        If the file cannot be written (the message names ``path``); ``path`` is unchanged.
    """
    _check_model(model)
    path = _check_path(path)
    payload = {"spec": compression_spec(model), "state_dict": model.state_dict()}
    atomic_write(path, lambda handle: torch.save(payload, handle))


# ------------------------------------------------------------------------------------------
# Validation of a loaded payload against the target model
# ------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A reason why the file does not fit the model (turned into a ValueError naming the file)."""


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{what} must be an int; got {value!r}")
    if not low <= value <= high:
        raise _Invalid(f"{what} must be in [{low}, {high}] for this layer; got {value}")
    return value


def _conv_geometry(module: nn.Module) -> dict[str, Any]:
    padding = module.padding
    return {
        "in_channels": int(module.in_channels),
        "out_channels": int(module.out_channels),
        "kernel_size": tuple(int(k) for k in module.kernel_size),
        "stride": tuple(int(s) for s in module.stride),
        "padding": padding if isinstance(padding, str) else tuple(int(p) for p in padding),
        "dilation": tuple(int(d) for d in module.dilation),
        "padding_mode": module.padding_mode,
        "groups": int(getattr(module, "groups", 1)),
    }


def _is_conv_like(module: nn.Module) -> bool:
    # The dense layer of a fresh model, or an already factorized one (loading twice).
    return (is_plain_conv2d(module) and not module.transposed) or isinstance(
        module, (Tucker2Conv2d, CPConv2d, LowRankConv2d)
    )


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LowRankLinear))


def _check_ranks(cls_name: str, spec: dict, old: nn.Module) -> None:
    """Ranks within the layer's own shape: this bounds what building the module allocates."""
    if cls_name == "LowRankLinear":
        out_f, in_f = int(old.out_features), int(old.in_features)
        _int(spec.get("rank"), "rank", 1, min(out_f, in_f))
        return
    geometry = _conv_geometry(old)
    t, s = geometry["out_channels"], geometry["in_channels"]
    kh, kw = geometry["kernel_size"]
    if cls_name == "Tucker2Conv2d":
        ranks = spec.get("ranks")
        if not isinstance(ranks, (list, tuple)) or len(ranks) != 2:
            raise _Invalid(f"ranks must be a pair [R_out, R_in]; got {ranks!r}")
        _int(ranks[0], "R_out", 1, t)
        _int(ranks[1], "R_in", 1, s)
    elif cls_name == "LowRankConv2d":
        _int(spec.get("rank"), "rank", 1, min(t, s * kh * kw))
    else:  # CPConv2d: no tensor needs a CP rank above prod(shape) / max(shape)
        dims = (t, s, kh, kw)
        _int(spec.get("rank"), "rank", 1, math.prod(dims) // max(dims))


def _build(name: str, spec: Any, modules: dict[str, nn.Module]) -> nn.Module:
    """The factorized module for ``name``, after checking it against the model's layer."""
    if not isinstance(name, str) or not name:
        raise _Invalid(f"invalid layer name {name!r}")
    if name not in modules:
        raise _Invalid(f"{name!r} is not a module of the model")
    if not isinstance(spec, dict):
        raise _Invalid(f"the spec of {name!r} is a {type(spec).__name__}, not a dict")
    old = modules[name]
    cls_name = spec.get("class")
    if cls_name in _CONV_CLASSES:
        if not _is_conv_like(old):
            raise _Invalid(f"{name!r} is a {type(old).__name__} in the model, but the file holds a {cls_name}")
    elif cls_name in _LINEAR_CLASSES:
        if not _is_linear_like(old):
            raise _Invalid(f"{name!r} is a {type(old).__name__} in the model, but the file holds a {cls_name}")
    else:
        raise _Invalid(f"unknown factorized layer class {cls_name!r} for {name!r}")
    try:
        _check_ranks(cls_name, spec, old)
    except _Invalid as exc:
        raise _Invalid(f"layer {name!r} ({cls_name}): {exc}") from None
    reference = next(iter(old.parameters()), None)
    device = reference.device if reference is not None else None
    # The layer's dtype, not the file's: the rest of the model keeps its own dtype (its
    # load_state_dict casts), and a float64 layer in a float32 model cannot run.
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    try:
        new = build_from_spec(spec, device=device, dtype=dtype)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise _Invalid(f"bad spec for layer {name!r}: {exc}") from None
    if cls_name in _CONV_CLASSES:
        want, got = _conv_geometry(old), _conv_geometry(new)
    else:
        want = {"in_features": int(old.in_features), "out_features": int(old.out_features)}
        got = {"in_features": new.in_features, "out_features": new.out_features}
    differ = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
    if differ:
        shown = ", ".join(f"{key} {a!r} in the file, {b!r} in the model" for key, (a, b) in differ.items())
        raise _Invalid(f"layer {name!r} does not match the model: {shown}")
    return new


def _check_state(state: Any, model: nn.Module, new_modules: dict[str, nn.Module]) -> None:
    """The saved state_dict must have exactly the keys, shapes and castable dtypes of the result."""
    if not isinstance(state, dict):
        raise _Invalid(f"its state_dict is a {type(state).__name__}, not a dict")
    # A layer registered under several names (``self.stem = conv; self.blocks =
    # nn.ModuleList([conv, ...])``) is replaced under all of them, and the state_dict lists
    # its weights under each.
    registered = list(model.named_modules(remove_duplicate=False))
    names = {
        name: [alias for alias, m in registered if m is model.get_submodule(name)] or [name] for name in new_modules
    }
    prefixes = tuple(f"{alias}." for aliases in names.values() for alias in aliases)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefixes)}
    for name, module in new_modules.items():
        for alias in names[name]:
            expected.update({f"{alias}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise _Invalid(
            "its state_dict does not fit the model"
            + (f"; missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
            + (f"; unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
        )
    for key, target in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise _Invalid(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        if value.shape != target.shape:
            raise _Invalid(
                f"state_dict[{key!r}] has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}"
            )
        if not torch.can_cast(value.dtype, target.dtype):
            raise _Invalid(f"state_dict[{key!r}] has dtype {value.dtype}, which cannot be copied into {target.dtype}")


def load_compressed(model: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild the factorized modules in ``model`` (the original architecture) and load weights.

    Everything in the file is checked against ``model`` first; ``model`` is modified only
    if the whole file fits.

    Parameters
    ----------
    model : nn.Module
        A fresh instance of the original architecture; modified in place. The factorized
        modules take the device and dtype of the layers they replace (the weights are cast,
        as ``load_state_dict`` casts the others).
    path : str or os.PathLike
        A file written by :func:`save_compressed`. It is read with
        ``torch.load(weights_only=True)``, which runs no code from the file.
    map_location : optional
        As in :func:`torch.load`.

    Returns
    -------
    nn.Module
        ``model``, with the factorized modules and the saved weights.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``path`` not a path.
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable file of :func:`save_compressed`, or does not fit
        ``model`` (unknown layer names, other layer types or widths, ranks out of range,
        state_dict keys or shapes); the message names ``path``. ``model`` is unchanged.
    """
    _check_model(model)
    path = _check_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"No such file: {path!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        raise ValueError(f"cannot read {path!r} as a file of save_compressed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. pickle.UnpicklingError for foreign objects
        raise ValueError(f"cannot read {path!r} as a file of save_compressed: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path!r} is not a file written by save_compressed.")
    spec = payload["spec"]
    try:
        if not isinstance(spec, dict):
            raise _Invalid(f"its spec is a {type(spec).__name__}, not a dict")
        modules = dict(model.named_modules())
        new_modules = {name: _build(name, layer_spec, modules) for name, layer_spec in spec.items()}
        _check_state(payload["state_dict"], model, new_modules)
    except _Invalid as exc:
        raise ValueError(f"{path!r} does not fit the model: {exc}.") from None
    # Everything fits: swap, then copy the weights. Should the copy still fail, put the
    # original modules back so that the model keeps its architecture.
    originals = {name: modules[name] for name in new_modules}
    try:
        for name, new in new_modules.items():
            _set_module(model, name, new)
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:
        for name, old in originals.items():
            _set_module(model, name, old)
        raise ValueError(f"cannot load the weights of {path!r}: {exc}") from None
    return model
