"""Export compressed models: TorchScript (script or trace) and ONNX, checked with ONNX Runtime.

The factorized layers are plain ``nn.Conv2d`` / ``nn.Linear`` pipelines plus
:func:`torch.nn.functional.pad` / ``conv2d`` / ``linear`` calls, so every form
(``'chain'``, ``'merged'``, ``'dense'``) and every padding mode (zeros, reflect, replicate,
circular; ``'same'`` / ``'valid'``) scripts, traces and maps onto standard ONNX operators.

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``): it needs only the ``onnx`` package and works offline, whereas the
dynamo-based exporter (the default since PyTorch 2.9) also needs ``onnxscript``. Pass
``dynamo=True`` to :func:`export_onnx` to use the latter where it is installed.
Install the checker with the ``onnx`` extra: ``pip install tensorly-dataaware[onnx]``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["script", "trace", "export_onnx", "check_onnx", "ONNX_RTOL"]

#: Relative tolerance (to the largest output magnitude) of ONNX Runtime against PyTorch.
ONNX_RTOL = 1e-4


def _check_model_input(model: Any, example_input: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"`example_input` must be a torch.Tensor; got {type(example_input).__name__}.")


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``model`` in eval mode (``model``'s own mode is left unchanged).

    Parameters
    ----------
    model : nn.Module
        Any model, typically with factorized layers.

    Returns
    -------
    torch.jit.ScriptModule
        Compiled from a copy put in eval mode, so that the inference forms of the factorized
        layers (which run only outside training) are the ones compiled in.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    return torch.jit.script(_eval_copy(model))


def trace(model: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``model`` in eval mode on ``example_input``."""
    _check_model_input(model, example_input)
    with torch.no_grad():
        return torch.jit.trace(_eval_copy(model), example_input)


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset_version: int = 17,
    dynamic_batch: bool = True,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamo: bool = False,
    check: bool = True,
    rtol: float = ONNX_RTOL,
) -> str:
    """Export ``model`` (eval mode) to an ONNX file, written atomically, optionally checked.

    Parameters
    ----------
    model : nn.Module
        Not modified (a copy in eval mode is exported).
    path : str or os.PathLike
        Destination. The file is written to a temporary name in the same folder and renamed
        over ``path`` only once complete (and checked, when ``check``).
    example_input : torch.Tensor
        Input used to trace the model.
    opset_version : int, default 17
    dynamic_batch : bool, default True
        Make the first dimension of input and output symbolic.
    input_names, output_names : sequence of str
    dynamo : bool, default False
        Use the dynamo-based exporter (needs ``onnxscript``) instead of the TorchScript one.
    check : bool, default True
        Run the file with ONNX Runtime on ``example_input`` and compare with PyTorch
        (:func:`check_onnx`); needs ``onnxruntime``.
    rtol : float, default :data:`ONNX_RTOL`
        Tolerance of the check, relative to the largest output magnitude.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ValueError
        If the check fails (the destination is then left untouched).
    """
    _check_model_input(model, example_input)
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < 7:
        raise ValueError(f"`opset_version` must be an int >= 7; got {opset_version!r}.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"`path`: folder {folder!r} does not exist.")
    exported = _eval_copy(model)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice is expected: see the module docstring.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            kwargs: dict[str, Any] = {"dynamo": dynamo}
            if dynamo:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            else:
                kwargs["dynamic_axes"] = dynamic_axes
            torch.onnx.export(
                exported, (example_input,), tmp, opset_version=opset_version,
                input_names=list(input_names), output_names=list(output_names), **kwargs,
            )
        if check:
            check_onnx(tmp, exported, example_input, rtol=rtol)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def check_onnx(
    path: str | os.PathLike, model: nn.Module, example_input: torch.Tensor, *, rtol: float = ONNX_RTOL
) -> float:
    """Run an ONNX file with ONNX Runtime (CPU) and compare with ``model`` in eval mode.

    Returns
    -------
    float
        ``max |onnx - torch| / max |torch|``.

    Raises
    ------
    ImportError
        Without ``onnxruntime`` (install the ``onnx`` extra).
    ValueError
        If the relative difference exceeds ``rtol``.
    """
    _check_model_input(model, example_input)
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example_input.detach().cpu().numpy()}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        expected = _eval_copy(model)(example_input).detach().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((got.to(expected.dtype) - expected).abs().max()) if expected.numel() else 0.0
    relative = diff / max(scale, 1e-30)
    if tuple(got.shape) != tuple(expected.shape) or not relative <= rtol:
        raise ValueError(
            f"ONNX Runtime output differs from PyTorch: shape {tuple(got.shape)} vs {tuple(expected.shape)}, "
            f"max relative difference {relative:.3e} > rtol={rtol:g}."
        )
    return relative
