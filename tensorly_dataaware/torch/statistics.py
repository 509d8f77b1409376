"""Streaming input statistics of convolutional and linear layers.

The data-aware decompositions weight the approximation error of a layer by the covariance
``Sigma`` of the layer's *input patches*: for a convolution with weight ``W`` of shape
``(T, S, kh, kw)``, a patch is the vector of length ``n = S * kh * kw`` that the kernel sees at
one output position, in exactly the column order of ``W.reshape(T, -1)`` (channel-major, then
kernel row, then kernel column; the order of :func:`torch.nn.functional.unfold`).  The output
at that position is ``W.reshape(T, -1) @ patch + bias``, so ``Sigma`` multiplies the
matricized weight on its right (input) side.

This module provides

* :func:`patches_for`: the patch vectors a layer sees for a given input, honouring stride,
  padding (including ``'same'`` / ``'valid'`` and every ``padding_mode``), dilation and groups;
* :class:`LayerStatistics`: float64 streaming moments (count, sum, sum of outer products) of
  those patches, mergeable across data shards and savable atomically;
* :func:`collect_covariances`: runs a model over batches with forward pre-hooks and returns one
  :class:`LayerStatistics` per selected layer, in memory independent of the dataset size.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._atomic import atomic_write
from .._validation import check_positive_int

try:  # tqdm is a hard dependency of the package, but keep the adapter importable without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised only in stripped-down environments
    tqdm = None

__all__ = [
    "LayerStatistics",
    "CrossStatistics",
    "PRECISIONS",
    "patches_for",
    "collect_covariances",
    "save_statistics",
    "load_statistics",
    "merge_statistics",
]

#: Module types whose input statistics can be collected, with the ``kind`` they map to.
_SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear)
_KINDS = ("conv2d", "conv1d", "linear")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_FORMAT_LAYER = "tensorly_dataaware.LayerStatistics"
_FORMAT_MAPPING = "tensorly_dataaware.LayerStatisticsMapping"
_FORMAT_CROSS = "tensorly_dataaware.CrossStatistics"
_FORMAT_VERSION = 1

#: Accepted values of the ``precision`` option of the accumulators and of
#: :func:`collect_covariances`; see :func:`_accumulate_products` for what each means.
PRECISIONS = ("auto", "float32", "float64")

#: Rows per float32 product in the ``'float32'`` policy.  Each block's float32 product is
#: added into the float64 accumulator, so rounding errors do not grow with the data set:
#: the error of one accumulated entry is bounded by ``gamma(FLOAT32_BLOCK_ROWS)`` (see
#: :func:`float32_error_bound`) times ``sum_k |a_ki| |b_kj|``.  8192 keeps the per-call
#: overhead negligible for the product shapes of the shipped models (measured, see
#: ``benchmarks/collect_speed.py``) while the bound stays below 5e-4 (typically ~1e-6).
FLOAT32_BLOCK_ROWS = 8192


# --------------------------------------------------------------------------------------------
# Products accumulated in float64
# --------------------------------------------------------------------------------------------


def _check_precision(precision: Any) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}; got {precision!r}.")
    return precision


def _product_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype in which the per-batch products of data of ``dtype`` are formed.

    ``'float64'`` always multiplies in float64.  ``'float32'`` and ``'auto'`` multiply data
    of float32 or lower precision in float32 (float16/bfloat16 convert to float32 exactly),
    and float64 data in float64: data that is already float64 keeps float64 products, so
    only a network that runs in single precision anyway gets single-precision products.
    """
    if precision == "float64" or dtype == torch.float64:
        return torch.float64
    return torch.float32


#: Mean squares (sum of squares / count) of a patch entry outside this range leave float32
#: products too little room: below it they come near float32's smallest normal number
#: (2^-126) and lose their relative accuracy or become zero; above it block sums of
#: thousands of products (times the row length, on the DFT route) come near its overflow
#: (2^128). float64 products cover both (:func:`_float32_range_ok`).
FLOAT32_SAFE_MEAN_SQUARE = (2.0**-90, 2.0**90)


#: With float32 products, a batch whose largest variance is below this fraction of its
#: largest mean square is formed again in float64 (:func:`_float32_range_ok`). The
#: products' rounding is about ``5e-6`` of the mean squares (``float32_error_bound``'s
#: typical case), and the centred covariance subtracts the squared means from them: for
#: inputs ``1e3 + N(0, 1)`` the variance is ``1e-6`` of the mean square and came out 8-54%
#: wrong. Above this fraction the centred covariance keeps about ``5e-4`` accuracy relative
#: to its largest entry; ReLU activations have ~0.36.
FLOAT32_MIN_SPREAD = 1e-2


def _float32_range_ok(count: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether moments formed with float32 products can be kept, or must be formed again in float64.

    ``pairs`` holds ``(sums, sums_of_products)``: the float64 column sums of a batch and the
    matching diagonal of its product sums (the sums of squares, or of ``x_i y_i``). False
    when any is non-finite, when a non-zero mean product lies outside
    :data:`FLOAT32_SAFE_MEAN_SQUARE`, or when a column with a non-zero sum has a zero sum of
    squares (its squares underflowed to zero). Why: ``precision='auto'`` forms the products
    in float32, and finite float32 activations of magnitude 1e-20 or 1e18 gave statistics
    that were 100% wrong, or an error blaming NaN in the data (collected in float64 they
    are exact). A dead (all-zero) column passes: its zeros are exact. Also False when the
    means dominate (the largest variance below :data:`FLOAT32_MIN_SPREAD` of the largest
    mean product): the centred covariance would be lost in the products' rounding.
    """
    if count == 0:
        return True
    low, high = FLOAT32_SAFE_MEAN_SQUARE
    for sums, products in pairs:
        if not (bool(torch.isfinite(sums).all()) and bool(torch.isfinite(products).all())):
            return False
        mean = products.abs() / count
        if bool(((mean > 0) & (mean < low)).any()) or bool((mean > high).any()):
            return False
        if bool(((products == 0) & (sums != 0)).any()):
            return False
        # The products' rounding, ~5e-6 of the largest mean square, must stay small against
        # the largest variance: the scale of the centred covariance, which subtracts the
        # squared means. (Per group. For x_i y_i pairs of cross statistics the test is
        # approximate, which at worst costs a float64 repeat.)
        spread = (mean - (sums / count) ** 2).amax(dim=-1)
        if bool((spread < FLOAT32_MIN_SPREAD * mean.amax(dim=-1)).any()):
            return False
    return True


def _redo_in_float64(precision: str, dtype: torch.dtype, count: int,
                     pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether moments just formed with ``precision`` from data of ``dtype`` must be formed
    again with float64 products: only for ``'auto'`` with float32 products, when
    :func:`_float32_range_ok` says their range was left."""
    return (precision == "auto" and _product_dtype(dtype, precision) != torch.float64
            and not _float32_range_ok(count, pairs))


def float32_error_bound(rows: int = FLOAT32_BLOCK_ROWS) -> float:
    """Worst-case relative error ``gamma(rows) = rows * u / (1 - rows * u)`` of float32 products.

    With ``u = 2**-24`` the unit roundoff of float32.  In the ``'float32'`` precision policy
    every accumulated entry ``S_ij = sum_k a_ki b_kj`` satisfies

        ``|computed S_ij - S_ij| <= gamma(FLOAT32_BLOCK_ROWS) * sum_k |a_ki| |b_kj|
        <= gamma(FLOAT32_BLOCK_ROWS) * sqrt(S^a_ii S^b_jj)``

    (the classical bound for a dot product of ``rows`` terms in any summation order, applied
    block by block; the float64 sum of the blocks adds a term of order ``1e-16``; the second
    form is Cauchy-Schwarz, with ``S^a``, ``S^b`` the Gram diagonals).  The bound is valid
    for every input whose products stay in float32's normal range (see
    :data:`FLOAT32_SAFE_MEAN_SQUARE`); rounding errors of random sign make the typical error about
    ``sqrt(rows) * u`` instead (``~5e-6`` for 8192 rows), which the tests check as well.
    """
    unit = 2.0**-24
    return rows * unit / (1.0 - rows * unit)


@contextlib.contextmanager
def _ieee_float32_matmul():
    """IEEE float32 matrix products inside the block, whatever the process's precision setting.

    ``torch.set_float32_matmul_precision('high' / 'medium')``, common in training scripts,
    lets float32 products run in TF32 on GPUs and in bfloat16 on CPUs: on the development CPU
    a 512 x 512 float32 product then had a relative error of 2.8e-3 instead of 5.4e-7, which
    would silently break the bound of :func:`float32_error_bound`.  The statistics therefore
    ask for IEEE products for their own work and restore the caller's setting afterwards
    (the model's forward pass, between the hooks, keeps the caller's setting).  PyTorch
    versions with per-backend settings (``torch.backends.<backend>.matmul.fp32_precision``)
    are set per backend, so that a caller who uses that API does not meet the error PyTorch
    raises when the legacy and the new API are mixed; older versions use the legacy one.
    """
    matmuls = [getattr(getattr(torch.backends, name, None), "matmul", None) for name in ("mkldnn", "cuda")]
    matmuls = [m for m in matmuls if m is not None and hasattr(m, "fp32_precision")]
    if matmuls:
        saved = [(m, m.fp32_precision) for m in matmuls]
        for m, _ in saved:
            m.fp32_precision = "ieee"
        try:
            yield
        finally:
            for m, value in saved:
                m.fp32_precision = value
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _accumulate_products(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, precision: str, sums: tuple[torch.Tensor, ...] = ()
) -> None:
    """``out += a^T b`` (batched over the leading group axis) and ``sums[i] += column sums``.

    Parameters
    ----------
    out : torch.Tensor
        ``(g, n, n_b)`` float64 accumulator, updated in place.
    a, b : torch.Tensor
        ``(g, m, n)`` and ``(g, m, n_b)`` data on ``out``'s device (``b`` may be ``a``
        itself: one conversion).
    precision : {'auto', 'float32', 'float64'}
        See :func:`_product_dtype`.  In float32, the rows are taken in blocks of at most
        :data:`FLOAT32_BLOCK_ROWS`, each block's product formed in float32 and added in
        float64 (see :func:`float32_error_bound` for the resulting error bound).
    sums : tuple of torch.Tensor
        ``(g, n)`` float64 accumulators that receive the column sums of ``a`` (first) and of
        ``b`` (second), accumulated the same way.
    """
    dtype = _product_dtype(a.dtype, precision)
    same = b is a
    a = a.to(dtype)
    b = a if same else b.to(dtype)
    groups, m, n = a.shape
    n_b = b.shape[2]
    spans = _symmetric_spans(n) if same else None
    if spans is not None:
        # a^T a is symmetric: only its block rows from the diagonal on are multiplied (about
        # 2/3 of the arithmetic with three block rows), then mirrored. Measured on one
        # 8192-row float32 block, one thread: 1.45 against 1.87 ms at n = 144, 4.6 against
        # 7.0 ms at n = 288, 18.6 against 26.6 ms at n = 576. Each entry is still one block
        # product summed in float64, so the error bound is unchanged.
        upper = torch.zeros_like(out)
        for lo, hi in spans:
            _accumulate_products(upper[:, lo:hi, lo:], a[:, :, lo:hi], a[:, :, lo:], precision)
        for i, (lo, hi) in enumerate(spans):
            for lo2, hi2 in spans[i + 1:]:
                upper[:, lo2:hi2, lo:hi] = upper[:, lo:hi, lo2:hi2].transpose(1, 2)
        out += upper
        for acc in sums[:2]:
            _accumulate_sums(acc, a, precision)
        return
    if dtype == torch.float64:
        out.baddbmm_(a.transpose(1, 2), b)
        for acc, data in zip(sums, (a, b)):
            acc += data.sum(dim=1)
        return
    # float32: full blocks of FLOAT32_BLOCK_ROWS rows in one batched call (one call instead of
    # one per block), each block's product summed into float64; then the ragged remainder.
    # Blocks are bounded so that the (groups, blocks, n, n) float32 products stay below
    # _FLOAT32_SCRATCH elements.
    rows = FLOAT32_BLOCK_ROWS
    if a.stride(1) == 1 and b.stride(1) == 1 and m > 1 and min(n, n_b) > 1:
        # Positions innermost (transposed views, as _patches_kernel_major stores grouped
        # patches): one batched GEMM per row block reads the blocks as they are, where the
        # batched matmul below would copy them.
        for first in range(0, m, rows):
            a_blk = a[:, first:first + rows]
            b_blk = a_blk if same else b[:, first:first + rows]
            out += torch.bmm(a_blk.transpose(1, 2), b_blk)
            for acc, data in zip(sums, (a_blk, b_blk)):
                acc += data.sum(dim=1)
        return
    n_blocks = m // rows
    per_call = max(1, _FLOAT32_SCRATCH // max(1, groups * n * n_b))
    for first in range(0, n_blocks, per_call):
        count = min(per_call, n_blocks - first)
        span = slice(first * rows, (first + count) * rows)
        a_blk = a[:, span].reshape(groups, count, rows, n)
        b_blk = a_blk if same else b[:, span].reshape(groups, count, rows, n_b)
        out += torch.matmul(a_blk.transpose(2, 3), b_blk).sum(dim=1, dtype=torch.float64)
        for acc, data in zip(sums, (a_blk, b_blk)):
            acc += data.sum(dim=2).sum(dim=1, dtype=torch.float64)
    if n_blocks * rows < m:
        a_rem = a[:, n_blocks * rows:]
        b_rem = a_rem if same else b[:, n_blocks * rows:]
        out += torch.bmm(a_rem.transpose(1, 2), b_rem)
        for acc, data in zip(sums, (a_rem, b_rem)):
            acc += data.sum(dim=1)


#: Symmetric products ``a^T a`` with at least this many columns are split into block rows.
_SYMMETRIC_SPLIT_MIN = 96


def _symmetric_spans(n: int) -> list[tuple[int, int]] | None:
    """Column spans of the block rows of a symmetric ``n x n`` product, or ``None`` (too
    small for the split to pay: below 96 columns the smaller GEMMs lose what they save)."""
    if n < _SYMMETRIC_SPLIT_MIN:
        return None
    k = min(3, n // 48)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _accumulate_sums(acc: torch.Tensor, a: torch.Tensor, precision: str) -> None:
    """``acc += column sums of a`` (``(g, m, n)``), in float32 blocks of at most
    :data:`FLOAT32_BLOCK_ROWS` rows added in float64, as :func:`_accumulate_products` sums."""
    if a.dtype == torch.float64:
        acc += a.sum(dim=1)
        return
    for first in range(0, a.shape[1], FLOAT32_BLOCK_ROWS):
        # Summed in the data's dtype, then added in float64: ``sum(dtype=float64)`` would
        # convert the whole block first (41% of the moments of a 3x3 stride-2 layer with 16
        # channels at 28x28, 250 images, in a profile).
        acc += a[:, first:first + FLOAT32_BLOCK_ROWS].sum(dim=1)


#: Most float32 elements held by the per-block products of one batched call (64 MiB).
_FLOAT32_SCRATCH = 1 << 24

# --------------------------------------------------------------------------------------------
# Patch extraction
# --------------------------------------------------------------------------------------------


def _kind_of(module: nn.Module) -> str:
    """Return ``'conv2d'``, ``'conv1d'`` or ``'linear'``, or raise a ``TypeError``."""
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(
        f"Input statistics are supported for nn.Conv2d, nn.Conv1d and nn.Linear only; "
        f"got a module of type {type(module).__module__}.{type(module).__qualname__}."
    )


def _conv_geometry(module: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    """Describe a 1-D or 2-D convolution as a 2-D one.

    A ``Conv1d`` is treated as a ``Conv2d`` with a kernel of height 1 acting on an input of
    height 1, so that a single code path extracts patches for both.

    Returns
    -------
    dict
        ``kernel``, ``stride``, ``dilation`` as ``(h, w)`` pairs; ``pad`` as the
        ``(left, right, top, bottom)`` amounts in :func:`torch.nn.functional.pad` order;
        ``padding_mode``; ``groups``; ``in_channels``.
    """
    if isinstance(module, nn.Conv2d):
        kernel = tuple(int(k) for k in module.kernel_size)
        stride = tuple(int(s) for s in module.stride)
        dilation = tuple(int(d) for d in module.dilation)
    else:
        kernel = (1, int(module.kernel_size[0]))
        stride = (1, int(module.stride[0]))
        dilation = (1, int(module.dilation[0]))
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            pad_hw = [(0, 0), (0, 0)]
        elif padding == "same":
            # Same rule as nn.Conv2d / F.conv2d(padding='same'): the total padding
            # dilation * (k - 1) is split with the extra element on the bottom/right side.
            pad_hw = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pad_hw.append((total // 2, total - total // 2))
        else:  # pragma: no cover - nn.Conv* rejects other strings at construction
            raise ValueError(f"Unsupported padding string {padding!r}.")
    else:
        pads = [int(p) for p in padding]
        if isinstance(module, nn.Conv1d):
            pads = [0] + pads
        pad_hw = [(pads[0], pads[0]), (pads[1], pads[1])]
    return {
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "pad": (pad_hw[1][0], pad_hw[1][1], pad_hw[0][0], pad_hw[0][1]),
        "padding_mode": str(module.padding_mode),
        "groups": int(module.groups),
        "in_channels": int(module.in_channels),
    }


def _random_positions(
    n_images: int, n_positions: int, k: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Draw, for each image, ``k`` distinct positions uniformly among ``n_positions``.

    The top-``k`` of i.i.d. uniform scores is a uniformly random ``k``-subset, drawn for the
    whole batch in one vectorized call.  The scores are drawn on the CPU so that a CPU
    ``torch.Generator`` gives the same subsets whatever the data's device.
    """
    scores = torch.rand(n_images, n_positions, generator=generator)
    return scores.topk(k, dim=1).indices.to(device)


def _padded(x: torch.Tensor, geometry: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
    """``(padded input, out_h, out_w)`` of a convolution; raises if the kernel does not fit."""
    kh, kw = geometry["kernel"]
    sh, sw = geometry["stride"]
    dh, dw = geometry["dilation"]
    left, right, top, bottom = geometry["pad"]
    if any((left, right, top, bottom)):
        # Pad explicitly, exactly as nn.Conv2d does for non-zero padding modes and as
        # F.conv2d does (implicitly, with zeros) otherwise; the windows then need no padding.
        mode = geometry["padding_mode"]
        x = F.pad(x, (left, right, top, bottom), mode="constant" if mode == "zeros" else mode)
    height, width = x.shape[-2:]
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"The (padded) input of spatial size {(height, width)} is smaller than the dilated "
            f"kernel {(dh * (kh - 1) + 1, dw * (kw - 1) + 1)}."
        )
    return x, out_h, out_w


def _conv_patches(
    x: torch.Tensor, geometry: dict[str, Any], max_positions: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Patches of a batched 4-D input ``(B, C, H, W)`` as ``(groups, m, n)``."""
    kh, kw = geometry["kernel"]
    sh, sw = geometry["stride"]
    dh, dw = geometry["dilation"]
    groups = geometry["groups"]
    batch, channels = x.shape[:2]
    n_per_group = (channels // groups) * kh * kw
    x, out_h, out_w = _padded(x, geometry)
    n_positions = out_h * out_w

    # Sliding windows as a strided *view* (B, Ho, Wo, g, C/g, kh, kw): Tensor.unfold takes the
    # dilated window span with the stride, and the ::d slices keep its dilated taps.  Unlike
    # F.unfold, whose (B, C*K, L) result must still be transposed, this lets the single copy
    # below write the patches straight into their final (groups, m, n) layout, which measured
    # several times faster (F.unfold is slow in float64 on the CPU).
    windows = (
        x.unfold(2, dh * (kh - 1) + 1, sh)
        .unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        .unflatten(1, (groups, channels // groups))
        .permute(0, 3, 4, 1, 2, 5, 6)  # (B, Ho, Wo, g, C/g, kh, kw): patch entries last
    )
    if max_positions is None or max_positions >= n_positions:
        # Channel-major, then kernel row, then column: the order of weight.reshape(T, -1).
        return windows.permute(3, 0, 1, 2, 4, 5, 6).reshape(groups, batch * n_positions, n_per_group)

    # Sub-sampled positions: advanced indexing copies only the selected windows.
    k = max_positions
    sel = _random_positions(batch, n_positions, k, generator, x.device)  # (B, k)
    images = torch.arange(batch, device=x.device)[:, None].expand(batch, k)
    picked = windows[images, sel // out_w, sel % out_w]  # (B, k, g, C/g, kh, kw)
    return picked.permute(2, 0, 1, 3, 4, 5).reshape(groups, batch * k, n_per_group)


def _patches_kernel_major(x: torch.Tensor, geometry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All patches of a batched 4-D input as ``(groups, m, n)``, columns in *kernel-major* order.

    The columns run over (kernel row, kernel column, channel) instead of the channel-major
    order of :func:`patches_for`; the second result ``order`` maps one to the other
    (``patches_for(...)[..., j] == result[..., order[j]]``), so moments computed from these
    patches are put in channel-major order by indexing them with ``order``.

    Why: with one group the input is copied once to channels-last and every patch row is
    then gathered from runs of ``C`` contiguous values, where the channel-major layout
    gathers single scattered values; on a 2-core CPU (float32, 250 images, 3x3 stride-2
    kernels) forming the patches took 3.5x less time at 16 channels and 28x28 and 3.4x less
    at 32 channels and 14x14. The ``n``-index permutation of the ``n x n`` moments costs
    little next to that. With several groups the patches are stored with the positions
    innermost (the result is a transposed view; see the comment in the code).
    """
    kh, kw = geometry["kernel"]
    sh, sw = geometry["stride"]
    dh, dw = geometry["dilation"]
    groups = geometry["groups"]
    c_g = x.shape[1] // groups
    x, _, _ = _padded(x, geometry)
    if groups > 1:
        # Stored group-major with the positions innermost, (groups, n, m), and returned as a
        # (groups, m, n) view: the gather copies runs along an image row and the products of
        # all groups are one batched GEMM per row block on these views as they are (see
        # _accumulate_products). The position-major layout below gathered runs of C / groups
        # values, single values for a depthwise layer: 1.7x slower to form and 3.7x slower to
        # multiply at 64 channels, 28x28, stride 2, 250 images (one thread, 2-core CPU).
        windows = (
            x.unfold(2, dh * (kh - 1) + 1, sh)
            .unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # (B, C, Ho, Wo, kh, kw)
            .unflatten(1, (groups, c_g))  # (B, g, C/g, Ho, Wo, kh, kw)
        )
        patches = windows.permute(1, 5, 6, 2, 0, 3, 4).reshape(groups, kh * kw * c_g, -1).transpose(1, 2)
    else:
        windows = (
            x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
            .unfold(1, dh * (kh - 1) + 1, sh)
            .unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # (B, Ho, Wo, C, kh, kw)
        )
        patches = windows.permute(0, 1, 2, 4, 5, 3).reshape(1, -1, kh * kw * c_g)
    order = torch.arange(kh * kw * c_g, device=x.device).reshape(kh * kw, c_g).T.reshape(-1)
    return patches, order


def patches_for(
    module: nn.Module,
    inputs: torch.Tensor,
    *,
    max_positions_per_image: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the input patch vectors that a layer multiplies by its weight.

    For a convolution with weight ``W`` of shape ``(T, S / groups, kh, kw)``, row ``p`` of
    ``patches[g]`` is the patch seen at one output position by group ``g``, in the column
    order of ``W[g * T_g:(g + 1) * T_g].reshape(T_g, -1)`` (``T_g = T / groups``): channel-major,
    then kernel row, then kernel column.  Hence, for every group,
    ``patches[g] @ W_g.T`` equals the layer's output without bias, position by position
    (rows are ordered image by image, then output row, then output column).

    Parameters
    ----------
    module : nn.Conv2d, nn.Conv1d or nn.Linear
        The layer.  Stride, padding (integers, tuples, ``'same'`` and ``'valid'``),
        ``padding_mode`` (``'zeros'``, ``'reflect'``, ``'replicate'``, ``'circular'``),
        dilation and groups are honoured.
    inputs : torch.Tensor
        The layer's input: ``(B, C, H, W)`` or ``(C, H, W)`` for ``Conv2d``, ``(B, C, L)`` or
        ``(C, L)`` for ``Conv1d``, ``(..., in_features)`` for ``Linear``.
    max_positions_per_image : int, optional
        If given, keep only this many output positions per image (per leading-axis sample
        for ``Linear`` inputs with more than two dimensions), drawn uniformly at random
        without replacement.  See :func:`collect_covariances` for why this is unbiased.
    generator : torch.Generator, optional
        A CPU generator for the position draws (the global RNG if omitted).

    Returns
    -------
    torch.Tensor
        ``(groups, m, n)`` with ``groups = 1`` except for grouped convolutions,
        ``n = (in_channels / groups) * kh * kw`` (``in_features`` for ``Linear``), in the
        dtype and on the device of ``inputs``.

    Raises
    ------
    TypeError
        If ``module`` is not a supported layer or ``inputs`` is not a floating tensor.
    ValueError
        If the input shape does not fit the layer.
    """
    kind = _kind_of(module)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor; got {type(inputs).__name__}.")
    if not inputs.is_floating_point():
        raise TypeError(f"`inputs` must be a floating-point tensor; got dtype {inputs.dtype}.")
    if max_positions_per_image is not None:
        max_positions_per_image = check_positive_int(max_positions_per_image, "max_positions_per_image")

    if kind == "linear":
        n = int(module.in_features)
        if inputs.dim() == 0 or inputs.shape[-1] != n:
            raise ValueError(
                f"Linear layer expects inputs of shape (..., {n}); got {tuple(inputs.shape)}."
            )
        # Explicit sizes: a -1 cannot be inferred for an empty batch (0 samples give 0 patches).
        x = inputs.reshape(1, 1, n) if inputs.dim() == 1 else inputs.reshape(
            inputs.shape[0], math.prod(inputs.shape[1:-1]), n
        )
        batch, n_positions = x.shape[:2]
        if max_positions_per_image is not None and max_positions_per_image < n_positions:
            sel = _random_positions(batch, n_positions, max_positions_per_image, generator, x.device)
            x = torch.gather(x, 1, sel[:, :, None].expand(-1, -1, n))
        return x.reshape(1, -1, n)

    geometry = _conv_geometry(module)
    x = _conv_input(module, kind, inputs, geometry)
    return _conv_patches(x, geometry, max_positions_per_image, generator)


def _conv_input(module: nn.Module, kind: str, inputs: torch.Tensor, geometry: dict[str, Any]) -> torch.Tensor:
    """Check a convolution's input and return it as a batched 4-D ``(B, C, H, W)`` tensor."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor; got {type(inputs).__name__}.")
    if not inputs.is_floating_point():
        raise TypeError(f"`inputs` must be a floating-point tensor; got dtype {inputs.dtype}.")
    spatial_dims = 2 if kind == "conv2d" else 1
    if inputs.dim() not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(
            f"{type(module).__name__} expects a {spatial_dims + 2}-D batched or "
            f"{spatial_dims + 1}-D unbatched input; got shape {tuple(inputs.shape)}."
        )
    x = inputs if inputs.dim() == spatial_dims + 2 else inputs.unsqueeze(0)
    if x.shape[1] != geometry["in_channels"]:
        raise ValueError(
            f"{type(module).__name__} has in_channels={geometry['in_channels']} but the input has "
            f"{x.shape[1]} channels (shape {tuple(inputs.shape)})."
        )
    if kind == "conv1d":
        x = x.unsqueeze(2)  # (B, C, 1, L): a height-1 image for a 1 x k kernel
    return x



# --------------------------------------------------------------------------------------------
# Moments of all patches without forming them (stride-1 convolutions)
# --------------------------------------------------------------------------------------------


def _excluded(lo: int, hi: int, starts: list[int], length: int) -> list[list[int]]:
    """For each window ``[s, s + length)``, the indices in ``[lo, hi)`` that it leaves out."""
    return [[i for i in range(lo, hi) if not s <= i < s + length] for s in starts]


#: Most elements of the temporary of one elementwise block in :func:`_group_products`: small
#: enough to stay in a core's cache between the product and its sum. 64k elements took 3.6 ms
#: per product of two (64000, 128) float32 views, 1M to 4M elements 6.2-6.5 ms, 16k 9.1 ms
#: (per-call overhead); one thread on the 2-core development machine. On accelerators, where
#: each block is a kernel launch, the blocks are 64 times larger.
_ELEMENTWISE_SCRATCH = 1 << 16


#: Widest product (columns) that :func:`_group_products` forms for several small channel groups
#: at once.
_GROUP_PRODUCT_WIDTH = 32


def _group_products(a: torch.Tensor, b: torch.Tensor, groups: int, precision: str) -> torch.Tensor:
    """Float64 ``(groups, c_g, c_g)``: ``a[:, group]^T b[:, group]`` for every channel group.

    ``a`` and ``b`` are ``(m, C)`` (views are fine), ``c_g = C / groups``.  One group is one
    product (:func:`_accumulate_products`).  Several groups are multiplied all at once, in
    blocks of at most :data:`FLOAT32_BLOCK_ROWS` rows whose float32 results are added in
    float64 (the error bound of :func:`float32_error_bound` holds): an elementwise product
    for one channel per group (depthwise convolutions), otherwise one batched GEMM per block
    over *super-groups* of ``k`` consecutive groups (``k * c_g`` at most
    :data:`_GROUP_PRODUCT_WIDTH` columns), of whose ``k x k`` block products only the
    diagonal blocks are kept.

    Why: one GEMM per group and shift made a depthwise layer's statistics hundreds of times
    slower than the layer itself (957 ms against 2.1 ms for 128 channels at 16x16, 64
    images, on the 2-core development machine; 30-40 ms now). A batched GEMM per group on
    the strided ``(m, c_g)`` column slices reads every cache line once per group; with
    super-groups it reads each ``k`` times fewer and wastes ``k`` times the (cheap)
    arithmetic: for 128 channels in groups of 4 over 64000 rows, 9.9 ms per product against
    41.7 ms (one thread).
    """
    m, channels = a.shape
    c_g = channels // groups
    dtype = _product_dtype(a.dtype, precision)
    if groups == 1 and c_g > 1 and (m <= FLOAT32_BLOCK_ROWS or dtype == torch.float64):
        # One block (the border products of _shift_moments): one GEMM, without the set-up of
        # _accumulate_products (a fixed cost that weighs on small batches).
        return torch.mm(a.to(dtype).T, b.to(dtype)).to(torch.float64)[None]
    out = torch.zeros(groups, c_g, c_g, dtype=torch.float64, device=a.device)
    if groups == 1 and c_g > 1:
        a_3d = a[None]
        _accumulate_products(out, a_3d, a_3d if b is a else b[None], precision)  # a^T a: symmetric
        return out
    rows = FLOAT32_BLOCK_ROWS if dtype != torch.float64 else m
    if c_g == 1:
        scratch = _ELEMENTWISE_SCRATCH * (1 if a.device.type == "cpu" else 64)
        # Chunks of about `scratch` elements, each summed block by block (at most `rows`
        # rows per float32 sum, the blocks added in float64). With few channels a chunk holds
        # many blocks: one block per chunk made a single-channel layer's statistics (13
        # shifts of 196k rows) hundreds of tiny operations, 13 ms for a 9 x 9 covariance.
        blocks = max(1, scratch // (channels * rows))
        rows = max(1, min(rows, scratch // channels))
        for first in range(0, m, rows * blocks):
            product = a[first:first + rows * blocks].to(dtype) * b[first:first + rows * blocks].to(dtype)
            full = product.shape[0] // rows * rows
            if full:
                out[:, 0, 0] += product[:full].view(-1, rows, channels).sum(1).sum(0, dtype=torch.float64)
            if full < product.shape[0]:
                out[:, 0, 0] += product[full:].sum(0).to(torch.float64)
        return out
    k = max(1, min(groups, _GROUP_PRODUCT_WIDTH // c_g))
    while groups % k:
        k -= 1
    supers, width = groups // k, k * c_g
    wide = torch.zeros(supers, k, c_g, k, c_g, dtype=torch.float64, device=a.device)
    for first in range(0, m, rows):
        # Every super-group's block at once: (supers, rows, width) views of the (rows, C) slices.
        a_blk = a[first:first + rows].to(dtype).view(-1, supers, width).transpose(0, 1)
        b_blk = b[first:first + rows].to(dtype).view(-1, supers, width).transpose(0, 1)
        wide += torch.bmm(a_blk.transpose(1, 2), b_blk).view(supers, k, c_g, k, c_g)
    diagonal = torch.arange(k, device=a.device)
    return wide[:, diagonal, :, diagonal].transpose(0, 1).reshape(groups, c_g, c_g)


@functools.lru_cache(maxsize=64)
def _column_dft(
    width: int, length: int, dtype: torch.dtype, device_type: str, device_index: int | None,
    columns: tuple[int, ...] = (),
) -> torch.Tensor:
    """``(2 F + len(columns), width)``: real DFT rows of a length-``length`` zero-padded signal
    (``F = length // 2 + 1``), then one selector row per entry of ``columns``.

    Row ``2 k`` is ``cos(2 pi k w / length)`` and row ``2 k + 1`` is ``sin(2 pi k w / length)``,
    so that a product with data laid out ``(..., width, C)`` gives, for each frequency, the
    cosine and sine parts of ``C`` channels side by side (``2 C`` contiguous columns).  Row
    ``0`` (all ones) gives the row sums.  A selector row is 1 at its column and 0 elsewhere,
    so the same product copies that column exactly (every other term is an exact zero of a
    finite input).  Computed in float64 and rounded once to ``dtype``; cached, callers must
    not modify it.
    """
    k = torch.arange(length // 2 + 1, dtype=torch.float64)[:, None]
    angle = (2 * math.pi / length) * k * torch.arange(width, dtype=torch.float64)[None, :]
    rows = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1).reshape(-1, width)
    selectors = torch.zeros(len(columns), width, dtype=torch.float64)
    selectors[torch.arange(len(columns)), list(columns)] = 1.0
    return torch.cat([rows, selectors]).to(dtype=dtype, device=torch.device(device_type, device_index))


@functools.lru_cache(maxsize=256)
def _dft_lag_weights(
    length: int, lags: tuple[int, ...], device_type: str, device_index: int | None
) -> torch.Tensor:
    """Float64 ``(len(lags), 2 F)``: real correlation at each column lag from the half spectrum.

    With ``X = C - i S`` the DFT of a real row (``C``, ``S`` the cosine and sine sums),
    ``sum_w x_c(w) x_d(w + s) = (1 / L) sum_k w_k (R_k cos(2 pi k s / L) - I_k sin(2 pi k s / L))``
    where ``R_k = C_c C_d + S_c S_d`` and ``I_k = S_c C_d - C_c S_d`` (summed over the rows),
    ``w_k`` = 1 for the zero (and, ``L`` even, the Nyquist) frequency and 2 otherwise: the
    other half of the spectrum is the complex conjugate. Columns: ``R`` weights, then ``I``.
    Cached on its device (it is the same for every batch of a layer); callers must not
    modify it.
    """
    n_freq = length // 2 + 1
    k = torch.arange(n_freq, dtype=torch.float64)
    weight = torch.full((n_freq,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if length % 2 == 0:
        weight[-1] = 1.0
    angle = (2 * math.pi / length) * torch.tensor(lags, dtype=torch.float64)[:, None] * k[None, :]
    weights = torch.cat([weight * torch.cos(angle), -weight * torch.sin(angle)], dim=1) / length
    return weights.to(torch.device(device_type, device_index))


#: Rows per float32 block of the products of the DFT route (:func:`_dft_products`):
#: a quarter of :data:`FLOAT32_BLOCK_ROWS`, so that together with the rounding of the
#: transform itself the route stays within :func:`float32_error_bound` (see
#: :func:`dft_error_bound`).
DFT_BLOCK_ROWS = FLOAT32_BLOCK_ROWS // 4

#: The DFT route holds the spectra of all image rows of a batch at once (about the size of
#: the batch's input); beyond this many bytes the direct products are used instead, which
#: need no memory beyond the frame.
_DFT_MAX_SPECTRA_BYTES = 1 << 28

#: The DFT route is taken when its estimated flops are below this fraction of the direct
#: products' (its GEMMs run somewhat slower: more, shorter products on strided rows).
_DFT_FLOP_FRACTION = 0.75


def dft_error_bound(width: int, rows: int = DFT_BLOCK_ROWS) -> float:
    """Worst-case relative error of one full-frame shift product formed by the DFT route in float32.

    Every product ``S_cd = sum_q x_c(q) x_d(q + delta)`` that :func:`_dft_products`
    forms from spectra (full-frame shifts and border rows; its border columns are direct
    products, within :func:`float32_error_bound`) from float32 data satisfies

        ``|computed S_cd - S_cd| <= dft_error_bound(width) * sqrt(S^0_cc S^0_dd)``

    with ``S^0`` the zero-shift Gram diagonals (sums of squares of each channel), i.e. the
    second form of :func:`float32_error_bound`.  Derivation (first order in the unit
    roundoff ``u``): a DFT coefficient of one image row of ``width`` pixels is off by at most
    ``gamma(width + 1) ||x_row||_1 <= gamma(width + 1) sqrt(width) ||x_row||_2`` (the
    rounded cosine/sine table included); the float32 block sums of the cross-spectra add
    ``gamma(rows)`` times ``sum |C_c||C_d| + ...`` over the four cosine/sine parts, which is
    at most ``2 |X_c(k)||X_d(k)|``; Parseval (``(1/L) sum_k |X(k)|^2 = ||x||^2``) and
    Cauchy-Schwarz over the frequencies and the rows turn both into multiples of
    ``sqrt(S^0_cc S^0_dd)``: ``2 gamma(rows)`` for the products, ``4 sqrt(2) < 6`` times
    ``sqrt(width) gamma(width + 1)`` for the transform.  The float64 steps add ``O(1e-16)``.
    The route is only taken where this is at most :func:`float32_error_bound`, the bound of
    the direct products (rows up to 76 pixels wide).
    """
    return 2 * float32_error_bound(rows) + 6 * math.sqrt(width) * float32_error_bound(width + 1)


def _dft_pays(shifts: list[tuple[int, int]], channels: int, rows: int, images: int, width: int, dw: int,
              dtype: torch.dtype) -> bool:
    """Whether :func:`_dft_products` should replace the direct route (:func:`_frame_products`).

    Only where its float32 error bound is within the direct products' (see
    :func:`dft_error_bound`), its products have more rows than columns, and a flop count
    (transform plus one ``2C x 2C`` product per row shift and frequency, against one
    ``C x C`` product per shift over the frame) says it does less than
    :data:`_DFT_FLOP_FRACTION` of the direct work, and its spectra fit in
    :data:`_DFT_MAX_SPECTRA_BYTES`.  Single channels stay direct (their products are
    elementwise, see :func:`_group_products`).
    """
    if channels < 2:
        return False
    if dtype != torch.float64 and dft_error_bound(width) > float32_error_bound():
        return False
    if rows * images < 2 * channels:
        # Products of fewer rows than columns are dominated by writing their 2C x 2C
        # results (512 channels at 4x4, 250 images: 16% slower than the direct products).
        return False
    n_freq = (width + max(abs(d2) for _, d2 in shifts) * dw) // 2 + 1
    if rows * images * 2 * n_freq * channels * torch.finfo(dtype).bits // 8 > _DFT_MAX_SPECTRA_BYTES:
        return False
    n_d1 = len({d1 for d1, _ in shifts})
    direct = 2 * len(shifts) * channels * channels * width
    dft = 4 * n_freq * width * channels + 8 * n_d1 * n_freq * channels * channels
    return dft < _DFT_FLOP_FRACTION * direct


def _row_spectra(
    data: torch.Tensor, length: int, columns: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real DFT of length ``length`` of every image row of ``data``, and some of its columns.

    ``data`` is ``(images, C, rows, width)``, as a layer receives it.  Returns the spectra,
    ``(rows, images, F, 2 C)`` (cosine then sine sums of every channel per frequency, see
    :func:`_column_dft`), and the data columns ``columns``, ``(rows, images, len(columns), C)``
    (exact copies), both views of one buffer.

    Row by row, one batched GEMM over the images, ``(2 F + len(columns)) x width`` by
    ``width x C``, reads the row's ``width x C`` slice of every image as it lies (a strided
    matrix) and writes its results with the channels innermost, where every frequency's
    products in :func:`_spectral_lags` read them as ``(image rows) x 2 C`` matrices.  No copy
    of the input is made, and the border columns come out of the same pass: copying the
    input channels-last first and transforming that, or transforming it as it lies and
    copying the spectra channels-last, each took 1.1 to 1.7 times as long (250 images of 16
    to 64 channels, 28x28 to 7x7, one or two threads), and each gather of a column of an
    ``(images, C, rows, width)`` input reads all of its memory.
    """
    batch, channels, rows, width = data.shape
    n_freq = length // 2 + 1
    data = data.to(dtype)
    table = _column_dft(width, length, dtype, data.device.type, data.device.index, columns)
    out = data.new_empty(rows, batch, table.shape[0], channels)
    table = table.expand(batch, *table.shape)
    for h in range(rows):
        torch.bmm(table, data[:, :, h, :].transpose(1, 2), out=out[h])
    spectra = out[:, :, :2 * n_freq].reshape(rows, batch, n_freq, 2 * channels)
    return spectra, out[:, :, 2 * n_freq:]


def _spectral_lags(
    spectra: torch.Tensor, lo: int, hi: int, skip: int, lags: list[int], length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Float64 ``(len(lags), 1, C, C)``: ``sum x(h, w)^T x(h + skip, w + lag)`` over the rows
    ``lo <= h < hi``, every image and column, from :func:`_row_spectra`.

    One ``(2 C x K) (K x 2 C)`` product per frequency (``K`` = rows times images) gives the
    cross-spectra of every channel pair; a small float64 product with
    :func:`_dft_lag_weights` turns them into the correlations at every wanted column lag.
    In float32 the products are summed in blocks of :data:`DFT_BLOCK_ROWS` rows added in
    float64 (see :func:`dft_error_bound`).
    """
    _, _, n_freq, width2 = spectra.shape
    c = width2 // 2
    left = spectra[lo:hi].reshape(-1, n_freq, width2)
    right = spectra[lo + skip:hi + skip].reshape(-1, n_freq, width2)
    m = left.shape[0]
    step = DFT_BLOCK_ROWS if dtype != torch.float64 else m
    gram = torch.zeros(n_freq, width2, width2, dtype=torch.float64, device=spectra.device)
    for first in range(0, m, step):
        gram += torch.bmm(left[first:first + step].permute(1, 2, 0), right[first:first + step].transpose(0, 1))
    real = gram[:, :c, :c] + gram[:, c:, c:]
    imag = gram[:, c:, :c] - gram[:, :c, c:]
    weights = _dft_lag_weights(length, tuple(lags), spectra.device.type, spectra.device.index)
    return (weights @ torch.cat([real, imag]).reshape(2 * n_freq, c * c)).view(len(lags), 1, c, c)


def _dft_products(
    data: torch.Tensor, plan: "_ShiftPlan", row0: int, col0: int, kernel: tuple[int, int], dh: int, dw: int,
    out_hw: tuple[int, int], dtype: torch.dtype, precision: str,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The products of ``plan`` (float64 ``(1, C, C)``: its full-frame shifts, then its border
    terms) and the float64 ``(C, kh kw)`` patch sums, for an ungrouped stride-1 layer, by a
    DFT along the image rows and without a frame.

    ``data`` is ``(images, C, rows, width)``: the input (zero padding) or the padded input
    (other padding modes), placed at frame row ``row0`` and column ``col0`` of
    :func:`_shift_moments`'s frame; everything outside it is zero.  ``out_hw`` is the
    output size.

    * Full-frame shifts ``(d1, d2)``: each image row gets a real DFT of length
      ``width + max |d2| dw`` (:func:`_row_spectra`; no wrap-around for the lags needed), and
      for every row shift ``d1`` the products of the spectra of rows ``h`` and ``h + d1 dh``
      give the correlations at all column shifts ``d2`` at once (:func:`_spectral_lags`).
    * Border rows: the same, restricted to that row.
    * Border columns and corners: direct products of the few data columns they read, which
      the transform copies out in the same pass.
    * Patch sums: the row sums (the zero frequency) minus the columns a kernel offset does
      not visit.

    Why: a direct product per shift costs ``2 C^2`` flops per pixel and shift (13 shifts for
    a 3x3 kernel: ``26 C^2``); here each row shift costs ``8 C^2 F / width`` per pixel
    (``F ~ width / 2``: ``~4 C^2``, 3 row shifts: ``~12 C^2``) plus ``4 F C`` for the
    transform.  And the input is read once: no channels-last frame of it is built (see
    ``benchmarks/RESULTS.md``, section 9, for what that saved).
    """
    batch, channels, data_h, data_w = data.shape
    kh, kw = kernel
    out_h, out_w = out_hw
    shifts = plan.shifts
    device = data.device
    # Data rows / columns visited by each kernel row / column offset (clipped to the data).
    row_span = [(max(0, a1 * dh - row0), max(0, min(data_h, a1 * dh - row0 + out_h))) for a1 in range(kh)]
    col_span = [(max(0, a2 * dw - col0), min(data_w, a2 * dw - col0 + out_w)) for a2 in range(kw)]
    unvisited = {a2: [w for w in range(data_w) if not lo <= w < hi] for a2, (lo, hi) in enumerate(col_span)}
    wanted_columns = {w for ws in unvisited.values() for w in ws}
    for r, c, s in plan.terms:
        if c is not None:
            wanted_columns |= {c - col0, c - col0 + shifts[s][1] * dw}
    columns = tuple(sorted(wanted_columns))
    slot = {w: j for j, w in enumerate(columns)}
    length = data_w + max(abs(d2) for _, d2 in shifts) * dw
    spectra, picked = _row_spectra(data, length, columns, dtype)

    out: list[torch.Tensor | None] = [None] * (len(shifts) + len(plan.terms))
    # Every wanted (rows lo..hi, row shift) pair of spectra, with the column lags it serves.
    requests: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for i, (d1, d2) in enumerate(shifts):
        requests.setdefault((0, data_h - d1 * dh, d1 * dh), []).append((d2 * dw, i))
    for j, (r, c, s) in enumerate(plan.terms):
        if c is None:  # a border row: its partner row is a data row (see _shift_plan)
            d1, d2 = shifts[s]
            requests.setdefault((r - row0, r - row0 + 1, d1 * dh), []).append((d2 * dw, len(shifts) + j))
    for (lo, hi, skip), wanted in requests.items():
        if hi <= lo:  # the shift is at least as tall as the data: no pair of data rows
            lags = torch.zeros(len(wanted), 1, channels, channels, dtype=torch.float64, device=device)
        else:
            lags = _spectral_lags(spectra, lo, hi, skip, [lag for lag, _ in wanted], length, dtype)
        for (_, position), value in zip(wanted, lags):
            out[position] = value

    for j, (r, c, s) in enumerate(plan.terms):
        if c is None:
            continue
        d1, d2 = shifts[s]
        e1, e2 = d1 * dh, d2 * dw
        first, second = picked[:, :, slot[c - col0]], picked[:, :, slot[c - col0 + e2]]  # (rows, images, C)
        if r is None:  # a border column over every data row whose partner row is a data row
            if e1 >= data_h:
                out[len(shifts) + j] = torch.zeros(1, channels, channels, dtype=torch.float64, device=device)
                continue
            a = first[:data_h - e1].reshape(-1, channels)
            b = a if (e1, e2) == (0, 0) else second[e1:].reshape(-1, channels)
        else:  # a corner: one pixel of every image
            a = first[r - row0]
            b = a if (e1, e2) == (0, 0) else second[r - row0 + e1]
        out[len(shifts) + j] = _group_products(a, b, 1, precision)

    # Patch sums: per data row, the sum over the images of its row sums (the zero-frequency
    # cosine part) and of the picked columns, then in float64 one window per kernel offset.
    row_sums = spectra[:, :, 0, :channels].sum(1).to(torch.float64)  # (rows, C)
    column_sums = picked.sum(1).to(torch.float64)  # (rows, columns, C)
    total = torch.empty(channels, kh * kw, dtype=torch.float64, device=device)
    for a1, (lo, hi) in enumerate(row_span):
        visited_rows = row_sums[lo:hi].sum(0)
        for a2 in range(kw):
            skipped = [slot[w] for w in unvisited[a2]]
            value = visited_rows - column_sums[lo:hi, skipped].sum((0, 1)) if skipped else visited_rows
            total[:, a1 * kw + a2] = value
    return out, total  # type: ignore[return-value]


class _ShiftPlan(NamedTuple):
    """What :func:`_shift_moments` computes for one geometry (see :func:`_shift_plan`)."""

    shifts: list[tuple[int, int]]
    terms: list[tuple[int | None, int | None, int]]
    combine: torch.Tensor
    ab_idx: torch.Tensor
    ba_idx: torch.Tensor


@functools.lru_cache(maxsize=256)
def _shift_plan(
    kh: int, kw: int, dh: int, dw: int, row0: int, col0: int, data_h: int, data_w: int, out_h: int, out_w: int
) -> _ShiftPlan:
    """The products :func:`_shift_moments` needs and how they combine into the patch blocks.

    It depends on the geometry only (not on the batch or the channels), so it is made once
    and cached; callers must not modify it.

    Returns
    -------
    _ShiftPlan
        ``shifts``: the half-plane of shifts ``(d1, d2)``, one full-frame product each.
        ``terms``: the border products that can matter, as ``(row, column, shift index)``
        (``column`` None: a border row; ``row`` None: a border column; both: a corner).
        ``combine``: float64 ``(pairs, len(shifts) + len(terms))``, the signs that make
        every block ``(a, a + delta)`` from those products, one row per *pair* of kernel
        offsets. ``ab_idx``, ``ba_idx``: each pair's block ``(a, a + delta)`` and its
        transpose ``(a + delta, a)`` as flat indices ``a * kh * kw + b`` of the ``k x k``
        blocks (``a``, ``b``: flat kernel offsets). Every block is one of the two.

    Why only some border products: a border correction is subtracted only from the blocks
    ``(a, a + delta)`` of the offsets ``a`` that leave the region out, only pairs inside the
    kernel are used, and a product is zero when the shifted neighbour of the region lies in
    the zero frame. With a 3x3 kernel and zero padding that leaves 3 of the 13 shifts per
    border region.
    """
    # Border rows / columns of the data that some kernel offset does not visit.
    rows_out = _excluded(row0, row0 + data_h, [a * dh for a in range(kh)], out_h)
    cols_out = _excluded(col0, col0 + data_w, [a * dw for a in range(kw)], out_w)
    rows = sorted({r for group in rows_out for r in group})
    cols = sorted({c for group in cols_out for c in group})
    shifts = [(d1, d2) for d1 in range(kh) for d2 in range(-(kw - 1), kw) if d1 > 0 or d2 >= 0]

    # Which blocks each shift fills: offset pairs (a, b = a + delta) that both fit the kernel.
    pairs = [(s, a1, a2) for s, (d1, d2) in enumerate(shifts)
             for a1 in range(kh - d1) for a2 in range(max(0, -d2), min(kw, kw - d2))]
    by_shift = [[p for p, pair in enumerate(pairs) if pair[0] == s] for s in range(len(shifts))]

    columns: list[tuple[list[int], float]] = [(by_shift[s], 1.0) for s in range(len(shifts))]
    terms = []
    regions = [(r, None, -1.0) for r in rows] + [(None, c, -1.0) for c in cols]
    regions += [(r, c, 1.0) for r in rows for c in cols]
    for row, col, sign in regions:
        for s, (d1, d2) in enumerate(shifts):
            if row is not None and not row0 <= row + d1 * dh < row0 + data_h:
                continue  # the shifted neighbours are in the zero frame: a zero product
            if col is not None and not col0 <= col + d2 * dw < col0 + data_w:
                continue
            ks = [p for p in by_shift[s]
                  if (row is None or row in rows_out[pairs[p][1]]) and (col is None or col in cols_out[pairs[p][2]])]
            if ks:
                terms.append((row, col, s))
                columns.append((ks, sign))
    combine = torch.zeros(len(pairs), len(columns), dtype=torch.float64)
    for j, (ks, sign) in enumerate(columns):
        combine[ks, j] = sign
    a_idx = torch.tensor([a1 * kw + a2 for _, a1, a2 in pairs])
    b_idx = torch.tensor([(a1 + shifts[s][0]) * kw + a2 + shifts[s][1] for s, a1, a2 in pairs])
    k = kh * kw
    ab_idx, ba_idx = a_idx * k + b_idx, b_idx * k + a_idx
    # _shift_moments writes every block from these (its result is not cleared first).
    assert set(ab_idx.tolist()) | set(ba_idx.tolist()) == set(range(k * k))
    return _ShiftPlan(shifts, terms, combine, ab_idx, ba_idx)


def _frame_products(
    data: torch.Tensor, plan: _ShiftPlan, row0: int, col0: int, frame_h: int, frame_w: int, dh: int, dw: int,
    kh: int, kw: int, groups: int, dtype: torch.dtype, precision: str,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The products of ``plan`` by one GEMM per shift on a channels-last zero frame (see
    :func:`_shift_moments`), and the float64 ``(frame_h, frame_w, C)`` per-pixel sums over
    the images."""
    batch, channels, data_h, data_w = data.shape
    device = data.device
    c_g = channels // groups
    row_len = batch * frame_w  # one frame row: that row of every image
    n_frame = frame_h * row_len
    max_offset = dh * (kh - 1) * row_len + dw * (kw - 1)
    # Only the zero frame is cleared: writing zeros under the data first would double the
    # memory traffic of building the frame (measured 1.9x slower at 16 channels, 28x28).
    flat = data.new_empty((n_frame + max_offset, channels), dtype=dtype)
    frame = flat[:n_frame].view(frame_h, batch, frame_w, channels)
    frame[:row0].zero_()
    frame[row0 + data_h:].zero_()
    frame[row0:row0 + data_h, :, :col0].zero_()
    frame[row0:row0 + data_h, :, col0 + data_w:].zero_()
    flat[n_frame:].zero_()
    frame[row0:row0 + data_h, :, col0:col0 + data_w] = data.permute(2, 0, 3, 1)
    offsets = [d1 * dh * row_len + d2 * dw for d1, d2 in plan.shifts]

    def frame_at(o: int) -> torch.Tensor:
        return flat[o:o + n_frame].view(frame_h, batch, frame_w, channels)

    def region(o: int, r: int | None, c: int | None) -> torch.Tensor:
        """A border row (all images), a frame column over the data rows (a strided matrix, no
        copy) or a corner, of the frame shifted by the flat offset ``o``, as ``(rows, C)``."""
        if c is None:
            return flat[o + r * row_len:o + (r + 1) * row_len]
        if r is None:
            return frame_at(o)[row0:row0 + data_h, :, c].reshape(-1, channels)
        return frame_at(o)[r, :, c]

    # The full-frame correlation of every shift: 13 GEMMs of the size of the input. Only
    # the data rows are taken on the left, and of those only the ones whose shifted partner
    # row (d1 * dh frame rows further down) is a data row too: all other pairs meet a zero
    # row of the frame and add nothing. On ResNet-20's 7x7 maps that skips 2 of 7 rows for
    # the five shifts with d1 = 2 and 1 of 7 for d1 = 1 (16% of the arithmetic).
    products = []
    for (d1, _), o in zip(plan.shifts, offsets):
        lo, hi = row0 * row_len, (row0 + max(0, data_h - d1 * dh)) * row_len
        if hi == lo:  # the shift is at least as tall as the data: no pair of data rows
            products.append(torch.zeros(groups, c_g, c_g, dtype=torch.float64, device=device))
        else:
            left = flat[lo:hi]
            # Offset 0 is the symmetric a^T a (passed as one object, see _accumulate_products).
            products.append(_group_products(left, left if o == 0 else flat[o + lo:o + hi], groups, precision))
    # Then the few border products that matter (see _shift_plan), each a small GEMM on views.
    products += [
        _group_products(region(0, r, c), region(offsets[s], r, c), groups, precision) for r, c, s in plan.terms
    ]
    return products, frame.sum(1).to(torch.float64)


def _shift_moments(
    x: torch.Tensor, geometry: dict[str, Any], precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(sum, sum_outer)`` of all patches of a stride-1 convolution, patches never formed.

    Why: with stride 1, the block of the patch Gram matrix for kernel offsets ``(a, b)``
    (a ``C x C`` matrix over channel pairs) is the correlation of the input with itself
    shifted by ``delta = b - a``, summed over the positions that offset ``a`` visits.
    Summed over the whole (padded) image instead, it depends on ``delta`` alone, so the
    ``(kh*kw)^2`` blocks follow from the ``((2kh-1)(2kw-1)+1)/2`` shift correlations of one
    half-plane of ``delta`` (one GEMM each, on the input laid out channels-last, with no
    copy per shift; the other half are transposes) minus the products over the few border
    rows and columns that offset ``a`` does not visit.  For a 3x3 kernel that is 13 GEMMs of
    the size of the input instead of one with a 9x longer patch matrix (81 blocks): about
    a sixth of the arithmetic, and no 9x copy of the input into patches.  For ungrouped
    layers all products and the sums are formed through a DFT along the image rows
    instead when :func:`_dft_pays` (about half the arithmetic again, and no frame: see
    :func:`_dft_products`).

    How the shifts stay exact (the direct route, :func:`_frame_products`): the (padded)
    input is laid out as ``(row, image, column,
    channel)`` in a zero frame whose image rows are separated by at least
    ``(kw - 1) * dw`` zero columns, with zero rows after the last row.  A flat offset
    ``o = d1*dh*(B*Wq) + d2*dw`` then pairs every pixel with its ``(d1, d2)`` neighbour in
    the same image, and lands on a zero whenever that neighbour is outside the image.  In
    this layout one frame row (all images) is a contiguous block and one frame column a
    strided matrix, so the border corrections are GEMMs on views as well.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` unpadded input with ``B >= 1``.
    geometry : dict
        From :func:`_conv_geometry`; the stride must be ``(1, 1)``.
    precision : str
        See :func:`_accumulate_products`; each product is accumulated that way.

    Returns
    -------
    tuple of torch.Tensor
        ``(groups, n)`` and ``(groups, n, n)`` float64, in the column order of
        :func:`patches_for`.
    """
    kh, kw = geometry["kernel"]
    dh, dw = geometry["dilation"]
    left, right, top, bottom = geometry["pad"]
    groups = geometry["groups"]
    batch, channels, height, width = x.shape
    device = x.device
    dtype = _product_dtype(x.dtype, precision)
    if geometry["padding_mode"] == "zeros":
        # The zero padding is part of the zero frame: only the input itself is data.
        data, row0, col0 = x, top, left
    else:
        data = F.pad(x, (left, right, top, bottom), mode=geometry["padding_mode"])
        row0 = col0 = 0
    padded_h, padded_w = height + top + bottom, width + left + right
    out_h, out_w = padded_h - dh * (kh - 1), padded_w - dw * (kw - 1)
    data_h, data_w = data.shape[-2:]
    frame_h = max(padded_h, row0 + data_h)
    # A pixel whose neighbour is past the right edge must land in zeros, not in the next
    # image's (or row's) data: at least (kw - 1) * dw zeros between two data segments.
    frame_w = max(padded_w, col0 + data_w, data_w + dw * (kw - 1))
    plan = _shift_plan(kh, kw, dh, dw, row0, col0, data_h, data_w, out_h, out_w)
    k = kh * kw
    c_g = channels // groups
    n = c_g * k

    if groups == 1 and _dft_pays(plan.shifts, channels, data_h, batch, data_w, dw, dtype):
        # The same products through a DFT along the image rows (about half the arithmetic),
        # read from the data itself: no frame.
        products, total = _dft_products(data, plan, row0, col0, (kh, kw), dh, dw, (out_h, out_w), dtype, precision)
    else:
        products, pixel_sums = _frame_products(data, plan, row0, col0, frame_h, frame_w, dh, dw, kh, kw, groups,
                                               dtype, precision)
        # Patch sums: from the per-pixel sums over the batch (in the product dtype), in
        # float64 one window sum per kernel offset.
        total = torch.stack(
            [pixel_sums[a1 * dh:a1 * dh + out_h, a2 * dw:a2 * dw + out_w].sum((0, 1))
             for a1 in range(kh) for a2 in range(kw)],
            dim=1,
        )  # (C, k): channel-major, then kernel offset, as in patches_for

    # Every block (a, a + delta) is its shift's full-frame correlation minus the products over
    # the border rows / columns that offset a does not visit plus those over the corners
    # (subtracted twice): one small float64 matrix product with the plan's signs, instead of
    # one indexed update per border product (those were about 40% of the fixed cost of a call
    # with 64 channels at 7x7 and a single image, in a profile).
    stacked = torch.stack(products).view(len(products), -1)
    valid = plan.combine.to(device) @ stacked  # (pair, group * C * C)
    # Blocks (a, b) and their transposes (b, a) are copied whole into a (k * k, ...) buffer
    # (writing them through an indexed, permuted view of the result was slower), then put
    # in the (c, a, c', b) column order of the result with one copy.
    by_offsets = valid.new_empty(k * k, groups, c_g, c_g)
    by_offsets.index_copy_(0, plan.ab_idx.to(device), valid.view(-1, groups, c_g, c_g))
    by_offsets.index_copy_(0, plan.ba_idx.to(device), valid.view(-1, groups, c_g, c_g).transpose(-1, -2))
    outer = torch.empty(groups, n, n, dtype=torch.float64, device=device)  # every entry is written
    outer.view(groups, c_g, k, c_g, k).copy_(by_offsets.view(k, k, groups, c_g, c_g).permute(2, 3, 0, 4, 1))

    return total.reshape(groups, n), outer


def _shift_positions(x: torch.Tensor, geometry: dict[str, Any]) -> int | None:
    """Output positions per image if ``_shift_moments`` applies to ``x`` (a stride-1
    convolution with a kernel larger than 1x1 and a non-empty output), else None."""
    kh, kw = geometry["kernel"]
    if geometry["stride"] != (1, 1) or (kh, kw) == (1, 1):
        return None
    dh, dw = geometry["dilation"]
    left, right, top, bottom = geometry["pad"]
    out_h = x.shape[2] + top + bottom - dh * (kh - 1)
    out_w = x.shape[3] + left + right - dw * (kw - 1)
    return out_h * out_w if out_h >= 1 and out_w >= 1 else None


@_ieee_float32_matmul()
def _batch_moments(
    module: nn.Module,
    inputs: torch.Tensor,
    *,
    max_positions_per_image: int | None,
    generator: torch.Generator | None,
    precision: str,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Float64 ``(count, sum, sum_outer)`` of the patches of one batch (see :func:`_batch_moments_at`).

    With ``precision='auto'``, a batch whose float32 products left their safe range
    (:func:`_float32_range_ok`: activations of extreme magnitude) is formed again with
    float64 products, from the same sampled positions.
    """
    state = generator.get_state() if generator is not None else None
    result = _batch_moments_at(module, inputs, max_positions_per_image=max_positions_per_image,
                               generator=generator, precision=precision)
    count, total, outer = result
    if _redo_in_float64(precision, inputs.dtype, count, [(total, outer.diagonal(dim1=1, dim2=2))]):
        if state is not None:
            generator.set_state(state)
        result = _batch_moments_at(module, inputs, max_positions_per_image=max_positions_per_image,
                                   generator=generator, precision="float64")
    return result


def _batch_moments_at(
    module: nn.Module,
    inputs: torch.Tensor,
    *,
    max_positions_per_image: int | None,
    generator: torch.Generator | None,
    precision: str,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Float64 ``(count, sum, sum_outer)`` of the patches of one batch, by the cheapest exact route.

    Stride-1 convolutions with a kernel larger than 1x1, when every position is kept, go
    through :func:`_shift_moments` (no patch matrix at all); other convolutions keeping every
    position form their patches in kernel-major order (:func:`_patches_kernel_major`) and
    permute the moments; the rest (sampled positions, Linear layers) form the patches with
    :func:`patches_for`; the patches are multiplied by :func:`_accumulate_products`.
    """
    kind = _kind_of(module)
    if kind != "linear":
        geometry = _conv_geometry(module)
        x = _conv_input(module, kind, inputs, geometry)
        if x.shape[0] == 0:  # an empty batch adds nothing (and some padding modes reject it)
            n = math.prod(module.weight.shape[1:])
            zeros = x.new_zeros((geometry["groups"], n), dtype=torch.float64)
            return 0, zeros, x.new_zeros((geometry["groups"], n, n), dtype=torch.float64)
        positions = None if max_positions_per_image is not None else _shift_positions(x, geometry)
        if positions is not None:
            total, outer = _shift_moments(x, geometry, precision)
            return x.shape[0] * positions, total, outer
        if max_positions_per_image is None:
            patches, order = _patches_kernel_major(x, geometry)
            m, total, outer = _moments_of(patches, precision)
            return m, total[:, order], outer[:, order][:, :, order]
    patches = patches_for(
        module, inputs, max_positions_per_image=max_positions_per_image, generator=generator
    )
    return _moments_of(patches, precision)


def _moments_of(patches: torch.Tensor, precision: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Float64 ``(count, sum, sum_outer)`` of ``(groups, m, n)`` patches."""
    groups, m, n = patches.shape
    total = torch.zeros(groups, n, dtype=torch.float64, device=patches.device)
    outer = torch.zeros(groups, n, n, dtype=torch.float64, device=patches.device)
    if m:
        _accumulate_products(outer, patches, patches, precision, sums=(total,))
    return m, total, outer


# --------------------------------------------------------------------------------------------
# Streaming moments
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Convert tuples (recursively) to lists so that metadata compares and saves uniformly."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _hyper_parameters(module: nn.Module) -> dict[str, Any]:
    kind = _kind_of(module)
    if kind == "linear":
        return {"in_features": int(module.in_features), "out_features": int(module.out_features)}
    return {
        "in_channels": int(module.in_channels),
        "out_channels": int(module.out_channels),
        "kernel_size": _plain(tuple(int(k) for k in module.kernel_size)),
        "stride": _plain(tuple(int(s) for s in module.stride)),
        "padding": module.padding if isinstance(module.padding, str) else _plain(tuple(int(p) for p in module.padding)),
        "dilation": _plain(tuple(int(d) for d in module.dilation)),
        "groups": int(module.groups),
        "padding_mode": str(module.padding_mode),
    }


#: Relative slack of the consistency checks on loaded sums (well above the rounding of the
#: float32 policy, far below what a hand edit changes).
_STATE_RTOL = 1e-3
_STATE_ATOL = 1e-300


def _state_int(state: Mapping[str, Any], key: str, *, minimum: int, what: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Corrupt {what} state: {key!r} must be an int >= {minimum}; got {value!r}.")
    return value


def _state_tensor(state: Mapping[str, Any], key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.is_complex():
        raise ValueError(f"Corrupt {what} state: {key!r} must be a real floating-point tensor; got {type(value).__name__}.")
    if tuple(value.shape) != shape:
        raise ValueError(f"Corrupt {what} state: {key!r} has shape {tuple(value.shape)}, expected {shape}.")
    # A copy: the rebuilt statistics accumulate into it in place, which must not change
    # the state they were built from (or the statistics that state came from).
    value = value.to(torch.float64, copy=True)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"Corrupt {what} state: {key!r} holds NaN or Inf values.")
    return value


def _round_off_floor(outer: torch.Tensor) -> torch.Tensor:
    """Per group, ``_STATE_RTOL`` of the largest diagonal entry, shape ``(groups, 1, 1)``.

    The shift and DFT routes form every entry from sums over the whole image row, so an
    entry that is exactly 0 (a kernel offset that only ever sees padding) comes out as
    rounding residue of either sign at the scale of the largest entries, not of its own:
    slightly negative diagonal entries and ``|S_ij| > sqrt(S_ii S_jj)`` where both are ~0.
    Files holding them were refused as corrupt.
    """
    peak = outer.diagonal(dim1=1, dim2=2).abs().amax(dim=1) if outer.shape[1] else outer.new_zeros(outer.shape[0])
    return (_STATE_RTOL * peak + _STATE_ATOL)[:, None, None]


def _check_symmetric(outer: torch.Tensor, key: str, what: str) -> None:
    """A sum of outer products ``x x^T`` is symmetric with ``|S_ij| <= sqrt(S_ii S_jj)``,
    up to rounding (:func:`_round_off_floor`)."""
    diagonal = outer.diagonal(dim1=1, dim2=2)
    floor = _round_off_floor(outer)
    if bool((diagonal < -floor[:, :, 0]).any()):
        raise ValueError(f"Corrupt {what} state: {key!r} has a negative diagonal entry.")
    diagonal = diagonal.clamp(min=0)
    scale = torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])
    if bool(((outer - outer.transpose(1, 2)).abs() > _STATE_RTOL * scale + floor).any()):
        raise ValueError(f"Corrupt {what} state: {key!r} is not symmetric.")
    if bool((outer.abs() > (1 + _STATE_RTOL) * scale + floor).any()):
        raise ValueError(f"Corrupt {what} state: {key!r} is not a sum of outer products (|S_ij| > sqrt(S_ii S_jj)).")


def _check_patches(patches: Any, groups: int, n: int, name: str) -> torch.Tensor:
    """Validate a ``(groups, m, n)`` (or ``(m, n)`` when ``groups == 1``) real tensor."""
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(patches).__name__}.")
    if patches.dim() == 2:
        patches = patches.unsqueeze(0)
    if patches.dim() != 3 or patches.shape[0] != groups or patches.shape[2] != n:
        raise ValueError(
            f"`{name}` must have shape ({groups}, m, {n})"
            + (f" or (m, {n})" if groups == 1 else "")
            + f"; got {tuple(patches.shape)}."
        )
    if patches.is_complex() or not patches.is_floating_point():
        raise TypeError(f"`{name}` must be a real floating-point tensor; got dtype {patches.dtype}.")
    return patches


def _check_finite_batch(batch_sum: torch.Tensor, batch_outer: torch.Tensor, what: str) -> None:
    """Reject a batch whose sums are not finite, before anything is accumulated.

    Any NaN/Inf in the batch makes its column sum non-finite; an overflow of the products
    shows on the diagonal (``|sum x_i x_j| <= max(sum x_i^2, sum x_j^2)``).  Checking these
    O(n) values is much cheaper than scanning the data.
    """
    if not (torch.isfinite(batch_sum).all() and torch.isfinite(batch_outer.diagonal(dim1=1, dim2=2)).all()):
        raise ValueError(f"The patches contain NaN or Inf values (or overflow float64); {what}.")


class LayerStatistics:
    """Streaming float64 moments of a layer's input patches.

    Holds the number of patch vectors seen, their sum and the sum of their outer products,
    from which the mean, the second moment ``E[x x^T]`` and the covariance follow.  Updates
    are exact sums, so statistics of data shards can be merged (:meth:`merge`) into exactly
    the statistics of the whole data.

    Parameters
    ----------
    kind : {'conv2d', 'conv1d', 'linear'}
        Type of the layer.
    weight_shape : sequence of int
        Shape of the layer's weight, ``(T, S / groups, kh, kw)``, ``(T, S / groups, k)`` or
        ``(out_features, in_features)``.  The patch length is ``n = prod(weight_shape[1:])``.
    groups : int, default 1
        Number of convolution groups; each group has its own patch vector and moments.
    hyper_parameters : dict, optional
        Layer hyper-parameters (stride, padding, ...), stored as metadata and compared by
        :meth:`merge`.
    device : torch.device or str, optional
        Where the accumulators live (CPU by default).  The accumulators move to the device of
        the first data passed to :meth:`update`.

    Attributes
    ----------
    count : int
        Number of patch vectors accumulated (per group).
    sum : torch.Tensor
        ``(groups, n)`` float64 sum of the patches.
    sum_outer : torch.Tensor
        ``(groups, n, n)`` float64 sum of ``x x^T`` over the patches.

    Examples
    --------
    >>> conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    >>> stats = LayerStatistics.from_module(conv)
    >>> stats.update(patches_for(conv, torch.randn(4, 3, 16, 16)))
    >>> stats.sigma().shape
    torch.Size([27, 27])
    """

    def __init__(
        self,
        kind: str,
        weight_shape: Iterable[int],
        *,
        groups: int = 1,
        hyper_parameters: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"`kind` must be one of {_KINDS}; got {kind!r}.")
        weight_shape = tuple(int(d) for d in weight_shape)
        expected_ndim = {"conv2d": 4, "conv1d": 3, "linear": 2}[kind]
        if len(weight_shape) != expected_ndim or any(d < 1 for d in weight_shape):
            raise ValueError(
                f"`weight_shape` of a {kind} layer must be {expected_ndim} positive ints; got {weight_shape}."
            )
        groups = check_positive_int(groups, "groups")
        if kind == "linear" and groups != 1:
            raise ValueError("A linear layer has groups=1.")
        self.kind: str = kind
        self.weight_shape: tuple[int, ...] = weight_shape
        self.groups: int = groups
        self.hyper_parameters: dict[str, Any] = {k: _plain(v) for k, v in dict(hyper_parameters or {}).items()}
        n = math.prod(weight_shape[1:])
        device = torch.device("cpu") if device is None else torch.device(device)
        self.count: int = 0
        self.sum: torch.Tensor = torch.zeros(groups, n, dtype=torch.float64, device=device)
        self.sum_outer: torch.Tensor = torch.zeros(groups, n, n, dtype=torch.float64, device=device)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, *, device: torch.device | str | None = None) -> "LayerStatistics":
        """Empty statistics for ``module`` (an ``nn.Conv2d``, ``nn.Conv1d`` or ``nn.Linear``)."""
        kind = _kind_of(module)
        return cls(
            kind,
            module.weight.shape,
            groups=int(getattr(module, "groups", 1)),
            hyper_parameters=_hyper_parameters(module),
            device=device,
        )

    # -- basic properties ---------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Length of one patch vector (per group)."""
        return int(self.sum.shape[-1])

    @property
    def device(self) -> torch.device:
        """Device of the accumulators."""
        return self.sum.device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, weight_shape={self.weight_shape}, "
            f"groups={self.groups}, n={self.n}, count={self.count}, device={self.device})"
        )

    # -- accumulation -------------------------------------------------------------------------

    @_ieee_float32_matmul()
    def update(self, patches: torch.Tensor, *, precision: str = "auto") -> None:
        """Accumulate a batch of patch vectors.

        Parameters
        ----------
        patches : torch.Tensor
            ``(groups, m, n)``, or ``(m, n)`` when ``groups == 1``, as returned by
            :func:`patches_for`.  Products ``P^T P`` and sums are accumulated in float64 on
            the patches' device.
        precision : {'auto', 'float32', 'float64'}, default 'auto'
            Dtype of the per-batch products.  ``'float64'`` converts the patches to float64
            and multiplies exactly as before.  ``'float32'`` and ``'auto'`` multiply float32
            (or lower precision) patches in float32, in blocks of at most
            :data:`FLOAT32_BLOCK_ROWS` rows whose products are added in float64, with the
            relative error bound of :func:`float32_error_bound`; float64 patches always get
            float64 products.  With ``'auto'``, a batch whose float32 products would leave
            float32's range (:data:`FLOAT32_SAFE_MEAN_SQUARE`) is multiplied in float64.

        Raises
        ------
        ValueError
            If the shape does not match or the batch holds NaN or Inf values; the statistics
            are left unchanged in that case.
        """
        _check_precision(precision)
        patches = _check_patches(patches, self.groups, self.n, "patches")
        if patches.shape[1] == 0:
            return
        if self.count == 0 and self.device != patches.device:
            # Accumulate where the data lives, so the products never cross devices.
            self._move_(patches.device)
        batch_sum = torch.zeros_like(self.sum)
        batch_outer = torch.zeros_like(self.sum_outer)
        _accumulate_products(batch_outer, patches, patches, precision, sums=(batch_sum,))
        if _redo_in_float64(precision, patches.dtype, patches.shape[1],
                            [(batch_sum, batch_outer.diagonal(dim1=1, dim2=2))]):
            # Patches of extreme magnitude: float32 products would under- or overflow.
            batch_sum.zero_()
            batch_outer.zero_()
            _accumulate_products(batch_outer, patches, patches, "float64", sums=(batch_sum,))
        _check_finite_batch(batch_sum, batch_outer, f"{self.kind} layer with weight shape {self.weight_shape}")
        self._add_batch(batch_sum, batch_outer, int(patches.shape[1]))

    def _add_batch(self, batch_sum: torch.Tensor, batch_outer: torch.Tensor, count: int) -> None:
        """Add already checked float64 batch sums (used by the fast collection paths too)."""
        self.sum += batch_sum.to(self.device)
        self.sum_outer += batch_outer.to(self.device)
        self.count += count

    # -- derived moments ----------------------------------------------------------------------

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("No data accumulated yet (count == 0): call update() first.")

    @property
    def mean(self) -> torch.Tensor:
        """``(groups, n)`` float64 mean patch ``E[x]``."""
        self._require_data()
        return self.sum / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """``(groups, n, n)`` float64 uncentered second moment ``E[x x^T]`` (symmetrized)."""
        self._require_data()
        m = self.sum_outer / self.count
        # BLAS may sum (i, j) and (j, i) in different orders: symmetrize the rounding away.
        return 0.5 * (m + m.transpose(1, 2))

    @property
    def covariance(self) -> torch.Tensor:
        """``(groups, n, n)`` float64 centred covariance ``E[x x^T] - E[x] E[x]^T``.

        Population-normalized (divided by ``count``, not ``count - 1``), and symmetrized.
        """
        mu = self.mean
        c = self.sum_outer / self.count - mu[:, :, None] * mu[:, None, :]
        return 0.5 * (c + c.transpose(1, 2))

    def sigma(self, centered: bool = True, *, group: int | None = None) -> torch.Tensor:
        """The ``(n, n)`` matrix that weights the decomposition error of this layer.

        Parameters
        ----------
        centered : bool, default True
            ``True`` for the covariance ``E[x x^T] - E[x] E[x]^T``: the mean part of the output
            error is then *not* penalized, and the compressed layer's bias must be corrected
            by ``(W - W~) E[x]`` to make the output error equal the Sigma-norm.  ``False``
            for the second moment ``E[x x^T]``, which needs no bias correction.
        group : int, optional
            Which convolution group; required when ``groups > 1``.

        Returns
        -------
        torch.Tensor
            ``(n, n)`` float64, in the column order of ``weight.reshape(T, -1)``.
        """
        if group is None:
            if self.groups != 1:
                raise ValueError(
                    f"This layer has groups={self.groups}: pass `group` (0..{self.groups - 1}), or use "
                    "the `covariance` / `second_moment` properties for all groups at once."
                )
            group = 0
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < self.groups:
            raise ValueError(f"`group` must be an int in [0, {self.groups}); got {group!r}.")
        return (self.covariance if centered else self.second_moment)[group]

    # -- merging ------------------------------------------------------------------------------

    def _check_compatible(self, other: "LayerStatistics") -> None:
        if not isinstance(other, LayerStatistics):
            raise TypeError(f"Can only merge LayerStatistics; got {type(other).__name__}.")
        mine = (self.kind, self.weight_shape, self.groups, self.hyper_parameters)
        theirs = (other.kind, other.weight_shape, other.groups, other.hyper_parameters)
        if mine != theirs:
            raise ValueError(
                "Cannot merge statistics of different layers: "
                f"(kind, weight_shape, groups, hyper_parameters) = {mine} vs {theirs}."
            )

    def merge(self, other: "LayerStatistics") -> "LayerStatistics":
        """Statistics of the union of both data sets, as a new object on ``self``'s device.

        The moments are plain sums, so merging the statistics of two shards gives exactly
        (up to float64 rounding) the statistics of the whole data.
        """
        self._check_compatible(other)
        merged = self.copy()
        merged.sum += other.sum.to(merged.device)
        merged.sum_outer += other.sum_outer.to(merged.device)
        merged.count += other.count
        return merged

    def __add__(self, other: "LayerStatistics") -> "LayerStatistics":
        if not isinstance(other, LayerStatistics):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other: Any) -> "LayerStatistics":
        # Lets the builtin ``sum(list_of_statistics)`` work (it starts from 0).
        if isinstance(other, int) and other == 0:
            return self.copy()
        return NotImplemented

    def copy(self) -> "LayerStatistics":
        """A deep copy."""
        return self.to(self.device, copy=True)

    def to(self, device: torch.device | str, *, copy: bool = False) -> "LayerStatistics":
        """Return these statistics with the accumulators on ``device``.

        A new object is returned (``self`` is not modified); it shares its tensors with
        ``self`` when they already are on ``device``, unless ``copy=True``.
        """
        device = torch.device(device)
        new = LayerStatistics(
            self.kind,
            self.weight_shape,
            groups=self.groups,
            hyper_parameters=self.hyper_parameters,
            device="meta",  # placeholders, replaced just below: avoids allocating twice
        )
        new.count = self.count
        new.sum = self.sum.to(device, copy=copy)
        new.sum_outer = self.sum_outer.to(device, copy=copy)
        return new

    def _move_(self, device: torch.device) -> None:
        self.sum = self.sum.to(device)
        self.sum_outer = self.sum_outer.to(device)

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-python/tensor description (tensors on the CPU), as written by :meth:`save`."""
        return {
            "format": _FORMAT_LAYER,
            "version": _FORMAT_VERSION,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "groups": self.groups,
            "hyper_parameters": dict(self.hyper_parameters),
            "count": int(self.count),
            # Copies: a CPU tensor's .cpu() is the tensor itself, and a snapshot must not
            # follow later updates (nor its rebuilt statistics write into these).
            "sum": self.sum.detach().to("cpu", copy=True),
            "sum_outer": self.sum_outer.detach().to("cpu", copy=True),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "LayerStatistics":
        """Rebuild statistics from :meth:`state_dict` output, validating it.

        Raises
        ------
        ValueError
            If ``state`` is not such a description or is inconsistent: missing entries,
            wrong types or shapes, non-finite sums, a ``sum_outer`` that is not symmetric
            or not a possible sum of outer products, a count of 0 with non-zero sums.
        """
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT_LAYER:
            raise ValueError("Not a LayerStatistics state (missing or wrong 'format' entry).")
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"Unsupported LayerStatistics format version {state.get('version')!r}.")
        for key in ("kind", "weight_shape", "groups", "hyper_parameters"):
            if key not in state:
                raise ValueError(f"Corrupt LayerStatistics state: no {key!r} entry.")
        if not isinstance(state["hyper_parameters"], Mapping):
            raise ValueError("Corrupt LayerStatistics state: 'hyper_parameters' is not a mapping.")
        weight_shape = state["weight_shape"]
        if not isinstance(weight_shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in weight_shape
        ):
            raise ValueError(f"Corrupt LayerStatistics state: 'weight_shape' {weight_shape!r} is not a list of ints.")
        groups = _state_int(state, "groups", minimum=1, what="LayerStatistics")
        try:
            stats = cls(
                state["kind"],
                weight_shape,
                groups=groups,
                hyper_parameters=state["hyper_parameters"],
                device="meta",
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Corrupt LayerStatistics state: {exc}") from exc
        hyper_groups = stats.hyper_parameters.get("groups", groups)
        if hyper_groups != groups:
            raise ValueError(
                f"Corrupt LayerStatistics state: groups={groups} but hyper_parameters say {hyper_groups!r}."
            )
        n = math.prod(stats.weight_shape[1:])
        count = _state_int(state, "count", minimum=0, what="LayerStatistics")
        total = _state_tensor(state, "sum", (groups, n), "LayerStatistics")
        outer = _state_tensor(state, "sum_outer", (groups, n, n), "LayerStatistics")
        if count == 0 and (total.any() or outer.any()):
            raise ValueError("Corrupt LayerStatistics state: count is 0 but the sums are not zero.")
        _check_symmetric(outer, "sum_outer", "LayerStatistics")
        # (sum_k x_ki)^2 <= count * sum_k x_ki^2 (Cauchy-Schwarz) holds for real data; the
        # slack covers the float32 policy's rounding.
        diagonal = outer.diagonal(dim1=1, dim2=2).clamp(min=0)
        floor = _round_off_floor(outer)[:, :, 0]
        if bool((total**2 > count * (diagonal * (1 + _STATE_RTOL) + floor)).any()):
            raise ValueError(
                "Corrupt LayerStatistics state: 'sum' is too large for 'sum_outer' and 'count' "
                "(no data set has these sums)."
            )
        stats.count = count
        stats.sum = total
        stats.sum_outer = outer
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to ``path`` atomically.

        The file is written to a temporary file in the same folder and then renamed over
        ``path``, so ``path`` never holds a partial file, even if writing fails.
        """
        _atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: torch.device | str | None = "cpu") -> "LayerStatistics":
        """Read statistics written by :meth:`save` (with ``torch.load(weights_only=True)``).

        Raises
        ------
        OSError
            If the file cannot be opened (missing, a folder, no permission).
        ValueError
            Naming ``path``, if the file is not a statistics file written by :meth:`save`
            (text, empty, truncated, another format) or holds an inconsistent state (see
            :meth:`from_state_dict`).
        """
        state = _load_state(path, map_location)
        try:
            return cls.from_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)!r}: {exc}") from exc


class CrossStatistics:
    """Streaming float64 cross-moments of two aligned sets of patch vectors.

    For "sequential calibration" a layer is refitted from the patches ``y`` that the
    partly compressed network feeds it to the patches ``x`` that the original network feeds
    it at the same images and positions.  This class accumulates, in float64, the count and
    the sums of ``x``, ``y``, ``y y^T`` and ``x y^T``, from which follow the means, the
    covariance of ``y`` and the ``x``-``y`` cross-covariance.  Updates are exact sums, so the
    statistics of data shards merge (:meth:`merge`, or an all-reduce of
    :meth:`sum_tensors`) into exactly the statistics of the whole data.

    Parameters
    ----------
    n : int
        Length of one patch vector (per group).
    groups : int, default 1
        Number of convolution groups; each group has its own patch vectors and moments.
    device : torch.device or str, optional
        Where the accumulators live (CPU by default).  They move to the device of the
        first data passed to :meth:`update`.

    Attributes
    ----------
    count : int
        Number of patch pairs accumulated (per group).
    sum_x, sum_y : torch.Tensor
        ``(groups, n)`` float64 sums of the ``x`` and ``y`` patches.
    sum_yy : torch.Tensor
        ``(groups, n, n)`` float64 sum of ``y y^T``.
    sum_xy : torch.Tensor
        ``(groups, n, n)`` float64 sum of ``x y^T`` (rows index ``x``, columns ``y``).

    Examples
    --------
    >>> conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    >>> images = torch.randn(4, 3, 16, 16)
    >>> cross = CrossStatistics(27)
    >>> cross.update(patches_for(conv, images), patches_for(conv, images + 0.1))
    >>> cross.cov_xy.shape
    torch.Size([1, 27, 27])
    """

    def __init__(self, n: int, *, groups: int = 1, device: torch.device | str | None = None) -> None:
        n = check_positive_int(n, "n")
        groups = check_positive_int(groups, "groups")
        device = torch.device("cpu") if device is None else torch.device(device)
        self.count: int = 0
        self.sum_x: torch.Tensor = torch.zeros(groups, n, dtype=torch.float64, device=device)
        self.sum_y: torch.Tensor = torch.zeros(groups, n, dtype=torch.float64, device=device)
        self.sum_yy: torch.Tensor = torch.zeros(groups, n, n, dtype=torch.float64, device=device)
        self.sum_xy: torch.Tensor = torch.zeros(groups, n, n, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        """Length of one patch vector (per group)."""
        return int(self.sum_x.shape[-1])

    @property
    def groups(self) -> int:
        """Number of groups."""
        return int(self.sum_x.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the accumulators."""
        return self.sum_x.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, groups={self.groups}, count={self.count}, device={self.device})"

    # -- accumulation -------------------------------------------------------------------------

    @_ieee_float32_matmul()
    def update(self, x_patches: torch.Tensor, y_patches: torch.Tensor, *, precision: str = "auto") -> None:
        """Accumulate a batch of aligned patch pairs.

        Parameters
        ----------
        x_patches, y_patches : torch.Tensor
            Same shape, ``(groups, m, n)`` or ``(m, n)`` when ``groups == 1``: row ``k`` of
            both is the same image and position (``x`` from the original network, ``y``
            from the compressed one), e.g. from :func:`patches_for` on the two inputs.
        precision : {'auto', 'float32', 'float64'}, default 'auto'
            Dtype of the per-batch products, as in :meth:`LayerStatistics.update`: float32
            (blocked, added in float64, error bound :func:`float32_error_bound`) only when
            both inputs are float32 or lower precision.

        Raises
        ------
        ValueError
            On mismatched shapes or NaN/Inf (or float64 overflow); the statistics are left
            unchanged in that case.
        """
        _check_precision(precision)
        self._add_pairs(x_patches, y_patches, precision)

    def _add_pairs(self, x_patches: torch.Tensor, y_patches: torch.Tensor, precision: str, order=None) -> None:
        """:meth:`update`, for patches whose columns are ``order``-permuted (None: not)."""
        x = _check_patches(x_patches, self.groups, self.n, "x_patches")
        y = _check_patches(y_patches, self.groups, self.n, "y_patches")
        if x.shape != y.shape:
            raise ValueError(
                f"`x_patches` and `y_patches` must have the same shape; got {tuple(x_patches.shape)} "
                f"and {tuple(y_patches.shape)}."
            )
        if x.device != y.device:
            raise ValueError(f"`x_patches` is on {x.device} but `y_patches` on {y.device}.")
        if x.shape[1] == 0:
            return
        if self.count == 0 and self.device != x.device:
            self._move_(x.device)
        if x.dtype != y.dtype:
            # Mixed precision: multiply in the finer dtype of the two.
            common = torch.promote_types(x.dtype, y.dtype)
            x, y = x.to(common), y.to(common)
        sum_x, sum_y = torch.zeros_like(self.sum_x), torch.zeros_like(self.sum_y)
        yy, xy = torch.zeros_like(self.sum_yy), torch.zeros_like(self.sum_xy)
        for attempt in (precision, "float64"):
            _accumulate_products(yy, y, y, attempt, sums=(sum_y,))
            # out += a^T b with a = x, b = y gives sum_k x_k y_k^T: rows x, columns y.
            _accumulate_products(xy, x, y, attempt, sums=(sum_x,))
            if not _redo_in_float64(attempt, x.dtype, x.shape[1],
                                    [(sum_y, yy.diagonal(dim1=1, dim2=2)), (sum_x, xy.diagonal(dim1=1, dim2=2))]):
                break
            # Patches of extreme magnitude: float32 products would under- or overflow.
            for t in (sum_x, sum_y, yy, xy):
                t.zero_()
        if order is not None:
            sum_x, sum_y = sum_x[:, order], sum_y[:, order]
            yy, xy = yy[:, order][:, :, order], xy[:, order][:, :, order]
        if not (
            torch.isfinite(sum_x).all()
            and torch.isfinite(sum_y).all()
            and torch.isfinite(yy.diagonal(dim1=1, dim2=2)).all()
            and torch.isfinite(xy).all()
        ):
            raise ValueError("The patches contain NaN or Inf values (or overflow float64).")
        self.sum_x += sum_x
        self.sum_y += sum_y
        self.sum_yy += yy
        self.sum_xy += xy
        self.count += int(x.shape[1])

    @_ieee_float32_matmul()
    def update_from_inputs(
        self, module: nn.Module, x_inputs: torch.Tensor, y_inputs: torch.Tensor | None = None, *, precision: str = "auto"
    ) -> None:
        """Accumulate the patches of two aligned layer inputs, by the cheapest exact route.

        Equivalent to ``update(patches_for(module, x_inputs), patches_for(module, y_inputs))``
        (``y_inputs=None`` means ``y = x``). For a stride-1 convolution with a kernel larger
        than 1x1 the patches are never formed: the two inputs are stacked along the
        channels (group by group) and the shift-structure moments of the stack (see
        ``_shift_moments``) hold ``X^T Y`` and ``Y^T Y`` as blocks, which costs two to three
        times less than forming both patch matrices and multiplying them here. Other
        convolutions form their patches in kernel-major order (faster to gather) and permute
        the moments.

        Parameters
        ----------
        module : nn.Conv2d, nn.Conv1d or nn.Linear
            The layer whose input patches are meant.
        x_inputs, y_inputs : torch.Tensor
            The layer's input in the original and in the compressed network (same shape).
        precision : {'auto', 'float32', 'float64'}, default 'auto'
            As in :meth:`update`.
        """
        _check_precision(precision)
        kind = _kind_of(module)
        same = y_inputs is None
        if not same and (not isinstance(y_inputs, torch.Tensor) or y_inputs.shape != x_inputs.shape):
            raise ValueError(
                f"`x_inputs` and `y_inputs` must have the same shape; got {tuple(x_inputs.shape)} and "
                f"{tuple(getattr(y_inputs, 'shape', ()))}."
            )
        if kind != "linear":
            geometry = _conv_geometry(module)
            x = _conv_input(module, kind, x_inputs, geometry)
            if x.shape[0] > 0:
                y = x if same else _conv_input(module, kind, y_inputs, geometry)
                # (Statistics made for another grouping fail the patch route's checks.)
                positions = _shift_positions(x, geometry) if self.groups == geometry["groups"] else None
                if positions is not None:
                    self._add_shift_moments(x, y, same, geometry, positions, precision)
                    return
                # Every position is kept here: the faster kernel-major patches, moments permuted.
                x_patches, order = _patches_kernel_major(x, geometry)
                y_patches = x_patches if same else _patches_kernel_major(y, geometry)[0]
                self._add_pairs(x_patches, y_patches, precision, order)
                return
        x_patches = patches_for(module, x_inputs)
        self.update(x_patches, x_patches if same else patches_for(module, y_inputs), precision=precision)

    def _add_shift_moments(self, x, y, same: bool, geometry, positions: int, precision: str) -> None:
        """Add the moments of the two inputs of a stride-1 convolution, from the shift-structure
        moments of their channel stack (see :meth:`update_from_inputs`)."""
        groups = geometry["groups"]
        if same:
            stacked = x
        else:
            # Each group's x channels, then its y channels: the stack keeps the grouping, and
            # each group's moments hold that group's X^T Y and Y^T Y blocks.
            b, c, h, w = x.shape
            stacked = torch.cat([x.reshape(b, groups, c // groups, h, w), y.to(x.dtype).reshape(b, groups, c // groups, h, w)],
                                dim=2).reshape(b, 2 * c, h, w)
        stacked_geometry = {**geometry, "in_channels": stacked.shape[1]}
        total, outer = _shift_moments(stacked, stacked_geometry, precision)
        if _redo_in_float64(precision, stacked.dtype, x.shape[0] * positions, [(total, outer.diagonal(dim1=1, dim2=2))]):
            # Inputs of extreme magnitude: float32 products would under- or overflow.
            total, outer = _shift_moments(stacked, stacked_geometry, "float64")
        n = self.n
        sum_x, sum_y = total[:, :n], total[:, n:] if not same else total[:, :n]
        yy = outer[:, n:, n:] if not same else outer
        xy = outer[:, :n, n:] if not same else outer
        if not (torch.isfinite(total).all() and torch.isfinite(yy.diagonal(dim1=1, dim2=2)).all()
                and torch.isfinite(xy).all()):
            raise ValueError("The patches contain NaN or Inf values (or overflow float64).")
        if self.count == 0 and self.device != total.device:
            self._move_(total.device)
        self.sum_x += sum_x
        self.sum_y += sum_y
        self.sum_yy += yy
        self.sum_xy += xy
        self.count += x.shape[0] * positions

    def sum_tensors(self) -> list[torch.Tensor]:
        """The live float64 accumulators ``[sum_x, sum_y, sum_yy, sum_xy]``.

        In-place operations on them change these statistics: this is how shards are combined
        under ``torch.distributed`` (``all_reduce`` each of them, and the count, with
        ``SUM``); :meth:`all_reduce_` does exactly that.
        """
        return [self.sum_x, self.sum_y, self.sum_yy, self.sum_xy]

    def all_reduce_(self, group: Any = None) -> "CrossStatistics":
        """Sum the statistics of all ranks in place with ``torch.distributed.all_reduce``.

        Every rank must call it (it is a collective), with statistics of the same ``n`` and
        ``groups``.  The count travels as a float64 tensor (exact below ``2**53``) with the
        sums, on the accumulators' device (which must suit the process group's backend).
        Returns ``self``.
        """
        import torch.distributed as dist

        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for tensor in [count, *self.sum_tensors()]:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.count = int(round(float(count.item())))
        return self

    def merge(self, other: "CrossStatistics") -> "CrossStatistics":
        """Statistics of the union of both data sets, as a new object on ``self``'s device."""
        if not isinstance(other, CrossStatistics):
            raise TypeError(f"Can only merge CrossStatistics; got {type(other).__name__}.")
        if (other.n, other.groups) != (self.n, self.groups):
            raise ValueError(
                f"Cannot merge CrossStatistics of (n, groups) = {(self.n, self.groups)} and "
                f"{(other.n, other.groups)}."
            )
        merged = self.copy()
        for mine, theirs in zip(merged.sum_tensors(), other.sum_tensors()):
            mine += theirs.to(merged.device)
        merged.count += other.count
        return merged

    def __add__(self, other: "CrossStatistics") -> "CrossStatistics":
        if not isinstance(other, CrossStatistics):
            return NotImplemented
        return self.merge(other)

    def copy(self) -> "CrossStatistics":
        """A deep copy."""
        new = CrossStatistics(self.n, groups=self.groups, device="meta")
        new.count = self.count
        new.sum_x, new.sum_y, new.sum_yy, new.sum_xy = (t.clone() for t in self.sum_tensors())
        return new

    def _move_(self, device: torch.device) -> None:
        self.sum_x, self.sum_y, self.sum_yy, self.sum_xy = (t.to(device) for t in self.sum_tensors())

    # -- derived moments ----------------------------------------------------------------------

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("No data accumulated yet (count == 0): call update() first.")

    @property
    def mean_x(self) -> torch.Tensor:
        """``(groups, n)`` float64 mean of the ``x`` patches."""
        self._require_data()
        return self.sum_x / self.count

    @property
    def mean_y(self) -> torch.Tensor:
        """``(groups, n)`` float64 mean of the ``y`` patches."""
        self._require_data()
        return self.sum_y / self.count

    @property
    def second_moment_yy(self) -> torch.Tensor:
        """``(groups, n, n)`` float64 uncentred ``E[y y^T]``, symmetrized."""
        self._require_data()
        m = self.sum_yy / self.count
        return 0.5 * (m + m.transpose(1, 2))

    @property
    def cov_yy(self) -> torch.Tensor:
        """``(groups, n, n)`` float64 centred ``E[y y^T] - E[y] E[y]^T`` (population), symmetrized."""
        mu = self.mean_y
        c = self.sum_yy / self.count - mu[:, :, None] * mu[:, None, :]
        return 0.5 * (c + c.transpose(1, 2))

    @property
    def cross_moment_xy(self) -> torch.Tensor:
        """``(groups, n, n)`` float64 uncentred ``E[x y^T]`` (rows ``x``, columns ``y``)."""
        self._require_data()
        return self.sum_xy / self.count

    @property
    def cov_xy(self) -> torch.Tensor:
        """``(groups, n, n)`` float64 centred ``E[x y^T] - E[x] E[y]^T`` (rows ``x``, columns ``y``)."""
        self._require_data()
        return self.sum_xy / self.count - self.mean_x[:, :, None] * self.mean_y[:, None, :]

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-python/tensor description (tensors on the CPU)."""
        return {
            "format": _FORMAT_CROSS,
            "version": _FORMAT_VERSION,
            "n": self.n,
            "groups": self.groups,
            "count": int(self.count),
            **{name: t.detach().to("cpu", copy=True) for name, t in zip(_CROSS_SUMS, self.sum_tensors())},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "CrossStatistics":
        """Rebuild statistics from :meth:`state_dict` output, validating it."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT_CROSS:
            raise ValueError("Not a CrossStatistics state (missing or wrong 'format' entry).")
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"Unsupported CrossStatistics format version {state.get('version')!r}.")
        n = _state_int(state, "n", minimum=1, what="CrossStatistics")
        groups = _state_int(state, "groups", minimum=1, what="CrossStatistics")
        count = _state_int(state, "count", minimum=0, what="CrossStatistics")
        stats = cls(n, groups=groups, device="meta")
        shapes = {"sum_x": (groups, n), "sum_y": (groups, n), "sum_yy": (groups, n, n), "sum_xy": (groups, n, n)}
        tensors = [_state_tensor(state, name, shapes[name], "CrossStatistics") for name in _CROSS_SUMS]
        if count == 0 and any(t.any() for t in tensors):
            raise ValueError("Corrupt CrossStatistics state: count is 0 but the sums are not zero.")
        _check_symmetric(tensors[2], "sum_yy", "CrossStatistics")
        stats.count = count
        stats.sum_x, stats.sum_y, stats.sum_yy, stats.sum_xy = tensors
        return stats


_CROSS_SUMS = ("sum_x", "sum_y", "sum_yy", "sum_xy")


def _atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through the package's one atomic-write helper (temporary file, fsync, rename)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def save_statistics(statistics: Mapping[str, LayerStatistics], path: str | os.PathLike) -> None:
    """Atomically save a mapping ``layer name -> LayerStatistics`` to one file.

    See :meth:`LayerStatistics.save` for the atomicity guarantee.
    """
    if not isinstance(statistics, Mapping):
        raise TypeError(f"`statistics` must be a mapping name -> LayerStatistics; got {type(statistics).__name__}.")
    layers = {}
    for name, stats in statistics.items():
        if not isinstance(name, str) or not isinstance(stats, LayerStatistics):
            raise TypeError(
                f"`statistics` must map str to LayerStatistics; got {type(name).__name__} -> {type(stats).__name__}."
            )
        layers[name] = stats.state_dict()
    _atomic_torch_save({"format": _FORMAT_MAPPING, "version": _FORMAT_VERSION, "layers": layers}, path)


def load_statistics(
    path: str | os.PathLike, *, map_location: torch.device | str | None = "cpu"
) -> dict[str, LayerStatistics]:
    """Load a mapping written by :func:`save_statistics`, in its original order.

    Raises
    ------
    OSError
        If the file cannot be opened (missing, a folder, no permission).
    ValueError
        Naming ``path`` (and the layer), if the file was not written by
        :func:`save_statistics` (text, empty, truncated, another format) or holds an
        inconsistent state (see :meth:`LayerStatistics.from_state_dict`).
    """
    shown = repr(os.fspath(path))
    state = _load_state(path, map_location)
    if not isinstance(state, Mapping) or state.get("format") != _FORMAT_MAPPING:
        raise ValueError(f"{shown} was not written by save_statistics.")
    if state.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{shown}: unsupported statistics format version {state.get('version')!r}.")
    layers = state.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError(f"{shown}: corrupt statistics file ('layers' is not a mapping).")
    result = {}
    for name, layer_state in layers.items():
        if not isinstance(name, str):
            raise ValueError(f"{shown}: corrupt statistics file (layer name {name!r} is not a string).")
        try:
            result[name] = LayerStatistics.from_state_dict(layer_state)
        except ValueError as exc:
            raise ValueError(f"{shown}, layer {name!r}: {exc}") from exc
    return result


def _load_state(path: str | os.PathLike, map_location: torch.device | str | None) -> Any:
    """``torch.load(weights_only=True)`` whose failures on bad content are a ValueError naming ``path``.

    Errors opening the file (missing, a folder, permissions) pass through unchanged: they
    are about the path, not the content.  Everything ``torch.load`` raises on a text, empty, truncated or
    foreign file (``UnpicklingError``, ``EOFError``, ``RuntimeError`` of the zip reader, ...)
    means the content is not a statistics file.
    """
    shown = repr(os.fspath(path))
    # Opening the file here separates the path's errors (which propagate) from the content's:
    # torch's zip reader reports a truncated file as an OSError too.
    with open(os.fspath(path), "rb") as handle:
        try:
            return torch.load(handle, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on bad content
            error = exc
    # Raised after the file is closed.
    message = str(error).splitlines()[0] if str(error) else ""
    raise ValueError(
        f"{shown} is not a readable statistics file (empty, truncated, text or another format): "
        f"{type(error).__name__}: {message}"
    ) from error


def merge_statistics(
    a: Mapping[str, LayerStatistics], b: Mapping[str, LayerStatistics]
) -> dict[str, LayerStatistics]:
    """Merge two mappings ``name -> LayerStatistics`` layer by layer.

    Both mappings must hold the same layer names (they describe the same model on two data
    shards); the result is the statistics of the union of the shards.
    """
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise TypeError("`a` and `b` must be mappings name -> LayerStatistics.")
    if set(a) != set(b):
        raise ValueError(
            "Cannot merge statistics of different layer sets: only in the first "
            f"{sorted(set(a) - set(b))}, only in the second {sorted(set(b) - set(a))}."
        )
    return {name: a[name].merge(b[name]) for name in a}


# --------------------------------------------------------------------------------------------
# Collection over a model
# --------------------------------------------------------------------------------------------


def check_eager_model(model: Any) -> None:
    """Raise a ``TypeError`` unless ``model`` is an eager ``nn.Module`` (hooks and module
    replacement work on it).

    A TorchScript module (``torch.jit.script`` / ``trace``) is an ``nn.Module`` too, but its
    submodules are script modules: no ``nn.Conv2d`` or ``nn.Linear`` is found in it and none
    can be replaced, which used to end in a misleading "no layer" error.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "`model` is a TorchScript module: its layers cannot be hooked or replaced. Pass the eager "
            "nn.Module (before torch.jit.script / torch.jit.trace); export the compressed model afterwards."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _batch_input(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"Batch {index} is an empty {type(batch).__name__}.")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"Each batch must be a tensor or a tuple/list whose first item is the input tensor; "
            f"batch {index} is (or starts with) a {type(batch).__name__}."
        )
    if batch.dim() == 0:
        raise ValueError(f"Batch {index} is a 0-d tensor; the first axis must index samples.")
    return batch


def collect_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str] | str | None = None,
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_positions_per_image: int | None = None,
    seed: int = 0,
    precision: str = "auto",
) -> dict[str, LayerStatistics]:
    """Run ``model`` over ``batches`` and collect the input-patch statistics of its layers.

    A forward pre-hook on every selected layer accumulates the float64 moments of the
    layer's input patches (:func:`patches_for`); nothing else is kept, so memory does not
    grow with the number of batches.  Stride-1 convolutions (when every position is kept)
    never form the patch matrix: their moments follow from the correlations of the input
    with its shifts (see :func:`_shift_moments`), several times less work on the CPU; for
    ungrouped layers those shift products are formed through a DFT along the image rows
    where that is cheaper (:func:`_dft_products`, within the same error bound).

    Parameters
    ----------
    model : nn.Module
        The network.  It runs in eval mode under ``torch.no_grad()``; the training flag of
        every submodule is restored afterwards and the hooks are removed, even on error.
        The model is not moved.
    batches : iterable
        Batches of inputs: tensors, or tuples/lists whose first item is the input (e.g. a
        ``DataLoader`` yielding ``(x, y)``).
    layers : list of str, optional
        Names (as in ``model.named_modules()``) of the layers to collect; a single string is
        one name.  Default: every ``nn.Conv2d``, ``nn.Conv1d`` and ``nn.Linear``.
    max_batches : int, optional
        Stop after this many batches.
    max_samples : int, optional
        Stop after this many samples (the last batch is truncated).
    device : torch.device or str, optional
        Where to move each batch; default the device of the model's first parameter.
    progress : bool, default True
        Show a tqdm progress bar.
    max_positions_per_image : int, optional
        Keep, per image and per layer, a uniformly random subset of this many output
        positions (all of them when the map has fewer).  Every position then enters the sums
        with the same probability, so the accumulated sums divided by the count are unbiased
        estimates of the full-data mean and second moment (the covariance, computed from
        them, is consistent as usual).  This cuts the cost on large feature maps.
    seed : int, default 0
        Seed of the CPU ``torch.Generator`` that draws the positions.
    precision : {'auto', 'float32', 'float64'}, default 'auto'
        Dtype of the per-batch products; the sums are float64 in every case.
        ``'float64'`` multiplies in float64 (exact up to float64 rounding).  ``'auto'`` and
        ``'float32'`` multiply float32 (or lower precision) layer inputs in float32, in
        blocks of at most :data:`FLOAT32_BLOCK_ROWS` rows added in float64: each entry of
        ``sum_outer`` is then within ``4 * gamma`` (``gamma = float32_error_bound()``, below
        5e-4; typically errors are ~1e-6) of the exact value, relative to
        ``sqrt(s_i s_j)`` where ``s_i`` is the sum of squares of the entry's channel over the
        padded input; the products are IEEE float32 whatever
        ``torch.set_float32_matmul_precision`` says (the caller's setting is restored
        afterwards).  A model (input) in float64 always gets float64 products, and with
        ``'auto'`` so does a batch whose float32 products would leave float32's range
        (root-mean-square activations below about 3e-14 or above about 1e13, see
        :data:`FLOAT32_SAFE_MEAN_SQUARE`; they gave wrong statistics), and a batch whose
        largest input variance is below 1% of its largest mean square
        (:data:`FLOAT32_MIN_SPREAD`: the centred covariance of inputs ``1e3 + N(0, 1)``
        came out 8-54% wrong). The
        bound above is on the uncentred sums: explicit ``'float32'`` gives neither
        protection, so use it only for activations of ordinary size and spread.  The default
        took the collection on the embedded ResNet-20 / VGG from 24x / 16x a forward pass to
        the figures in ``benchmarks/RESULTS.md`` without changing the compressed models'
        accuracy (``benchmarks/collect_accuracy.py``); pass ``'float64'`` to force exact
        products.

    Returns
    -------
    dict of str to LayerStatistics
        In the model's module order.  Layers that the forward passes never called are left
        out, with a warning.

    Raises
    ------
    ValueError
        For unknown or unsupported layer names (the message lists the valid ones), no
        batches, bad limits, or NaN/Inf in a batch or in a layer input.
    TypeError
        For a ``model`` that is not an ``nn.Module`` or badly formed batches.
    """
    check_eager_model(model)
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "max_batches")
    if max_samples is not None:
        max_samples = check_positive_int(max_samples, "max_samples")
    if max_positions_per_image is not None:
        max_positions_per_image = check_positive_int(max_positions_per_image, "max_positions_per_image")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an int; got {seed!r}.")
    seed = int(seed)  # NumPy integers too
    if not -(2**63) <= seed < 2**64:  # the range torch.Generator.manual_seed takes
        raise ValueError(f"`seed` must be in [-2**63, 2**64); got {seed}.")
    _check_precision(precision)

    named = dict(model.named_modules())
    supported = {name: m for name, m in named.items() if isinstance(m, _SUPPORTED_TYPES)}
    if layers is None:
        selected = list(supported)
        if not selected:
            raise ValueError("The model has no nn.Conv2d, nn.Conv1d or nn.Linear layer.")
    else:
        requested = [layers] if isinstance(layers, str) else list(layers)
        bad = [name for name in requested if name not in supported]
        if bad:
            details = ", ".join(
                f"{name!r} ({type(named[name]).__name__}: unsupported type)" if name in named else f"{name!r} (unknown)"
                for name in bad
            )
            raise ValueError(
                f"Invalid layer names: {details}. Valid names (nn.Conv2d/Conv1d/Linear): {sorted(supported)}."
            )
        if not requested:
            raise ValueError("`layers` is empty.")
        wanted = set(requested)
        selected = [name for name in supported if name in wanted]  # model order, no duplicates

    if device is not None:
        # The same check as compress: an unavailable device failed deep inside the first
        # batch ("Torch not compiled with CUDA enabled"), and 'meta' holds no values.
        from .compress import check_device

        device = check_device(device)
    target = device if device is not None else _model_device(model)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    statistics: dict[str, LayerStatistics] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"Layer {name!r} received a {type(x).__name__} instead of a tensor.")
            count, total, outer = _batch_moments(
                module,
                x.detach(),
                max_positions_per_image=max_positions_per_image,
                generator=generator,
                precision=precision,
            )
            if name not in statistics:
                statistics[name] = LayerStatistics.from_module(module, device=total.device)
            if count == 0:
                return
            try:
                _check_finite_batch(total, outer, f"{type(module).__name__} input")
            except ValueError as exc:
                raise ValueError(f"Layer {name!r}: {exc}") from exc
            statistics[name]._add_batch(total, outer, count)

        return hook

    training_flags = [(m, m.training) for m in model.modules()]
    handles = []
    total = None
    if hasattr(batches, "__len__"):
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    bar = None
    n_batches = n_samples = 0
    try:
        for name in selected:
            handles.append(named[name].register_forward_pre_hook(make_hook(name), with_kwargs=True))
        model.eval()
        if tqdm is not None:
            bar = tqdm(total=total, disable=not progress, desc="collecting covariances", unit="batch")
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and n_batches >= max_batches:
                    break
                x = _batch_input(batch, index)
                if max_samples is not None:
                    x = x[: max_samples - n_samples]
                x = x.to(target)
                if x.is_floating_point() and not torch.isfinite(x).all():
                    raise ValueError(f"Batch {index} contains NaN or Inf values.")
                model(x)
                n_batches += 1
                n_samples += int(x.shape[0])
                if bar is not None:
                    bar.update(1)
                if max_samples is not None and n_samples >= max_samples:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags:
            module.training = flag
        if bar is not None:
            bar.close()

    if n_batches == 0:
        raise ValueError("`batches` yielded no batch: nothing to collect.")
    if n_samples == 0:
        raise ValueError("`batches` held no samples (every batch was empty): nothing to collect.")
    missing = [name for name in selected if name not in statistics]
    if missing:
        warnings.warn(
            f"These layers were never called during the forward passes and are left out: {missing}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return {name: statistics[name] for name in selected if name in statistics}
