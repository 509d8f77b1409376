"""Interoperability with TensorLy-Torch (``tltorch``): our factorized convolutions as its layers.

:func:`to_tltorch` turns a :class:`~tensorly_dataaware.torch.Tucker2Conv2d` or
:class:`~tensorly_dataaware.torch.CPConv2d` into a ``tltorch.FactorizedConv`` holding the same
factorization (built with ``FactorizedConv.from_factorization``), so that tltorch's tooling
(tensor dropout, rank regularization, fine-tuning of the factors) applies to data-aware
decompositions. Tested with tensorly-torch 0.5.0 and PyTorch 2.13 (extra ``tltorch``).

A Tucker-2 layer becomes a Tucker tensor of rank ``(R_out, R_in, kh, kw)`` whose spatial
factors are identities; a CP layer becomes a CP tensor with unit weights (ours are folded
into the output factor). tltorch convolutions have no ``padding_mode`` and no string
padding, so only zero padding with explicit sizes converts.
"""

from __future__ import annotations

from torch import nn

from .layers import CPConv2d, Tucker2Conv2d

__all__ = ["to_tltorch"]


def to_tltorch(module: nn.Module, implementation: str = "factorized") -> nn.Module:
    """A ``tltorch.FactorizedConv`` computing the same convolution as ``module``.

    Parameters
    ----------
    module : Tucker2Conv2d or CPConv2d
    implementation : {'factorized', 'reconstructed'}, default 'factorized'
        tltorch's forward: through the factors, or with the reconstructed dense kernel.

    Returns
    -------
    tltorch.FactorizedConv
        With copies of the factors (the module is not modified).

    Raises
    ------
    ImportError
        Without tensorly-torch (install the ``tltorch`` extra).

    Notes
    -----
    Importing tensorly-torch (done here on first use) calls ``tl.set_backend('pytorch')``,
    and its layers need that backend when they run; code that uses TensorLy's NumPy backend
    afterwards should wrap itself in ``tl.backend_context('numpy')``.
    TypeError
        For another module type.
    ValueError
        For a non-zero padding mode or string padding, which tltorch cannot express.
    """
    import tltorch
    import torch

    if not isinstance(module, (Tucker2Conv2d, CPConv2d)):
        raise TypeError(f"`module` must be a Tucker2Conv2d or CPConv2d; got {type(module).__name__}.")
    if implementation not in ("factorized", "reconstructed"):
        raise ValueError(f"`implementation` must be 'factorized' or 'reconstructed'; got {implementation!r}.")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(
            f"tltorch convolutions support zero padding with explicit sizes only; got padding={module.padding!r}, "
            f"padding_mode={module.padding_mode!r}."
        )
    with torch.no_grad():
        last = module.last.weight[:, :, 0, 0].clone()
        first = module.first.weight[:, :, 0, 0].T.clone()
        kh, kw = module.kernel_size
        if isinstance(module, Tucker2Conv2d):
            core = module.core.weight.clone()
            eye = [torch.eye(k, dtype=core.dtype, device=core.device) for k in (kh, kw)]
            weight = tltorch.TuckerTensor(core, [last, first, *eye])
        else:
            vertical = module.vertical.weight[:, 0, :, 0].T.clone()
            horizontal = module.horizontal.weight[:, 0, 0, :].T.clone()
            ones = torch.ones(module.rank, dtype=last.dtype, device=last.device)
            weight = tltorch.CPTensor(ones, [last, first, vertical, horizontal])
        bias = None if module.last.bias is None else module.last.bias.detach().clone()
    return tltorch.FactorizedConv.from_factorization(
        weight, implementation=implementation, stride=module.stride, padding=module.padding,
        dilation=module.dilation, bias=bias,
    )
