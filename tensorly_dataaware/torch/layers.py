"""Factorized PyTorch modules that compute exactly a given low-rank weight.

Each module replaces a dense layer whose weight has been approximated by a decomposition,
and computes *exactly* the layer with the approximated weight ``W~``: its output equals
``F.conv2d(x, W~, bias, stride, padding, dilation)`` (with the same ``padding_mode``
semantics as ``nn.Conv2d``) or ``F.linear(x, W~, bias)``, up to floating-point rounding.

=====================  ==========================================================  ===========
module                 ``W~``                                                      pipeline
=====================  ==========================================================  ===========
:class:`Tucker2Conv2d`  ``sum_ab last[t,a] first[s,b] core[a,b,i,j]``               1x1, kh x kw, 1x1
:class:`CPConv2d`       ``sum_r w[r] A[t,r] B[s,r] C[i,r] D[j,r]``                  1x1, kh x 1, 1 x kw, 1x1
:class:`LowRankConv2d`  ``(last @ first).reshape(T, S, kh, kw)``                    kh x kw, 1x1
:class:`LowRankLinear`  ``last @ first``                                            linear, linear
=====================  ==========================================================  ===========

Every module has ``weight_approx()`` (the dense ``W~``, for checks), ``spec()`` (a plain-python
description) and :func:`build_from_spec` rebuilds an uninitialized module of the same
structure, so that ``build_from_spec(m.spec()).load_state_dict(m.state_dict())`` round-trips.
Grouped convolutions are not supported.

Inference forms
---------------
The same ``W~`` can be computed in several ways whose speed depends on the hardware and the
input shape; ``set_form(name)`` picks one (``forms`` lists those of a class):

* ``'chain'`` (default): the factorized pipeline of the table above;
* ``'dense'``: one convolution (or linear map) with the reconstructed ``W~``, for layers
  whose factorized chain is slower than the dense kernel (small ranks on small images,
  where the per-call overhead of three or four kernels dominates);
* ``'merged'`` (CP and Tucker-2): fewer convolutions in the chain.  CP: the two depthwise
  convolutions merged into one ``kh x kw`` depthwise convolution whose per-channel kernels
  are the rank-one outer products ``C[:, r] D[:, r]^T``.  Tucker-2: the core and the output
  factor merged into one ``kh x kw`` convolution from ``R_in`` to ``T`` channels, after the
  1x1 input factor; at small ranks on large images the chain is bound by memory traffic,
  not arithmetic, and one pass fewer over the activations can be faster (measured: 8.3 ms
  -> 7.2 ms for a 16-channel layer at ranks (3, 3), 28x28 images, batch 256, one thread).

A non-chain form is an inference cache: its kernel is a non-persistent buffer computed in
float64 from the factors by ``set_form``, again after ``load_state_dict``, whenever the
module is switched to eval mode, and, in eager mode, at the first call after any change of
the factors (in-place updates, other tensors through ``torch.func.functional_call``, a
dtype or device change: each call compares the factors' identity and in-place version with
those the kernel was made from). In training mode the chain runs, so gradients always reach
the factors (in eval mode a non-chain form gives them none) and the eager ``state_dict`` is
the same for every form. A TorchScript module keeps the kernel it was scripted with, and
its ``state_dict`` lists it as ``_form_weight`` (TorchScript ignores ``persistent=False``):
script or trace after the final weights are loaded, or script the ``'chain'`` form.  ``spec()`` records a
non-chain form under the key ``'form'`` (absent means ``'chain'``, so older specs load).
:func:`tensorly_dataaware.torch.deploy.optimize_for_inference` chooses forms by measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
# The factors are copied in right after construction: skip_init builds the submodules
# without their random initialization, which advanced the global RNG (and cost time).
from torch.nn.utils import skip_init
from torch import nn

__all__ = ["Tucker2Conv2d", "CPConv2d", "LowRankConv2d", "LowRankLinear", "build_from_spec"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _factor(value: Any, name: str, ndim: int) -> torch.Tensor:
    """Check that ``value`` is a finite floating tensor with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor; got dtype {value.dtype}.")
    if value.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D; got shape {tuple(value.shape)}.")
    if any(d == 0 for d in value.shape):
        raise ValueError(f"`{name}` has an empty dimension: shape {tuple(value.shape)}.")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or Inf values.")
    return value.detach()


def _bias(bias: Any, out: int, like: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = _factor(bias, "bias", 1)
    if bias.shape[0] != out:
        raise ValueError(f"`bias` must have shape ({out},); got {tuple(bias.shape)}.")
    return bias.to(dtype=like.dtype, device=like.device)


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int or a pair of ints; got {value!r}.")
    if isinstance(value, int):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"`{name}` must be an int or a pair of ints; got {value!r}.")
    if any(v < minimum for v in value):
        raise ValueError(f"`{name}` must be >= {minimum}; got {tuple(value)}.")
    return int(value[0]), int(value[1])


def _conv_hyper_parameters(
    kernel_size: tuple[int, int], stride: Any, padding: Any, dilation: Any, padding_mode: Any, groups: Any
) -> tuple[tuple[int, int], tuple[int, int] | str, tuple[int, int], str, tuple[int, int, int, int]]:
    """Validate conv hyper-parameters and return them normalized.

    Returns ``(stride, padding, dilation, padding_mode, pad)`` where ``padding`` keeps the
    strings ``'same'``/``'valid'`` and ``pad`` is the explicit ``(left, right, top, bottom)``
    padding in :func:`torch.nn.functional.pad` order.
    """
    if groups != 1:
        raise ValueError(
            f"Grouped convolutions (groups={groups!r}) are not supported by the factorized layers; "
            "only groups=1."
        )
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {_PADDING_MODES}; got {padding_mode!r}.")
    if isinstance(padding, str):
        if padding == "valid":
            pad_hw = ((0, 0), (0, 0))
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' requires stride 1 (as in nn.Conv2d); got stride={stride}.")
            # nn.Conv2d's rule: total dilation*(k-1), the odd element on the bottom/right side.
            pad_hw = tuple(
                (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel_size, dilation)
            )
        else:
            raise ValueError(f"`padding` string must be 'same' or 'valid'; got {padding!r}.")
    else:
        padding = _pair(padding, "padding", 0)
        pad_hw = ((padding[0], padding[0]), (padding[1], padding[1]))
    pad = (pad_hw[1][0], pad_hw[1][1], pad_hw[0][0], pad_hw[0][1])
    return stride, padding, dilation, padding_mode, pad


def _padding_spec(padding: tuple[int, int] | str) -> list[int] | str:
    return padding if isinstance(padding, str) else list(padding)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _set(parameter: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.reshape(parameter.shape))


def _f64(t: torch.Tensor) -> torch.Tensor:
    # Kernels of the inference forms are products of factors: accumulate them in float64.
    # (Devices without float64, e.g. MPS, fall back to float32.)
    return t.detach().to(torch.float64) if t.device.type != "mps" else t.detach().float()


def _as_param(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(dtype=like.dtype, device=like.device).contiguous()


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the cached kernel of a non-chain form follows the new factors."""
    module._refresh_form()  # type: ignore[operator]


class _FormMixin(nn.Module):
    """Selectable inference form (see the module docstring): validation, cache, spec key."""

    forms = ("chain", "dense")
    # TorchScript compiles the properties below too: scripted code that reads a layer's
    # weight or bias (nn.TransformerEncoderLayer.forward does) must find them.

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (``weight_approx()``), read-only.

        For code written against ``nn.Conv2d`` / ``nn.Linear`` that reads its layers'
        parameters instead of calling them: ``nn.TransformerEncoderLayer.forward`` reads
        ``linear1.weight`` to choose its fused path, which made a compressed encoder layer
        fail with an ``AttributeError``.  It is rebuilt from the factors at every read and is
        not a parameter: train the factors.
        """
        return self.weight_approx()  # type: ignore[attr-defined]

    @property
    def bias(self):
        """The layer's bias (that of its last factor), or ``None``; as ``nn.Conv2d.bias``.

        Not annotated on purpose: TorchScript then types it per layer as ``Tensor`` or
        ``None``, as it does ``nn.Linear.bias``; ``Optional[Tensor]`` failed in scripted code
        that uses it as a tensor (``nn.TransformerEncoderLayer.forward``).
        """
        return self.last.bias  # type: ignore[union-attr]

    def __setattr__(self, name: str, value) -> None:
        # nn.Module would report "property has no setter" for a tensor and "attribute
        # 'weight' already exists" for a Parameter: say what to do instead.
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight is computed from the factors and cannot be assigned: change the "
                "factors' parameters, or replace the layer with a dense one."
            )
        if name == "bias":
            raise AttributeError(
                f"{type(self).__name__}.bias is the bias of its last factor: assign `layer.last.bias` instead."
            )
        super().__setattr__(name, value)

    # The freshness key of the cached kernel (see _kernel) is eager-only bookkeeping.
    __jit_ignored_attributes__ = ["_form_key", "_form_slots"]

    def _init_form(self) -> None:
        self.form = "chain"
        # Empty until a non-chain form is chosen; a tensor (never None) keeps TorchScript simple.
        self.register_buffer("_form_weight", torch.empty(0, dtype=self._factor_dtype()), persistent=False)
        self._form_key: tuple | None = None
        self._form_slots: list = []
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _factor_key(self) -> tuple:
        """Storage address and in-place version of every parameter: what the cached kernel
        was computed from. A dtype or device change moves the data (``_apply`` converts into
        new storage while the old is alive), an in-place update bumps the version, and a
        Parameter replaced in its module's dictionary is read from there. Read through the
        ``_parameters`` dictionaries collected at the last refresh: ``self.parameters()``
        costs about 10 us per call, as much as a small layer's convolution."""
        return tuple((p.data_ptr(), p._version) for d, name in self._form_slots if (p := d[name]) is not None)

    def _kernel(self) -> torch.Tensor:
        """The cached kernel of a non-chain form, rebuilt first if the factors changed.

        ``set_form``, ``load_state_dict`` and ``eval()`` rebuild it, but factors also change
        without any of them: an in-place update (an EMA of the weights, an optimizer step
        in eval mode, ``layer.core.load_state_dict``), ``torch.func.functional_call`` with
        other tensors, or ``model.to(dtype)``, which converted the cached kernel instead of
        recomputing it. Each of these gave a silently stale output. (Eager mode only: a
        scripted module keeps the kernel it was scripted with.)
        """
        if not torch.jit.is_scripting():
            self._check_form_cache()
        return self._form_weight

    @torch.jit.unused
    def _check_form_cache(self) -> None:
        if self._factor_key() != self._form_key:
            self._refresh_form()

    def _factor_dtype(self) -> torch.dtype:
        return self.last.weight.dtype  # type: ignore[union-attr]

    def _form_kernel(self, form: str) -> torch.Tensor:
        raise NotImplementedError

    def set_form(self, form: str) -> "_FormMixin":
        """Compute the layer as ``form`` (one of ``self.forms``) from now on; returns ``self``.

        Raises
        ------
        ValueError
            If ``form`` is not one of ``self.forms``.
        """
        if form not in self.forms:
            raise ValueError(f"`form` must be one of {self.forms} for {type(self).__name__}; got {form!r}.")
        self.form = form
        self._refresh_form()
        return self

    @torch.no_grad()
    def _refresh_form(self) -> None:
        # Outside inference mode even when called in it (`model.eval()` inside a
        # `torch.inference_mode()` evaluation): an inference tensor as the cached kernel made
        # later autograd through the layer fail ("Inference tensors cannot be saved for backward").
        with torch.inference_mode(False):
            self._refresh_kernel()
        self._form_slots = [(m._parameters, name) for m in self.modules() for name in m._parameters]
        self._form_key = self._factor_key()

    def _refresh_kernel(self) -> None:
        if self.form == "chain":
            kernel = torch.empty(0, dtype=self._factor_dtype(), device=self._form_weight.device)
        else:
            kernel = self._form_kernel(self.form)
        # Follow the layout of the factors (model.to(memory_format=torch.channels_last)), so
        # that oneDNN does not reorder the cached kernel at every call.  1x1 and depthwise
        # factors are contiguous in both layouts and say nothing; a module whose factors are
        # all such (CP) keeps a contiguous kernel until the next model.to(memory_format=...),
        # which converts this buffer too.
        if kernel.dim() == 4 and any(
            p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in self.parameters()
        ):
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        self._form_weight = kernel

    def train(self, mode: bool = True) -> "_FormMixin":
        super().train(mode)
        if not mode and self.form != "chain":
            # Factors may have changed while training: rebuild the cached kernel.
            self._refresh_form()
        return self

    def _form_repr(self) -> str:
        return "" if self.form == "chain" else f", form={self.form!r}"

    def _form_spec(self) -> dict[str, Any]:
        return {} if self.form == "chain" else {"form": self.form}


def _apply_spec_form(module: "_FormMixin", spec: dict[str, Any]) -> "_FormMixin":
    form = spec.get("form", "chain")
    if form != "chain":
        module.set_form(form)
    return module


class _FactorizedConv2d(_FormMixin):
    """Shared hyper-parameter bookkeeping of the factorized 2-D convolutions.

    Attributes ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``padding_mode`` and ``groups`` mean what they mean for ``nn.Conv2d``.
    (No class-level annotations: under ``from __future__ import annotations`` they are
    strings, which ``torch.jit.script`` cannot resolve.)
    """

    groups = 1

    def _init_conv(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
        stride: Any, padding: Any, dilation: Any, padding_mode: Any, groups: Any,
    ) -> tuple[int, int, int, int]:
        stride, padding, dilation, padding_mode, pad = _conv_hyper_parameters(
            kernel_size, stride, padding, dilation, padding_mode, groups
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.stride, self.padding, self.dilation, self.padding_mode = stride, padding, dilation, padding_mode
        left, right, top, bottom = pad
        native = padding_mode == "zeros" and left == right and top == bottom
        # Padding of the single-kernel forms and of CP's depthwise pair: native (symmetric
        # zeros, ``(top, left)``) or an explicit F.pad applied first (other modes, asymmetric
        # 'same').  Always-filled int lists, so that TorchScript infers their types.
        self._native_pad = [top, left] if native else [0, 0]
        self._use_explicit_pad = not native and any(pad)
        self._explicit_pad = list(pad)
        self._pad_mode = "constant" if padding_mode == "zeros" else padding_mode
        self._stride_list, self._dilation_list = list(stride), list(dilation)
        return pad

    def _single_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        """One convolution with the layer's stride, dilation and padding (any padding mode)."""
        if self._use_explicit_pad:
            x = F.pad(x, self._explicit_pad, mode=self._pad_mode)
        return F.conv2d(x, weight, bias, self._stride_list, self._native_pad, self._dilation_list, groups)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._single_conv(x, self._kernel(), self.last.bias, 1)  # type: ignore[union-attr]

    def _conv_spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": _padding_spec(self.padding),
            "dilation": list(self.dilation),
            "padding_mode": self.padding_mode,
        }

    def _conv_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}", f"kernel_size={self.kernel_size}", f"stride={self.stride}"]
        if self.padding != (0, 0):
            parts.append(f"padding={self.padding!r}" if isinstance(self.padding, str) else f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Tucker-2
# --------------------------------------------------------------------------------------------


class Tucker2Conv2d(_FactorizedConv2d):
    """Tucker-2 factorized convolution: 1x1 (S -> R_in), kh x kw (R_in -> R_out), 1x1 (R_out -> T).

    Computes exactly the convolution with weight
    ``W~[t, s, i, j] = sum_{a, b} last[t, a] first[s, b] core[a, b, i, j]``.  The 1x1
    convolutions act pixel by pixel, so they commute with every padding mode; the spatial
    stride, padding, padding mode and dilation are those of the middle convolution.

    Parameters
    ----------
    core : torch.Tensor
        ``(R_out, R_in, kh, kw)``.
    first : torch.Tensor
        ``(S, R_in)`` input-channel factor.
    last : torch.Tensor
        ``(T, R_out)`` output-channel factor.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d` (``padding`` may be ``'same'`` or ``'valid'``).
    groups : int, default 1
        Must be 1: grouped convolutions are not supported.
    bias : torch.Tensor, optional
        ``(T,)``, added by the last convolution.

    Notes
    -----
    Parameters take the dtype and device of ``core``.  Submodules: ``first``, ``core``,
    ``last`` (all :class:`torch.nn.Conv2d`).  Inference forms (:meth:`set_form`): ``'chain'``,
    ``'merged'`` (core and ``last`` as one ``kh x kw`` convolution) and ``'dense'``.
    """

    forms = ("chain", "merged", "dense")

    def __init__(
        self,
        core: torch.Tensor,
        first: torch.Tensor,
        last: torch.Tensor,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        groups: int = 1,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        core = _factor(core, "core", 4)
        first = _factor(first, "first", 2).to(dtype=core.dtype, device=core.device)
        last = _factor(last, "last", 2).to(dtype=core.dtype, device=core.device)
        rank_out, rank_in, kh, kw = core.shape
        if first.shape[1] != rank_in:
            raise ValueError(f"`first` must be (S, R_in={rank_in}) to match `core` {tuple(core.shape)}; got {tuple(first.shape)}.")
        if last.shape[1] != rank_out:
            raise ValueError(f"`last` must be (T, R_out={rank_out}) to match `core` {tuple(core.shape)}; got {tuple(last.shape)}.")
        in_channels, out_channels = first.shape[0], last.shape[0]
        bias = _bias(bias, out_channels, core)
        self._init_conv(in_channels, out_channels, (kh, kw), stride, padding, dilation, padding_mode, groups)
        self.ranks = (int(rank_out), int(rank_in))
        kwargs = {"dtype": core.dtype, "device": core.device}
        self.first = skip_init(nn.Conv2d, in_channels, rank_in, 1, bias=False, **kwargs)
        self.core = skip_init(
            nn.Conv2d,
            rank_in, rank_out, (kh, kw), stride=self.stride, padding=self.padding, dilation=self.dilation,
            padding_mode=self.padding_mode, bias=False, **kwargs,
        )
        self.last = skip_init(nn.Conv2d, rank_out, out_channels, 1, bias=bias is not None, **kwargs)
        _set(self.first.weight, first.T)
        _set(self.core.weight, core)
        _set(self.last.weight, last)
        if bias is not None:
            _set(self.last.bias, bias)
        self._init_form()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense" and not self.training:
            return self._dense_forward(x)
        if self.form == "merged" and not self.training:
            # The 1x1 input factor commutes with padding: the merged kernel pads like the core.
            return self._single_conv(self.first(x), self._kernel(), self.last.bias, 1)
        return self.last(self.core(self.first(x)))

    def weight_approx(self) -> torch.Tensor:
        """The dense ``(T, S, kh, kw)`` weight that this module computes with."""
        first = self.first.weight[:, :, 0, 0]  # (R_in, S)
        last = self.last.weight[:, :, 0, 0]  # (T, R_out)
        return torch.einsum("ta,bs,abij->tsij", last, first, self.core.weight)

    def _form_kernel(self, form: str) -> torch.Tensor:
        # Float64 products of the factors, rounded once.
        if form == "merged":  # (T, R_in, kh, kw): core followed by the output factor
            return _as_param(torch.einsum(
                "ta,abij->tbij", _f64(self.last.weight[:, :, 0, 0]), _f64(self.core.weight)
            ), self.last.weight)
        return _as_param(torch.einsum(
            "ta,bs,abij->tsij", _f64(self.last.weight[:, :, 0, 0]), _f64(self.first.weight[:, :, 0, 0]),
            _f64(self.core.weight),
        ), self.last.weight)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, ranks={self.ranks}, bias={self.last.bias is not None}{self._form_repr()}"

    def spec(self) -> dict[str, Any]:
        """Plain-python description of the structure (see :func:`build_from_spec`)."""
        return {
            "class": type(self).__name__,
            **self._conv_spec(),
            "ranks": list(self.ranks),
            "bias": self.last.bias is not None,
            "dtype": _dtype_name(self.core.weight.dtype),
            **self._form_spec(),
        }

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: Any) -> "Tucker2Conv2d":
        kh, kw = spec["kernel_size"]
        rank_out, rank_in = spec["ranks"]
        kwargs = {"dtype": dtype, "device": device}
        return _apply_spec_form(cls(
            torch.zeros(rank_out, rank_in, kh, kw, **kwargs),
            torch.zeros(spec["in_channels"], rank_in, **kwargs),
            torch.zeros(spec["out_channels"], rank_out, **kwargs),
            **_conv_kwargs(spec),
            bias=torch.zeros(spec["out_channels"], **kwargs) if spec["bias"] else None,
        ), spec)


# --------------------------------------------------------------------------------------------
# CP
# --------------------------------------------------------------------------------------------


class CPConv2d(_FactorizedConv2d):
    """CP factorized convolution: 1x1 (S -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> T).

    Computes exactly the convolution with weight
    ``W~[t, s, i, j] = sum_r weights[r] A[t, r] B[s, r] C[i, r] D[j, r]``.

    The spatial kernel of each rank-one term is the outer product ``C[:, r] D[:, r]``, so the
    kh x kw convolution splits into a vertical (kh x 1, stride ``(sh, 1)``, dilation
    ``(dh, 1)``) and a horizontal (1 x kw, stride ``(1, sw)``, dilation ``(1, dw)``)
    depthwise convolution.  This is exact once the input is padded on both axes *before* the
    vertical convolution: with symmetric zero padding the two depthwise convolutions pad
    natively (zero columns stay zero through the vertical pass); any other padding (a
    non-``'zeros'`` mode, or the asymmetric ``'same'`` of even kernels) is applied once with
    :func:`torch.nn.functional.pad` before the depthwise pair, whose convolutions then use
    padding 0.  Padding after the first 1x1 convolution rather than before it is equivalent,
    since a 1x1 convolution without bias acts pixel by pixel.

    Parameters
    ----------
    weights : torch.Tensor or None
        ``(R,)`` weights of the rank-one terms (``None`` means all ones); folded into the last
        1x1 convolution.
    factors : sequence of 4 torch.Tensor
        ``[A (T, R), B (S, R), C (kh, R), D (kw, R)]``.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d`.
    groups : int, default 1
        Must be 1.
    bias : torch.Tensor, optional
        ``(T,)``, added by the last convolution.

    Notes
    -----
    Parameters take the dtype and device of ``A``.  Submodules: ``first``, ``vertical``,
    ``horizontal``, ``last``.  Inference forms (:meth:`set_form`): ``'chain'``, ``'merged'``
    (one ``kh x kw`` depthwise convolution), ``'dense'``.
    """

    forms = ("chain", "merged", "dense")

    def __init__(
        self,
        weights: torch.Tensor | None,
        factors: Sequence[torch.Tensor],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        groups: int = 1,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence) or len(factors) != 4:
            raise TypeError("`factors` must be a sequence of 4 tensors [A (T, R), B (S, R), C (kh, R), D (kw, R)].")
        a = _factor(factors[0], "factors[0]", 2)
        kwargs = {"dtype": a.dtype, "device": a.device}
        b, c, d = (_factor(f, f"factors[{k}]", 2).to(**kwargs) for k, f in enumerate(factors[1:], start=1))
        rank = a.shape[1]
        for k, f in enumerate((b, c, d), start=1):
            if f.shape[1] != rank:
                raise ValueError(
                    f"All factors must have R={rank} columns (from factors[0]); factors[{k}] has shape {tuple(f.shape)}."
                )
        if weights is None:
            weights = torch.ones(rank, **kwargs)
        weights = _factor(weights, "weights", 1).to(**kwargs)
        if weights.shape[0] != rank:
            raise ValueError(f"`weights` must have shape ({rank},); got {tuple(weights.shape)}.")
        out_channels, in_channels, kh, kw = a.shape[0], b.shape[0], c.shape[0], d.shape[0]
        bias = _bias(bias, out_channels, a)
        self._init_conv(in_channels, out_channels, (kh, kw), stride, padding, dilation, padding_mode, groups)
        self.rank = int(rank)
        # The depthwise pair pads natively (symmetric zeros) or the input is padded once first.
        top, left = self._native_pad
        vertical_pad, horizontal_pad = (top, 0), (0, left)
        self.first = skip_init(nn.Conv2d, in_channels, rank, 1, bias=False, **kwargs)
        self.vertical = skip_init(
            nn.Conv2d,
            rank, rank, (kh, 1), stride=(self.stride[0], 1), padding=vertical_pad,
            dilation=(self.dilation[0], 1), groups=rank, bias=False, **kwargs,
        )
        self.horizontal = skip_init(
            nn.Conv2d,
            rank, rank, (1, kw), stride=(1, self.stride[1]), padding=horizontal_pad,
            dilation=(1, self.dilation[1]), groups=rank, bias=False, **kwargs,
        )
        self.last = skip_init(nn.Conv2d, rank, out_channels, 1, bias=bias is not None, **kwargs)
        _set(self.first.weight, b.T)
        _set(self.vertical.weight, c.T)
        _set(self.horizontal.weight, d.T)
        _set(self.last.weight, a * weights[None, :])
        if bias is not None:
            _set(self.last.bias, bias)
        self._init_form()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense" and not self.training:
            return self._dense_forward(x)
        x = self.first(x)
        if self.form == "merged" and not self.training:
            return self.last(self._single_conv(x, self._kernel(), None, self.rank))
        if self._use_explicit_pad:
            x = F.pad(x, self._explicit_pad, mode=self._pad_mode)
        return self.last(self.horizontal(self.vertical(x)))

    def _form_kernel(self, form: str) -> torch.Tensor:
        c = _f64(self.vertical.weight[:, 0, :, 0])  # (R, kh)
        d = _f64(self.horizontal.weight[:, 0, 0, :])  # (R, kw)
        if form == "merged":
            # Depthwise kernel r = outer product C[:, r] D[:, r]^T, shape (R, 1, kh, kw).
            return _as_param(torch.einsum("ri,rj->rij", c, d)[:, None], self.last.weight)
        a = _f64(self.last.weight[:, :, 0, 0])
        b = _f64(self.first.weight[:, :, 0, 0])
        return _as_param(torch.einsum("tr,rs,ri,rj->tsij", a, b, c, d), self.last.weight)

    def weight_approx(self) -> torch.Tensor:
        """The dense ``(T, S, kh, kw)`` weight that this module computes with."""
        a = self.last.weight[:, :, 0, 0]  # (T, R), weights folded in
        b = self.first.weight[:, :, 0, 0]  # (R, S)
        c = self.vertical.weight[:, 0, :, 0]  # (R, kh)
        d = self.horizontal.weight[:, 0, 0, :]  # (R, kw)
        return torch.einsum("tr,rs,ri,rj->tsij", a, b, c, d)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, rank={self.rank}, bias={self.last.bias is not None}{self._form_repr()}"

    def spec(self) -> dict[str, Any]:
        """Plain-python description of the structure (see :func:`build_from_spec`)."""
        return {
            "class": type(self).__name__,
            **self._conv_spec(),
            "rank": self.rank,
            "bias": self.last.bias is not None,
            "dtype": _dtype_name(self.last.weight.dtype),
            **self._form_spec(),
        }

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: Any) -> "CPConv2d":
        kh, kw = spec["kernel_size"]
        rank = spec["rank"]
        kwargs = {"dtype": dtype, "device": device}
        factors = [torch.zeros(size, rank, **kwargs) for size in (spec["out_channels"], spec["in_channels"], kh, kw)]
        return _apply_spec_form(cls(
            None,
            factors,
            **_conv_kwargs(spec),
            bias=torch.zeros(spec["out_channels"], **kwargs) if spec["bias"] else None,
        ), spec)


# --------------------------------------------------------------------------------------------
# Matrix low rank
# --------------------------------------------------------------------------------------------


class LowRankConv2d(_FactorizedConv2d):
    """Low-rank convolution: kh x kw (S -> r), then 1x1 (r -> T).

    Computes exactly the convolution with weight ``W~ = (last @ first).reshape(T, S, kh, kw)``,
    i.e. a rank-``r`` factorization of the matricized weight ``W.reshape(T, -1)``.

    Parameters
    ----------
    first : torch.Tensor
        ``(r, S * kh * kw)`` (columns in ``W.reshape(T, -1)`` order; needs ``kernel_size``)
        or ``(r, S, kh, kw)``.
    last : torch.Tensor
        ``(T, r)``.
    kernel_size : int or pair of int, optional
        Required when ``first`` is 2-D; checked against ``first`` when it is 4-D.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d`; used by the first (spatial) convolution.
    groups : int, default 1
        Must be 1.
    bias : torch.Tensor, optional
        ``(T,)``, added by the last convolution.

    Notes
    -----
    Parameters take the dtype and device of ``first``.  Submodules: ``first``, ``last``.
    """

    def __init__(
        self,
        first: torch.Tensor,
        last: torch.Tensor,
        *,
        kernel_size: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        groups: int = 1,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"`first` must be a torch.Tensor; got {type(first).__name__}.")
        if first.dim() == 4:
            first = _factor(first, "first", 4)
            rank, in_channels, kh, kw = first.shape
            if kernel_size is not None and _pair(kernel_size, "kernel_size", 1) != (kh, kw):
                raise ValueError(f"`kernel_size`={kernel_size!r} does not match `first` of shape {tuple(first.shape)}.")
        else:
            first = _factor(first, "first", 2)
            if kernel_size is None:
                raise ValueError("`kernel_size` is required when `first` is a 2-D (r, S*kh*kw) matrix.")
            kh, kw = _pair(kernel_size, "kernel_size", 1)
            rank, cols = first.shape
            if cols % (kh * kw):
                raise ValueError(
                    f"`first` has {cols} columns, not a multiple of kh*kw={kh * kw} for kernel_size {(kh, kw)}."
                )
            in_channels = cols // (kh * kw)
        last = _factor(last, "last", 2).to(dtype=first.dtype, device=first.device)
        if last.shape[1] != rank:
            raise ValueError(f"`last` must be (T, r={rank}); got {tuple(last.shape)}.")
        out_channels = last.shape[0]
        bias = _bias(bias, out_channels, first)
        self._init_conv(in_channels, out_channels, (kh, kw), stride, padding, dilation, padding_mode, groups)
        self.rank = int(rank)
        kwargs = {"dtype": first.dtype, "device": first.device}
        self.first = skip_init(
            nn.Conv2d,
            in_channels, rank, (kh, kw), stride=self.stride, padding=self.padding, dilation=self.dilation,
            padding_mode=self.padding_mode, bias=False, **kwargs,
        )
        self.last = skip_init(nn.Conv2d, rank, out_channels, 1, bias=bias is not None, **kwargs)
        _set(self.first.weight, first)
        _set(self.last.weight, last)
        if bias is not None:
            _set(self.last.bias, bias)
        self._init_form()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense" and not self.training:
            return self._dense_forward(x)
        return self.last(self.first(x))

    def weight_approx(self) -> torch.Tensor:
        """The dense ``(T, S, kh, kw)`` weight that this module computes with."""
        w = self.last.weight[:, :, 0, 0] @ self.first.weight.reshape(self.rank, -1)
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def _form_kernel(self, form: str) -> torch.Tensor:
        w = _f64(self.last.weight[:, :, 0, 0]) @ _f64(self.first.weight.reshape(self.rank, -1))
        return _as_param(w.reshape(self.out_channels, self.in_channels, *self.kernel_size), self.last.weight)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, rank={self.rank}, bias={self.last.bias is not None}{self._form_repr()}"

    def spec(self) -> dict[str, Any]:
        """Plain-python description of the structure (see :func:`build_from_spec`)."""
        return {
            "class": type(self).__name__,
            **self._conv_spec(),
            "rank": self.rank,
            "bias": self.last.bias is not None,
            "dtype": _dtype_name(self.last.weight.dtype),
            **self._form_spec(),
        }

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: Any) -> "LowRankConv2d":
        kh, kw = spec["kernel_size"]
        rank = spec["rank"]
        kwargs = {"dtype": dtype, "device": device}
        return _apply_spec_form(cls(
            torch.zeros(rank, spec["in_channels"], kh, kw, **kwargs),
            torch.zeros(spec["out_channels"], rank, **kwargs),
            **_conv_kwargs(spec),
            bias=torch.zeros(spec["out_channels"], **kwargs) if spec["bias"] else None,
        ), spec)


class LowRankLinear(_FormMixin):
    """Low-rank linear layer: ``Linear(in -> r, no bias)`` then ``Linear(r -> out, bias)``.

    Computes exactly ``F.linear(x, last @ first, bias)``.

    Parameters
    ----------
    first : torch.Tensor
        ``(r, in_features)``.
    last : torch.Tensor
        ``(out_features, r)``.
    bias : torch.Tensor, optional
        ``(out_features,)``.

    Notes
    -----
    Parameters take the dtype and device of ``first``.  Submodules: ``first``, ``last``.
    """

    def __init__(self, first: torch.Tensor, last: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        first = _factor(first, "first", 2)
        last = _factor(last, "last", 2).to(dtype=first.dtype, device=first.device)
        rank, in_features = first.shape
        if last.shape[1] != rank:
            raise ValueError(f"`last` must be (out_features, r={rank}); got {tuple(last.shape)}.")
        out_features = last.shape[0]
        bias = _bias(bias, out_features, first)
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        kwargs = {"dtype": first.dtype, "device": first.device}
        self.first = skip_init(nn.Linear, in_features, rank, bias=False, **kwargs)
        self.last = skip_init(nn.Linear, rank, out_features, bias=bias is not None, **kwargs)
        _set(self.first.weight, first)
        _set(self.last.weight, last)
        if bias is not None:
            _set(self.last.bias, bias)
        self._init_form()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense" and not self.training:
            return F.linear(x, self._kernel(), self.last.bias)
        return self.last(self.first(x))

    def weight_approx(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight that this module computes with."""
        return self.last.weight @ self.first.weight

    def _form_kernel(self, form: str) -> torch.Tensor:
        return _as_param(_f64(self.last.weight) @ _f64(self.first.weight), self.last.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.last.bias is not None}{self._form_repr()}"
        )

    def spec(self) -> dict[str, Any]:
        """Plain-python description of the structure (see :func:`build_from_spec`)."""
        return {
            "class": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.last.bias is not None,
            "dtype": _dtype_name(self.last.weight.dtype),
            **self._form_spec(),
        }

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: Any) -> "LowRankLinear":
        kwargs = {"dtype": dtype, "device": device}
        return _apply_spec_form(cls(
            torch.zeros(spec["rank"], spec["in_features"], **kwargs),
            torch.zeros(spec["out_features"], spec["rank"], **kwargs),
            torch.zeros(spec["out_features"], **kwargs) if spec["bias"] else None,
        ), spec)


# --------------------------------------------------------------------------------------------
# Rebuilding from a spec
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (Tucker2Conv2d, CPConv2d, LowRankConv2d, LowRankLinear)
}
_REQUIRED_KEYS = {
    "Tucker2Conv2d": ("in_channels", "out_channels", "kernel_size", "ranks", "stride", "padding", "dilation", "padding_mode", "bias"),
    "CPConv2d": ("in_channels", "out_channels", "kernel_size", "rank", "stride", "padding", "dilation", "padding_mode", "bias"),
    "LowRankConv2d": ("in_channels", "out_channels", "kernel_size", "rank", "stride", "padding", "dilation", "padding_mode", "bias"),
    "LowRankLinear": ("in_features", "out_features", "rank", "bias"),
}


def _conv_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    padding = spec["padding"]
    return {
        "stride": tuple(spec["stride"]),
        "padding": padding if isinstance(padding, str) else tuple(padding),
        "dilation": tuple(spec["dilation"]),
        "padding_mode": spec["padding_mode"],
    }


def build_from_spec(
    spec: dict[str, Any], *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Build an uninitialized factorized module from its ``spec()`` (e.g. :meth:`Tucker2Conv2d.spec`).

    The parameters are zero; load them with ``load_state_dict``, e.g.
    ``build_from_spec(m.spec()).load_state_dict(m.state_dict())``.

    Parameters
    ----------
    spec : dict
        As returned by the ``spec()`` method of a module of this file (possibly after a JSON
        round trip, which turns tuples into lists).
    dtype : torch.dtype, optional
        Parameter dtype; default the one recorded in the spec (float32 if absent).
    device : torch.device or str, optional
        Parameter device (CPU by default).

    Raises
    ------
    ValueError
        For an unknown class name or missing keys.
    """
    if not isinstance(spec, dict):
        raise TypeError(f"`spec` must be a dict; got {type(spec).__name__}.")
    name = spec.get("class")
    if name not in _REGISTRY:
        raise ValueError(f"Unknown factorized layer class {name!r}; expected one of {sorted(_REGISTRY)}.")
    missing = [key for key in _REQUIRED_KEYS[name] if key not in spec]
    if missing:
        raise ValueError(f"The spec of a {name} lacks the keys {missing}.")
    if dtype is None:
        dtype_name = spec.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"Unsupported dtype {dtype_name!r} in spec; expected one of {sorted(_DTYPES)}.")
        dtype = _DTYPES[dtype_name]
    return _REGISTRY[name]._from_spec(spec, dtype, device)  # type: ignore[attr-defined]
