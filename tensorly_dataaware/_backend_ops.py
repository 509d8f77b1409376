"""The few linear-algebra kernels TensorLy's backend interface does not expose.

TensorLy offers ``solve`` (LU), ``eigh`` and ``qr`` but no Cholesky. A Cholesky solve is
the cheapest exact solver for the symmetric positive definite normal equations of the ALS
(``n^3 / 3`` flops against roughly ``9 n^3`` for ``eigh``), so it is dispatched here to each
backend's own routine. It reports failure (a singular or indefinite matrix) by returning
``None`` instead of raising or returning NaN, and callers fall back to a pseudo-inverse.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorly as tl

__all__ = ["cholesky_factor", "cholesky_solve", "contract", "triangular_solve", "host_dtype", "dtype_kind", "framework_of"]


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


def host_dtype(tensor) -> np.dtype:
    """NumPy dtype of a tensor of any backend (reads one element, so it is cheap on a GPU)."""
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


def _factor_numpy(matrix):
    import scipy.linalg

    try:
        return scipy.linalg.cholesky(matrix, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def _factor_pytorch(matrix):
    import torch

    factor, info = torch.linalg.cholesky_ex(matrix)
    return factor if int(info) == 0 else None


def _factor_jax(matrix):
    import jax.numpy as jnp

    # JAX signals a failed factorization with NaNs rather than an exception.
    factor = jnp.linalg.cholesky(matrix)
    return factor if np.all(np.isfinite(np.asarray(jnp.diag(factor)))) else None


def _triangular_numpy(factor, rhs, transpose):
    import scipy.linalg

    return scipy.linalg.solve_triangular(factor, rhs, lower=True, trans=1 if transpose else 0, check_finite=False)


def _triangular_pytorch(factor, rhs, transpose):
    import torch

    squeeze = rhs.ndim == 1
    rhs = rhs[:, None] if squeeze else rhs
    if transpose:
        out = torch.linalg.solve_triangular(factor.mT, rhs, upper=True)
    else:
        out = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return out[:, 0] if squeeze else out


def _triangular_jax(factor, rhs, transpose):
    import jax.scipy.linalg as jsl

    return jsl.solve_triangular(factor, rhs, lower=True, trans=1 if transpose else 0)


_FACTOR = {"numpy": _factor_numpy, "pytorch": _factor_pytorch, "jax": _factor_jax}
_TRIANGULAR = {"numpy": _triangular_numpy, "pytorch": _triangular_pytorch, "jax": _triangular_jax}


def cholesky_factor(matrix, max_cond: float | None = None):
    """Lower Cholesky factor ``L`` (``matrix = L L^T``) of a symmetric positive definite matrix.

    Only the lower triangle of ``matrix`` is read. Returns ``None`` if the factorization
    fails (the matrix is singular or indefinite in working precision), if its pivots reveal
    a condition number above ``max_cond`` (default ``1 / (1000 eps)``), or if the backend has
    no Cholesky routine here.
    """
    factorize = _FACTOR.get(tl.get_backend())
    if factorize is None:
        return None
    if max_cond is None:
        max_cond = 1e-3 / float(np.finfo(host_dtype(matrix)).eps)
    factor = factorize(matrix)
    if factor is None or not _well_conditioned(tl.to_numpy(tl.diag(factor)), max_cond):
        return None
    return factor


def triangular_solve(factor, rhs, *, transpose: bool = False):
    """``L^{-1} rhs`` (or ``L^{-T} rhs`` with ``transpose=True``) for a lower-triangular ``L``."""
    return _TRIANGULAR[tl.get_backend()](factor, rhs, transpose)


def cholesky_solve(matrix, rhs, max_cond: float | None = None):
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite ``matrix``.

    Returns ``None`` when :func:`cholesky_factor` does, or when the solution is not finite
    (a factorization of a nearly singular matrix can "succeed" with huge pivot ratios); the
    caller then falls back to a pseudo-inverse.
    """
    factor = cholesky_factor(matrix, max_cond)
    if factor is None:
        return None
    out = triangular_solve(factor, triangular_solve(factor, rhs), transpose=True)
    if not np.isfinite(float(tl.sum(out))):
        return None
    return out
