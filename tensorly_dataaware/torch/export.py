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

A model may return one tensor or a nested tuple / list / dict of tensors (e.g. ``(logits,
features)`` or ``{"logits": ...}``): both exporters flatten the structure into one ONNX output
per tensor, tuples and lists in order and dicts in insertion order, depth first; the dict keys
and the nesting are lost, so :func:`export_onnx` names the outputs after their place in the
structure (see ``output_names``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from .._atomic import atomic_write

__all__ = ["script", "trace", "export_onnx", "check_onnx", "ONNX_RTOL", "ONNX_RTOL_HALF"]

#: Relative tolerance (to the largest output magnitude) of ONNX Runtime against PyTorch,
#: for float32 and float64 models; half-precision models get :data:`ONNX_RTOL_HALF`.
ONNX_RTOL = 1e-4
#: The same for float16 / bfloat16 models (their rounding alone is ~5e-4 / 4e-3 relative).
ONNX_RTOL_HALF = 2e-2


def _default_rtol(model: nn.Module, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return ONNX_RTOL_HALF if half else ONNX_RTOL


def _check_model_input(model: Any, example_input: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"`example_input` must be a torch.Tensor; got {type(example_input).__name__}.")


def _output_leaves(output: Any, what: str = "the model's output") -> list[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` of every tensor of a model's output, in the order the ONNX exporters use.

    Parameters
    ----------
    output : Any
        What the model returned: a tensor, or tuples / lists (named tuples included) and
        dicts of them, nested to any depth.
    what : str
        How the messages name ``output``.

    Returns
    -------
    list of (tuple, torch.Tensor)
        The path (indices and dict keys from the top) and the tensor, depth first, sequences in
        order and dicts in insertion order: the order in which ``torch.onnx.export`` (both
        exporters) flattens outputs, so that the i-th pair is the i-th ONNX output.

    Raises
    ------
    TypeError
        For any other leaf (``None``, a number, a custom object), named by its path: the
        TorchScript exporter drops ``None`` and fails on the others, and no tolerance check
        can be defined for them.
    ValueError
        If there is no tensor at all (e.g. an empty tuple).
    """
    leaves: list[tuple[tuple, torch.Tensor]] = []

    def visit(value: Any, path: tuple) -> None:
        if isinstance(value, torch.Tensor):
            leaves.append((path, value))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(item, (*path, i))
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, (*path, key))
        else:
            where = what + "".join(f"[{key!r}]" for key in path)
            raise TypeError(
                f"{where} has type {type(value).__name__}: a model's output must be a tensor or "
                "tuples, lists and dicts of tensors."
            )

    visit(output, ())
    if not leaves:
        raise ValueError(f"{what} contains no tensor ({type(output).__name__} without tensors).")
    return leaves


def _max_abs_diff(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max |got - expected|, max |expected|)``, in float64 (0 for empty tensors)."""
    if not expected.numel():
        return 0.0, 0.0
    # float64 also for integer and bool outputs, which cannot be subtracted as they are.
    as_float = (lambda t: t) if expected.is_complex() else (lambda t: t.to(torch.float64))
    got, expected = as_float(got.to(expected.device)), as_float(expected)
    return float((got - expected).abs().max()), float(expected.abs().max())


def _onnx_output_names(paths: Sequence[tuple], output_names: Sequence[str]) -> list[str]:
    """One ONNX name per output tensor: ``output_names`` itself, or its one name plus each path."""
    names = [output_names] if isinstance(output_names, str) else list(output_names)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"`output_names` must be non-empty strings; got {output_names!r}.")
    if len(names) != len(paths):
        if len(names) != 1:
            raise ValueError(
                f"`output_names` has {len(names)} names for the {len(paths)} tensors the model returns; "
                "give one per tensor, or one to prefix each tensor's place in the output with."
            )
        # The exporter would name all but the first output after internal graph values, and
        # `dynamic_axes` needs their names: e.g. "output.0", "output.1" or "output.logits".
        names = [".".join([names[0], *(str(key) for key in path)]) for path in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"The ONNX output names are not unique: {names}.")
    return names


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
    rtol: float | None = None,
) -> str:
    """Export ``model`` (eval mode) to an ONNX file, written atomically, optionally checked.

    Parameters
    ----------
    model : nn.Module
        Not modified (a copy in eval mode is exported).
    path : str or os.PathLike
        Destination. The model is exported to a private scratch folder and checked there
        (when ``check``); only then is the file written to ``path``, through the package's
        atomic writer (:func:`tensorly_dataaware._atomic.atomic_write`): a symbolic link is
        written through, an existing file keeps its mode, and on any failure ``path`` is left
        as it was and no temporary file remains.
    example_input : torch.Tensor
        Input used to trace the model.
    opset_version : int, default 17
    dynamic_batch : bool, default True
        Make the first dimension of input and output symbolic.
    input_names : sequence of str
    output_names : sequence of str, default ``("output",)``
        One name per tensor the model returns. A model returning nested tuples, lists or
        dicts of tensors (flattened into one ONNX output each, see the module docstring) may
        also be given one name, which is then followed by each tensor's indices and keys:
        ``(logits, features)`` gives ``"output.0"`` and ``"output.1"``, ``{"logits": ...,
        "aux": (a, b)}`` gives ``"output.logits"``, ``"output.aux.0"`` and ``"output.aux.1"``;
        a single tensor in a container keeps the name as given.
    dynamo : bool, default False
        Use the dynamo-based exporter (needs ``onnxscript``) instead of the TorchScript one.
    check : bool, default True
        Run the file with ONNX Runtime on ``example_input`` and compare with PyTorch
        (:func:`check_onnx`); needs ``onnxruntime``.
    rtol : float, optional
        Tolerance of the check, relative to the largest output magnitude; default
        :data:`ONNX_RTOL` (1e-4), :data:`ONNX_RTOL_HALF` (2e-2) for float16 / bfloat16 models.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    TypeError
        If the model's output is not a tensor or tuples, lists and dicts of tensors (checked
        on one forward pass before exporting).
    ValueError
        If ``output_names`` does not fit the outputs, the exporter needs weights stored
        outside the ONNX file (models over 2 GB), or the check fails (the destination is then
        left untouched).
    """
    _check_model_input(model, example_input)
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < 7:
        raise ValueError(f"`opset_version` must be an int >= 7; got {opset_version!r}.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"`path`: folder {folder!r} does not exist.")
    exported = _eval_copy(model)
    # One forward pass first: an output the exporter or the check cannot handle fails here,
    # with its place in the output named, not after the (slow) export.
    with torch.no_grad():
        leaves = _output_leaves(exported(example_input))
    output_names = _onnx_output_names([path for path, _ in leaves], output_names)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in input_names}
        # A 0-d output (e.g. a sum over the batch) has no batch dimension to make symbolic.
        dynamic_axes.update({name: {0: "batch"} for name, (_, t) in zip(output_names, leaves) if t.dim()})
    # The exporters want a path (and may write weights next to it), so they write into a
    # scratch folder that is removed in any case; the destination itself is written only by
    # atomic_write, which follows symbolic links, keeps an existing file's mode and never
    # flips the process-wide umask (see tensorly_dataaware._atomic).
    with tempfile.TemporaryDirectory(prefix="tensorly-dataaware-onnx-") as scratch:
        scratch_path = os.path.join(scratch, "model.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice is expected: see the module docstring.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            kwargs: dict[str, Any] = {"dynamo": dynamo}
            if dynamo:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                # The dynamo exporter stores weights in a side file by default; one
                # self-contained file is what can be moved into place atomically.
                kwargs["external_data"] = False
            else:
                kwargs["dynamic_axes"] = dynamic_axes
            torch.onnx.export(
                exported, (example_input,), scratch_path, opset_version=opset_version,
                input_names=list(input_names), output_names=output_names, **kwargs,
            )
        extra = sorted(set(os.listdir(scratch)) - {"model.onnx"})
        if extra:
            # Both exporters fall back to external weight files above protobuf's 2 GB limit;
            # copying model.onnx alone would write a file that references missing weights.
            raise ValueError(
                f"The exporter stored weights outside the ONNX file ({len(extra)} extra file(s)), "
                "which export_onnx cannot write atomically; the model is probably over 2 GB."
            )
        if check:
            # `exported` is already the eval-mode copy and `leaves` its outputs: check_onnx
            # would copy the model and run it again.
            _compare_with_onnx_runtime(scratch_path, exported, example_input, leaves, rtol)
        with open(scratch_path, "rb") as source:
            atomic_write(path, lambda handle: shutil.copyfileobj(source, handle))
    return path


def check_onnx(
    path: str | os.PathLike, model: nn.Module, example_input: torch.Tensor, *, rtol: float | None = None
) -> float:
    """Run an ONNX file with ONNX Runtime (CPU) and compare with ``model`` in eval mode.

    A model returning nested tuples, lists or dicts of tensors is compared tensor by tensor
    with the file's outputs, in the exporters' flattening order (see the module docstring).

    Returns
    -------
    float
        ``max |onnx - torch| / max |torch|``, the largest over the output tensors (each relative
        to its own magnitude: logits and features may differ in scale by orders of magnitude).

    Raises
    ------
    ImportError
        Without ``onnxruntime`` (install the ``onnx`` extra).
    TypeError
        If the model's output is not a tensor or tuples, lists and dicts of tensors.
    ValueError
        If ONNX Runtime cannot run the file (e.g. float64 convolutions, which its CPU build
        lacks), the number of outputs or a shape differs, or a relative difference exceeds
        ``rtol`` (default as in :func:`export_onnx`).
    """
    _check_model_input(model, example_input)
    with torch.no_grad():
        # Before importing onnxruntime and loading the file: an unsupported output fails first.
        expected = _output_leaves(_eval_copy(model)(example_input))
    return _compare_with_onnx_runtime(path, model, example_input, expected, rtol)


def _compare_with_onnx_runtime(path, model: nn.Module, example_input: torch.Tensor,
                               expected: list[tuple[tuple, torch.Tensor]], rtol: float | None) -> float:
    """:func:`check_onnx` once PyTorch's outputs ``expected`` (:func:`_output_leaves`) are known."""
    import onnxruntime as ort

    rtol = _default_rtol(model, rtol)
    try:
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: example_input.detach().cpu().numpy()}
        outputs = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types (NotImplemented, Fail, ...)
        hint = ""
        if example_input.dtype == torch.float64 or any(p.dtype == torch.float64 for p in model.parameters()):
            hint = (" ONNX Runtime's CPU build has no float64 convolution: export a float32 copy "
                    "(model.float(), example_input.float()), or pass check=False.")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"ONNX Runtime cannot run the ONNX model: {first}.{hint}") from None
    names = [o.name for o in session.get_outputs()]
    if len(outputs) != len(expected):
        raise ValueError(
            f"ONNX Runtime returns {len(outputs)} output(s) {names}, PyTorch {len(expected)} tensor(s)."
        )
    worst = 0.0
    for name, array, (_, want) in zip(names, outputs, expected):
        got, want = torch.from_numpy(array), want.detach().cpu()
        same_shape = tuple(got.shape) == tuple(want.shape)
        diff, scale = _max_abs_diff(got, want) if same_shape else (float("nan"), 0.0)
        relative = diff / max(scale, 1e-30)
        if not same_shape or not relative <= rtol:
            raise ValueError(
                f"ONNX Runtime output {name!r} differs from PyTorch: shape {tuple(got.shape)} vs "
                f"{tuple(want.shape)}, max relative difference {relative:.3e} > rtol={rtol:g}."
            )
        worst = max(worst, relative)
    return worst
