"""Thread policy of the solvers: how many BLAS / PyTorch threads the ALS runs on.

The ALS makes many small dense operations (``R x R`` to ``S R x S R`` factorizations, thin
GEMMs). Whether a second thread pays for its synchronization depends on the library that
runs them. Measured on the idle 2-core development machine (``benchmarks/threads_bench.py``,
10 sweeps with ``tol=0``, 64 and 128 channels, Tucker-2 and CP;
``benchmarks/results/threads_cpu_1v2_s15.txt``):

* NumPy (SciPy's OpenBLAS): 2 threads took 2.2x to 3.6x the time of 1;
* PyTorch (float32 and float64): 2 threads took 0.64x to 0.77x the time of 1.

So by default the NumPy (and JAX) backends run single-threaded, whatever the process's
settings, and restore those settings when they return, while the PyTorch backend leaves
PyTorch's threads as they are (``DEFAULT_THREADS_BY_BACKEND``). On a busy machine every
multi-threaded kernel can wait a whole scheduler slice (an earlier measurement under a load
average of 6 had 2 threads 7-17x slower than 1 on both backends): pass ``threads=1`` there.

Override, from the most to the least specific:

* the ``threads`` argument of :func:`~tensorly_dataaware.tucker2_sigma` /
  :func:`~tensorly_dataaware.parafac_sigma` (and their classes);
* the :func:`solver_threads` context manager around the calls (its value becomes the
  default of every call inside it);
* the ``TENSORLY_DATAAWARE_THREADS`` environment variable.

``0`` means "leave the thread settings alone" (use what the process has, e.g. for very
large layers on a many-core machine, or a GPU run where host threads do not matter).
JAX's CPU thread pool is fixed when JAX starts and is not affected.

The thread counts of BLAS and OpenMP are process-wide: solver calls running at the same
time in several Python threads change them under each other (the last to return restores
what it found, which can be another call's temporary value), and threadpoolctl ignores the
limits set by a thread other than the one that first set them. Run concurrent solver calls
in processes, or with ``threads=0`` and your own settings, to keep them apart. (TensorLy's
backend is process-wide too: the PyTorch adapter switches it to ``'pytorch'`` for its
decompositions, so a NumPy call running meanwhile in another thread can meet that backend.)
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from contextvars import ContextVar

import tensorly as tl

__all__ = ["solver_threads", "DEFAULT_THREADS", "DEFAULT_THREADS_BY_BACKEND", "ENV_VAR"]

#: Threads used when nothing else is said, for backends not in :data:`DEFAULT_THREADS_BY_BACKEND`
#: (see the module docstring for the measurements).
DEFAULT_THREADS = 1
#: Backend-specific defaults: PyTorch's own threading was measured faster than one thread.
DEFAULT_THREADS_BY_BACKEND = {"pytorch": 0}
#: Environment variable overriding :data:`DEFAULT_THREADS`.
ENV_VAR = "TENSORLY_DATAAWARE_THREADS"

_scoped: ContextVar[int | None] = ContextVar("tensorly_dataaware_solver_threads", default=None)
_controller = None


#: Largest thread count accepted: beyond it torch failed with "Overflow when unpacking long"
#: and OpenBLAS silently wrapped the value around (2**32 + 1 ran on one thread).
MAX_THREADS = 4096


def _check(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0 (0: leave the thread settings alone), got {value!r}.")
    if value > MAX_THREADS:
        raise ValueError(f"`{name}` must be at most {MAX_THREADS}, got {value!r}.")
    return int(value)


def resolve_threads(threads=None) -> int:
    """The thread count a call with ``threads`` runs on (0: untouched)."""
    if threads is not None:
        return _check(threads, "threads")
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{ENV_VAR}={env!r}: expected an int >= 0.") from None
        return _check(value, ENV_VAR)
    return DEFAULT_THREADS_BY_BACKEND.get(tl.get_backend(), DEFAULT_THREADS)


def _blas_controller():
    # Building a ThreadpoolController scans the loaded libraries (~30 ms); limiting through a
    # cached one costs ~0.1 ms, which matters for the many small decompositions of a network.
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def _limit(n: int):
    torch = sys.modules.get("torch")  # only if the caller uses torch: never import it here
    previous_torch = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None and previous_torch != n:
            torch.set_num_threads(n)
        with _blas_controller().limit(limits=n, user_api="blas"):
            yield
    finally:
        if torch is not None and torch.get_num_threads() != previous_torch:
            torch.set_num_threads(previous_torch)


@contextlib.contextmanager
def solver_threads(threads=None):
    """Run the enclosed solver calls on ``threads`` BLAS and PyTorch threads.

    Used by the solvers themselves, and by users as a context manager to change the default
    of every call inside it::

        with solver_threads(4):
            tucker2_sigma(W, rank, sigma)

    Parameters
    ----------
    threads : int or None
        ``>= 1``: that many threads; ``0``: leave the process's settings alone; ``None``: the
        enclosing :func:`solver_threads`, else ``$TENSORLY_DATAAWARE_THREADS``, else the
        active backend's default (:data:`DEFAULT_THREADS_BY_BACKEND`, else
        :data:`DEFAULT_THREADS`).

    Yields
    ------
    int
        The resolved thread count (0 when untouched). Previous settings are restored on exit,
        also when the body raises.
    """
    n = resolve_threads(threads)
    token = _scoped.set(n)
    try:
        if n == 0:
            yield 0
        else:
            with _limit(n):
                yield n
    finally:
        _scoped.reset(token)
