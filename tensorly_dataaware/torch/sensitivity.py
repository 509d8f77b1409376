r"""How much each output channel of a layer matters to the network's loss: the diagonal Fisher.

A small change :math:`\delta y` of a layer's output raises the expected loss, to second
order, by :math:`\tfrac12\,\delta y^\top H\,\delta y`; the diagonal of the empirical Fisher,
:math:`F_c = \mathbb E[(\partial L/\partial y_c)^2]`, is the usual cheap stand-in for the
diagonal of :math:`H`. Summed over the positions of an image, and with the layer's output
error per position :math:`\mathbb E[\delta y_c^2]`, the loss increase of one image is about
:math:`\tfrac12 \sum_c F_c\,\mathbb E[\delta y_c^2]`: a per-channel weight that makes output
errors of different layers (and channels) comparable. :func:`output_fisher` measures it with
one backward pass per calibration batch, needing no labels: the loss is the cross-entropy of
the model's own predicted class (the "label-free" empirical Fisher).

The diagonal ignores that the loss may care about *combinations* of channels. With
``full=True`` :func:`output_fisher` returns the whole ``T x T`` matrix
:math:`F = \mathbb E[\sum_p g_p g_p^\top]` (``g_p`` the gradient of the loss with respect to
the layer's output at position ``p``). With the input side summarized by the covariance
``C``, the second-order loss increase of a weight change :math:`\Delta W` is then about
:math:`\tfrac12 \operatorname{tr}(\Delta W^\top F \Delta W C)`, the Kronecker-factored
(K-FAC) approximation of the Hessian, which is exactly the weighted norm
:math:`\|F^{1/2} \Delta W C^{1/2}\|_F^2` that the solvers minimize once the rows are
transformed by :math:`F^{1/2}` (:func:`fisher_matrix_roots`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._validation import check_positive_int
from .statistics import _batch_input, _model_device

__all__ = ["output_fisher", "fisher_matrix_roots", "fisher_row_weights"]


def _channel_axis(module: nn.Module, output: torch.Tensor) -> int:
    # Conv2d writes channels on axis 1; Linear on the last axis, whatever the leading ones.
    return 1 if isinstance(module, nn.Conv2d) else output.dim() - 1


def output_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str] | str,
    *,
    max_batches: int | None = None,
    reduce=None,
    full: bool = False,
    agree=None,
) -> dict[str, torch.Tensor]:
    r"""Diagonal (or full) empirical Fisher of every named layer's output channels, label-free.

    For every image the loss is the cross-entropy of the model's output against its own
    predicted class (``argmax`` over axis 1, so logits of shape ``(N, C)`` or ``(N, C, ...)``
    for dense prediction); the result for channel ``c`` of layer ``l`` is the mean over
    images of :math:`\sum_p (\partial L / \partial y_{c,p})^2`, the sum running over the
    positions ``p`` of the layer's output (for a Linear layer, over every axis but the last).
    Accumulated in float64. The model runs in eval mode; its parameters' ``.grad`` and its
    modes are left as they were (the gradients are taken with respect to the layer outputs
    only, through a zero added to each).

    Parameters
    ----------
    model : nn.Module
        A classifier: ``model(x)`` returns logits with the classes on axis 1.
    batches : iterable of batches
        Tensors, or tuples/lists whose first item is the input (labels are ignored).
    layers : iterable of str, or str
        Names of ``nn.Conv2d`` / ``nn.Linear`` modules, each called once per forward pass; a
        single string is one name. Repeated names are measured once (as in
        :func:`~tensorly_dataaware.torch.statistics.collect_covariances`).
        A layer whose output the loss does not depend on (run under ``torch.no_grad()``
        inside the forward, or feeding an output the model does not return) gets a Fisher of
        zero, with a warning: the weighting cannot tell its channels apart.
    max_batches : int, optional
        Use only the first ``max_batches`` batches (a positive int).
    reduce : callable, optional
        ``reduce(tensor)`` sums a float64 tensor over processes in place (distributed runs);
        it is called once with the concatenated sums, the per-layer counts of batches whose
        loss depended on the layer, and the image count.
    agree : callable, optional
        ``agree(error, what)`` with the exception this process met in its own forward and
        backward passes (or None), before ``reduce``: in distributed runs every process must
        learn of a failure there, or the others would wait in ``reduce`` for ever.
    full : bool, default is False
        Return the ``out_channels x out_channels`` matrix
        :math:`\frac1N \sum_{\text{images}} \sum_p g_p g_p^\top` instead of its diagonal
        (``out_channels**2`` float64 numbers per layer).

    Returns
    -------
    dict of str to torch.Tensor
        Float64 vector of length ``out_channels`` (a matrix with ``full=True``) per layer,
        on the CPU.

    Raises
    ------
    ValueError
        If ``layers`` is empty or names a missing module, ``max_batches`` is below 1,
        ``batches`` is empty, a layer is not called, the output is not logits of at least 2
        classes, or no layer's output reaches the loss.
    TypeError
        If ``layers`` holds a non-string or ``max_batches`` is not an int.
    """
    # A string is one name, not an iterable of one-character names; repeats are measured
    # once (a repeated name would otherwise hook the layer twice and add its Fisher twice).
    requested = [layers] if isinstance(layers, str) else list(layers)
    bad_names = [name for name in requested if not isinstance(name, str)]
    if bad_names:
        raise TypeError(f"`layers` must hold module names (str); got {bad_names!r}.")
    names = list(dict.fromkeys(requested))
    if not names:
        raise ValueError("`layers` is empty.")
    if max_batches is not None:
        # Any Integral (compress_sequential passes on whatever integer it accepted).
        max_batches = check_positive_int(max_batches, "max_batches")
    modules = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"`layers`: the model has no module named {name!r}.") from exc
    for name, module in modules.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"`layers`: {name!r} is a {type(module).__name__}, not an nn.Conv2d or nn.Linear.")
    sums = {
        name: torch.zeros((m.weight.shape[0],) * (2 if full else 1), dtype=torch.float64) for name, m in modules.items()
    }
    # Batches on which the loss depended on each layer's output (its probe was in the graph).
    reached = torch.zeros(len(names), dtype=torch.float64)
    images = 0
    device = _model_device(model)
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    local_error = None
    try:
        with torch.enable_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                x = _batch_input(batch, index).to(device)
                probes: dict[str, torch.Tensor] = {}
                outputs: dict[str, torch.Tensor] = {}

                def make_hook(name):
                    def hook(_module, _args, output):
                        if name in probes:
                            # A second probe would replace the first: the Fisher would count
                            # the last call only. The fit weights one output per layer anyway.
                            raise ValueError(
                                f"Layer {name!r} is called more than once per forward pass (a shared "
                                "layer): output_fisher needs each layer called exactly once."
                            )
                        # d(loss)/d(probe) = d(loss)/d(output): a leaf to differentiate
                        # against, whether or not the parameters require grad.
                        probe = torch.zeros_like(output, requires_grad=True)
                        probes[name], outputs[name] = probe, output
                        return output + probe

                    return hook

                handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
                try:
                    logits = model(x)
                finally:
                    for handle in handles:
                        handle.remove()
                missing = [name for name in names if name not in probes]
                if missing:
                    raise ValueError(f"Layers {missing} were not called by the forward pass.")
                # One class (C == 1) is refused too: the cross-entropy of a single class is
                # identically 0, so the Fisher would be silently all zero (unit weights).
                if (
                    not isinstance(logits, torch.Tensor)
                    or logits.dim() < 2
                    or not logits.is_floating_point()
                    or logits.shape[1] < 2
                ):
                    raise ValueError(
                        "The label-free Fisher needs a classifier: `model(x)` must return floating logits of shape "
                        f"(N, C, ...) with at least 2 classes (C >= 2) on axis 1; got {type(logits).__name__}"
                        + (f" of shape {tuple(logits.shape)}." if isinstance(logits, torch.Tensor) else ".")
                    )
                predicted = logits.detach().argmax(1)
                loss = nn.functional.cross_entropy(logits, predicted, reduction="sum")
                inputs = [probes[name] for name in names]
                if loss.requires_grad:
                    # allow_unused: a layer outside the loss's graph (a frozen backbone under
                    # no_grad, an auxiliary head not returned) gets None, i.e. a zero gradient.
                    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                else:  # no layer reached the logits at all (e.g. the whole forward under no_grad)
                    grads = (None,) * len(inputs)
                for i, (name, grad) in enumerate(zip(names, grads)):
                    if grad is None:
                        continue  # adds zero to the sums
                    reached[i] += 1
                    axis = _channel_axis(modules[name], grad)
                    g = grad.detach().to(torch.float64)
                    if full:
                        # Channels first, every image and position after: one (T, m) GEMM.
                        g = g.movedim(axis, 0).reshape(g.shape[axis], -1)
                        sums[name] += (g @ g.T).cpu()
                    else:
                        sums[name] += (g * g).sum(dim=tuple(d for d in range(g.dim()) if d != axis)).cpu()
                images += logits.shape[0]
    except Exception as exc:  # noqa: BLE001 - re-raised here, or first made known to every process
        local_error = exc
    finally:
        for name, module in model.named_modules():
            if name in flags:
                module.train(flags[name])
    if agree is not None:
        agree(local_error, "the output Fisher")
    elif local_error is not None:
        raise local_error
    if reduce is not None:
        # `reached` travels with the sums, so that every process warns or raises alike.
        flat = torch.cat(
            [sums[name].reshape(-1) for name in names] + [reached, torch.tensor([float(images)], dtype=torch.float64)]
        )
        reduce(flat)
        images = int(round(float(flat[-1])))
        offset = 0
        for name in names:
            size = sums[name].numel()
            sums[name] = flat[offset : offset + size].reshape(sums[name].shape).clone()
            offset += size
        reached = flat[offset : offset + len(names)].clone()
    if images == 0:
        raise ValueError("`batches` yielded no batch: nothing to measure the Fisher on.")
    unreached = [name for name, count in zip(names, reached.tolist()) if count == 0]
    if len(unreached) == len(names):
        raise ValueError(
            f"The loss does not depend on the output of any of the layers {names}: no Fisher to measure. Is the "
            "forward run under torch.no_grad() / inference_mode, or are the layers outside the returned output?"
        )
    if unreached:
        warnings.warn(
            f"The loss does not depend on the output of layers {unreached} (run under torch.no_grad(), or not "
            "reaching the model's output): their Fisher is zero and a Fisher weighting is uninformative there.",
            stacklevel=2,
        )
    return {name: value / images for name, value in sums.items()}


def fisher_row_weights(fisher: Mapping[str, torch.Tensor], floor: float = 1e-3) -> dict[str, torch.Tensor]:
    """Per-channel weights ``F_c`` with a floor of ``floor`` times the layer's mean.

    A channel whose Fisher is zero (e.g. dead after its ReLU on every calibration image)
    would otherwise get weight 0, which the weighted fit cannot divide back out.
    """
    out = {}
    for name, f in fisher.items():
        mean = float(f.mean()) if f.numel() else 0.0
        out[name] = f.clamp_min(floor * mean) if mean > 0 else torch.ones_like(f)
    return out


def fisher_matrix_roots(fisher: torch.Tensor, floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F^{1/2}, F^{-1/2})`` of a full output Fisher, its eigenvalues floored.

    The floor is ``floor`` times the mean eigenvalue (the mean of the diagonal), as
    :func:`fisher_row_weights` floors the diagonal: directions of the output that the loss
    never felt on the calibration data (e.g. channels dead after their ReLU) keep a small
    weight, so that the weighted fit can be transformed back. An all-zero Fisher gives the
    identity (no weighting).
    """
    fisher = (fisher + fisher.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(fisher)
    mean = float(eigvals.mean()) if eigvals.numel() else 0.0
    if not mean > 0:
        eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
        return eye, eye.clone()
    root = eigvals.clamp_min(floor * mean).sqrt()
    return (eigvecs * root) @ eigvecs.T, (eigvecs / root) @ eigvecs.T
