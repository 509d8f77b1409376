"""The few linear-algebra kernels TensorLy's backend interface does not expose.

TensorLy offers ``solve`` (LU), ``eigh`` and ``qr`` but no Cholesky. A Cholesky solve is
the cheapest exact solver for the symmetric positive definite normal equations of the ALS
(``n^3 / 3`` flops against roughly ``9 n^3`` for ``eigh``), so it is dispatched here to each
backend's own routine. It reports failure (a singular or indefinite matrix) by returning
``None`` instead of raising or returning NaN, and callers fall back to a pseudo-inverse.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import tensorly as tl

__all__ = ["full_precision_products", "cholesky_factor", "cholesky_solve", "contract", "host_dtype", "dtype_kind", "framework_of", "weighted_sum"]


@functools.lru_cache(maxsize=512)
def _contraction(expression: str, shapes: tuple):
    import opt_einsum

    return opt_einsum.contract_expression(expression, *shapes)


def contract(expression: str, *operands):
    """``opt_einsum.contract`` with the contraction path cached per expression and shapes.

    The ALS evaluates the same dozen contractions at the same shapes every sweep; finding
    the path each time took 45% of a small CP run's time (measured with cProfile on a
    ``10 x 8 x 3 x 3`` tensor), more than the arithmetic itself.
    """
    shapes = tuple(tuple(int(d) for d in tl.shape(op)) for op in operands)
    return _contraction(expression, shapes)(*operands)


@contextlib.contextmanager
def full_precision_products():
    """Full-precision float32 matrix products inside the block, on backends that reduce them.

    JAX's default matmul precision lets float32 products run with TF32 or bfloat16 passes
    on GPUs and TPUs (about 1e-3 relative error). Without x64 mode the solvers work in
    float32 on JAX, where that would cost the ALS its accuracy and monotonicity on
    ill-conditioned covariances, so the block asks for ``'highest'`` and restores the
    caller's setting afterwards. NumPy's products are always IEEE, and PyTorch inputs are
    solved in float64, which no precision setting reduces: nothing to do there.
    """
    if tl.get_backend() != "jax":
        yield
        return
    import jax

    with jax.default_matmul_precision("highest"):
        yield


#: Up to this many terms, :func:`weighted_sum` on PyTorch accumulates slice by slice.
_SLICED_SUM_MAX_TERMS = 64


def weighted_sum(tensor, factor, axis: int):
    """``out[..., r] = sum_i tensor[..., i (at axis), ..., r] * factor[i, r]``.

    A mode contracted with a factor whose rank index is the tensor's last axis (a
    Khatri-Rao step of the CP sweep). Einsum backends turn it into slow batched products,
    so it is a broadcast product and a sum; on PyTorch, for the short spatial modes, the
    slices are accumulated in place instead (``addcmul_``), which skips the full-size
    temporary: 0.085 against 0.19 ms for a ``64 x 3 x 3 x 3 x 3 x 68`` float64 tensor,
    one thread.
    """
    size, rank = tl.shape(factor)
    if tl.get_backend() == "pytorch" and size <= _SLICED_SUM_MAX_TERMS:
        out = tensor.select(axis, 0) * factor[0]
        for i in range(1, size):
            out.addcmul_(tensor.select(axis, i), factor[i])
        return out
    shape = [1] * tl.ndim(tensor)
    shape[axis], shape[-1] = size, rank
    return tl.sum(tensor * tl.reshape(factor, tuple(shape)), axis=axis)


def host_dtype(tensor) -> np.dtype:
    """NumPy dtype of a tensor of any backend.

    Read from the dtype's name (:func:`dtype_kind`) when NumPy knows it: no device
    synchronization, and much cheaper than a copy (the solvers ask several times per sweep).
    Otherwise from one element copied to the host.
    """
    try:
        return np.dtype(dtype_kind(tensor)[2])
    except TypeError:
        return np.dtype(tl.to_numpy(tl.reshape(tensor, (-1,))[:1]).dtype)


def framework_of(obj) -> str | None:
    """``'numpy'``, ``'pytorch'`` or ``'jax'`` for an array of that library, else ``None``.

    Read from the type's module so that no framework is imported to ask the question.
    """
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        return "numpy"
    root = type(obj).__module__.split(".")[0]
    return {"torch": "pytorch", "jax": "jax", "jaxlib": "jax"}.get(root)


def dtype_kind(tensor) -> tuple[str, int, str]:
    """``(kind, itemsize, name)`` of a tensor's dtype without copying it to the host.

    ``kind`` is NumPy's letter (``'f'`` float, ``'c'`` complex, ``'i'``/``'u'`` integer,
    ``'b'`` bool). Unlike :func:`host_dtype` it also works for dtypes NumPy lacks
    (``torch.bfloat16``; JAX's ``bfloat16`` reports kind ``'V'`` to NumPy).
    """
    dtype = getattr(tensor, "dtype", None)
    if framework_of(tensor) == "pytorch":
        if dtype.is_complex:
            kind = "c"
        elif dtype.is_floating_point:
            kind = "f"
        else:
            kind = "b" if str(dtype) == "torch.bool" else "i"
        return kind, int(tensor.element_size()), str(dtype).replace("torch.", "")
    dtype = np.dtype(dtype if dtype is not None else np.asarray(tensor).dtype)
    kind = dtype.kind
    if kind == "V" and "float" in dtype.name:  # ml_dtypes' bfloat16 / float8 (JAX)
        kind = "f"
    return kind, int(dtype.itemsize), dtype.name


def _well_conditioned(diagonal, max_cond: float) -> bool:
    # (max/min pivot)^2 is a cheap lower estimate of the condition number: beyond
    # max_cond the solution is dominated by round-off in near-null directions.
    d = np.abs(np.asarray(diagonal, dtype=np.float64))
    return bool(d.min() > 0 and (d.max() / d.min()) ** 2 < max_cond)


def _numpy(matrix, max_cond):
    import scipy.linalg

    try:
        factor = scipy.linalg.cho_factor(matrix, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    if not _well_conditioned(np.diag(factor[0]), max_cond):
        return None
    return lambda rhs: scipy.linalg.cho_solve(factor, rhs, check_finite=False)


def _pytorch(matrix, max_cond):
    import torch

    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 or not _well_conditioned(factor.diagonal().cpu().numpy(), max_cond):
        return None

    def solve(rhs):
        if rhs.ndim == 1:
            return torch.cholesky_solve(rhs[:, None], factor)[:, 0]
        return torch.cholesky_solve(rhs, factor)

    return solve


def _jax(matrix, max_cond):
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    factor = jnp.linalg.cholesky(matrix)
    # JAX signals a failed factorization with NaNs rather than an exception.
    diagonal = np.asarray(jnp.diag(factor))
    if not np.all(np.isfinite(diagonal)) or not _well_conditioned(diagonal, max_cond):
        return None
    return lambda rhs: jsl.cho_solve((factor, True), rhs)


_DISPATCH = {"numpy": _numpy, "pytorch": _pytorch, "jax": _jax}


def cholesky_factor(matrix, max_cond: float | None = None):
    """Factor a symmetric positive definite ``matrix`` once, to solve with it repeatedly.

    Returns a function ``solve(rhs) -> x`` with ``matrix @ x = rhs`` (``rhs`` of shape
    ``(m,)`` or ``(m, k)``), or ``None`` if the factorization fails (the matrix is singular
    or indefinite in working precision), if its pivots reveal a condition number above
    ``max_cond`` (default ``1 / (1000 eps)``), or if the backend has no Cholesky routine
    here. The caller then falls back to an eigendecomposition.
    """
    factor = _DISPATCH.get(tl.get_backend())
    if factor is None:
        return None
    if max_cond is None:
        max_cond = 1e-3 / float(np.finfo(host_dtype(matrix)).eps)
    return factor(matrix, max_cond)


def cholesky_solve(matrix, rhs, max_cond: float | None = None):
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite ``matrix``.

    Returns ``None`` where :func:`cholesky_factor` does, or if the solution is not finite.
    """
    solve = cholesky_factor(matrix, max_cond)
    if solve is None:
        return None
    out = solve(rhs)
    # A factorization of a nearly singular matrix can "succeed" with huge pivots ratios;
    # reject non-finite results so the caller falls back to the pseudo-inverse.
    if not np.isfinite(float(tl.sum(out))):
        return None
    return out
