"""The weighted least-squares problem both solvers start from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorly as tl

from .._backend_ops import host_dtype
from .._validation import validate_sigma, validate_tensor
from ..norms import _as_float64, damp_sigma, matricize

__all__ = ["SigmaProblem"]


@dataclass
class SigmaProblem:
    r"""A validated instance of :math:`\min \|(W - \tilde W)\Sigma^{1/2}\|_F^2`.

    Attributes
    ----------
    shape : tuple of int
        Shape of the tensor ``W``: ``(T, S, *spatial)``.
    W : tensor ``(T, n)``
        The matricized tensor.
    sigma : tensor ``(n, n)``
        Symmetrized and damped weight, in the tensor's dtype and device.
    Wsig : tensor ``(T, n)``
        ``W @ sigma``, computed once: every update and every error evaluation reuses it.
    ref : float
        ``trace(W sigma W^T)``, the squared sigma-norm of ``W``.
    eps : float
        Machine epsilon of the working dtype.
    noise_scale : float
        ``||W||_F ||W sigma||_F / ref >= 1``: the factor by which the conditioning of the
        problem amplifies round-off in the computed error.
    """

    shape: tuple
    W: object
    sigma: object
    Wsig: object
    ref: float
    eps: float
    noise_scale: float = 1.0
    out_context: dict | None = None

    @property
    def tensor(self):
        """The tensor in working precision, shape ``(T, S, *spatial)``."""
        return tl.reshape(self.W, self.shape)

    def to_output(self, x):
        """Cast a result back to the caller's dtype and device."""
        return tl.tensor(x, **self.out_context) if self.out_context is not None else x

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def n_in(self) -> int:
        return self.shape[1]

    @property
    def spatial(self) -> tuple:
        return tuple(self.shape[2:])

    @property
    def n_pos(self) -> int:
        return int(np.prod(self.spatial)) if self.spatial else 1

    @classmethod
    def build(cls, tensor, sigma, *, damping: float, check_psd: bool) -> "SigmaProblem":
        validate_tensor(tensor)
        dtype = host_dtype(tensor)
        if dtype.kind != "f":
            raise TypeError(
                f"`tensor` must have a floating-point dtype (float32 or float64), got {dtype}."
            )
        shape = tuple(int(d) for d in tl.shape(tensor))
        out_context = dict(tl.context(tensor))
        if dtype.itemsize < 8:
            # Single precision is not enough for the normal equations of real covariances
            # (cond ~ 1e6-1e10): a float32 CP sweep was measured to *increase* the objective
            # by 3%. Work in float64 on the same backend and device, return the input dtype.
            wide = _as_float64(tensor)
            if host_dtype(wide).itemsize == 8:
                tensor, dtype = wide, np.dtype(np.float64)
        W = matricize(tensor)
        n = tl.shape(W)[1]
        # sigma follows the tensor: same backend, dtype and device (as TensorLy does for
        # every argument of a decomposition).
        sigma = tl.tensor(sigma, **tl.context(tensor))
        sigma = damp_sigma(validate_sigma(sigma, n, check_psd=check_psd), damping)
        Wsig = tl.dot(W, sigma)
        ref = float(tl.sum(W * Wsig))
        if not ref > 0.0:
            raise ValueError(
                "`tensor` has zero sigma-norm (it lies in the null space of `sigma`): "
                "there is nothing to approximate."
            )
        noise_scale = float(tl.norm(W)) * float(tl.norm(Wsig)) / ref
        return cls(shape, W, sigma, Wsig, ref, float(np.finfo(dtype).eps), noise_scale, out_context)

    def relative_error(self, approx, approx_sig) -> float:
        """Relative error from ``W~`` and ``W~ @ sigma`` (both ``T x n``), computed explicitly.

        ``trace(D sigma D^T)`` with ``D = W - W~`` is evaluated as ``sum(D * (W sigma - W~ sigma))``
        rather than through Gram identities such as ``||W||^2 - ||core||^2``: the latter is
        wrong in the sigma-norm for non-orthogonal factors and loses all accuracy to
        cancellation when the error is small.
        """
        diff = float(tl.sum((self.W - approx) * (self.Wsig - approx_sig)))
        return float(np.sqrt(max(diff, 0.0) / self.ref))
