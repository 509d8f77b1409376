r"""Sequential calibration: fit each layer to the original output from the compressed inputs.

The one-shot :func:`~tensorly_dataaware.torch.compress` fits every layer to the inputs it
sees in the *original* network. When several layers are compressed their errors compound:
layer ``l`` of the compressed network does not receive the inputs ``x`` it was fitted on, but
``x~``, the output of the already-compressed layers before it. :func:`compress_sequential`
compresses the selected layers in forward order and fits layer ``l`` so that, fed the inputs
``x~`` it actually receives, it reproduces the *original* network's output at that layer:

.. math:: \min_{\tilde W, \tilde b}\; \mathbb E\,\|W x + b - \tilde W \tilde x - \tilde b\|^2 .

With :math:`\mu = \mathbb E x`, :math:`\tilde\mu = \mathbb E \tilde x`,
:math:`\tilde C = \operatorname{Cov}(\tilde x)` and
:math:`C_{x\tilde x} = \operatorname{Cov}(x, \tilde x)`, the best bias for any
:math:`\tilde W` is :math:`\tilde b = b + W\mu - \tilde W\tilde\mu`, and the remaining error is

.. math:: \|(W' - \tilde W)\,\tilde C^{1/2}\|_F^2 + \text{const}, \qquad
          W' = W C_{x\tilde x} \tilde C^{+},

so each layer is the usual weighted problem with target ``W'`` (the best *linear predictor*
of the original output from the compressed inputs) and weight ``C~``: the same solvers apply.
For the first compressed layer ``x~ = x`` and the fit is exactly the one-shot one.

``damping`` keeps the meaning it has in :func:`compress`: with
:math:`\delta = \mathrm{damping}\cdot\overline{\operatorname{diag}\tilde C}`, the objective
gains :math:`\delta\|W - \tilde W\|_F^2`, which pulls :math:`\tilde W` toward the original
weight in directions the calibration data does not excite. The target becomes
:math:`W' = W (C_{x\tilde x} + \delta I)(\tilde C + \delta I)^{-1}` and the weight
:math:`\tilde C + \delta I`; with ``x~ = x`` this is again ``W' = W``. Without damping a
singular :math:`\tilde C` is handled by the pseudo-inverse (the rows of
:math:`C_{x\tilde x}` lie in its range, so it is exact).

Layers left dense (``refit=``) get the same target with no rank constraint: their weight
becomes :math:`W'` itself, a ridge regression of the original output on the compressed
inputs. With few calibration samples per input feature it overfits, so ``refit_damping='cv'``
chooses its ridge by cross-validation over folds of the calibration images, from the folds'
moments alone (the held-out error is a quadratic form in them). The target ``W'`` of a
compressed layer is the same regression; ``target_damping`` gives it its own ridge (``'cv'``:
chosen the same way; ``'auto'``, the default: chosen that way for the layers with fewer
samples than twice their inputs), while the weight of the low-rank fit keeps ``damping``: the
factors then fit the cross-validated predictor in the metric of the inputs' covariance.

Cost: the statistics of layer ``l`` need the compressed network's inputs at that layer, and
those change every time a layer is replaced, so the compressed network runs over the
calibration batches once per compressed layer; each pass stops at the layer (a pre-hook
interrupts it), and what it computed before the previous layer is replayed from copies kept
in the previous pass instead of being recomputed (:class:`_PrefixCache`), so a pass costs
about the part of the network since the previous compressed layer. The original network's
inputs are computed once and kept when they fit in ``cache_bytes`` (else they are
recomputed the same way); the replayed copies have a budget of ``cache_bytes`` too. Patch
moments are streamed in float64 (count, the sums of ``x`` and ``x~``, of ``x~ x~^T`` and of
``x x~^T``): memory does not grow with the number of batches.
"""

from __future__ import annotations

import copy
import numbers
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import tensorly as tl
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..norms import psd_solve
from . import ranks as rk
from .compress import (
    METHODS,
    NORMS,
    LayerJob,
    LayerReport,
    _check_choice,
    _layer_method,
    _resolve_rank,
    _set_module,
    _unsupported_reason,
    check_device,
    check_flags,
    check_rank_options,
    check_solver_options,
    check_unknown_ranks,
    decompose_layer,
    dense_report_row,
    plan_compression,
)
from .sensitivity import fisher_matrix_roots, fisher_row_weights, output_fisher
from .statistics import CrossStatistics, _batch_input, _model_device, check_eager_model, collect_covariances

__all__ = ["compress_sequential", "layer_call_order"]

#: Cross-validation of the refit ridge (``refit_damping='cv'``): the number of image folds,
#: the grid of relative ridges, and the value used when it cannot run.
_CV_FOLDS = 4
_CV_GRID = tuple(10.0 ** (k / 2) for k in range(-12, 9))
_CV_FALLBACK = 1e-6
#: ``target_damping='auto'`` cross-validates the target of a layer with fewer calibration
#: samples than this many times its input features (where the warning of
#: :func:`_warn_if_underdetermined` would fire) and uses ``damping`` elsewhere.
_AUTO_CV_SAMPLES_PER_INPUT = 2

#: How ``budget=`` compares the layers' errors, and how a compressed layer's output rows are
#: weighted in its fit (see ``compress_sequential``).
BUDGET_WEIGHTINGS = ("relative", "fisher")
FIT_WEIGHTINGS = ("fisher", "kfac")


class _StopForward(BaseException):
    """Raised by a pre-hook to end a forward pass once the layer's input is captured.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a model's own ``except
    Exception`` blocks do not swallow it.
    """


class _Local:
    """The collective steps of a sequential run, for one process (no communication).

    :func:`~tensorly_dataaware.torch.distributed.compress_sequential_distributed` overrides
    them so that every rank streams its shard, the sums are all-reduced, rank 0 factorizes
    and every rank installs the same module, and a failure anywhere stops every rank.
    """

    def agree(self, error: BaseException | None, what: str) -> None:
        if error is not None:
            raise error

    def same(self, value: Any, what: str) -> None:
        pass

    def reduce(self, moments: CrossStatistics) -> None:
        pass

    def reduce_tensor(self, tensor: torch.Tensor) -> None:
        """Sum a float64 tensor over the processes, in place."""

    def decide(self, compute: Callable[[], tuple[nn.Module, LayerReport]], name: str) -> tuple[nn.Module, LayerReport]:
        return compute()

    def collect(self, model, batches, layers, max_batches):
        return collect_covariances(model, batches, layers, max_batches=max_batches, progress=False)


def _is_one_shot_iterator(batches: Any) -> bool:
    try:
        return iter(batches) is batches
    except TypeError:
        raise TypeError(
            f"`batches` must be an iterable of batches (a DataLoader, a list, ...); got {type(batches).__name__}."
        ) from None


def _iterate(batches: Iterable[Any], max_batches: int | None):
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            return
        yield index, batch


def _prepare(batch: Any, index: int, device: torch.device) -> torch.Tensor:
    x = _batch_input(batch, index).to(device)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"Batch {index} contains NaN or Inf values.")
    return x


def _capture_input(model: nn.Module, module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The input of ``module`` when ``model`` runs on ``x``; the pass stops at the module."""
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        value = args[0] if args else kwargs.get("input")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Layer {name!r} received a {type(value).__name__} instead of a tensor.")
        captured.append(value)
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        # A copy: a model that changes its input in place (an in-place normalization at the
        # top of forward) would otherwise change the user's batch at every pass, and the
        # original and the compressed network would see differently scaled images.
        model(x.clone())
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"Layer {name!r} was not called by the forward pass.")
    return captured[0].detach()


#: Output values a replay returns as they are: immutable, and holding no tensor.
_ATOMS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _items(value: Any) -> list | None:
    """The items of a container that :func:`_rebuild` can rebuild with its own type: a tuple,
    list, dict or OrderedDict (these exact types: a subclass may carry state or a constructor
    that an iterable of items does not fit) or a namedtuple; None for anything else."""
    kind = type(value)
    if kind in (tuple, list) or _is_namedtuple(value):
        return list(value)
    if kind in (dict, OrderedDict):
        return list(value.values())
    return None


def _is_namedtuple(value: Any) -> bool:
    # A namedtuple's constructor takes one argument per field, not an iterable (hence _make);
    # a subclass that added instance attributes would lose them: not one.
    kind = type(value)
    return (
        isinstance(value, tuple) and hasattr(kind, "_fields") and hasattr(kind, "_make")
        and not getattr(value, "__dict__", None)
    )


def _rebuild(value: Any, items: list) -> Any:
    """A container of the type (and for a mapping, the keys) of ``value`` holding ``items``."""
    if _is_namedtuple(value):
        return type(value)._make(items)
    if isinstance(value, dict):
        return type(value)(zip(value.keys(), items))
    return type(value)(items)


def _clone_output(value: Any) -> tuple[Any, int] | None:
    """A copy of a module's output that later in-place operations cannot change, and its
    size in bytes; None for outputs that cannot be copied safely."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone(), value.numel() * value.element_size()
    if isinstance(value, _ATOMS):
        return value, 0
    items = _items(value)
    if items is None:
        return None
    parts = [_clone_output(v) for v in items]
    if any(p is None for p in parts):
        return None
    return _rebuild(value, [p[0] for p in parts]), sum(p[1] for p in parts)


def _replayed(value: Any) -> Any:
    """A fresh copy of a recorded output (from :func:`_clone_output`) for the caller (which
    may modify it in place)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    items = _items(value)
    return value if items is None else _rebuild(value, [_replayed(v) for v in items])


def _tensors(value: Any, found: list[torch.Tensor]) -> bool:
    """Append to ``found`` the tensors in ``value`` (through tuples, lists and mappings of any
    type); False when it holds another object, whose changes cannot be watched."""
    if isinstance(value, torch.Tensor):
        found.append(value)
        return True
    if isinstance(value, _ATOMS):
        return True
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return all(_tensors(v, found) for v in value)
    return False


def _watch(args: tuple, kwargs: dict, module: nn.Module) -> list[tuple[torch.Tensor, int]] | None:
    """What a call of ``module`` could change in place for the rest of the network to see,
    to be checked by :func:`_replayable` after the call: the tensors of its arguments and
    its parameters and buffers, with their version counters (which every in-place operation
    on a tensor or on any view of it increments).

    None when the call cannot be watched: an argument that is not tensors, numbers, strings
    and containers of them (an object the call could change, e.g. a key-value cache), or an
    inference-mode tensor (which has no version counter).
    """
    found: list[torch.Tensor] = []
    if not _tensors((args, kwargs), found):
        return None
    found.extend(module.parameters())
    found.extend(module.buffers())
    try:
        return [(t, t._version) for t in found]
    except RuntimeError:
        return None


def _replayable(watched: list[tuple[torch.Tensor, int]] | None, output: Any) -> bool:
    """Whether a module call that was watched (:func:`_watch`) and returned ``output`` can be
    replayed from a copy of ``output`` (:func:`_clone_output`) with the same effect.

    A replay only returns a fresh copy of the output, so the call must have changed none of
    the watched tensors in place (e.g. an ``nn.ReLU(inplace=True)`` modifies its argument,
    which its caller may still hold: ``skip = y; y = relu(y)``), and its output must share
    memory with none of them nor with itself (a module that returns its input, a view of it
    or a tensor twice): there, an in-place operation on one tensor changes the other when the
    module runs, and not when it is replayed. Such a call simply runs in every pass.
    """
    if watched is None:
        return False
    outputs: list[torch.Tensor] = []
    if not _tensors(output, outputs):
        return False
    try:
        if any(t._version != version for t, version in watched):
            return False
        memory = {_memory(t) for t, _ in watched} - {None}
        for t in outputs:
            where = _memory(t)
            if where is not None:
                if where in memory:
                    return False
                memory.add(where)
    except Exception:  # noqa: BLE001 - a tensor whose memory cannot be inspected: not replayed
        return False
    return True


def _memory(t: torch.Tensor) -> int | None:
    """The address of the storage behind ``t`` (shared by all its views); None when empty."""
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


class _PrefixCache:
    """Replays the partly compressed network's computation that cannot have changed.

    The compressed network runs once per compressed layer over the calibration batches,
    stopping at the layer. Layers are compressed in call order, so every module call that
    finished before the previous pass stopped had only final layers upstream: this pass
    repeats it exactly. Its output is recorded (a copy) in that pass and returned, without
    running the module, in the next ones (a copy again: the caller may modify it in place).

    Only the outermost finished calls are kept, the calls of the children of the stopped
    layer's ancestors (the root, then e.g. ``layer2`` and ``layer2.0`` for
    ``layer2.0.conv2``), and only for modules called once per forward pass (a module called
    several times, such as a shared activation, is always run: a skipped outer call would
    otherwise shift its call count). An ``nn.Sequential`` ancestor passes only its last
    output on, so for it just the output of the child before the path to the layer is kept,
    and the children up to that one are not called at all. Without this a layer halfway
    through the network costs half a forward pass; with it, about the part since the
    previous layer. The copies count against ``limit`` bytes (beyond it nothing more is
    kept, and that part is recomputed).

    A replay returns a copy of the output and has no other effect, so a call is kept only
    when that is all it did (:func:`_replayable`): it changed none of its arguments,
    parameters or buffers in place, and its output shares memory with none of them (for an
    ``nn.Sequential`` ancestor: the children up to the kept one changed none of their
    parameters or buffers; nothing can see their effect on the container's input before the
    pass stops inside it). Other calls, e.g. an ``nn.ReLU(inplace=True)`` whose argument the
    caller also keeps as a shortcut, or a module that updates a buffer, run in every pass
    (limits: a change made through ``.data``, which has its own version counter, or to a
    tensor that is neither an argument nor a parameter or buffer of the module, is not
    seen).
    """

    def __init__(self, model: nn.Module, once: set[str], limit: int):
        self.model = model
        self.once = once
        self.limit = limit
        # batch -> name -> (output, bytes); for an nn.Sequential ancestor, ("seq", name) ->
        # (output of child c, bytes, c).
        self.records: dict[int, dict[Any, tuple]] = {}
        self.inputs: dict[int, torch.Tensor] = {}

    def capture(self, module: nn.Module, x: torch.Tensor, name: str, index: int) -> torch.Tensor:
        """:func:`_capture_input` of ``module`` for batch ``index``, with replay."""
        old = self.records.get(index, {})
        if old and not torch.equal(self.inputs[index], x):
            old = {}  # other inputs than last time (a shuffling loader): nothing is valid
        parts = name.split(".")
        # Ancestor name -> the name of its child on the path to the layer.
        path = {".".join(parts[:k]): ".".join(parts[:k + 1]) for k in range(len(parts) - 1, -1, -1)}
        modules = dict(self.model.named_modules())  # as they are now: replaced layers are new objects
        sequential = {
            a for a in path
            if a in self.once and type(modules[a]).forward is nn.Sequential.forward
        }
        new: dict[Any, tuple] = {}
        budget = [self.limit - sum(r[1] for batch, recs in self.records.items() if batch != index for r in recs.values())]

        def keep(key, value, *extra):
            copied = _clone_output(value)
            if copied is not None and copied[1] <= budget[0]:
                new[key] = (*copied, *extra)
                budget[0] -= copied[1]

        calls: dict[str, int] = {}

        def wrap_call(mod_name, mod):
            forward = mod.forward
            parent = mod_name.rpartition(".")[0]
            outermost = parent in path and parent not in sequential

            def replay_or_run(*args, **kwargs):
                calls[mod_name] = calls.get(mod_name, 0) + 1
                if calls[mod_name] > 1:
                    # Called again in this pass (the first batch's count did not hold, e.g.
                    # input-dependent control flow): never replay or keep it from now on.
                    self.once.discard(mod_name)
                    new.pop(mod_name, None)
                    return forward(*args, **kwargs)
                if mod_name in old:
                    if outermost:
                        new[mod_name] = old[mod_name]
                    return _replayed(old[mod_name][0])
                if not outermost:
                    return forward(*args, **kwargs)
                watched = _watch(args, kwargs, mod)
                out = forward(*args, **kwargs)
                if _replayable(watched, out):
                    keep(mod_name, out)
                return out

            return replay_or_run

        def wrap_sequential(seq_name, container):
            children = list(container)
            target = [n for n, m in container.named_children()].index(path[seq_name].rpartition(".")[2])

            def forward(value):
                # Only the children's parameters and buffers are watched: what they do to the
                # container's input (e.g. an in-place activation first) or to one another's
                # outputs cannot be seen before the pass stops inside the container.
                watched = _watch((), {}, container) if target > 0 else None
                start = 0
                record = old.get(("seq", seq_name))
                if record is not None and record[2] < target:
                    value, start = _replayed(record[0]), record[2] + 1
                    if record[2] == target - 1:
                        new[("seq", seq_name)] = record
                for i in range(start, len(children)):
                    value = children[i](value)
                    if i == target - 1 and _replayable(watched, value):
                        keep(("seq", seq_name), value, i)
                return value

            return forward

        wrapped = []
        for mod_name, mod in modules.items():
            if mod_name not in self.once or mod is module:
                continue
            if mod_name in sequential:
                replacement = wrap_sequential(mod_name, mod)
            elif mod_name not in path:
                replacement = wrap_call(mod_name, mod)
            else:
                continue  # an ancestor of the layer: it runs (and is stopped inside)
            wrapped.append((mod, mod.__dict__.get("forward")))
            mod.forward = replacement
        try:
            captured = _capture_input(self.model, module, x, name)
        finally:
            for mod, previous in wrapped:
                if previous is None:
                    del mod.forward
                else:
                    mod.forward = previous
        self.records[index] = new
        self.inputs[index] = x
        return captured


def layer_call_order(
    model: nn.Module, x: torch.Tensor, names: Iterable[str] | str
) -> tuple[list[str], dict[str, int]]:
    """Run ``model`` once on ``x`` and return the named layers in the order they are called.

    The model runs as :func:`~tensorly_dataaware.torch.collect_covariances` runs it: in eval
    mode under ``torch.no_grad()``, so that the probe changes nothing (no BatchNorm running
    statistics, no dropout drawing from the global random generator, no autograd graph).
    The training flag of every submodule is restored afterwards and the hooks are removed,
    even on error.

    Parameters
    ----------
    model : nn.Module
    x : torch.Tensor
        One input batch.
    names : iterable of str, or str
        Candidate module names (as in ``model.named_modules()``); a single string is one name.

    Returns
    -------
    (list of str, dict of str to int)
        The names in order of their first call, and how many times each was called
        (names never called are absent from the list and have count 0).

    Raises
    ------
    ValueError
        If a name is not a module of ``model`` (the message lists the unknown ones).
    """
    # A string is one name, not an iterable of one-character names.
    names = [names] if isinstance(names, str) else list(names)
    # get_submodule, not named_modules(): it also finds a module registered under two names.
    modules, unknown = {}, []
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except (AttributeError, TypeError):  # TypeError: not a string
            unknown.append(name)
    if unknown:
        raise ValueError(f"`names`: {unknown} are not modules of the model.")
    counts = {name: 0 for name in names}
    order: list[str] = []
    handles = []

    def make_hook(name):
        def hook(_module, _args):
            if counts[name] == 0:
                order.append(name)
            counts[name] += 1

        return hook

    # Every module's own flag: model.train(flag) afterwards would overwrite submodules that
    # were deliberately in another mode (e.g. frozen BatchNorm in a training model).
    training_flags = [(module, module.training) for module in model.modules()]
    try:
        for name in counts:
            handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
        model.eval()
        with torch.no_grad():
            model(x.clone())  # a copy, as in _capture_input
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags:
            module.training = flag
    return order, counts


def _candidates(model: nn.Module, layers, skipped: list) -> tuple[list[str], bool]:
    """Names to consider and whether the user named them (named ones must all work).

    Unsupported layers of the default selection go to ``skipped`` as ``(name, reason)``.
    """
    modules = dict(model.named_modules())
    if layers is None:
        names = []
        for name, module in modules.items():
            # Conv1d too, so that the report lists it as kept dense, as compress's does.
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                continue
            reason = _unsupported_reason(module)
            if reason:
                warnings.warn(f"Skipping layer {name!r} (kept dense): {reason}", stacklevel=3)
                skipped.append((name, reason))
                continue
            names.append(name)
        if not names:
            raise ValueError("The model has no nn.Conv2d or nn.Linear layer to compress.")
        return names, False
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    if not names:
        raise ValueError("`layers` is empty: name at least one layer, or leave it None for every supported layer.")
    for name in names:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"`layers`: {name!r} is not a module of the model.")
        reason = _unsupported_reason(modules[name])
        if reason:
            raise ValueError(f"Cannot compress layer {name!r}: {reason}")
    if len(set(names)) != len(names):
        raise ValueError(f"`layers` names a layer twice: {names}.")
    return names, True


def _sequential_target(weight: torch.Tensor, c_yy: torch.Tensor, c_xy: torch.Tensor, damping: float) -> torch.Tensor:
    """``W' = W (C_xy + d I)(C_yy + d I)^+`` (``d = damping * mean(diag(C_yy))``), matricized."""
    mat = weight.reshape(weight.shape[0], -1)
    n = c_yy.shape[0]
    delta = damping * float(torch.diagonal(c_yy).sum()) / n
    eye = torch.eye(n, dtype=c_yy.dtype, device=c_yy.device)
    with tl.backend_context("pytorch"):
        # (C_yy + dI) W'^T = (C_xy + dI)^T W^T, solved by Cholesky or the pseudo-inverse.
        solved = psd_solve(c_yy + delta * eye, (c_xy + delta * eye).T @ mat.T)
    return solved.T.reshape(weight.shape)


def _restore_modes(model: nn.Module, flags: Mapping[str, bool]) -> None:
    # Parents first (named_modules order), so that every module ends with its own flag and
    # the submodules of a new factorized layer inherit the flag of the layer it replaced.
    for name, module in model.named_modules():
        if name in flags:
            module.train(flags[name])


def compress_sequential(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "tucker2",
    *,
    ranks: Mapping[str, Any] | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    norm: str = "sigma",
    layers: Iterable[str] | None = None,
    centered: bool = True,
    bias_correction: bool = True,
    inplace: bool = False,
    return_report: bool = False,
    progress: bool = True,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    damping: float = 1e-6,
    cache_bytes: int = 2**30,
    refit: Iterable[str] | bool | None = None,
    refit_damping: float | str | None = "cv",
    target_damping: float | str | None = "auto",
    budget_weighting: str = "relative",
    fit_weighting: str | None = None,
    **solver_options,
):
    """Compress layer by layer, fitting each to the original output from the compressed inputs.

    The selected layers are compressed in the order the forward pass calls them. Layer
    ``l`` is fitted, on the calibration batches, to reproduce the *original* network's
    output at ``l`` from the inputs the *partly compressed* network feeds it, which stops
    the errors of earlier layers from compounding (see the module documentation for the
    mathematics). It costs one pass of both networks over ``batches`` per compressed layer,
    each pass stopping at the layer.

    Parameters
    ----------
    model : nn.Module
        The trained network. It is deep-copied unless ``inplace=True`` (a reference copy
        of the original is then kept during the run).
    batches : re-iterable of batches
        Calibration inputs: tensors, or tuples/lists whose first item is the input (a
        ``DataLoader``, a list, ...). They are iterated once per compressed layer, so a
        one-shot iterator or generator is refused (wrap it in ``list(...)``).
    method : {'tucker2', 'cp', 'svd'}, default is 'tucker2'
        As in :func:`~tensorly_dataaware.torch.compress` (Linear layers and ``1 x 1``
        convolutions use the whitened SVD).
    ranks, ratio, energy, budget
        As in :func:`~tensorly_dataaware.torch.compress`. ``energy`` is measured on each
        layer's sequential target and weight; ``budget`` is allocated with one-shot
        statistics of the original network (one extra pass over ``batches``). ``budget``
        tends to move weights from the last, largest layers to the early ones, so combine
        it with ``refit`` (at least the classifier): measured without fine-tuning, 500
        calibration images, on the embedded ResNet-20 Tucker-2 at 4% kept, ``budget``
        alone gave 66.85% (``ratio``: 76.15%), with ``refit=True`` 83.9% (``ratio`` with
        ``refit=True``: 79.1%), with only the classifier refitted 83.4%
        (``benchmarks/results/accuracy_*_sequential_budget_refit_all.json``).
    norm : {'sigma', 'frobenius'}, default is 'sigma'
        ``'frobenius'`` fits the sequential target ``W'`` in the Frobenius norm (a baseline).
    layers : iterable of str, optional
        Layers to compress; default every ``nn.Conv2d`` and ``nn.Linear`` the forward pass
        calls once (grouped convolutions, ``nn.Conv2d`` / ``nn.Linear`` subclasses that
        override ``forward`` and layers called several times per pass are skipped with a
        warning; naming them raises).
    centered : bool, default is True
        Covariances (True) or uncentred second moments (False).
    bias_correction : bool, default is True
        Set the bias to ``b + W E[x] - W~ E[x~]``, the best constant for the fitted ``W~``.
        ``None`` means what it means in :func:`~tensorly_dataaware.torch.compress`: True for
        ``norm='sigma'`` with ``centered=True``, False otherwise.
    inplace : bool, default is False
        Modify ``model`` itself.
    return_report : bool, default is False
        Also return the per-layer :class:`~tensorly_dataaware.torch.LayerReport` list; its
        ``sigma_error`` is measured against the sequential target ``W'``.
    progress : bool, default is True
        A ``tqdm`` bar over the layers.
    max_batches : int, optional
        Use only the first ``max_batches`` batches of every pass.
    device : str or torch.device, optional
        Where the decompositions run (default: the layer's device). The forward passes run
        where the model is.
    damping : float, default is 1e-6
        Relative ridge toward the original weight (see the module documentation).
    cache_bytes : int, default is 1 GiB
        Memory allowed for keeping the original network's inputs of every selected layer
        (and the batches), from one pass. When they fit, the original network runs once
        instead of once per layer; otherwise, or when a later pass yields other inputs
        (a shuffling loader, random augmentation), they are recomputed. The same amount
        again is allowed for the outputs of the compressed network's module calls that
        each pass replays in the next instead of recomputing (the calls that finished
        before the pass stopped; with them the embedded ResNet-20 took 4.7 s instead of
        6.2 s, ``benchmarks/results/sequential_speed*_s19.json``). 0 disables both.
    refit : iterable of str or bool, optional
        Layers that stay dense but are refitted in the same pass, at no parameter cost: their
        weight becomes the (ridge-regularized, see ``refit_damping``) best linear predictor
        of their original output from the compressed network's inputs, and their bias the
        matching optimum. Useful for the classifier and for the layers left dense between
        compressed ones (e.g. ``1 x 1`` shortcut convolutions). ``True`` refits every
        ``nn.Conv2d`` and ``nn.Linear`` layer that is not compressed, is supported and is
        called once per forward pass, after the first compressed layer (before it, the
        inputs are unchanged and so would be the layer); it needs ``layers`` or ``ranks``
        to leave some layers out of the compression. Named layers are removed from the
        default selection; naming one in ``layers`` or ``ranks`` too is an error.
        Measured without fine-tuning, 500 calibration images, ``refit=True`` with the
        cross-validated ridge (``benchmarks/results/accuracy_*_sequential_refit_all.json``):
        on the embedded ResNet-20 (the classifier and the two ``1 x 1`` shortcut
        convolutions refitted) Tucker-2 at 4% kept went from 76.15% to 79.1% and at 2% from
        57.05% to 74.1%; on the VGG (its classifier) at 10% from 92.15% to 92.55%.
    refit_damping : float or 'cv' or None, default is 'cv'
        Relative ridge of the refitted layers, toward their original weight (as
        ``damping``): a refitted layer has no rank constraint, so with few calibration
        samples per input feature its least-squares fit overfits (a 2304-input classifier
        refitted on 500 images fell from 92% to 77% test accuracy at ``damping=1e-6``).
        ``'cv'`` chooses it per layer by 4-fold cross-validation over the calibration
        images (the ``i``-th image, counted over the batches, is in fold ``i mod 4``; the held-out
        output error is computed from the folds' moments, so nothing is stored per image),
        from a logarithmic grid from ``1e-6`` to ``1e4``; the chosen value is in the
        report's notes. None: ``damping``.
    target_damping : float or 'cv' or 'auto' or None, default is 'auto'
        Relative ridge of the compressed layers' regression target ``W'`` only (see the
        module documentation); the weight of their low-rank fit keeps ``damping``. The
        target is the same least-squares regression as a refitted layer's weight, and it
        overfits the same way when a layer has few calibration samples per input feature;
        ``'cv'`` chooses its ridge per layer as ``refit_damping='cv'`` does (the same folds,
        grid and held-out error of the dense predictor), and the low-rank factors are then
        fitted to that target. The first compressed layer is unaffected (there ``W' = W``
        whatever the ridge). None: ``damping``. ``'auto'`` (the default): ``'cv'`` for the
        layers that will see fewer calibration samples than twice their input features
        (predicted before the layer's pass from the first layer's count; the report row
        says so), ``damping`` for the others. Measured without fine-tuning, 500
        calibration images, ``budget`` with ``refit=True``
        (``benchmarks/results/accuracy_*_sequential_target_cv*.json``), ``'cv'`` is
        neutral, within the noise: it picks ridges of ``3e-3`` to ``0.1`` for the VGG's
        deeper convolutions, and at 10% kept gives Tucker-2 92.98% against 92.92% and CP
        93.02% against 92.95% on the 10k test images; on ResNet-20 Tucker-2, 83.7% at 4%
        and 89.0% at 10% (83.9% and 89.05% without it, 2000 test images). With few
        calibration images it matters: on the small networks of
        ``benchmarks/architectures.py`` (16-48 images) the default target overfitted, with
        held-out output errors up to ``8.7e4`` times the output on one network, and ``'cv'``
        kept them at or below the one-shot fit's; ``'auto'`` does the same there. ``'cv'``
        costs one eigendecomposition of ``Cov(x~)`` per fold and layer (+44% time on the
        embedded ResNet-20, +214% on VGG, 500 images), which is why ``'auto'`` spends it only
        where the layer is underdetermined: with 500 images no layer of the embedded
        ResNet-20 or VGG is, so there ``'auto'`` is ``damping``. With a fixed ridge, an
        underdetermined layer gets a warning and a report note.
    budget_weighting : {'relative', 'fisher'}, default is 'relative'
        How ``budget`` compares the layers (ignored without ``budget``). ``'relative'``:
        every layer's *relative* squared sigma-error counts the same. ``'fisher'``: each
        layer's *absolute* output error is weighted per output channel by the diagonal
        empirical Fisher of that output, ``sum_c F_c E[(y_c - y~_c)^2]``, a second-order
        estimate of the loss increase, so the allocation buys ranks where the network's
        loss is most sensitive. ``F`` is measured label-free on the original network (the
        cross-entropy of its own predicted class: ``model(x)`` must return logits with the
        classes on axis 1) with one forward and backward pass over ``batches``
        (:func:`~tensorly_dataaware.torch.sensitivity.output_fisher`). Measured without
        fine-tuning, 500 calibration images, ``budget=0.1`` with ``refit=True``
        (``benchmarks/results/accuracy_*_sequential_fisher*.json``): on the embedded VGG,
        Tucker-2 92.90% and CP 93.30% against 92.70% and 92.85% (2000 test images; within
        the noise of about +-0.9 point); on ResNet-20 within noise of ``'relative'``.
    fit_weighting : {'fisher', 'kfac'} or None, optional
        ``'fisher'`` weights the output rows of every compressed layer's objective by the
        same Fisher ``F_c`` (floored at ``1e-3`` of the layer's mean):
        ``min ||F^{1/2} (W' - W~) C~^{1/2}||``. The report's ``sigma_error`` is then in the
        weighted norm. Measured as above, with ``budget_weighting='fisher'``: VGG CP 93.55%
        (93.08% on the 10k test split, against 92.95% before), Tucker-2 unchanged.
        ``'kfac'`` uses the whole ``T x T`` output Fisher ``F`` instead of its diagonal (the
        Kronecker-factored approximation of the loss's curvature, see
        :mod:`~tensorly_dataaware.torch.sensitivity`; eigenvalues floored at ``1e-3`` of their
        mean; ``T**2`` float64 numbers per compressed layer); the budget, with
        ``budget_weighting='fisher'``, still uses its diagonal. Measured with
        ``budget_weighting='fisher'``, ``budget=0.1`` and ``refit=True`` on the embedded VGG,
        four disjoint sets of 500 calibration images, against ``'fisher'``, on the 8000 test
        images that no setting was chosen on: CP +0.15 to +0.45 point (93.24-93.36%),
        Tucker-2 0 to +0.21 point (``benchmarks/results/kfac_*.json``).
    **solver_options
        Passed to the solvers, as in :func:`~tensorly_dataaware.torch.compress` (pass
        ``random_state`` for CP results that repeat from run to run).

    Returns
    -------
    nn.Module or (nn.Module, list of LayerReport)

    Raises
    ------
    TypeError
        For a one-shot iterator, badly formed batches or unknown solver options.
    ValueError
        For bad rank options, unknown or unsupported layers, empty ``batches``, NaN/Inf.

    Notes
    -----
    Both networks run in eval mode under ``torch.no_grad()``; every module's training flag
    is restored afterwards and every hook removed, even on error.

    Examples
    --------
    >>> from tensorly_dataaware.models import load_pretrained
    >>> from tensorly_dataaware.data import load_embedded_subset, make_loader
    >>> data = load_embedded_subset()
    >>> calib = make_loader(data["calib_images"][:64], data["calib_labels"][:64], batch_size=32)
    >>> net = load_pretrained("resnet20")
    >>> small = compress_sequential(net, calib, "tucker2", ratio=0.2, layers=["layer3.1.conv1", "layer3.1.conv2"],
    ...                             n_iter_max=5, progress=False)
    >>> type(small.layer3[1].conv2).__name__
    'Tucker2Conv2d'
    """
    return _run_sequential(
        model, batches, method, ranks=ranks, ratio=ratio, energy=energy, budget=budget, norm=norm,
        layers=layers, centered=centered, bias_correction=bias_correction, inplace=inplace,
        return_report=return_report, progress=progress, max_batches=max_batches, device=device,
        damping=damping, solver_options=solver_options, cache_bytes=cache_bytes,
        refit=refit, refit_damping=refit_damping, target_damping=target_damping,
        budget_weighting=budget_weighting, fit_weighting=fit_weighting,
    )


def _check_ridge(value, what: str, allow_cv: bool = True, allow_auto: bool = False) -> None:
    """A relative ridge must be a finite number >= 0 (or ``'cv'`` where cross-validation applies,
    ``'auto'`` for the target ridge)."""
    if (allow_cv and value == "cv") or (allow_auto and value == "auto"):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (value >= 0) or value == float("inf"):
        also = (", 'cv'" if allow_cv else "") + (", 'auto'" if allow_auto else "") + (" or None" if allow_cv or allow_auto else "")
        raise ValueError(f"`{what}` must be a finite number >= 0{also}; got {value!r}.")


def _run_sequential(
    model, batches, method, *, ranks, ratio, energy, budget, norm, layers, centered, bias_correction,
    inplace, return_report, progress, max_batches, device, damping, solver_options,
    cache_bytes=2**30, refit=None, refit_damping="cv", target_damping="auto",
    budget_weighting="relative", fit_weighting=None,
    collectives: _Local | None = None,
):
    """The work of :func:`compress_sequential`; ``collectives`` makes it distributed."""
    comm = collectives if collectives is not None else _Local()
    check_eager_model(model)
    _check_choice(method, "method", METHODS)
    _check_choice(norm, "norm", NORMS)
    check_flags(centered=centered, inplace=inplace, return_report=return_report, progress=progress)
    if bias_correction is None:
        # As in compress: None was falsy here, and turned the correction off silently (a 5x
        # larger output error in the audit's case).
        bias_correction = norm == "sigma" and centered
    check_flags(bias_correction=bias_correction)
    check_rank_options(ranks, ratio, energy, budget)
    check_solver_options(method, norm, solver_options)
    device = check_device(device)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive int or None; got {max_batches!r}.")
    _check_ridge(damping, "damping", allow_cv=False)
    if refit_damping is None:
        refit_damping = damping
    _check_ridge(refit_damping, "refit_damping")
    if target_damping is None:
        target_damping = damping
    _check_ridge(target_damping, "target_damping", allow_auto=True)
    _check_choice(budget_weighting, "budget_weighting", BUDGET_WEIGHTINGS)
    if fit_weighting is not None:
        _check_choice(fit_weighting, "fit_weighting", FIT_WEIGHTINGS)
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, numbers.Integral) or cache_bytes < 0:
        raise ValueError(f"`cache_bytes` must be an int >= 0; got {cache_bytes!r}.")
    # The one argument that may differ by process (each passes its own shard): agreed on, so
    # that a one-shot iterator on one rank does not leave the others waiting.
    comm.agree(
        TypeError(
            "`batches` is a one-shot iterator (e.g. a generator), but sequential calibration reads the "
            "batches once per compressed layer: pass a re-iterable (a DataLoader or a list, e.g. list(batches))."
        ) if _is_one_shot_iterator(batches) else None,
        "the batches",
    )
    skipped: list = []
    call_position: dict[str, int] = {}
    module_calls: dict[str, int] = {}
    per_image: dict[str, float] = {}  # patches (rows) per model input of each layer, from planning
    names, named = _candidates(model, layers, skipped)
    refit_all = refit is True
    refit = _check_refit(model, refit, names if named else None, ranks)
    if refit_all:
        refit = _dense_layers(model, names, ranks, named)
    names = [name for name in names if name not in refit] + list(refit)

    flags = {name: m.training for name, m in model.named_modules()}
    reference = copy.deepcopy(model) if inplace else model
    target = model if inplace else copy.deepcopy(model)
    run_device = _model_device(model)
    report: list[LayerReport] = []
    try:
        reference.eval()
        target.eval()
        with torch.no_grad():
            error = None
            order: list[str] = []
            try:
                order = _plan_order(
                    reference, batches, names, named, max_batches, run_device, ranks, skipped, call_position, refit,
                    refit_all, module_calls, per_image,
                )
                # Before any fitting, as compress does (the loop would meet them layer by layer).
                _check_ranks(
                    reference, [name for name in order if name not in refit], method, ranks, ratio, energy, budget
                )
            except Exception as exc:  # noqa: BLE001 - every process must learn of it
                error = exc
            comm.agree(error, "planning")
            comm.same(order, "the layer order")
            if target_damping == "auto":
                comm.same(sorted(per_image.items()), "the samples per input of each layer")
            # Runs every batch through the model: a bad batch on one process must stop all.
            cache, error = None, None
            try:
                cache = _cache_reference_inputs(reference, batches, order, max_batches, run_device, cache_bytes)
            except Exception as exc:  # noqa: BLE001 - every process must learn of it
                error = exc
            comm.agree(error, "the original network's inputs")
            # The target is still a copy of the reference: the same module names and calls.
            once = {name for name, calls in module_calls.items() if calls == 1}
            prefix = _PrefixCache(target, once, cache_bytes) if cache_bytes else None
            compressed = [name for name in order if name not in refit]
            fisher = fit_weights = None
            if fit_weighting is not None or (budget is not None and budget_weighting == "fisher"):
                error = None
                try:
                    full = fit_weighting == "kfac"
                    measured = output_fisher(
                        reference, batches, compressed, max_batches=max_batches, reduce=comm.reduce_tensor, full=full,
                        agree=comm.agree,
                    )
                    fisher = fisher_row_weights({k: v.diagonal() if full else v for k, v in measured.items()})
                    if fit_weighting is not None:
                        fit_weights = measured if full else fisher
                except Exception as exc:  # noqa: BLE001 - every process must learn of it
                    error = exc
                comm.agree(error, "the output Fisher")
            if budget is not None:
                ranks = _budget_ranks(
                    reference, batches, method, ranks, budget, centered, compressed, max_batches, device, comm,
                    weights=fisher if budget_weighting == "fisher" else None,
                )

            bar = tqdm(order, desc=f"sequential ({method}, {norm})", disable=not progress, leave=False)
            first_count = None
            for position, name in enumerate(bar):
                bar.set_postfix_str(name)
                start = time.perf_counter()
                cached = None if cache is None else cache.pop(name)
                ridge = refit_damping if name in refit else target_damping
                auto_note = None
                if ridge == "auto":
                    ridge, auto_note = _auto_target_ridge(
                        target.get_submodule(name), name, order[0], first_count, per_image, damping
                    )
                folds = _CV_FOLDS if ridge == "cv" and position > 0 else 1
                moments, fold_moments = _layer_moments(
                    reference, target, batches, name, position == 0, max_batches, run_device, comm, cached, folds,
                    prefix,
                )
                if position == 0:
                    first_count = moments.count
                if name in refit:
                    fit = lambda: _refit_layer(  # noqa: E731
                        target, name, moments, first_layer=position == 0, norm=norm, centered=centered,
                        bias_correction=bias_correction, device=device, damping=refit_damping, folds=fold_moments,
                    )
                else:
                    fit = lambda: _fit_layer(  # noqa: E731
                        target, name, moments, first_layer=position == 0, method=method, ranks=ranks, ratio=ratio,
                        energy=energy, norm=norm, centered=centered, bias_correction=bias_correction,
                        device=device, damping=damping, target_damping=ridge, folds=fold_moments,
                        solver_options=solver_options,
                        row_weights=None if fit_weights is None else fit_weights[name],
                    )
                new, row = comm.decide(fit, name)
                if auto_note is not None:
                    row.notes.append(auto_note)
                row.seconds = time.perf_counter() - start
                _set_module(target, name, new)
                report.append(row)
    finally:
        _restore_modes(reference, flags)
        _restore_modes(target, flags)
    modules = dict(target.named_modules())
    report.extend(dense_report_row(name, modules[name], reason) for name, reason in skipped)
    # Compression (call) order; layers the forward pass never calls go last.
    report.sort(key=lambda row: call_position.get(row.name, len(call_position)))
    if return_report:
        return target, report
    return target


def _cache_reference_inputs(reference, batches, order, max_batches, run_device, limit) -> dict[str, tuple] | None:
    """The original network's inputs of every layer in ``order``, for every batch, from one
    pass: or None when they would take more than ``limit`` bytes (then each layer's pass
    recomputes them)."""
    if not limit:
        return None
    cache: dict[str, list] = {name: [] for name in order}
    inputs: list[torch.Tensor] = []  # to check that later passes see the same batches
    used = 0

    def make_hook(name):
        def hook(_module, args, kwargs):
            nonlocal used
            value = args[0] if args else kwargs.get("input")
            if isinstance(value, torch.Tensor):
                # A copy: a later in-place operation of the model must not change it.
                cache[name].append(value.detach().clone())
                used += value.numel() * value.element_size()
        return hook

    handles = [
        reference.get_submodule(name).register_forward_pre_hook(make_hook(name), with_kwargs=True) for name in order
    ]
    try:
        for index, batch in _iterate(batches, max_batches):
            x = _prepare(batch, index, run_device)
            inputs.append(x)
            used += x.numel() * x.element_size()
            reference(x.clone())  # a copy, as in _capture_input: `inputs` must stay the batches
            if used > limit:
                return None
    finally:
        for handle in handles:
            handle.remove()
    return {name: (inputs, values) for name, values in cache.items()}


def _plan_order(
    reference, batches, names, named, max_batches, run_device, ranks, skipped, call_position, refit=(),
    refit_all=False, module_calls=None, per_image=None,
) -> list[str]:
    """The selected layers in call order (one forward pass over the first batch).

    ``module_calls``, if given, receives how many times every module (the model as ``''``)
    was called in that pass (see :class:`_PrefixCache`); ``per_image``, the input patches
    (or rows) per model input of every traced layer (see :func:`_samples_hooks`).
    """
    first = None
    for index, batch in _iterate(batches, max_batches):
        first = _prepare(batch, index, run_device)
        break
    if first is None:
        raise ValueError("`batches` yielded no batch: nothing to calibrate on.")
    # The skipped (e.g. grouped) layers are traced too, to place their report rows.
    traced = list(names) + [name for name, _ in skipped if name not in names]
    # Every module is traced in the same pass, for the prefix replay's call counts.
    handles = [] if per_image is None else _samples_hooks(reference, traced, first.shape[0], per_image)
    try:
        everything, all_counts = layer_call_order(reference, first, [name for name, _ in reference.named_modules()])
    finally:
        for handle in handles:
            handle.remove()
    if module_calls is not None:
        module_calls.update(all_counts)
    wanted = set(traced)
    order = [name for name in everything if name in wanted]
    counts = {name: all_counts[name] for name in traced}
    call_position.update({name: i for i, name in enumerate(order)})
    if refit_all:
        # Chosen by refit=True, not by name: layers it cannot refit simply stay as they are,
        # and so do those called before the first compressed layer (their inputs do not change).
        compressed = [name for name in order if name in names and name not in refit and counts[name] == 1]
        first = order.index(compressed[0]) if compressed else len(order)
        keep = {name for name in refit if counts[name] == 1 and name in order and order.index(name) > first}
        names = [name for name in names if name not in refit or name in keep]
        refit[:] = [name for name in refit if name in keep]
    counts = {name: counts[name] for name in names}
    order = [name for name in order if name in counts]
    bad = {name: c for name, c in counts.items() if c != 1}
    bad_refit = {name: c for name, c in bad.items() if name in refit}
    if bad_refit:
        raise ValueError(f"`refit` layers must be called exactly once per forward pass: {bad_refit} (name: calls).")
    if bad:
        text = ", ".join(f"{n!r} ({'never called' if c == 0 else f'called {c} times'})" for n, c in bad.items())
        if named:
            raise ValueError(f"Sequential calibration needs every layer called exactly once per forward pass: {text}.")
        warnings.warn(f"Skipping layers not called exactly once per forward pass (kept dense): {text}.", stacklevel=4)
        skipped.extend(
            (n, "never called by the forward pass" if c == 0 else f"called {c} times per forward pass")
            for n, c in bad.items()
        )
    order = [name for name in order if counts[name] == 1]
    if not order:
        raise ValueError("No layer to compress: none of the selected layers is called once per forward pass.")
    check_unknown_ranks(ranks, [name for name in order if name not in refit])
    return order


def _check_ranks(model, names, method, ranks, ratio, energy, budget) -> None:
    """Refuse a missing or invalid rank of any layer of ``names`` before the first layer is
    fitted, with :func:`compress`'s message (each layer's rank is otherwise resolved only when
    its turn comes, after every earlier layer's pass and fit).

    The same checks as :func:`_resolve_rank` in :func:`_fit_layer`, on the same weight shapes
    (a layer is replaced only after its fit): an explicit rank is validated, a layer without
    one needs ``ratio`` or ``energy`` (always valid; ``energy``'s rank depends on the fit's
    statistics). With ``budget`` the allocation sets every rank, so nothing is checked here.
    """
    if budget is not None:
        return
    for name in names:
        if (ranks is not None and name in ranks) or (ratio is None and energy is None):
            module = model.get_submodule(name)
            _resolve_rank(name, module, _layer_method(module, method), ranks, None, None, module.weight, None)


def _layer_moments(
    reference, target, batches, name, first_layer, max_batches, run_device, comm, cached=None, folds=1, prefix=None
) -> tuple[CrossStatistics, list[CrossStatistics] | None]:
    """Stream the paired input patches of layer ``name`` over ``batches`` (all-reduced).

    ``cached``: the original network's inputs of the layer, batch by batch, if kept.
    ``prefix``: a :class:`_PrefixCache` of ``target`` (replays what cannot have changed).
    ``folds > 1``: also return the moments of each fold of images (the ``i``-th image of
    the stream, counted over the batches, in fold ``i % folds``), whose sum is the first
    result; else None.
    """
    ref_module = reference.get_submodule(name)
    module = target.get_submodule(name)  # still the dense layer: it is replaced after the fit
    n = ref_module.weight[0].numel()
    parts = [CrossStatistics(n, device=run_device) for _ in range(folds)]
    error = None
    seen = 0  # images before this batch: fold of an image = its position in the stream mod folds
    try:
        for index, batch in _iterate(batches, max_batches):
            x = _prepare(batch, index, run_device)
            # A shuffling loader or random augmentation gives other inputs on every pass:
            # the cached activations are then not those of this batch.
            if cached is not None and index < len(cached[0]) and torch.equal(x, cached[0][index]):
                x_ref = cached[1][index]
            else:
                x_ref = _capture_input(reference, ref_module, x, name)
            # Before the first replacement both networks are the same: x~ = x.
            if first_layer:
                x_new = x_ref
            elif prefix is not None:
                x_new = prefix.capture(module, x, name, index)
            else:
                x_new = _capture_input(target, module, x, name)
            # In the network's dtype: float32 products are blocked and summed in float64
            # (see LayerStatistics.update for the error bound).
            try:
                if folds == 1:
                    parts[0].update_from_inputs(ref_module, x_ref, None if first_layer else x_new)
                elif not _batched(ref_module, x_ref):
                    # No image axis to split along: all in one fold (cross-validation then
                    # falls back to `damping`).
                    parts[0].update_from_inputs(ref_module, x_ref, None if first_layer else x_new)
                else:
                    # By position in the whole stream, not in the batch: with one image per
                    # batch, "image k of every batch" put everything in fold 0 and the
                    # cross-validation silently fell back to a fixed ridge.
                    for k, part in enumerate(parts):
                        start = (k - seen) % folds
                        if start < x_ref.shape[0]:
                            part.update_from_inputs(
                                ref_module, x_ref[start::folds], None if first_layer else x_new[start::folds]
                            )
                    seen += x_ref.shape[0]
            except ValueError as exc:
                raise ValueError(f"Layer {name!r}, batch {index}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - every process must learn of it
        error = exc
    comm.agree(error, f"layer {name!r}")
    for part in parts:
        comm.reduce(part)
    moments = parts[0]
    for part in parts[1:]:
        moments = moments.merge(part)
    if moments.count == 0:
        raise ValueError(
            f"Layer {name!r}: no input patch on this pass over `batches` (does it yield the same batches every time?)."
        )
    return moments, (parts if folds > 1 else None)


def _batched(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer input ``x`` has a leading batch (image) axis."""
    return x.dim() >= 2 if isinstance(module, nn.Linear) else x.dim() == module.weight.dim()


def _dense_layers(model, names, ranks, named) -> list[str]:
    """``refit=True``: the supported Conv2d/Linear layers that are not to be compressed."""
    if not named:
        raise ValueError(
            "`refit=True` refits the layers left out of the compression, but without `layers` every "
            "supported layer is compressed: choose the compressed layers with `layers=`."
        )
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in names and not _unsupported_reason(module)
    ]


def _check_refit(model, refit, named_layers, ranks) -> list[str]:
    """Validate ``refit`` (layers refitted dense) and return it as a list (``[]`` for a bool)."""
    if refit is None or isinstance(refit, bool):
        return []
    if isinstance(refit, str):
        refit = [refit]
    refit = list(refit)
    modules = dict(model.named_modules())
    for name in refit:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"`refit`: {name!r} is not a module of the model.")
        reason = _unsupported_reason(modules[name])
        if reason:
            raise ValueError(f"`refit`: cannot refit layer {name!r}: {reason}")
        if named_layers is not None and name in named_layers:
            raise ValueError(f"`refit`: {name!r} is also in `layers`: a layer is either compressed or refitted.")
        if ranks is not None and name in ranks:
            raise ValueError(f"`refit`: {name!r} also has an entry in `ranks`: a refitted layer stays dense.")
    if len(set(refit)) != len(refit):
        raise ValueError(f"`refit` names a layer twice: {refit}.")
    return refit


def _targets(module, moments, first_layer, centered, damping, dev):
    """``(W, W', C~)`` in float64 on ``dev``: the layer's weight, its sequential target (with
    the relative ridge ``damping``) and weight."""
    weight = module.weight.detach().to(device=dev, dtype=torch.float64)
    if centered:
        c_yy, c_xy = moments.cov_yy[0].to(dev), moments.cov_xy[0].to(dev)
    else:
        c_yy, c_xy = moments.second_moment_yy[0].to(dev), moments.cross_moment_xy[0].to(dev)
    # x~ = x for the first layer, and then W' = W exactly (no round-off from a solve).
    goal = weight if first_layer else _sequential_target(weight, c_yy, c_xy, damping)
    return weight, goal, c_yy


def _samples_hooks(model: nn.Module, names, batch_size: int, per_image: dict[str, float]) -> list:
    """Forward hooks that record into ``per_image`` the input patches (or rows) per model input
    of every layer of ``names``, for one pass on a batch of ``batch_size``; the caller removes
    them. A convolution sees one patch per output position, a Linear layer one row per vector
    of its input (e.g. per token): ``output.numel() / (output features * batch_size)``.
    """

    def make_hook(name):
        def hook(module, _args, output):
            if name not in per_image and isinstance(output, torch.Tensor) and output.dim() >= 2:
                features = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
                per_image[name] = output.numel() / max(1, features * batch_size)

        return hook

    return [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]


def _auto_target_ridge(module, name, first_name, first_count, per_image, damping):
    """The target ridge ``target_damping='auto'`` gives layer ``name``: ``'cv'`` when it will see
    fewer calibration samples than :data:`_AUTO_CV_SAMPLES_PER_INPUT` times its input features,
    else ``damping``; and the report note that says why (None when ``damping``).

    The count is predicted before the layer's pass (its folds are collected during it) from
    the first layer's count and both layers' samples per model input.
    """
    if first_count is None or name not in per_image or not per_image.get(first_name):
        return damping, None
    expected = first_count * per_image[name] / per_image[first_name]
    inputs = module.weight[0].numel()
    if expected >= _AUTO_CV_SAMPLES_PER_INPUT * inputs:
        return damping, None
    return "cv", f"target damping cross-validated (target_damping='auto': {expected:.0f} samples for {inputs} inputs)"


def _warn_if_underdetermined(name: str, moments: CrossStatistics, notes: list[str], option: str = "target_damping") -> None:
    # W' is a regression of the original output on n input features: with fewer samples
    # than features it interpolates the calibration data (measured: a refitted 2304-input
    # classifier fell from 92.15% to 77.0% test accuracy with 500 images; on the small
    # networks of benchmarks/architectures.py with 16-48 calibration images, held-out output
    # errors up to 8.7e4 times the output against 0.12-0.15 with target_damping='cv').
    if moments.count < 2 * moments.n:
        # The ridge of a refitted layer is `refit_damping`; of a compressed layer's target,
        # `target_damping` (`damping` regularizes only the low-rank fit's weight).
        notes.append(f"few samples ({moments.count} for {moments.n} inputs): may overfit, see {option}='cv'")
        warnings.warn(
            f"Layer {name!r}: {moments.count} calibration samples for {moments.n} input features; its "
            f"sequential fit may overfit the calibration data (use more images, a larger `{option}` or "
            f"`{option}='cv'`).",
            RuntimeWarning,
            stacklevel=6,
        )


def _refit_layer(
    target, name, moments, *, first_layer, norm, centered, bias_correction, device, damping, folds=None
):
    """Layer ``name`` kept dense, with the (ridge) best linear predictor ``W'`` as its weight.

    ``damping='cv'``: chosen by cross-validation over ``folds`` (moments of disjoint image sets).
    """
    start = time.perf_counter()
    module = target.get_submodule(name)
    dev = device if device is not None else module.weight.device
    notes = ["refitted dense", "sequential"]
    damping = _choose_ridge(name, module, moments, damping, folds, first_layer, centered, bias_correction, dev, notes)
    weight, goal, _ = _targets(module, moments, first_layer, centered, damping, dev)
    new = copy.deepcopy(module)
    dtype, out_dev = module.weight.dtype, module.weight.device
    trainable = module.weight.requires_grad
    if parametrize.is_parametrized(module):
        # A parametrized weight is a property: assigning a Parameter to it fails. The
        # refitted value is the effective weight itself, so the copy becomes a plain layer
        # of the original class, as a compressed layer does (a weight-norm or orthogonal
        # constraint would otherwise rescale or project it). Not remove_parametrizations:
        # it edits the parametrized class, which the copy shares with the user's module.
        new.__class__ = type(module).__bases__[0]
        del new._modules["parametrizations"]
        if parametrize.is_parametrized(module, "bias"):
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        notes.append("parametrization removed")
    new.weight = nn.Parameter(goal.to(dtype=dtype, device=out_dev), requires_grad=trainable)
    if bias_correction:
        mat, goal_mat = weight.reshape(weight.shape[0], -1), goal.reshape(weight.shape[0], -1)
        bias = mat @ moments.mean_x[0].to(dev) - goal_mat @ moments.mean_y[0].to(dev)
        if module.bias is not None:
            bias = bias + module.bias.detach().to(bias)
        # Frozen layers stay frozen: a new Parameter would be trainable by default.
        new.bias = nn.Parameter(bias.to(dtype=dtype, device=out_dev),
                                requires_grad=module.bias.requires_grad if module.bias is not None else trainable)
        notes.insert(1, "bias corrected")
    params = rk.dense_params(weight.shape)
    row = LayerReport(
        name=name, kind=type(module).__name__, shape=tuple(weight.shape), method="refit", norm=norm, rank=None,
        params_before=params, params_after=params, macs_before=params, macs_after=params, sigma_error=0.0,
        seconds=time.perf_counter() - start, notes=notes,
    )
    return new, row


def _choose_ridge(name, module, moments, damping, folds, first_layer, centered, bias_correction, dev, notes, label="damping"):
    """The relative ridge of layer ``name``'s target: ``damping``, or for ``'cv'`` the one
    chosen by cross-validation over ``folds`` (noted in ``notes``). Warns when a fixed ridge
    meets fewer calibration samples than twice the layer's input features."""
    if damping == "cv" and first_layer:
        return _CV_FALLBACK  # the original inputs: W' = W whatever the ridge
    if damping == "cv":
        chosen = _cross_validated_damping(module, folds, centered, bias_correction, dev)
        if chosen is None:
            notes.append(f"{label} {_CV_FALLBACK:g} (fewer than 2 folds of images: no cross-validation)")
            return _CV_FALLBACK
        notes.append(f"{label} {chosen:g} (cross-validated)")
        return chosen
    if not first_layer:
        # label "damping": a refitted layer (refit_damping); "target damping": a compressed one.
        _warn_if_underdetermined(name, moments, notes, "refit_damping" if label == "damping" else "target_damping")
    return damping


def _cross_validated_damping(module, folds, centered, bias_correction, dev) -> float | None:
    """The relative ridge of ``_CV_GRID`` with the smallest held-out output error, or None
    when fewer than two folds hold data."""
    scores = _cv_scores(module, folds, centered, bias_correction, dev)
    return None if scores is None else float(_CV_GRID[int(torch.argmin(scores))])


def _cv_scores(module, folds, centered, bias_correction, dev) -> torch.Tensor | None:
    """Held-out output error (up to a constant) of the refit for every ridge of ``_CV_GRID``.

    For each fold ``k`` the layer is refitted on the other folds (as :func:`_targets` and
    the bias of :func:`_refit_layer` would) and scored on fold ``k``: with ``x`` the
    original and ``y`` the compressed network's input patch, the error
    ``E_k ||W x + b - B y - b~||^2`` expands into the fold's moments; its one term without
    ``B``, ``E_k ||W x||^2``, is the same for every ridge and is left out. One eigen-
    decomposition of ``Cov(y)`` per fold serves the whole grid.
    """
    used = [part for part in (folds or []) if part.count > 0]
    if len(used) < 2:
        return None
    weight = module.weight.detach().to(device=dev, dtype=torch.float64)
    w = weight.reshape(weight.shape[0], -1)
    total = used[0]
    for part in used[1:]:
        total = total.merge(part)
    sums = [t.to(dev) for t in total.sum_tensors()]  # sum_x, sum_y, sum_yy, sum_xy (group 0 below)
    scores = torch.zeros(len(_CV_GRID), dtype=torch.float64, device=dev)
    for part in used:
        held = [t.to(dev)[0] for t in part.sum_tensors()]
        count = total.count - part.count
        if count == 0:
            return None
        sx, sy, syy, sxy = ((a[0] - b) / count for a, b in zip(sums, held))
        if centered:
            c_yy = syy - torch.outer(sy, sy)
            c_xy = sxy - torch.outer(sx, sy)
        else:
            c_yy, c_xy = syy, sxy
        c_yy = 0.5 * (c_yy + c_yy.T)
        lam, q = torch.linalg.eigh(c_yy)
        lam = lam.clamp_min(0)
        mean_diag = float(lam.sum()) / lam.numel()
        # Held-out fold's own moments (uncentred; the trained bias carries the centring).
        m = part.count
        hx, hy, hyy, hxy = (t / m for t in held)
        wq = w @ c_xy @ q  # W C_xy Q
        wq_plain = w @ q  # W Q, for the ridge term W (C_xy + d I) Q = W C_xy Q + d W Q
        for i, relative in enumerate(_CV_GRID):
            delta = relative * mean_diag
            inv = torch.where(lam + delta > 0, 1.0 / (lam + delta), torch.zeros_like(lam))
            b = ((wq + delta * wq_plain) * inv) @ q.T  # W (C_xy + dI)(C_yy + dI)^-1
            # The bias change of _refit_layer, from the training folds' means.
            shift = (w @ sx - b @ sy) if bias_correction else torch.zeros_like(w[:, 0])
            # ||W x - B y - c||^2 without ||W x||^2: ||B y||^2 - 2 (W x)^T B y - 2 c^T (W x - B y) + ||c||^2.
            score = (
                torch.sum((b @ hyy) * b)
                - 2 * torch.sum((w @ hxy) * b)
                - 2 * shift @ (w @ hx - b @ hy)
                + shift @ shift
            )
            scores[i] += m * score
    return scores


def _fit_layer(
    target, name, moments, *, first_layer, method, ranks, ratio, energy, norm, centered, bias_correction,
    device, damping, solver_options, target_damping=None, folds=None, row_weights=None,
):
    """Factorize layer ``name`` of ``target`` from its streamed moments.

    ``target_damping``: the relative ridge of the target ``W'`` (None: ``damping``; ``'cv'``:
    chosen by cross-validation over ``folds``); the weight of the fit keeps ``damping``.
    ``row_weights`` (per output channel, ``D``): minimize ``||D^{1/2} (W' - W~) C~^{1/2}||``
    instead. Every factorization's output factor absorbs a diagonal scaling of the rows, so
    this is the plain problem for the target ``D^{1/2} W'``, with the output factor's rows
    (and the bias) divided by ``D^{1/2}`` afterwards. A ``T x T`` matrix ``F`` (the full
    output Fisher) works the same way with ``F^{1/2}`` (floored, :func:`fisher_matrix_roots`):
    the output factor absorbs any invertible linear map of the rows as well.
    """
    module = target.get_submodule(name)
    dev = device if device is not None else module.weight.device
    notes: list[str] = []
    ridge = damping if target_damping is None else target_damping
    ridge = _choose_ridge(
        name, module, moments, ridge, folds, first_layer, centered, bias_correction, dev, notes, "target damping"
    )
    weight, goal, c_yy = _targets(module, moments, first_layer, centered, ridge, dev)
    mean_x, mean_y = moments.mean_x[0].to(dev), moments.mean_y[0].to(dev)
    layer_method = _layer_method(module, method)
    rank = _resolve_rank(name, module, layer_method, ranks, ratio, energy, goal, c_yy)
    fit_module = module
    if row_weights is not None:
        if row_weights.dim() == 2:
            scale, unscale = (m.to(goal) for m in fisher_matrix_roots(row_weights.to(torch.float64)))
        else:
            scale = row_weights.to(goal).sqrt()
            unscale = 1.0 / scale
        goal, weight = _scale_rows(goal, scale), _scale_rows(weight, scale)
        fit_module = copy.deepcopy(module)
        if fit_module.bias is not None:
            fit_module.bias.data.copy_(_scale_rows(fit_module.bias.data, scale.to(fit_module.bias)))
    job = LayerJob(
        name, fit_module, layer_method, goal, c_yy, mean_y, rank, reference_weight=weight, reference_mean=mean_x,
    )
    new, row = decompose_layer(job, norm=norm, bias_correction=bias_correction, damping=damping, **solver_options)
    if row_weights is not None:
        _scale_output(new, unscale)
        notes.append(
            ("K-FAC" if row_weights.dim() == 2 else "Fisher") + "-weighted fit (sigma_error in the weighted norm)"
        )
    row.notes.append("sequential")
    row.notes.extend(notes)
    return new, row


def _scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``diag(scale) @ weight`` for a vector ``scale``, ``scale @ weight`` for a matrix, with
    ``weight`` matricized as ``weight.reshape(T, -1)`` (a bias is a ``T``-vector)."""
    if scale.dim() == 1:
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return (scale @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape)


@torch.no_grad()
def _scale_output(module: nn.Module, scale: torch.Tensor) -> None:
    """Map the output rows of a factorized layer (its ``last`` factor and bias) by ``scale``
    (a vector: row by row; a matrix: ``scale @ rows``)."""
    last = module.last
    scale = scale.to(dtype=last.weight.dtype, device=last.weight.device)
    last.weight.copy_(_scale_rows(last.weight, scale))
    if last.bias is not None:
        last.bias.copy_(_scale_rows(last.bias, scale))


def _budget_ranks(reference, batches, method, ranks, budget, centered, order, max_batches, device, comm, weights=None):
    """Whole-model ranks from one-shot statistics of the original network (``weights``: per
    output channel, e.g. the Fisher, for the weighted allocation)."""
    stats = comm.collect(reference, batches, order, max_batches)
    jobs = plan_compression(
        reference, stats, method, ranks=ranks, budget=budget, centered=centered, layers=order, device=device,
        budget_weights=weights,
    )
    return {job.name: job.rank for job in jobs}
