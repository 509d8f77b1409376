"""Make a compressed model fast: choose, by measurement, how each factorized layer is computed.

A factorized layer can compute its approximated weight ``W~`` in several equivalent ways
(its *forms*, see :mod:`tensorly_dataaware.torch.layers`): the factorized chain, a shorter
chain (CP's two depthwise convolutions merged into one ``kh x kw`` depthwise convolution,
Tucker-2's core merged with its output factor), or one convolution with the reconstructed
dense kernel.  Which is fastest depends on the ranks, the image size,
the batch, the thread count and the memory layout: on CPU the chain of 1x1 and depthwise
convolutions is several times faster in channels-last layout (oneDNN runs NHWC natively and
reorders NCHW tensors around each call), and for tiny ranks on small images the per-call
overhead of three or four kernels can exceed the dense convolution's arithmetic.

:func:`optimize_for_inference` times the alternatives on each layer's actual input (captured
from one forward pass of an example input), for each candidate memory layout, keeps the
fastest per layer, then times the whole model under each layout and keeps the fastest
configuration *including the model as given* and the one with every layer in the dense
form, whose cost is that of the uncompressed layers: the result is never slower than its
input nor than the uncompressed model with the same BatchNorm folding and layout (up to
timing noise, which medians over interleaved repeats keep small).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .export import _max_abs_diff, _output_leaves
from .fold import fold_batchnorm
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d, _FormMixin

__all__ = ["optimize_for_inference", "LayerLatency", "DeployReport", "format_deploy_report", "MEMORY_FORMATS", "FORMS"]

#: Memory layouts tried for the whole model (4-D parameters and activations).
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: Every form name a factorized layer may have.
FORMS = ("chain", "merged", "dense")
# Below this many multiply-accumulates per call a layer's time is dominated by per-kernel
# overhead, so the cost model says nothing and every form is timed.
_PRUNE_MIN_MACS = 20_000_000


@dataclass
class LayerLatency:
    """Latency of one factorized layer before and after :func:`optimize_for_inference`.

    Times are medians in milliseconds over interleaved repeats, on the layer's own input
    (captured from the example input, in the chosen memory layout for ``ms_after`` and in
    the model's original layout for ``ms_before``).
    """

    name: str
    kind: str
    input_shape: tuple
    params: int
    cached_elements: int
    macs_before: int
    macs_after: int
    form_before: str
    form_after: str
    ms_before: float
    ms_after: float
    spread_after: tuple = ()
    candidates_ms: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeployReport:
    """Whole-model result of :func:`optimize_for_inference`."""

    threads: int
    input_shape: tuple
    memory_format: str
    ms_before: float
    ms_after: float
    spread_before: tuple
    spread_after: tuple
    configurations_ms: dict
    max_abs_diff: float
    max_rel_diff: float
    layers: list = field(default_factory=list)
    folded_batchnorm: list = field(default_factory=list)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [layer.as_dict() if isinstance(layer, LayerLatency) else layer for layer in self.layers]
        return out


def format_deploy_report(report: DeployReport) -> str:
    """A plain-text table of a :class:`DeployReport` (one row per layer and a total line)."""
    head = f"{'layer':24s} {'kind':14s} {'params':>8s} {'MMACs':>9s} {'form':>16s} {'ms before':>10s} {'ms after':>9s}"
    lines = [head, "-" * len(head)]
    for r in report.layers:
        lines.append(
            f"{r.name:24s} {r.kind:14s} {r.params:8d} {r.macs_after / 1e6:9.1f} "
            f"{r.form_before + '->' + r.form_after:>16s} {r.ms_before:10.2f} {r.ms_after:9.2f}"
        )
    lines.append(
        f"whole model ({report.threads} thread(s), input {tuple(report.input_shape)}, {report.memory_format}): "
        f"{report.ms_before:.2f} ms -> {report.ms_after:.2f} ms ({report.ms_before / max(report.ms_after, 1e-12):.2f}x), "
        f"max |diff| {report.max_abs_diff:.2e} (relative {report.max_rel_diff:.2e})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@contextmanager
def _threads(n: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def time_interleaved(
    calls: dict[str, Any], repeats: int, warmup: int = 1, min_sample_ms: float = 2.0
) -> dict[str, list[float]]:
    """Milliseconds per call of each zero-argument callable, sampled round-robin ``repeats`` times.

    Interleaving spreads slow phases of a shared machine over every candidate instead of
    penalizing whichever happened to run during them.  A call faster than ``min_sample_ms``
    (a small layer at batch 1 takes tens of microseconds, the scale of timer and scheduler
    noise) is repeated within each sample until the sample lasts about that long, as
    :mod:`timeit` does, and the sample is the mean per call.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    loops = {}
    for key, fn in calls.items():
        start = time.perf_counter()
        fn()
        once_ms = (time.perf_counter() - start) * 1e3
        loops[key] = max(1, min(1000, math.ceil(min_sample_ms / max(once_ms, 1e-6))))
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            for _ in range(loops[key]):
                fn()
            times[key].append((time.perf_counter() - start) * 1e3 / loops[key])
    return times


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _spread(values: list[float]) -> tuple:
    ordered = sorted(values)
    # Inter-quartile range by nearest rank: robust to the odd preempted run.
    return (ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4])


# --------------------------------------------------------------------------------------------
# Cost accounting
# --------------------------------------------------------------------------------------------


def _out_hw(module: nn.Module, h: int, w: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    left, right, top, bottom = module._explicit_pad if module._use_explicit_pad else (
        module._native_pad[1], module._native_pad[1], module._native_pad[0], module._native_pad[0]
    )
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1


def layer_macs(module: nn.Module, input_shape: Iterable[int], form: str) -> int:
    """Multiply-accumulates of one call of a factorized module in ``form`` on ``input_shape``."""
    shape = tuple(input_shape)
    if isinstance(module, LowRankLinear):
        rows = math.prod(shape[:-1])
        if form == "dense":
            return rows * module.in_features * module.out_features
        return rows * module.rank * (module.in_features + module.out_features)
    n, s, h, w = shape
    ho, wo = _out_hw(module, h, w)
    kh, kw = module.kernel_size
    t = module.out_channels
    out = n * ho * wo
    if form == "dense":
        return out * t * s * kh * kw
    if isinstance(module, Tucker2Conv2d):
        r_out, r_in = module.ranks
        if form == "merged":
            return n * h * w * s * r_in + out * r_in * t * kh * kw
        return n * h * w * s * r_in + out * (r_in * r_out * kh * kw + r_out * t)
    if isinstance(module, CPConv2d):
        r = module.rank
        spatial = kh * kw if form == "merged" else kh + kw
        return n * h * w * s * r + out * r * (spatial + t)
    if isinstance(module, LowRankConv2d):
        return out * module.rank * (s * kh * kw + t)
    raise TypeError(f"Not a factorized layer: {type(module).__name__}.")


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def _check_args(model, example_input, threads, candidates, memory_formats, repeats):
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"`example_input` must be a torch.Tensor; got {type(example_input).__name__}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`threads` must be a positive int or None; got {threads!r}.")
    candidates = tuple(candidates)
    unknown = [c for c in candidates if c not in FORMS]
    if unknown or "chain" not in candidates:
        raise ValueError(f"`candidates` must be forms among {FORMS} including 'chain'; got {candidates!r}.")
    if isinstance(memory_formats, str):
        memory_formats = (memory_formats,)
    memory_formats = tuple(memory_formats)
    bad = [m for m in memory_formats if m not in MEMORY_FORMATS]
    if bad or not memory_formats:
        raise ValueError(f"`memory_formats` must be names among {tuple(MEMORY_FORMATS)}; got {memory_formats!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int; got {repeats!r}.")
    return candidates, memory_formats


def _factorized(model: nn.Module) -> dict[str, _FormMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _FormMixin)}


@torch.no_grad()
def _capture_inputs(model: nn.Module, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0].clone(memory_format=torch.preserve_format)))
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _to_format(model: nn.Module, memory_format: str) -> nn.Module:
    # nn.Module.to(memory_format=...) converts the 4-D parameters and buffers (incl. the
    # form caches); activations follow the weights' layout through oneDNN convolutions.
    return model.to(memory_format=MEMORY_FORMATS[memory_format])


def _choose_forms(model, x, candidates, repeats, max_macs_ratio, memory_format) -> dict[str, tuple[str, dict[str, list[float]]]]:
    """Per factorized layer of ``model``: the fastest form on its captured input, and all timings."""
    layers = _factorized(model)
    inputs = _capture_inputs(model, x, layers)
    chosen = {}
    for name, module in layers.items():
        variants = {}
        forms = [form for form in candidates if form in module.forms]
        macs = {form: layer_macs(module, inputs[name].shape, form) for form in forms}
        cheapest = min(macs.values())
        for form in forms:
            # Cost-model pruning: a form with many times the arithmetic of the cheapest one
            # cannot win on overhead alone, and timing it would dominate the pass's run time.
            # Small layers (batch 1, tiny images) are overhead-bound: always time every form.
            if form == "chain" or macs[form] <= max_macs_ratio * cheapest or macs[form] < _PRUNE_MIN_MACS:
                variants[form] = _apply(copy.deepcopy(module).eval(), {"": form}, memory_format)
        xin = inputs[name]
        times = time_interleaved({form: (lambda v=v: v(xin)) for form, v in variants.items()}, repeats)
        best = min(times, key=lambda form: _median(times[form]))
        chosen[name] = (best, times)
    return chosen


def _apply(model: nn.Module, forms: dict[str, str], memory_format: str | None) -> nn.Module:
    layers = _factorized(model)
    for name, form in forms.items():
        layers[name].set_form(form)
    if memory_format is not None:
        # After set_form: the conversion also reaches the form's cached kernel (a buffer),
        # whose layout set_form cannot always infer (1x1 and depthwise factors are both
        # contiguous and channels-last); a mismatched kernel is reordered at every call.
        _to_format(model, memory_format)
    return model


def _layout_of(model: nn.Module) -> str:
    for p in model.parameters():
        channels_last, contiguous = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
        # 1x1 kernels are both at once: they say nothing about the layout.
        if p.dim() == 4 and channels_last != contiguous:
            return "channels_last" if channels_last else "contiguous"
    return "contiguous"


def optimize_for_inference(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    threads: int | None = None,
    candidates: Iterable[str] = FORMS,
    memory_formats: Iterable[str] = ("contiguous", "channels_last"),
    repeats: int = 7,
    max_macs_ratio: float = 4.0,
    fold_bn: bool = True,
    inplace: bool = False,
    return_report: bool = False,
):
    """Pick, by measurement, the fastest equivalent form of every factorized layer.

    For each memory layout in ``memory_formats``, every factorized layer
    (:class:`~tensorly_dataaware.torch.Tucker2Conv2d`, :class:`~tensorly_dataaware.torch.CPConv2d`,
    :class:`~tensorly_dataaware.torch.LowRankConv2d`, :class:`~tensorly_dataaware.torch.LowRankLinear`)
    is timed in each of its forms among ``candidates`` on its actual input (captured from
    ``model(example_input)``) and the fastest is kept; then the whole model is timed in each
    resulting configuration, with every factorized layer dense (what the uncompressed model
    computes, at its cost) in each layout, and in its configuration as given, interleaved,
    and the fastest is returned.  The result computes the same function (forms are exact
    rewrites; the difference is floating-point rounding, reported in ``max_abs_diff``).

    Parameters
    ----------
    model : nn.Module
        A model containing factorized layers (e.g. from :func:`~tensorly_dataaware.torch.compress`).
        Deep-copied unless ``inplace=True``. The returned model is in eval mode. It may return
        a tensor or nested tuples, lists and dicts of tensors (e.g. ``(logits, features)``):
        the report's ``max_abs_diff`` and ``max_rel_diff`` are then the largest over them, each
        tensor relative to its own magnitude.
    example_input : torch.Tensor
        A representative input: the choice is specific to its shape (batch size included),
        device and dtype, so optimize with the batch you will deploy with.
    threads : int, optional
        ``torch.set_num_threads`` during the measurements (restored afterwards); default:
        the current setting. Deploy with the same number.
    candidates : iterable of str, default ``('chain', 'merged', 'dense')``
        Forms allowed (must include ``'chain'``); a layer only tries the forms it has.
    memory_formats : iterable of str, default ``('contiguous', 'channels_last')``
        Layouts tried for the whole model. With ``'channels_last'`` chosen, the model's 4-D
        weights are converted; inputs may stay NCHW (the first convolution converts them).
    repeats : int, default 7
        Interleaved timed repeats per alternative (after one warm-up call); medians decide.
    max_macs_ratio : float, default 4.0
        Cost-model pruning: a form whose multiply-accumulates exceed this multiple of the
        layer's cheapest form, and 2e7, is not timed (``float('inf')`` times every form).
    fold_bn : bool, default True
        Fold every eval-mode ``BatchNorm2d`` into the convolution (or factorized layer) that
        alone feeds it before timing (:func:`~tensorly_dataaware.torch.fold.fold_batchnorm`):
        one pass over the activations fewer per pair, the same function.  On the embedded
        ResNet-20 (batch 256, one thread) the BatchNorms were about 20% of the original
        model's time.  A model that ``torch.fx`` cannot trace is not folded (a warning says
        why).  The folded BatchNorms become ``nn.Identity`` (listed in the report's
        ``folded_batchnorm``), so save the model *before* optimizing it.
    inplace : bool, default False
        Modify ``model`` itself.
    return_report : bool, default False
        Also return a :class:`DeployReport` (per-layer params, MACs, latency before/after).

    Returns
    -------
    nn.Module or (nn.Module, DeployReport)

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong type or value (named in the message), or a model whose
        output is not a tensor or tuples, lists and dicts of tensors (found on the first
        forward pass, before any timing).

    Notes
    -----
    Forms and layout are not part of the ``state_dict``: ``save_compressed`` records the
    forms in the spec (key ``'form'``); re-apply ``model.to(memory_format=torch.channels_last)``
    after loading if the report's ``memory_format`` says so.  A model with folded BatchNorms
    no longer loads into its original architecture: save before, optimize after loading.
    A model without factorized layers (e.g. the uncompressed original) is accepted: only the
    BatchNorm folding and the layout are then chosen, which makes it the fair baseline.
    """
    candidates, memory_formats = _check_args(model, example_input, threads, candidates, memory_formats, repeats)
    if isinstance(max_macs_ratio, bool) or not isinstance(max_macs_ratio, (int, float)) or not max_macs_ratio >= 1:
        raise ValueError(f"`max_macs_ratio` must be a number >= 1; got {max_macs_ratio!r}.")
    if not isinstance(fold_bn, bool):
        raise TypeError(f"`fold_bn` must be a bool; got {type(fold_bn).__name__}.")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    with _threads(threads) as n_threads, torch.no_grad():
        reference = copy.deepcopy(target)
        # Checked now, not when the result is compared after every timing run: an output
        # that cannot be compared fails in one forward pass.
        expected = _output_leaves(reference(example_input))
        layers_before = _factorized(reference)
        forms_before = {name: m.form for name, m in layers_before.items()}
        layout_before = _layout_of(reference)
        folded, pairs = reference, []
        if fold_bn:
            try:
                folded, pairs = fold_batchnorm(reference, return_pairs=True)
            except ValueError as exc:
                warnings.warn(f"optimize_for_inference: BatchNorm not folded. {exc}", RuntimeWarning, stacklevel=2)

        # Per-layer choice in each layout, on that layout's own activations.  Configurations
        # map a name to (model, forms, layout); the model as given is one of them.
        configurations: dict[str, tuple] = {"as given": (reference, forms_before, layout_before)}
        choices: dict[str, dict] = {}
        for memory_format in memory_formats:
            trial = _to_format(copy.deepcopy(folded), memory_format)
            for name, module in _factorized(trial).items():
                module.set_form("chain")
            if memory_format != "contiguous":
                # Code written for contiguous activations can fail in another layout (e.g.
                # `x.view(n, -1)` after a convolution under channels_last): skip that layout.
                try:
                    with torch.no_grad():
                        trial(example_input)
                except RuntimeError as exc:
                    warnings.warn(
                        f"optimize_for_inference: the {memory_format} layout is skipped: the model fails in it "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
            choice = _choose_forms(trial, example_input, candidates, repeats, max_macs_ratio, memory_format)
            choices[memory_format] = choice
            forms = {n: c[0] for n, c in choice.items()}
            configurations[memory_format] = (_apply(trial, forms, memory_format), forms, memory_format)
            # Every layer dense computes what the (folded) uncompressed model computes, at its
            # cost: timed as a whole too, so that layer choices that win alone but lose
            # together (cache effects, timing noise) cannot make the result slower than it.
            dense = {n: "dense" for n, m in _factorized(trial).items() if "dense" in m.forms and "dense" in candidates}
            if dense and dense != forms:
                configurations[f"{memory_format}, all dense"] = (
                    _apply(copy.deepcopy(trial), dense, memory_format), dense, memory_format
                )

        whole = time_interleaved(
            {key: (lambda m=c[0]: m(example_input)) for key, c in configurations.items()}, repeats
        )
        best = min(whole, key=lambda key: _median(whole[key]))
        _, forms_after, layout_after = configurations[best]
        if best == "as given":
            pairs = []
        elif pairs:
            # The pairs of `target` itself: a deep copy (`reference`) no longer shares memory
            # between distinct Parameters, so the two can differ when `target` has tied tensors.
            pairs = fold_batchnorm(target, inplace=True, return_pairs=True)[1]
        _apply(target, forms_after, layout_after)
        got = _output_leaves(target(example_input))
        # Tensor by tensor, each relative to its own magnitude (logits and features of a
        # (logits, features) output may differ in scale by orders of magnitude).
        diffs = [_max_abs_diff(g, e) for (_, g), (_, e) in zip(got, expected)]
        abs_diff = max(diff for diff, _ in diffs)
        rel_diff = max(diff / max(scale, 1e-30) for diff, scale in diffs)

        report = None
        if return_report:
            inputs_before = _capture_inputs(reference, example_input, layers_before)
            inputs_after = _capture_inputs(target, example_input, layers_before)
            rows = []
            for name, module in _factorized(target).items():
                before = layers_before[name]
                times = time_interleaved(
                    {"before": lambda b=before, x=inputs_before[name]: b(x), "after": lambda a=module, x=inputs_after[name]: a(x)},
                    repeats,
                )
                timing = choices.get(best, {}).get(name, (None, {}))[1]
                rows.append(LayerLatency(
                    name=name,
                    kind=type(module).__name__,
                    input_shape=tuple(inputs_after[name].shape),
                    params=sum(p.numel() for p in module.parameters()),
                    cached_elements=module._form_weight.numel(),
                    macs_before=layer_macs(module, inputs_before[name].shape, forms_before[name]),
                    macs_after=layer_macs(module, inputs_after[name].shape, module.form),
                    form_before=forms_before[name],
                    form_after=module.form,
                    ms_before=_median(times["before"]),
                    ms_after=_median(times["after"]),
                    spread_after=_spread(times["after"]),
                    candidates_ms={form: _median(t) for form, t in timing.items()},
                ))
            report = DeployReport(
                threads=n_threads,
                input_shape=tuple(example_input.shape),
                memory_format=layout_after,
                ms_before=_median(whole["as given"]),
                ms_after=_median(whole[best]),
                spread_before=_spread(whole["as given"]),
                spread_after=_spread(whole[best]),
                configurations_ms={key: _median(t) for key, t in whole.items()},
                max_abs_diff=abs_diff,
                max_rel_diff=rel_diff,
                layers=rows,
                folded_batchnorm=[list(pair) for pair in pairs],
            )
    if return_report:
        return target, report
    return target
