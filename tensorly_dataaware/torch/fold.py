"""Fold inference-mode BatchNorm into the convolution that feeds it.

In eval mode ``BatchNorm2d`` is a per-channel affine map ``y = scale * z + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``.
When its only input is the output of a convolution whose output feeds nothing else, the map
can be moved into that convolution's weight and bias and the BatchNorm removed: one pass over
the activations fewer per pair, exactly the same function up to rounding.  For a factorized
layer the map goes into its last 1x1 convolution (output channels are the rows of its
weight), so the factors keep their ranks and the parameter count does not change.

The pairs are found on the graph that :mod:`torch.fx` traces, with the factorized layers of
:mod:`tensorly_dataaware.torch.layers` kept as leaves, so folding follows the data flow and
never relies on attribute order or names.  A model that ``torch.fx`` cannot trace (data-
dependent control flow) cannot be folded: :func:`fold_batchnorm` then raises, naming the
reason, and :func:`~tensorly_dataaware.torch.optimize_for_inference` warns and goes on
without folding.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from .compress import _set_module
from .layers import _FormMixin

__all__ = ["fold_batchnorm"]


class _Tracer(fx.Tracer):
    # The factorized layers are opaque: their last 1x1 convolution is what a BatchNorm folds
    # into, so they must stay one node each.
    # BatchNorm subclasses too: traced into, their forward's `if self.training` is control
    # flow that fx refuses, which made any model with one (even `class BN(nn.BatchNorm2d):
    # pass`) unfoldable.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, (_FormMixin, nn.modules.batchnorm._BatchNorm))
            or super().is_leaf_module(m, module_qualified_name)
        )


def _plain_batchnorm2d(module: nn.Module | None) -> bool:
    """A BatchNorm2d that computes what nn.BatchNorm2d computes (a subclass may redefine it)."""
    return isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward


def _foldable_producer(module: nn.Module) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` whose output channels a following BatchNorm2d can be folded into."""
    if isinstance(module, _FormMixin) and isinstance(getattr(module, "last", None), nn.Conv2d):
        return module.last
    if type(module) is nn.Conv2d:
        return module
    return None


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm, in float64."""
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        gamma, beta = bn.weight.detach().to(torch.float64), bn.bias.detach().to(torch.float64)
        scale, shift = scale * gamma, shift * gamma + beta
    return scale, shift


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale, shift = _bn_affine(bn)
    weight = conv.weight
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
    new_weight = (weight.detach().to(torch.float64) * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    weight.copy_(new_weight)
    new_bias = (bias * scale + shift).to(weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _check_bn(name: str, bn: nn.BatchNorm2d, channels: int) -> str | None:
    """Why ``bn`` cannot be folded, or None."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return f"{name}: no running statistics (track_running_stats=False uses batch statistics)"
    if bn.num_features != channels:
        return f"{name}: {bn.num_features} features for {channels} channels"
    stats = [bn.running_mean, bn.running_var] + ([bn.weight, bn.bias] if bn.affine else [])
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        return f"{name}: non-finite statistics or parameters"
    return None


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Identifies the memory behind ``tensor``: two Parameters over one storage are one tensor."""
    storage = tensor.untyped_storage()
    # Empty or storage-less tensors (meta, sizes 0) have no address to compare: their identity is.
    return (str(tensor.device), storage.data_ptr()) if storage.data_ptr() else ("id", id(tensor))


def _check_shared(name: str, conv: nn.Conv2d, uses: Counter) -> str | None:
    """Why ``conv``'s weight or bias cannot be rewritten in place because another module uses it, or None.

    ``uses`` counts, per :func:`_storage_key`, the parameters and buffers of the whole model
    in every module that holds them.  Folding rewrites the weight (and bias) in place: a
    tied weight (``b.weight = a.weight``) or one built on the same memory
    (``nn.Parameter(a.weight.data)``) would change in every other module using it.
    """
    for role, tensor in (("weight", conv.weight), ("bias", conv.bias)):
        if tensor is not None and uses[_storage_key(tensor)] > 1:
            return f"{name}: its {role} is shared with another module (folding would change that module too)"
    return None


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, return_pairs: bool = False):
    """Fold every eval-mode ``BatchNorm2d`` into the convolution that alone feeds it.

    A pair ``conv -> bn`` is folded when ``conv`` is an ``nn.Conv2d`` (any groups, padding,
    stride) or a factorized convolution (:class:`~tensorly_dataaware.torch.Tucker2Conv2d`,
    :class:`~tensorly_dataaware.torch.CPConv2d`, :class:`~tensorly_dataaware.torch.LowRankConv2d`),
    the BatchNorm's only input is the convolution's output, that output feeds nothing else,
    and each module is called once per forward pass.  The BatchNorm's per-channel affine map
    is multiplied into the convolution's weight (the last 1x1 factor of a factorized layer)
    and added to its bias (created if absent), and the BatchNorm is replaced by
    ``nn.Identity``.  The result computes the same function *in eval mode*.

    Parameters
    ----------
    model : nn.Module
        Deep-copied unless ``inplace=True``. The returned model is in eval mode.
    inplace : bool, default False
        Modify ``model`` itself.
    return_pairs : bool, default False
        Also return the folded ``(conv name, BatchNorm name)`` pairs, in graph order.

    Returns
    -------
    nn.Module or (nn.Module, list of (str, str))

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If ``torch.fx`` cannot trace the model (the message gives the tracer's reason).

    Notes
    -----
    The folded model is for inference: training it would train the folded weights without
    BatchNorm, and its ``state_dict`` no longer has the BatchNorm entries, so
    :func:`~tensorly_dataaware.torch.load_compressed` refuses it for the original
    architecture.  Save the compressed model before folding, and fold after loading.
    BatchNorm layers without running statistics, fed by anything but a convolution, whose
    convolution's output is used elsewhere (e.g. a pre-activation residual), or whose
    convolution's weight or bias is shared with another module (tied weights, which folding
    would change there too) are left as they are.  A BatchNorm's own parameters are only
    read, so sharing them does not prevent folding.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorly_dataaware.torch.fold import fold_batchnorm
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded, pairs = fold_batchnorm(net, return_pairs=True)
    >>> pairs
    [('0', '1')]
    >>> x = torch.randn(2, 3, 8, 8)
    >>> bool(torch.allclose(folded(x), net(x), atol=1e-5))
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises assorted types (TraceError, TypeError, ...)
        raise ValueError(
            f"Cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    modules = dict(target.named_modules())
    # A module reachable under two names, or called twice, has one set of weights for
    # several places in the graph: folding one BatchNorm into it would change the others.
    aliases = Counter(id(m) for _, m in target.named_modules(remove_duplicate=False))
    # Likewise a tensor held by several modules (tied weights), counted once per holder: the
    # module checks above do not see it, as each module appears once.
    uses = Counter(
        _storage_key(t) for _, t in (
            *target.named_parameters(remove_duplicate=False), *target.named_buffers(remove_duplicate=False)
        )
    )
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _plain_batchnorm2d(modules.get(node.target)):
            continue
        source = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        producer = _foldable_producer(modules[source.target])
        bn = modules[node.target]
        if producer is None or len(source.users) != 1:
            continue
        if calls[source.target] != 1 or calls[node.target] != 1:
            continue
        if aliases[id(modules[source.target])] != 1 or aliases[id(bn)] != 1 or aliases[id(producer)] != 1:
            continue
        if _check_bn(node.target, bn, producer.out_channels) is not None:
            continue
        if _check_shared(source.target, producer, uses) is not None:
            continue
        _fold_into(producer, bn)
        if isinstance(modules[source.target], _FormMixin):
            modules[source.target]._refresh_form()
        _set_module(target, node.target, nn.Identity())
        pairs.append((source.target, node.target))
    if return_pairs:
        return target, pairs
    return target
