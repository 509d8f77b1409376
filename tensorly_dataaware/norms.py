r"""The sigma-weighted norm and the small linear-algebra kernels every solver shares.

For a tensor ``W`` of shape ``(T, S, d_2, ..., d_{N-1})`` matricized as
``W.reshape(T, -1)`` (``n = S * d_2 * ... * d_{N-1}`` columns) and a symmetric positive
semi-definite ``sigma`` of size ``n x n``,

.. math::

    \|W\|_\Sigma^2 = \operatorname{tr}(W \Sigma W^\top) = \|W \Sigma^{1/2}\|_F^2 .

When ``sigma`` is the second moment of a layer's input patches, this is the mean squared
output of the linear map ``W`` over the data; applied to ``W - W~`` it is the mean squared
change of the layer's output.

Everything here is written with TensorLy ops, so it runs on every backend.
"""

from __future__ import annotations

import numpy as np
import tensorly as tl

from ._backend_ops import cholesky_solve, dtype_kind, framework_of, host_dtype
from ._validation import as_backend_tensor, check_finite, validate_sigma, validate_tensor

__all__ = [
    "matricize",
    "sigma_norm",
    "relative_sigma_error",
    "damp_sigma",
    "psd_solve",
    "whitened_svd",
]


def matricize(tensor):
    """Reshape ``(T, S, ...)`` to ``(T, S * ...)``: the column order of ``sigma``."""
    shape = tl.shape(tensor)
    return tl.reshape(tensor, (shape[0], -1))


def _to_dense(approximation):
    """Accept a dense tensor, a ``CPTensor``/``TuckerTensor``, or their plain-tuple forms
    ``(weights, factors)`` / ``(core, factors)`` (what the solvers' ``init`` also accepts)."""
    if isinstance(approximation, tl.cp_tensor.CPTensor):
        return tl.cp_to_tensor(approximation)
    if isinstance(approximation, tl.tucker_tensor.TuckerTensor):
        return tl.tucker_to_tensor(approximation)
    if isinstance(approximation, tuple) and len(approximation) == 2:
        # Only a pair whose second item is a sequence of matrices (the factors): a dense
        # tensor written as nested tuples of numbers stays what it is.
        head, factors = approximation
        if (isinstance(factors, (list, tuple)) and factors
                and all(getattr(f, "ndim", None) == 2 for f in factors) and getattr(head, "ndim", None) is not None):
            ranks = [f.shape[1] for f in factors]
            if head.ndim == 1 and all(r == head.shape[0] for r in ranks):
                return tl.cp_to_tensor(tl.cp_tensor.CPTensor((head, list(factors))))
            if head.ndim == len(factors) and tuple(head.shape) == tuple(ranks):
                return tl.tucker_to_tensor(tl.tucker_tensor.TuckerTensor((head, list(factors))))
    return approximation


def _squared_sigma_norm(matrix, sigma):
    # sum(M * (M @ sigma)) = trace(M sigma M^T) without forming the T x T product.
    return tl.sum(matrix * tl.dot(matrix, sigma))


def _pow2_scale(tensor) -> float:
    """Power of two nearest to ``max|tensor|`` (1 for a zero tensor).

    Dividing by it is exact and brings squared norms of huge (1e154) or tiny weights back
    into range: ``trace(W sigma W^T)`` overflows long before ``W`` does.
    """
    peak = float(tl.max(tl.abs(tensor)))
    if not peak > 0.0 or not np.isfinite(peak):
        return 1.0
    return float(2.0 ** np.round(np.log2(peak)))


def _real_floating(tensor, name: str):
    """Coerce to the active backend; integers are promoted to float64."""
    tensor = as_backend_tensor(tensor, name)
    kind, itemsize, _ = dtype_kind(tensor)
    # Integers, and half precision (which has no eigensolver on most backends and far too
    # few digits for a squared norm), are computed in float64.
    if kind != "f" or itemsize < 4:
        tensor = _as_float64(tensor)
    return tensor


def sigma_norm(tensor, sigma, *, check_psd: bool = False):
    r"""Sigma-weighted norm :math:`\|W \Sigma^{1/2}\|_F` of a tensor.

    Parameters
    ----------
    tensor : tensor of shape ``(T, S, ...)``
        Mode 0 is the output mode; the other modes are flattened in C order.
    sigma : tensor of shape ``(n, n)``
        Symmetric positive semi-definite weight, ``n = prod(tensor.shape[1:])``.
    check_psd : bool, default is False
        Also verify that ``sigma`` is positive semi-definite (a float64 Cholesky).

    Returns
    -------
    float
        :math:`\sqrt{\operatorname{tr}(W \Sigma W^\top)}`.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorly_dataaware import sigma_norm
    >>> W = np.ones((2, 3))
    >>> float(sigma_norm(W, np.eye(3)))  # the Frobenius norm when sigma = I
    2.449489742783178
    """
    tensor = _real_floating(tensor, "tensor")
    validate_tensor(tensor)
    mat = matricize(tensor)
    sigma = tl.tensor(as_backend_tensor(sigma, "sigma"), **tl.context(mat))
    sigma = validate_sigma(sigma, tl.shape(mat)[1], check_psd=check_psd)
    w_scale, s_scale = _pow2_scale(mat), _pow2_scale(sigma)
    squared = float(_squared_sigma_norm(mat / w_scale, sigma / s_scale))
    # Clamp: round-off can make a tiny squared norm slightly negative.
    return float(np.sqrt(max(squared, 0.0)) * w_scale * np.sqrt(s_scale))


def relative_sigma_error(tensor, approximation, sigma, *, check_psd: bool = False) -> float:
    r"""Relative sigma-error :math:`\|(W - \tilde W)\Sigma^{1/2}\|_F / \|W \Sigma^{1/2}\|_F`.

    Parameters
    ----------
    tensor : tensor of shape ``(T, S, ...)``
        The reference tensor ``W``.
    approximation : tensor, CPTensor, TuckerTensor, or a ``(weights, factors)`` / ``(core, factors)`` pair
        ``W~``; decompositions are reconstructed first.
    sigma : tensor of shape ``(n, n)``
        Symmetric positive semi-definite weight.
    check_psd : bool, default is False
        Also verify that ``sigma`` is positive semi-definite.

    Returns
    -------
    float
        The relative error (0 for an exact approximation).
    """
    tensor = _real_floating(tensor, "tensor")
    validate_tensor(tensor)
    approximation = _real_floating(_to_dense(approximation), "approximation")
    if tuple(tl.shape(approximation)) != tuple(tl.shape(tensor)):
        raise ValueError(
            f"`approximation` has shape {tuple(tl.shape(approximation))}, "
            f"but `tensor` has shape {tuple(tl.shape(tensor))}."
        )
    check_finite(approximation, "approximation")
    mat = matricize(tensor)
    approx = tl.tensor(matricize(approximation), **tl.context(mat))
    sigma = tl.tensor(as_backend_tensor(sigma, "sigma"), **tl.context(mat))
    sigma = validate_sigma(sigma, tl.shape(mat)[1], check_psd=check_psd)
    # Homogeneous in (W, W~) together and in sigma: scale both into range (exactly).
    w_scale, s_scale = _pow2_scale(mat), _pow2_scale(sigma)
    mat, approx, sigma = mat / w_scale, approx / w_scale, sigma / s_scale
    ref = float(_squared_sigma_norm(mat, sigma))
    if ref <= 0.0:
        raise ValueError("`tensor` has zero sigma-norm: the relative error is undefined.")
    diff = float(_squared_sigma_norm(mat - approx, sigma))
    if not np.isfinite(diff):
        raise ValueError(
            "`approximation` is too far from `tensor` (its sigma-error overflows): the relative error is not representable."
        )
    return float(np.sqrt(max(diff, 0.0) / ref))


def damp_sigma(sigma, damping: float):
    r"""Return :math:`\Sigma + \delta \cdot \overline{\operatorname{diag}(\Sigma)} \cdot I`.

    Real input covariances are singular or nearly so (zero padding, dead channels,
    correlated pixels). Adding a ridge proportional to the mean variance is the same as
    adding a little isotropic noise to the inputs: it makes every normal equation well posed
    and pulls the minimizer, in directions the data never excites, toward the Frobenius one,
    while changing the objective by a relative ``O(damping)`` only.

    Parameters
    ----------
    sigma : tensor of shape ``(n, n)``
    damping : float
        Relative ridge, ``>= 0``; 0 returns ``sigma`` itself.

    Returns
    -------
    tensor of shape ``(n, n)``
    """
    if damping < 0 or not np.isfinite(damping):
        raise ValueError(f"`damping` must be a finite number >= 0, got {damping}.")
    if damping == 0:
        return sigma
    n = tl.shape(sigma)[0]
    mean_diag = tl.sum(tl.diag(sigma)) / n
    return sigma + (damping * mean_diag) * tl.eye(n, **tl.context(sigma))


def _pinv_rcond(matrix) -> float:
    # Relative eigenvalue cut-off in the spirit of numpy.linalg.pinv / lstsq: below
    # n * eps * lambda_max an eigen-direction is numerical noise.
    eps = float(np.finfo(host_dtype(matrix)).eps)
    return max(tl.shape(matrix)[0], 1) * eps * 10


def psd_solve(matrix, rhs, rcond: float | None = None):
    """Minimum-norm solution of ``matrix @ x = rhs`` for a symmetric PSD ``matrix``.

    Uses the eigendecomposition, so a singular ``matrix`` (a rank-deficient covariance)
    gives the pseudo-inverse solution instead of NaN or an exception, and it behaves the
    same on every backend. ``x`` is the exact minimizer of the quadratic
    ``x^T A x / 2 - b^T x`` over the range of ``A``, which is what keeps the ALS monotone.

    A Cholesky solve (about 30 times cheaper than the eigendecomposition) is tried first;
    the eigendecomposition is used only when the matrix is singular or too ill-conditioned
    for it. Single-precision systems are solved in double precision: they are small next
    to the products that build them, and float32 normal equations of real covariances are
    too ill-conditioned to keep the ALS monotone.

    Parameters
    ----------
    matrix : tensor of shape ``(m, m)``
        Symmetric positive semi-definite.
    rhs : tensor of shape ``(m,)`` or ``(m, k)``
    rcond : float, optional
        Eigenvalues below ``rcond * max(eigenvalues)`` are treated as zero (default
        ``10 m eps``).

    Returns
    -------
    tensor
        Same shape as ``rhs``.
    """
    if host_dtype(matrix).itemsize < 8:
        wide = _as_float64(matrix)
        # JAX without x64 mode cannot promote: then solve in single precision.
        if host_dtype(wide).itemsize == 8:
            return _cast_like(psd_solve(wide, _as_float64(rhs), rcond=rcond), matrix)
    out = cholesky_solve(matrix, rhs)
    if out is not None:
        return out
    eigvals, eigvecs = tl.eigh(matrix)
    if rcond is None:
        rcond = _pinv_rcond(matrix)
    top = tl.max(eigvals)
    keep = eigvals > rcond * top
    safe = tl.where(keep, eigvals, tl.ones(tl.shape(eigvals), **tl.context(eigvals)))
    inv = tl.where(keep, 1.0 / safe, tl.zeros(tl.shape(eigvals), **tl.context(eigvals)))
    proj = tl.dot(tl.transpose(eigvecs), rhs)
    if tl.ndim(rhs) == 1:
        return tl.dot(eigvecs, inv * proj)
    return tl.dot(eigvecs, inv[:, None] * proj)


def _as_float64(tensor):
    """Same backend and device, float64."""
    if framework_of(tensor) == "pytorch":
        # One conversion: ``tl.tensor`` clones first, then converts (two copies), which
        # was a third of a float32 solve of a 68 x 68 system (the CP output step).
        import torch

        return tensor.to(torch.float64)
    context = dict(tl.context(tensor))
    if framework_of(tensor) == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            # float32 is the widest JAX has without x64 (the documented fallback): asking
            # for float64 only made JAX warn at every call that it truncates to float32.
            if dtype_kind(tensor)[1] >= 4:
                return tensor
            context["dtype"] = getattr(tl.backend, "float32")
            return tl.tensor(tensor, **context)
    context["dtype"] = getattr(tl.backend, "float64")
    return tl.tensor(tensor, **context)


def _cast_like(tensor, like):
    """``tensor`` in the dtype and on the device of ``like`` (same backend)."""
    if framework_of(tensor) == "pytorch":
        return tensor.to(dtype=like.dtype, device=like.device)
    return tl.tensor(tensor, **tl.context(like))


def top_eigvecs(matrix, k: int):
    """The ``k`` leading eigenvectors (descending) and eigenvalues of a symmetric matrix."""
    eigvals, eigvecs = tl.eigh(matrix)
    n = tl.shape(eigvals)[0]
    # eigh sorts ascending; flip (not fancy indexing, which JAX rejects) for descending.
    return tl.flip(eigvecs[:, n - k :], axis=1), tl.flip(eigvals[n - k :], axis=0)


def whitened_svd(matrix, rank: int, sigma, *, damping: float = 0.0, check_psd: bool = True):
    r"""Best rank-``r`` approximation of a matrix in the sigma-norm.

    Solves :math:`\min_{\operatorname{rank}(\tilde W) \le r} \|(W - \tilde W)\Sigma^{1/2}\|_F`
    exactly: :math:`\tilde W = U_r U_r^\top W` with :math:`U_r` the ``r`` leading
    eigenvectors of :math:`W \Sigma W^\top`, i.e. the leading left singular vectors of the
    whitened matrix :math:`W \Sigma^{1/2}`. No square root or inverse of ``sigma`` is
    needed, so a singular ``sigma`` is fine. This is the optimum for ``nn.Linear`` layers
    and ``1 x 1`` convolutions.

    Parameters
    ----------
    matrix : tensor of shape ``(T, n)`` (or ``(T, S, ...)``, matricized)
    rank : int
        Target rank, ``1 <= rank <= min(T, n)``.
    sigma : tensor of shape ``(n, n)``
    damping : float, default is 0
        Relative ridge added to ``sigma`` (see :func:`~tensorly_dataaware.norms.damp_sigma`).
    check_psd : bool, default is True

    Returns
    -------
    (last, first)
        ``last`` of shape ``(T, rank)`` with orthonormal columns and ``first = last.T @ W``
        of shape ``(rank, n)``, so that ``W~ = last @ first``.
    """
    matrix = as_backend_tensor(matrix, "matrix")
    kind, itemsize, _ = dtype_kind(matrix)
    # Half precision is computed in float64 and returned in its dtype.
    out_context = dict(tl.context(matrix)) if kind == "f" and itemsize < 4 else None
    matrix = _real_floating(matrix, "matrix")
    validate_tensor(matrix, "matrix")
    mat = matricize(matrix)
    n_out, n = tl.shape(mat)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"`rank` must be an int, got {rank!r}.")
    if not (1 <= rank <= min(n_out, n)):
        raise ValueError(f"`rank` must be in [1, {min(n_out, n)}], got {rank}.")
    sigma = tl.tensor(as_backend_tensor(sigma, "sigma"), **tl.context(mat))
    sigma = damp_sigma(validate_sigma(sigma, n, check_psd=check_psd), damping)
    # The eigenvectors of W sigma W^T do not depend on the scales of W and sigma: remove
    # them (exactly, powers of two) so that the Gram matrix cannot overflow.
    scaled, sigma = mat / _pow2_scale(mat), sigma / _pow2_scale(sigma)
    gram = tl.dot(scaled, tl.dot(sigma, tl.transpose(scaled)))
    last, _ = top_eigvecs((gram + tl.transpose(gram)) / 2, rank)
    first = tl.dot(tl.transpose(last), mat)
    if out_context is not None:
        last, first = tl.tensor(last, **out_context), tl.tensor(first, **out_context)
    return last, first
