"""Input checks shared by every public entry point.

Every function here raises a ``ValueError`` (or ``TypeError``) with a message that names the
offending argument, so that bad input never turns into a silent wrong answer further down.
All checks run on the active TensorLy backend; the positive semi-definiteness test is a
one-off float64 Cholesky (see :func:`validate_sigma`).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import scipy.linalg
import tensorly as tl

__all__ = [
    "as_backend_tensor",
    "check_finite",
    "validate_tensor",
    "validate_sigma",
    "validate_tucker2_rank",
    "validate_cp_rank",
]


def as_backend_tensor(value, name: str):
    """Return ``value`` as a real tensor of the active TensorLy backend, or raise ``TypeError``.

    Accepted: tensors of the active backend, NumPy arrays and nested Python lists/tuples of
    numbers (converted with ``tl.tensor``, as TensorLy's decompositions do). A PyTorch
    tensor that requires grad (a ``conv.weight`` Parameter) is detached: the solvers are
    not differentiable, and nothing flows back through them. Refused with a ``TypeError``
    naming the argument: tensors of another framework than the active backend (converting
    them silently would copy across devices), complex values (the objective is real; the
    imaginary part would be dropped), and anything that is not an array.
    """
    from ._backend_ops import dtype_kind, framework_of

    active = tl.get_backend()
    framework = framework_of(value)
    if framework is None:
        if isinstance(value, (list, tuple)):
            try:
                value = np.asarray(value)
            except ValueError as exc:  # ragged nesting
                raise TypeError(f"`{name}` must be a tensor or a rectangular nested list of numbers: {exc}") from None
            if value.dtype.kind not in "biufc":
                raise TypeError(f"`{name}` must hold numbers, got a list of {value.dtype} values.")
            framework = "numpy"
        else:
            raise TypeError(f"`{name}` must be a tensor of the active TensorLy backend ({active!r}), got {type(value).__name__}.")
    if framework == "pytorch" and getattr(value, "requires_grad", False):
        value = value.detach()
    if framework == "pytorch" and value.device.type == "meta":
        raise ValueError(f"`{name}` is on PyTorch's 'meta' device, which holds shapes but no values: "
                         "nothing to decompose. Materialize it first (e.g. `.to_empty(...)` and load weights).")
    kind = dtype_kind(value)[0]
    if kind == "c":
        raise TypeError(f"`{name}` is complex ({dtype_kind(value)[2]}): only real tensors are supported.")
    if framework != active:
        if framework != "numpy":
            raise TypeError(
                f"`{name}` is a {framework} tensor but the active TensorLy backend is {active!r}: "
                f"call tl.set_backend({framework!r}) (or use tl.backend_context) or convert it first."
            )
        value = tl.tensor(value)
    return value


def check_finite(tensor, name: str) -> None:
    """Raise a ``ValueError`` if ``tensor`` holds a NaN or an infinite value."""
    total = tl.sum(tensor)
    # One reduction is enough: any NaN or Inf makes the sum non-finite, and a finite sum
    # with an overflowing partial sum cannot happen for finite inputs of reasonable size.
    if not np.isfinite(float(total)):
        # The sum can also overflow for huge finite values: check element-wise to be sure.
        if not bool(np.all(np.isfinite(tl.to_numpy(tensor)))):
            raise ValueError(f"`{name}` contains NaN or Inf values.")


def validate_tensor(tensor, name: str = "tensor") -> tuple[int, int, tuple[int, ...]]:
    """Check the tensor to decompose.

    Returns
    -------
    (n_out, n_in, spatial_shape)
        The output-mode size ``T``, the input-mode size ``S`` and the shape of the
        remaining ("spatial") modes, possibly empty.
    """
    shape = tuple(int(d) for d in tl.shape(tensor))
    if len(shape) < 2:
        raise ValueError(
            f"`{name}` must have order >= 2 (output mode, input mode, optional spatial modes); "
            f"got shape {shape}."
        )
    if any(d < 1 for d in shape):
        raise ValueError(f"`{name}` has an empty mode: shape {shape}.")
    check_finite(tensor, name)
    return shape[0], shape[1], shape[2:]


#: Default relative tolerance of the PSD test of :func:`validate_sigma` (also applied by the
#: PyTorch adapter before it repairs round-off, ``torch.compress._round_off_psd``).
PSD_TOL = 1e-6


def validate_sigma(sigma, n: int, *, check_psd: bool = True, psd_tol: float = PSD_TOL, sym_tol: float = 1e-6):
    """Check a covariance matrix and return it symmetrized.

    Parameters
    ----------
    sigma : tensor
        Candidate ``(n, n)`` symmetric positive semi-definite matrix.
    n : int
        Expected size, ``prod(tensor.shape[1:])``.
    check_psd : bool
        If True, verify positive semi-definiteness with a Cholesky factorization of
        ``sigma + psd_tol * mean(diag(sigma)) * I`` in float64 (on the tensor's device for
        PyTorch, on the host otherwise). This costs
        ``n**3 / 3`` flops once per call (about a second for ``n = 4608``); pass False to
        skip it when ``sigma`` is known to be a covariance.
    psd_tol : float
        Relative tolerance for negative eigenvalues: an eigenvalue below
        ``-psd_tol * mean(diag(sigma))`` makes ``sigma`` indefinite.
    sym_tol : float
        Relative tolerance for asymmetry, measured against ``max(abs(sigma))``.

    Returns
    -------
    sigma : tensor
        ``(sigma + sigma.T) / 2``: round-off asymmetry removed.
    """
    shape = tuple(int(d) for d in tl.shape(sigma))
    if shape != (n, n):
        raise ValueError(
            f"`sigma` must be a square matrix of size n = prod(tensor.shape[1:]) = {n}, "
            f"in the column order of tensor.reshape(T, -1); got shape {shape}."
        )
    check_finite(sigma, "sigma")
    scale = float(tl.max(tl.abs(sigma)))
    if scale == 0.0:
        raise ValueError("`sigma` is the zero matrix: the weighted objective is identically zero.")
    asym = float(tl.max(tl.abs(sigma - tl.transpose(sigma))))
    if asym > sym_tol * scale:
        raise ValueError(
            f"`sigma` is not symmetric: max |sigma - sigma.T| = {asym:.3g} exceeds "
            f"{sym_tol:g} * max |sigma| = {sym_tol * scale:.3g}."
        )
    sigma = (sigma + tl.transpose(sigma)) / 2
    diag = tl.to_numpy(tl.diag(sigma)).astype(np.float64)
    if float(diag.min()) < -psd_tol * max(float(diag.mean()), 0.0):
        raise ValueError("`sigma` has a negative diagonal entry: it is not positive semi-definite.")
    if check_psd and not _shifted_cholesky_succeeds(sigma, psd_tol * float(diag.mean())):
        raise ValueError(
            "`sigma` is not positive semi-definite: it has an eigenvalue below "
            f"-{psd_tol:g} * mean(diag(sigma)). A covariance or second-moment matrix of "
            "layer inputs is always PSD; check how it was computed."
        )
    return sigma


def _shifted_cholesky_succeeds(sigma, shift: float) -> bool:
    """Whether ``sigma + shift * I`` has a float64 Cholesky factor (i.e. is positive definite).

    PyTorch tensors are factored where they are by ``torch.linalg.cholesky_ex`` (no host copy
    of a GPU matrix); other backends on the host by LAPACK through SciPy. Either way the
    shift goes onto the diagonal of one float64 copy in place, and the factorization may
    overwrite that copy, instead of building ``sigma + shift * eye(n)`` and an ``eye(n)``.
    """
    n = tl.shape(sigma)[0]
    # Dispatch on the tensor, not on TensorLy's global backend: the PyTorch adapter calls this
    # with torch tensors whatever backend the user has set (the default is NumPy, which copied
    # the matrix to the host through a deprecated conversion).
    from ._backend_ops import framework_of

    if framework_of(sigma) == "pytorch":
        import torch

        work = sigma.to(torch.float64, copy=True)
        work.diagonal().add_(shift)
        _, info = torch.linalg.cholesky_ex(work)
        return int(info) == 0
    work = np.array(tl.to_numpy(sigma), dtype=np.float64, order="F", copy=True)
    work.flat[:: n + 1] += shift
    try:
        scipy.linalg.cholesky(work, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return False
    return True


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    return int(value)


def check_positive_int(value, name: str) -> int:
    """``value`` as an ``int`` >= 1 (NumPy integers too); bools and integral floats are refused,
    not converted (``True`` would silently mean 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def _fraction_as_float(rank):
    """NumPy floating scalars (``np.float32(0.5)``) as Python floats, the fraction they mean;
    anything else unchanged (``np.float64`` already is a ``float``)."""
    if isinstance(rank, np.floating):
        return float(rank)
    return rank


def check_init_form(init, decomposition: type, form: str, pair: str, factors: str) -> bool:
    """Refuse an ``init`` that is neither a method name nor a decomposition.

    Returns True for a decomposition (``decomposition`` or a ``pair`` whose second item is
    the list of ``factors``), False for a name. Before, a NumPy array failed with "truth
    value of an array is ambiguous" and a list of factors with "too many values to unpack".
    """
    name = decomposition.__name__
    if not isinstance(init, (str, decomposition, tuple, list)):
        raise TypeError(
            f"`init` must be 'svd', 'frobenius', 'random' or a {name} / {form}; got a {type(init).__name__}."
        )
    if isinstance(init, str):
        return False
    if len(init) != 2 or not isinstance(init[1], (tuple, list)):
        raise ValueError(
            f"`init` must be a {name} or a pair {pair} with `factors` a list of {factors}; got a "
            f"{type(init).__name__} of {len(init)} items."
        )
    return True


def validate_tucker2_rank(shape: Sequence[int], rank) -> tuple[int, int]:
    """Resolve a Tucker-2 rank into ``(R_out, R_in)``.

    ``rank`` may be an int (used for both modes, clipped to each mode's size as TensorLy
    does for ``partial_tucker``), a pair ``(R_out, R_in)``, or a float in ``(0, 1]``: the
    fraction of parameters to keep, resolved by TensorLy's ``validate_tucker_rank`` with the
    spatial modes fixed.
    """
    shape = tuple(int(d) for d in shape)
    n_out, n_in = shape[0], shape[1]
    rank = _fraction_as_float(rank)
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0) or not np.isfinite(rank):
            raise ValueError(f"A float `rank` is a fraction of parameters in (0, 1]; got {rank}.")
        from tensorly.tucker_tensor import validate_tucker_rank

        resolved = validate_tucker_rank(shape, rank=rank, fixed_modes=list(range(2, len(shape))))
        r_out, r_in = max(1, int(resolved[0])), max(1, int(resolved[1]))
        return min(r_out, n_out), min(r_in, n_in)
    if isinstance(rank, (tuple, list)):
        if len(rank) != 2:
            raise ValueError(f"A Tucker-2 `rank` must be an int, a float or a pair (R_out, R_in); got {rank!r}.")
        r_out, r_in = _check_int(rank[0], "rank[0]"), _check_int(rank[1], "rank[1]")
    else:
        r = _check_int(rank, "rank")
        if r < 1:
            raise ValueError(f"`rank` must be >= 1, got {r}.")
        r_out, r_in = min(r, n_out), min(r, n_in)
    if not (1 <= r_out <= n_out):
        raise ValueError(f"`rank`: R_out = {r_out} is out of range: it must be in [1, {n_out}] (output mode size).")
    if not (1 <= r_in <= n_in):
        raise ValueError(f"`rank`: R_in = {r_in} is out of range: it must be in [1, {n_in}] (input mode size).")
    return r_out, r_in


def validate_cp_rank(shape: Sequence[int], rank) -> int:
    """Resolve a CP rank: a positive int, or a float fraction of parameters in ``(0, 1]``."""
    shape = tuple(int(d) for d in shape)
    rank = _fraction_as_float(rank)
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0) or not np.isfinite(rank):
            raise ValueError(f"A float `rank` is a fraction of parameters in (0, 1]; got {rank}.")
        # Parameters of a rank-R CP model: R * sum(shape) (the weights are absorbed).
        return max(1, int(np.floor(rank * float(np.prod(shape)) / float(sum(shape)))))
    r = _check_int(rank, "rank")
    # Every tensor has CP rank at most the product of all mode sizes but the largest one:
    # beyond that bound extra components only add degenerate directions.
    max_rank = int(np.prod(shape)) // max(shape)
    if not (1 <= r <= max_rank):
        raise ValueError(
            f"CP `rank` must be in [1, {max_rank}] for a tensor of shape {shape} "
            f"(the product of all mode sizes but the largest); got {r}."
        )
    return r
