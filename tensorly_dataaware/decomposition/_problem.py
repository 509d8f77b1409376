"""The weighted least-squares problem both solvers start from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorly as tl

from .._backend_ops import dtype_kind, host_dtype
from .._validation import as_backend_tensor, check_finite, validate_sigma, validate_tensor
from ..norms import _as_float64, damp_sigma, matricize

__all__ = ["SigmaProblem"]


def _unit_scale(tensor):
    """``(tensor / c, c)`` with ``c`` the power of two nearest to ``max|tensor|`` (1 for zero)."""
    peak = float(tl.max(tl.abs(tensor)))
    if not peak > 0.0 or not np.isfinite(peak):
        return tensor, 1.0
    scale = float(2.0 ** np.round(np.log2(peak)))
    if scale == 1.0:
        return tensor, 1.0
    return tensor / scale, scale


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
    out_context : dict
        Backend context (dtype, device) of the caller's tensor: results are returned in it.
    scale : float
        Power of two by which the caller's tensor was divided (``W`` is the scaled one):
        results are multiplied back by it in :meth:`to_output`.
    """

    shape: tuple
    W: object
    sigma: object
    Wsig: object
    ref: float
    eps: float
    noise_scale: float = 1.0
    out_context: dict | None = None
    scale: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False)

    def sigma_by_input(self):
        """``sigma`` as an ``(S P P) x S`` matrix, ``[(s, p, q), u] = sigma[(s, p), (u, q)]``.

        In this layout the products of ``sigma`` with an input-channel factor ``V``
        (``S x R``) that both solvers need every sweep (``Sigma (V kron I_P)`` for Tucker-2,
        ``Sigma`` against ``B`` for CP's spatial and output steps) are one plain GEMM,
        ``sigma_by_input @ V`` of shape ``(S, P, P, R)``; an einsum on the natural layout
        transposes ``sigma`` every time (2.3x slower at 64 channels). It is a copy of
        ``sigma``, made once per decomposition.
        """
        if "sigma_by_input" not in self._cache:
            S, P = self.n_in, self.n_pos
            sigma4 = tl.reshape(self.sigma, (S, P, S, P))
            self._cache["sigma_by_input"] = tl.reshape(tl.transpose(sigma4, (0, 1, 3, 2)), (S * P * P, S))
        return self._cache["sigma_by_input"]

    def wsig_by_input(self):
        """``W Sigma`` as a ``(T P) x S`` matrix, ``[(t, p), s] = (W Sigma)[t, (s, p)]``.

        ``W Sigma (V kron I_P)`` is then one GEMM with ``V`` instead of a contraction that
        transposes ``W Sigma`` every sweep. Made once per decomposition.
        """
        if "wsig_by_input" not in self._cache:
            wsig3 = tl.reshape(self.Wsig, (self.n_out, self.n_in, self.n_pos))
            self._cache["wsig_by_input"] = tl.reshape(tl.transpose(wsig3, (0, 2, 1)), (self.n_out * self.n_pos, self.n_in))
        return self._cache["wsig_by_input"]

    @property
    def tensor(self):
        """The tensor in working precision, shape ``(T, S, *spatial)``."""
        return tl.reshape(self.W, self.shape)

    def to_output(self, x, *, rescale: bool = False):
        """Cast a result back to the caller's dtype and device.

        ``rescale=True`` for the one factor of a decomposition that carries the scale of
        ``W`` (Tucker core, CP weights): it is multiplied back by :attr:`scale`.
        """
        if rescale and self.scale != 1.0:
            x = x * self.scale
        if self.out_context is None:
            return x
        out = tl.tensor(x, **self.out_context)
        if dtype_kind(out)[1] < dtype_kind(x)[1] and not bool(tl.all(tl.abs(tl.tensor(out, **tl.context(x))) < float("inf"))):
            # float16 tops out at 65504: a CP weight (the norm of a whole rank-one term) of a
            # tensor whose entries fit can still overflow it, and an `inf` would come back
            # silently while the reported error is that of the float64 result.
            peak = float(tl.max(tl.abs(x)))
            raise OverflowError(
                f"A factor of the result (largest magnitude {peak:.3g}) does not fit the input's dtype "
                f"{dtype_kind(out)[2]}: pass the tensor in float32 or float64."
            )
        return out

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
        tensor = as_backend_tensor(tensor, "tensor")
        sigma = as_backend_tensor(sigma, "sigma")
        kind, itemsize, dtype_name = dtype_kind(tensor)
        if kind != "f":
            raise TypeError(
                f"`tensor` must have a floating-point dtype (it is solved in float64 and returned in its own), got {dtype_name}."
            )
        shape = tuple(int(d) for d in tl.shape(tensor))
        out_context = dict(tl.context(tensor))
        if itemsize < 8:
            # Single and half precision are not enough for the normal equations of real
            # covariances (cond ~ 1e6-1e10): a float32 CP sweep was measured to *increase*
            # the objective by 3%. Work in float64 on the same backend and device, return
            # the input dtype.
            wide = _as_float64(tensor)
            if dtype_kind(wide)[1] == 8:
                tensor = wide
            elif itemsize < 4:
                # JAX without x64: float32 is the widest available.
                tensor = tl.tensor(tensor, **{**out_context, "dtype": tl.float32})
        validate_tensor(tensor)
        # The problem is homogeneous: W -> c W scales the solution by c, sigma -> c sigma
        # changes nothing. Working on W and sigma scaled by powers of two (exact) near unit
        # size keeps trace(W sigma W^T) representable for weights up to ~1e300 (1e154 would
        # overflow it otherwise) and down to the smallest normal numbers.
        tensor, scale = _unit_scale(tensor)
        dtype = host_dtype(tensor)
        W = matricize(tensor)
        n = tl.shape(W)[1]
        # sigma follows the tensor: same backend, dtype and device (as TensorLy does for
        # every argument of a decomposition).
        sigma = tl.tensor(sigma, **tl.context(tensor))
        check_finite(sigma, "sigma")
        sigma, _ = _unit_scale(sigma)
        sigma = damp_sigma(validate_sigma(sigma, n, check_psd=check_psd), damping)
        Wsig = tl.dot(W, sigma)
        ref = float(tl.sum(W * Wsig))
        if not ref > 0.0:
            raise ValueError(
                "`tensor` has zero sigma-norm (it lies in the null space of `sigma`): "
                "there is nothing to approximate."
            )
        noise_scale = float(tl.norm(W)) * float(tl.norm(Wsig)) / ref
        return cls(shape, W, sigma, Wsig, ref, float(np.finfo(dtype).eps), noise_scale, out_context, scale)

    def relative_error(self, approx, approx_sig) -> float:
        """Relative error from ``W~`` and ``W~ @ sigma`` (both ``T x n``), computed explicitly.

        ``trace(D sigma D^T)`` with ``D = W - W~`` is evaluated as ``sum(D * (W sigma - W~ sigma))``
        rather than through Gram identities such as ``||W||^2 - ||core||^2``: the latter is
        wrong in the sigma-norm for non-orthogonal factors and loses all accuracy to
        cancellation when the error is small.
        """
        diff = float(tl.sum((self.W - approx) * (self.Wsig - approx_sig)))
        return float(np.sqrt(max(diff, 0.0) / self.ref))
