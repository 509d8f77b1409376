"""Walk a model, decompose the selected layers, swap in their factorized forms.

The mathematics lives in :mod:`tensorly_dataaware.decomposition` and
:mod:`tensorly_dataaware.norms`; this module only moves weights between PyTorch modules and
the TensorLy solvers (run on the ``pytorch`` backend, so on the layer's device).
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import tensorly as tl
import torch
from torch import nn
from tqdm.auto import tqdm

from .._validation import PSD_TOL, _shifted_cholesky_succeeds, validate_cp_rank, validate_tucker2_rank
from ..decomposition import parafac_sigma, tucker2_sigma
from ..norms import relative_sigma_error, whitened_svd
from . import ranks as rk
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d
from .statistics import LayerStatistics, _hyper_parameters, _plain, check_eager_model, float32_error_bound

__all__ = ["compress", "plan_compression", "decompose_layer", "LayerJob", "LayerReport", "format_report"]

METHODS = ("tucker2", "cp", "svd")
NORMS = ("sigma", "frobenius")
_FACTORIZED = (Tucker2Conv2d, CPConv2d, LowRankConv2d, LowRankLinear)


@dataclass
class LayerReport:
    """One row of the compression report."""

    name: str
    kind: str
    shape: tuple
    method: str
    norm: str
    rank: Any
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    sigma_error: float
    seconds: float
    sweeps: int = 0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def format_report(report: Iterable[LayerReport]) -> str:
    """A plain-text table of a compression report, with a total line.

    Parameters
    ----------
    report : iterable of LayerReport

    Returns
    -------
    str
    """
    rows = list(report)
    header = f"{'layer':<24} {'shape':<18} {'method':<8} {'norm':<9} {'rank':<12} {'params':>17} {'MACs/pos':>17} {'sigma-err':>9} {'time':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<24} {'x'.join(map(str, r.shape)):<18} {r.method:<8} {r.norm:<9} {str(r.rank):<12} "
            f"{r.params_before:>8}->{r.params_after:<8} {r.macs_before:>8}->{r.macs_after:<8} "
            f"{r.sigma_error:>9.4f} {r.seconds:>6.2f}s"
        )
    if rows:
        before = sum(r.params_before for r in rows)
        after = sum(r.params_after for r in rows)
        lines.append("-" * len(header))
        lines.append(f"{'total':<24} {'':<18} {'':<8} {'':<9} {'':<12} {before:>8}->{after:<8} ({after / before:.1%} kept)")
    return "\n".join(lines)


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _resolve_layers(model: nn.Module, stats: Mapping[str, LayerStatistics], layers, skipped=None) -> list[str]:
    modules = dict(model.named_modules())
    if layers is None:
        names = []
        for name in stats:
            module = modules.get(name)
            if module is None:
                raise ValueError(f"Statistics name {name!r} is not a module of the model.")
            reason = _unsupported_reason(module)
            if reason:
                warnings.warn(f"Skipping layer {name!r} (kept dense): {reason}", stacklevel=3)
                if skipped is not None:
                    skipped.append((name, reason))
                continue
            names.append(name)
        return names
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    if not names:
        raise ValueError("`layers` is empty: name at least one layer, or leave it None for all layers with statistics.")
    for name in names:
        if name not in modules:
            raise ValueError(f"{name!r} is not a module of the model; modules with statistics: {sorted(stats)}.")
        if name not in stats:
            raise ValueError(f"No statistics for layer {name!r}; collect them first (collect_covariances).")
        reason = _unsupported_reason(modules[name])
        if reason:
            raise ValueError(f"Cannot compress layer {name!r}: {reason}")
    if len(set(names)) != len(names):
        # As compress_sequential does: a repeated name was decomposed and reported twice, and
        # counted twice against a `budget`.
        raise ValueError(f"`layers` names a layer twice: {names}.")
    return names


def dense_report_row(name: str, module: nn.Module, reason: str) -> LayerReport:
    """The report row of a layer left dense (e.g. a grouped convolution), with the reason."""
    shape = tuple(module.weight.shape)
    params = rk.dense_params(shape)
    return LayerReport(
        name=name, kind=type(module).__name__, shape=shape, method="dense", norm="-", rank=None,
        params_before=params, params_after=params, macs_before=params, macs_after=params,
        sigma_error=0.0, seconds=0.0, notes=[f"kept dense: {reason}"],
    )


def _overridden(module: nn.Module, base: type, methods: tuple[str, ...]) -> str | None:
    """The first of ``methods`` that ``module``'s class defines differently from ``base``."""
    for method in methods:
        if getattr(type(module), method, None) is not getattr(base, method, None):
            return method
    return None


def is_plain_conv2d(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` (or a subclass) that computes what ``nn.Conv2d`` computes.

    Subclasses that only add attributes or change the initialization qualify, and so do
    parametrized layers (``torch.nn.utils.parametrize``, e.g. weight normalization: their
    ``weight`` is the effective weight); subclasses that override ``forward`` or
    ``_conv_forward`` (a weight standardization, quantization-aware training, dynamic
    padding) do not.
    """
    return isinstance(module, nn.Conv2d) and _overridden(module, nn.Conv2d, ("forward", "_conv_forward")) is None


def _unsupported_reason(module: nn.Module) -> str | None:
    # A subclass that computes something else than W x + b (a LoRA update, a weight
    # standardization) would be replaced by a factorization of its raw weight: its own
    # computation silently lost (a LoRA-style Linear subclass at 90% kept: 72% output error).
    if isinstance(module, nn.Linear):
        if _overridden(module, nn.Linear, ("forward",)):
            return (f"{type(module).__name__} overrides nn.Linear.forward: its output need not be W x + b, "
                    "which is what the factorized layer computes.")
        return None
    if isinstance(module, nn.Conv2d):
        method = _overridden(module, nn.Conv2d, ("forward", "_conv_forward"))
        if method:
            return (f"{type(module).__name__} overrides nn.Conv2d.{method}: its output need not be the "
                    "convolution with its weight, which is what the factorized layer computes.")
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported."
        if module.transposed:
            return "transposed convolutions are not supported."
        return None
    return f"{type(module).__name__} layers are not supported (only nn.Conv2d and nn.Linear)."


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name``, under every name it is registered.

    A module registered twice (``self.stem = conv; self.layers = nn.ModuleList([conv, ...])``)
    is one layer: ``named_modules()`` lists it once, and replacing that name alone left the
    forward pass running the old module through the other one.
    """
    old = model.get_submodule(name)
    hooks = [kind for kind, table in (("forward pre-hooks", old._forward_pre_hooks), ("forward hooks", old._forward_hooks),
                                      ("backward hooks", old._backward_hooks), ("backward pre-hooks", old._backward_pre_hooks))
             if table]
    if hooks and new is not old:
        # The statistics were collected with their effect, but a hook belongs to the module
        # object it was registered on: the factorized module does not run it.
        warnings.warn(
            f"Layer {name!r} has {' and '.join(hooks)}; the {type(new).__name__} that replaces it does not carry "
            "them over: register them again on the new module if they are needed.",
            RuntimeWarning,
            stacklevel=3,
        )
    aliases = [alias for alias, module in model.named_modules(remove_duplicate=False) if module is old]
    for alias in aliases or [name]:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def _layer_method(module: nn.Module, method: str) -> str:
    # Linear layers and 1x1 convolutions have no spatial mode to factorize: their exact
    # optimum in the same norm is the (whitened) truncated SVD.
    if isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1):
        return "svd"
    return method


def _check_rank_value(name, method, shape, rank):
    """Validate an explicit rank for one layer before any decomposition runs."""
    where = f"ranks[{name!r}]"
    if isinstance(rank, bool) or isinstance(rank, float) or not isinstance(rank, (numbers.Integral, tuple, list)):
        raise TypeError(
            f"{where} must be an int{' or a pair (R_out, R_in)' if method == 'tucker2' else ''}; got {rank!r}."
        )
    try:
        if method == "tucker2":
            return validate_tucker2_rank(shape, rank)
        if isinstance(rank, (tuple, list)):
            if method == "cp":
                raise TypeError(f"a CP rank is one int, not a pair; got {rank!r}.")
            # Linear layers and 1x1 convolutions (SVD) accept a Tucker-style pair: the
            # smaller entry is the matrix rank.
            if len(rank) != 2:
                raise ValueError(f"expected an int or a pair, got {rank!r}.")
            rank = min(_as_positive_int(r, where) for r in rank)
        rank = _as_positive_int(rank, where)
        if method == "cp":
            return validate_cp_rank(shape, rank)
        limit = min(shape[0], rk.dense_params(shape) // shape[0])
        if rank > limit:
            raise ValueError(f"the matrix rank must be in [1, {limit}] for a weight of shape {tuple(shape)}; got {rank}.")
        return rank
    except (TypeError, ValueError) as exc:
        text = str(exc)
        raise type(exc)(text if text.startswith(where) else f"{where} (layer shape {tuple(shape)}, method {method!r}): {text}") from None


def _as_positive_int(value, where):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must hold ints; got {value!r}.")
    if value < 1:
        raise ValueError(f"{where} must be >= 1; got {value}.")
    return int(value)


def _resolve_rank(name, module, method, ranks, ratio, energy, weight, sigma):
    shape = tuple(weight.shape)
    if ranks is not None and name in ranks:
        return _check_rank_value(name, method, shape, ranks[name])
    if ratio is not None:
        return rk.ranks_for_ratio(method, shape, ratio)
    if energy is not None:
        return rk.ranks_for_energy(method, weight, sigma, energy)
    raise ValueError(f"No rank for layer {name!r}: give `ranks` for it, `ratio`, `energy` or `budget`.")


def check_flags(**flags: Any) -> None:
    """Refuse a value other than True / False for a yes/no option (pass an option that may
    also be ``None`` only when it is not ``None``).

    Why: ``inplace="no"`` is truthy, and modified the user's model.
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False; got {value!r}.")


def check_rank_options(ranks, ratio, energy, budget) -> None:
    """Validate the rank arguments shared by :func:`compress` and :func:`compress_sequential`.

    Raises
    ------
    TypeError, ValueError
        With a message naming the argument.
    """
    given = [x is not None for x in (ratio, energy, budget)]
    if sum(given) > 1:
        raise ValueError("Give at most one of `ratio`, `energy` and `budget`.")
    if ranks is None and not any(given):
        raise ValueError("Give `ranks`, `ratio`, `energy` or `budget` to choose the ranks.")
    for value, label in ((ratio, "ratio"), (energy, "energy"), (budget, "budget")):
        if value is not None:
            rk.check_fraction(value, label)
    if ranks is not None:
        if not isinstance(ranks, Mapping):
            raise TypeError(f"`ranks` must be a mapping layer name -> rank, got {type(ranks).__name__}.")
        for key in ranks:
            if not isinstance(key, str):
                raise TypeError(f"`ranks` keys must be layer names (str), got {key!r}.")


def check_unknown_ranks(ranks, names) -> None:
    """Refuse ``ranks`` entries for layers that are not compressed (typos)."""
    if ranks is None:
        return
    unknown = sorted(set(ranks) - set(names))
    if unknown:
        raise ValueError(
            f"`ranks` names layers that are not compressed: {unknown}; compressed layers: {list(names)}."
        )


def check_device(device):
    """``torch.device(device)`` with a clear error for invalid or unavailable devices."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`device` {device!r} is not a valid torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r}: CUDA is not available in this torch build/machine (torch {torch.__version__}).")
    if dev.type == "meta":
        # Meta tensors hold no values: the decompositions failed deep inside with
        # "Tensor.item() cannot be called on meta tensors".
        raise ValueError("`device` 'meta' holds no values to decompose: give a device with memory ('cpu', 'cuda').")
    try:
        # Any other backend this build or machine lacks (xpu, mps, a cuda:N beyond the last
        # GPU) fails here, with its reason, instead of inside the first batch.
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = (str(exc).splitlines() or [repr(exc)])[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ValueError(f"`device` {device!r} is not usable here: {reason}") from None
    return dev


_FROBENIUS_OPTIONS = frozenset({"n_iter_max", "tol", "random_state"})
_ADAPTER_OWNED = frozenset({"tensor", "rank", "sigma", "return_errors", "damping"})


def check_solver_options(method: str, norm: str, options: Mapping[str, Any]) -> None:
    """Refuse solver options the chosen method/norm would silently ignore."""
    if not options:
        return
    if norm == "frobenius" or method == "svd":
        # The SVD is exact: iteration options are accepted (so one call can loop over
        # methods) but have no effect; anything else would be silently ignored.
        allowed = set(_FROBENIUS_OPTIONS)
    else:
        solver = tucker2_sigma if method == "tucker2" else parafac_sigma
        allowed = set(inspect.signature(solver).parameters) - _ADAPTER_OWNED
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"Unknown solver option(s) {unknown} for method={method!r}, norm={norm!r}; "
            f"accepted: {sorted(allowed) or 'none'}."
        )


def _decompose(method, norm, weight, sigma, rank, solver_options):
    """Return (factorized tensors, approximation W~, sweeps)."""
    if method == "svd":
        mat = weight.reshape(weight.shape[0], -1)
        eye = torch.eye(mat.shape[1], dtype=mat.dtype, device=mat.device)
        # The same relative ridge as the ALS solvers get, so every method fits the same objective.
        damping = solver_options.get("damping", 0.0) if norm == "sigma" else 0.0
        last, first = whitened_svd(mat, rank, sigma if norm == "sigma" else eye, damping=damping, check_psd=False)
        return (first, last), (last @ first).reshape(weight.shape), 1
    if method == "tucker2":
        if norm == "sigma":
            tucker, errors = tucker2_sigma(weight, rank, sigma, return_errors=True, **solver_options)
            sweeps = len(errors)
        else:
            from tensorly.decomposition import partial_tucker

            (core, factors), errors = partial_tucker(
                weight, rank=list(rank), modes=[0, 1],
                n_iter_max=solver_options.get("n_iter_max", 100), tol=solver_options.get("tol", 1e-8),
            )
            tucker = tl.tucker_tensor.TuckerTensor((core, list(factors) + [torch.eye(d, dtype=weight.dtype, device=weight.device) for d in weight.shape[2:]]))
            sweeps = len(errors)
        core, factors = tucker
        return (core, factors[1], factors[0]), tl.tucker_to_tensor(tucker), sweeps
    if norm == "sigma":
        cp, errors = parafac_sigma(weight, rank, sigma, return_errors=True, **solver_options)
    else:
        from tensorly.decomposition import parafac

        cp, errors = parafac(
            weight, rank, return_errors=True, n_iter_max=solver_options.get("n_iter_max", 100),
            tol=solver_options.get("tol", 1e-8), random_state=solver_options.get("random_state"),
        )
    return (cp.weights, cp.factors), tl.cp_to_tensor(cp), len(errors)


def _zero_decomposition(method, weight, rank):
    """The exact decomposition of an all-zero ``weight``: zero factors, in the layout of
    :func:`_decompose` (whose solvers have nothing to normalize and fail on it)."""
    n_out, n_in, *spatial = weight.shape
    zeros = lambda *shape: weight.new_zeros(shape)  # noqa: E731
    if method == "svd":
        tensors = (zeros(rank, math.prod(weight.shape[1:])), zeros(n_out, rank))
    elif method == "tucker2":
        r_out, r_in = rank
        tensors = (zeros(r_out, r_in, *spatial), zeros(n_in, r_in), zeros(n_out, r_out))
    else:
        tensors = (zeros(rank), [zeros(d, rank) for d in weight.shape])
    return tensors, torch.zeros_like(weight), 0


def _build_module(method, module, tensors, bias):
    if isinstance(module, nn.Linear):
        first, last = tensors
        return LowRankLinear(first, last, bias=bias)
    conv = dict(
        stride=module.stride, padding=module.padding, dilation=module.dilation,
        padding_mode=module.padding_mode, bias=bias,
    )
    if method == "svd":
        first, last = tensors
        return LowRankConv2d(first, last, kernel_size=tuple(module.kernel_size), **conv)
    if method == "tucker2":
        core, first, last = tensors
        return Tucker2Conv2d(core, first, last, **conv)
    weights, factors = tensors
    return CPConv2d(weights, factors, **conv)


@dataclass
class LayerJob:
    """One layer to factorize: everything :func:`decompose_layer` needs, ranks resolved."""

    name: str
    module: nn.Module
    method: str
    weight: torch.Tensor  # float64, on the device where the decomposition runs
    sigma: torch.Tensor  # float64 (n, n)
    mean: torch.Tensor  # float64 (n,), the mean input patch
    rank: Any
    #: Sequential calibration (:func:`compress_sequential`): ``weight`` is then the target
    #: ``W'`` and ``sigma``/``mean`` describe the compressed network's inputs; the optimal
    #: bias needs the original weight and the original inputs' mean as well.
    reference_weight: torch.Tensor | None = None
    reference_mean: torch.Tensor | None = None

    @property
    def cost(self) -> float:
        """Rough flop count of the decomposition, to balance work across processes."""
        n = self.sigma.shape[0]
        r = max(self.rank) if isinstance(self.rank, tuple) else self.rank
        return float(n) * n * (r + self.weight.shape[0])


def plan_compression(
    model: nn.Module,
    stats: Mapping[str, LayerStatistics],
    method: str = "tucker2",
    *,
    ranks: Mapping[str, Any] | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    centered: bool = True,
    layers: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    skipped: list | None = None,
    budget_weights: Mapping[str, torch.Tensor] | None = None,
) -> list[LayerJob]:
    """Select the layers of ``model`` to compress and resolve their ranks (no decomposition).

    The jobs are deterministic for a given model and statistics, so several processes can
    plan the same work and split it.

    Parameters
    ----------
    model, stats, method, ranks, ratio, energy, budget, centered, layers, device
        As in :func:`compress`.
    skipped : list, optional
        Receives ``(name, reason)`` for each layer with statistics that is left dense
        because it is not supported (only when ``layers`` is None).
    budget_weights : mapping of str to torch.Tensor, optional
        With ``budget``: a per-output-channel weight for every selected layer (e.g. its
        diagonal Fisher, see :func:`~tensorly_dataaware.torch.sensitivity.output_fisher`).
        The allocation then minimizes the summed *weighted absolute* output error instead
        of the summed relative error.

    Returns
    -------
    list of LayerJob
    """
    _check_choice(method, "method", METHODS)
    check_rank_options(ranks, ratio, energy, budget)
    device = check_device(device)
    if not isinstance(stats, Mapping):
        raise TypeError("`stats` must be a mapping name -> LayerStatistics (from collect_covariances).")
    for name, value in stats.items():
        if not isinstance(value, LayerStatistics):
            raise TypeError(
                f"`stats[{name!r}]` must be a LayerStatistics (from collect_covariances), got {type(value).__name__}."
            )
    names = _resolve_layers(model, stats, layers, skipped)
    check_unknown_ranks(ranks, names)
    modules = dict(model.named_modules())
    prepared = []
    for name in names:
        module = modules[name]
        st = stats[name]
        if tuple(st.weight_shape) != tuple(module.weight.shape):
            raise ValueError(
                f"Statistics of {name!r} are for a weight of shape {tuple(st.weight_shape)}, "
                f"but the layer has {tuple(module.weight.shape)}."
            )
        if st.groups != 1:
            raise ValueError(f"Statistics of {name!r} have groups={st.groups}; grouped layers cannot be compressed.")
        # Same weight shape is not the same layer: padding, stride or dilation change which
        # patches the weight sees, and statistics of other patches fit it to the wrong data.
        layer_hyper = {k: _plain(v) for k, v in _hyper_parameters(module).items()}
        differ = sorted(k for k in set(st.hyper_parameters) & set(layer_hyper) if st.hyper_parameters[k] != layer_hyper[k])
        if differ:
            raise ValueError(
                f"Statistics of {name!r} were collected on a layer with other settings: "
                + ", ".join(f"{k}={st.hyper_parameters[k]!r} there, {layer_hyper[k]!r} here" for k in differ)
                + ". Collect them on this model."
            )
        dev = device if device is not None else module.weight.device
        weight = module.weight.detach().to(device=dev, dtype=torch.float64)
        sigma = st.sigma(centered).to(dev)
        mean = st.mean[0].to(dev)
        prepared.append((name, module, _layer_method(module, method), weight, sigma, mean))
    if budget is not None:
        fixed = dict(ranks or {})
        if budget_weights is not None:
            missing = [p[0] for p in prepared if p[0] not in budget_weights]
            if missing:
                raise ValueError(f"`budget_weights` has no entry for layers {missing}.")
            for p in prepared:
                if budget_weights[p[0]].shape != (p[3].shape[0],):
                    raise ValueError(
                        f"`budget_weights[{p[0]!r}]` must have shape ({p[3].shape[0]},), one weight per output "
                        f"channel; got {tuple(budget_weights[p[0]].shape)}."
                    )
        # Explicit ranks are kept as given (as with `ratio`), and the budget is what is left
        # for the other layers: the budget used to overwrite them silently.
        total = sum(rk.dense_params(tuple(p[3].shape)) for p in prepared)
        spent = sum(
            rk.factorized_params(p[2], tuple(p[3].shape), _check_rank_value(p[0], p[2], tuple(p[3].shape), fixed[p[0]]))
            for p in prepared if p[0] in fixed
        )
        free = [p[:5] for p in prepared if p[0] not in fixed]
        available = int(budget * total) - spent
        if free and available > 0 and spent:
            smallest = sum(rk.factorized_params(p[2], tuple(p[3].shape), rk.min_rank(p[2])) for p in free)
            if smallest > available:
                raise ValueError(
                    f"The explicit `ranks` use {spent} of the `budget`'s {int(budget * total)} parameters: the "
                    f"{available} left are below the smallest factorization of {[p[0] for p in free]} ({smallest} "
                    "weights). Give a larger `budget` or smaller explicit ranks."
                )
        if free and available <= 0 and not spent:
            raise ValueError(
                f"The parameter budget {int(budget * total)} (`budget`={budget} of the selected layers' {total} "
                "weights) is below the smallest factorization: give a larger `budget`."
            )
        if free and available <= 0:
            raise ValueError(
                f"The explicit `ranks` use {spent} parameters, all of the `budget` ({int(budget * total)} of the "
                f"selected layers' {total}): nothing is left for {[p[0] for p in free]}."
            )
        ranks = {**fixed, **(_budget_ranks(free, budget, budget_weights, available=available) if free else {})}
    return [
        LayerJob(name, module, layer_method, weight, sigma, mean,
                 _resolve_rank(name, module, layer_method, ranks, ratio, energy, weight, sigma))
        for name, module, layer_method, weight, sigma, mean in prepared
    ]


def _round_off_psd(name: str, sigma: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """``sigma`` made positive semi-definite where round-off left it slightly indefinite.

    The statistics are sums of outer products, PSD in exact arithmetic, but with the default
    precision each batch's products are formed in float32. When the inputs of a layer are
    exactly linearly dependent (patches that repeat pixels, e.g. circular padding on small
    maps, or the low-rank outputs of an already compressed layer), the covariance is
    singular and round-off puts some of its zero eigenvalues slightly below zero: measured
    ``-1.5e-7`` against ``+-2e-20`` with float64 products, for a 5x5 convolution with
    circular padding on 10x9 maps (mean variance ``3.5e-3``). The solvers' PSD test
    (``-1e-6 * mean(diag)``) rejects that. So here, when that same test fails, the negative
    eigenvalues are set to zero (the nearest PSD matrix in the Frobenius norm), provided
    they are within the round-off bound of float32 products, ``gamma * trace(E[x x^T])``
    (:func:`~tensorly_dataaware.torch.statistics.float32_error_bound`, a bound on every
    entry's error summed over the diagonal); beyond it the statistics are not sums of outer
    products at all and a clear error is raised.

    Returns
    -------
    (sigma, note)
        ``note`` is None when ``sigma`` passed unchanged, else a line for the layer's report.
    """
    diag = sigma.diagonal()
    shift = PSD_TOL * max(float(diag.mean()), 0.0)
    if float(diag.min()) >= -shift and _shifted_cholesky_succeeds(sigma, shift):
        return sigma, None
    values, vectors = torch.linalg.eigh((sigma + sigma.T).to(torch.float64) / 2)
    mean = mean.to(torch.float64)
    bound = float32_error_bound() * (float(diag.sum()) + float(mean @ mean))
    lowest = float(values[0])
    if lowest < -bound:
        raise ValueError(
            f"The input statistics of layer {name!r} are not positive semi-definite: their lowest "
            f"eigenvalue is {lowest:.3g}, beyond the round-off bound {-bound:.3g} of sums of float32 "
            "outer products. Statistics from collect_covariances / LayerStatistics are always PSD up to "
            "round-off: were they edited or loaded from a corrupted file?"
        )
    if lowest >= 0.0:  # PSD and singular (e.g. all zero): the test's shift was zero
        return sigma, None
    clipped = (vectors * values.clamp(min=0.0)) @ vectors.T
    note = f"sigma made PSD: eigenvalues down to {lowest:.2g} (float32 round-off) set to 0"
    return clipped.to(sigma.dtype), note


def decompose_layer(
    job: LayerJob,
    *,
    norm: str = "sigma",
    bias_correction: bool = True,
    damping: float = 1e-6,
    **solver_options,
) -> tuple[nn.Module, LayerReport]:
    """Factorize one planned layer.

    Parameters
    ----------
    job : LayerJob
        From :func:`plan_compression`.
    norm, bias_correction, damping, **solver_options
        As in :func:`compress`.

    Returns
    -------
    (nn.Module, LayerReport)
        The factorized module (on the layer's device and dtype) and its report row.

    Notes
    -----
    With ``norm='sigma'`` (and unless ``check_psd=False`` is passed), ``job.sigma`` is
    tested for positive semi-definiteness here: negative eigenvalues within the round-off of
    float32-accumulated statistics are set to zero, larger ones raise ``ValueError``. A layer
    whose weight has zero sigma-norm (its inputs never excite it) is fitted in the Frobenius
    norm. Both are noted in the report row (see ``docs/math.rst``, "Singular covariances").
    """
    _check_choice(norm, "norm", NORMS)
    start = time.perf_counter()
    module, weight, sigma = job.module, job.weight, job.sigma
    options = {"damping": damping, **solver_options} if norm == "sigma" else solver_options
    notes = []
    fit_norm = norm
    if not bool(torch.any(weight != 0)):
        # A pruned (all-zero) layer, or a sequential target that is zero: exact as zeros.
        fit_norm = "zero"
        notes.append("zero weight: factors set to zero")
    elif norm == "sigma":
        if not (bool(torch.isfinite(sigma).all()) and bool(torch.isfinite(job.mean).all())):
            # Checked first: NaN fails every comparison below, which would take it for a zero
            # sigma-norm and fit in the Frobenius norm without a word.
            raise ValueError(
                f"The input statistics of layer {job.name!r} contain NaN or Inf values: were they edited, or "
                "computed from non-finite inputs?"
            )
        if options.get("check_psd", True):
            # The PSD test is done here, with the round-off of the statistics in mind; the
            # solvers need not repeat it.
            sigma, note = _round_off_psd(job.name, sigma, job.mean)
            if job.method != "svd":
                options = {**options, "check_psd": False}
            if note is not None:
                notes.append(note)
        if not float(torch.sum((weight.reshape(weight.shape[0], -1) @ sigma) * weight.reshape(weight.shape[0], -1))) > 0:
            # The inputs never excite the weight (e.g. they are constant on the calibration
            # data): every W~ fits them equally well. Fit in the Frobenius norm, which is
            # what the damping does in the directions the data never excites.
            fit_norm = "frobenius"
            options = {k: v for k, v in options.items() if k not in ("damping", "check_psd")}
            notes.append("zero sigma-norm (inputs do not excite the weight): fitted in the Frobenius norm")
    with tl.backend_context("pytorch"):
        if fit_norm == "zero":
            tensors, approx, sweeps = _zero_decomposition(job.method, weight, job.rank)
        else:
            tensors, approx, sweeps = _decompose(job.method, fit_norm, weight, sigma, job.rank, options)
        err = relative_sigma_error(weight, approx, sigma, check_psd=False) if fit_norm == norm else 0.0
    bias = module.bias.detach().to(weight) if module.bias is not None else None
    if bias_correction:
        # The output error's best constant for this W~: b + W_ref E[x_ref] - W~ E[x]. In the
        # one-shot fit the reference is the layer itself and it is b + (W - W~) E[x].
        approx_mat = approx.reshape(weight.shape[0], -1)
        ref_weight = job.reference_weight if job.reference_weight is not None else weight
        ref_mean = job.reference_mean if job.reference_mean is not None else job.mean
        delta = ref_weight.reshape(weight.shape[0], -1).to(weight) @ ref_mean.to(weight) - approx_mat @ job.mean.to(weight)
        bias = (bias if bias is not None else torch.zeros_like(delta)) + delta
        notes.append("bias corrected")
    dtype, dev = module.weight.dtype, module.weight.device
    new = _build_module(
        job.method, module, _cast_tensors(tensors, dtype, dev), None if bias is None else bias.to(dtype=dtype, device=dev)
    )
    new.train(module.training)
    if not module.weight.requires_grad:
        new.requires_grad_(False)  # a frozen layer gives frozen factors (new Parameters are trainable)
    row = LayerReport(
        name=job.name,
        kind=type(module).__name__,
        shape=tuple(weight.shape),
        method=job.method,
        norm=norm,
        rank=job.rank,
        params_before=rk.dense_params(weight.shape),
        params_after=rk.factorized_params(job.method, weight.shape, job.rank),
        macs_before=rk.macs_per_position(job.method, weight.shape),
        macs_after=rk.macs_per_position(job.method, weight.shape, job.rank, getattr(module, "stride", (1, 1))),
        sigma_error=err,
        seconds=time.perf_counter() - start,
        sweeps=sweeps,
        notes=notes,
    )
    return new, row


def compress(
    model: nn.Module,
    stats: Mapping[str, LayerStatistics],
    method: str = "tucker2",
    *,
    ranks: Mapping[str, Any] | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    norm: str = "sigma",
    centered: bool = True,
    bias_correction: bool | None = None,
    layers: Iterable[str] | None = None,
    inplace: bool = False,
    damping: float = 1e-6,
    device: str | torch.device | None = None,
    progress: bool = True,
    return_report: bool = False,
    **solver_options,
):
    """Replace conv and linear layers by factorized modules fitted to the data.

    Parameters
    ----------
    model : nn.Module
        The trained network. It is deep-copied unless ``inplace=True``.
    stats : mapping name -> LayerStatistics
        Input statistics of the layers (from :func:`collect_covariances`).
    method : {'tucker2', 'cp', 'svd'}, default is 'tucker2'
        Factorization of ``k x k`` convolutions. Linear layers and ``1 x 1`` convolutions
        always use the (whitened) truncated SVD, the exact optimum of the same norm.
    ranks : mapping name -> rank, optional
        Explicit ranks: an int for CP and SVD, a pair ``(R_out, R_in)`` (or an int for
        both) for Tucker-2. Layers not listed fall back to ``ratio``/``energy``.
    ratio : float in (0, 1], optional
        Fraction of each layer's weights kept (see :func:`~tensorly_dataaware.torch.ranks_for_ratio`).
    energy : float in (0, 1], optional
        Keep this fraction of each layer's whitened output energy
        (:func:`~tensorly_dataaware.torch.ranks_for_energy`).
    budget : float in (0, 1], optional
        Whole-model mode: keep this fraction of the selected layers' total weights, spent
        where the whitened spectra say it lowers the sigma-error most
        (:func:`~tensorly_dataaware.torch.allocate_budget`: greedy, so close to but not
        always the best allocation of its estimate, and a larger budget can give a layer a
        smaller rank; any budget the estimate cannot use is spread over the layers as
        evenly as their ranks allow). Layers listed in ``ranks`` keep
        those ranks and their parameters count against the budget; the rest is allocated
        over the other layers.
    norm : {'sigma', 'frobenius'}, default is 'sigma'
        Data-aware decomposition, or the classical Frobenius one (TensorLy's
        ``partial_tucker`` / ``parafac`` / plain SVD) as a baseline.
    centered : bool, default is True
        Weight with the covariance (True) or with the uncentred second moment (False).
    bias_correction : bool, optional
        Add ``(W - W~) E[x]`` to the bias, which makes the centred objective exactly the
        layer's mean squared output error. Default: True for ``norm='sigma'`` with
        ``centered=True``, False otherwise (the classical Frobenius pipeline has none).
    layers : iterable of str, optional
        Module names to compress; default: every layer with statistics (unsupported ones,
        e.g. grouped convolutions and ``nn.Conv2d`` / ``nn.Linear`` subclasses that override
        ``forward``, are skipped with a warning; named ones raise; parametrized layers and
        subclasses that keep ``forward`` are compressed).
    inplace : bool, default is False
        Modify ``model`` itself instead of a copy.
    damping : float, default is 1e-6
        Relative ridge added to each covariance (see :func:`tensorly_dataaware.norms.damp_sigma`).
    device : str or torch.device, optional
        Where the decompositions run (default: the layer's device).
    progress : bool, default is True
        Show a ``tqdm`` progress bar over the layers.
    return_report : bool, default is False
        Also return the list of :class:`LayerReport` (see :func:`format_report`).
    **solver_options
        Passed to :func:`~tensorly_dataaware.tucker2_sigma` / :func:`~tensorly_dataaware.parafac_sigma` (``n_iter_max``, ``tol``,
        ``init``, ``random_state``, ...). Pass ``random_state`` (an int) for results that
        repeat from run to run: CP's initialization at ranks above a mode's size draws
        random columns (as TensorLy's ``parafac`` does), and ``init='random'`` always does.

    Returns
    -------
    nn.Module or (nn.Module, list of LayerReport)
    """
    check_eager_model(model)
    _check_choice(norm, "norm", NORMS)
    _check_choice(method, "method", METHODS)
    check_solver_options(method, norm, solver_options)
    check_flags(centered=centered, inplace=inplace, return_report=return_report, progress=progress)
    if bias_correction is not None:
        check_flags(bias_correction=bias_correction)
    if bias_correction is None:
        bias_correction = norm == "sigma" and centered
    target = model if inplace else copy.deepcopy(model)
    skipped: list = []
    jobs = plan_compression(
        target, stats, method, ranks=ranks, ratio=ratio, energy=energy, budget=budget,
        centered=centered, layers=layers, device=device, skipped=skipped,
    )
    modules = dict(target.named_modules())
    report = [dense_report_row(name, modules[name], reason) for name, reason in skipped]
    bar = tqdm(jobs, desc=f"compress ({method}, {norm})", disable=not progress, leave=False)
    for job in bar:
        bar.set_postfix_str(job.name)
        new, row = decompose_layer(job, norm=norm, bias_correction=bias_correction, damping=damping, **solver_options)
        _set_module(target, job.name, new)
        report.append(row)
    position = {name: i for i, name in enumerate(modules)}
    report.sort(key=lambda row: position[row.name])
    if return_report:
        return target, report
    return target


def _cast_tensors(tensors, dtype, device):
    out = []
    for t in tensors:
        if isinstance(t, (list, tuple)):
            out.append([x.to(dtype=dtype, device=device) for x in t])
        else:
            out.append(t.to(dtype=dtype, device=device))
    return out


def _budget_ranks(
    prepared, budget: float, output_weights: Mapping[str, torch.Tensor] | None = None, available: int | None = None
) -> dict[str, Any]:
    """Ranks from a global budget, using each layer's whitened output spectrum as its curve.

    ``budget`` is a fraction of the ``prepared`` layers' dense parameters, unless
    ``available`` gives the number of parameters to spend directly.

    Without ``output_weights`` a layer's error is its *relative* squared sigma-error (every
    layer's relative error counts the same). With them (name -> per-output-channel weight
    ``F``, e.g. the diagonal Fisher of the layer's output) it is the *absolute* weighted
    error ``||F^{1/2} (W - W~) Sigma^{1/2}||_F^2``, comparable across layers as an estimate
    of the loss increase; its tail is that of ``F^{1/2} W Sigma W^T F^{1/2}``.
    """
    curves = {}
    total = 0
    for name, _module, method, weight, sigma in prepared:
        shape = tuple(weight.shape)
        total += rk.dense_params(shape)
        mat = weight.reshape(shape[0], -1)
        if output_weights is not None:
            mat = output_weights[name].to(mat).sqrt()[:, None] * mat
        gram = mat @ sigma @ mat.T
        eig = torch.clamp(torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0), min=0)
        if output_weights is not None:
            tail = float(eig.sum()) - torch.cumsum(eig, 0)
        else:
            tail = 1 - torch.cumsum(eig, 0) / max(float(eig.sum()), 1e-300)
        curve = []
        # Rank 1 first: the smallest factorization (the 2% step refused budgets that rank-1
        # layers fit).
        for rank in [rk.min_rank(method)] + [rk.ranks_for_ratio(method, shape, 0.02 * i) for i in range(1, 51)]:
            # Proxy error: the whitened output tail at the output rank the factorization
            # affords (a lower bound of the layer's sigma-error at that size).
            r_out = rank[0] if isinstance(rank, tuple) else min(rank, shape[0])
            err = float(tail[min(r_out, shape[0]) - 1]) if r_out >= 1 else 1.0
            params = rk.factorized_params(method, shape, rank)
            if not curve or params > curve[-1][0]:
                curve.append((params, err, rank))
        curves[name] = curve
    return rk.allocate_budget(curves, int(budget * total) if available is None else available)
