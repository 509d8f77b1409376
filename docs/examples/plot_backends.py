"""
One decomposition, three TensorLy backends
==========================================

The solvers are written once with TensorLy operations, so the backend is chosen the
TensorLy way, with ``tl.set_backend``. ``sigma`` follows the tensor (it is cast
to the tensor's backend, dtype and device), so the same call runs on NumPy, PyTorch (CPU
or GPU) and JAX. Here we time the same Tucker-2 decomposition on each backend available
and check that the errors agree.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import tensorly as tl
from threadpoolctl import threadpool_limits

from tensorly_dataaware import tucker2_sigma

# One thread for NumPy's BLAS (and torch below): the matrices are small, and on a busy machine
# extra threads wait for each other (issue 9: 21 s instead of 0.6 s on a busy 2-core machine).
threadpool_limits(1)

rng = np.random.default_rng(0)

# %%
# A ``64 x 64 x 3 x 3`` weight and a correlated covariance of size ``576 x 576``. The ranks
# give ``64 * 32 = 2048`` unknowns in the input-factor system, so the solver uses
# Kronecker-preconditioned conjugate gradients (``solver='auto'``).

T, S, k = 64, 64, 3
n = S * k * k
W = rng.standard_normal((T, S, k, k))
basis = rng.standard_normal((n, n)) * (0.99 ** np.arange(n))[None, :]
sigma = basis @ basis.T / n + 1e-6 * np.eye(n)
ranks = (32, 32)
options = dict(n_iter_max=10, tol=1e-12, return_errors=True)

backends = ["numpy"]
try:
    import torch

    torch.set_num_threads(1)  # the same single thread as NumPy's BLAS (threadpool_limits above)
    backends.append("pytorch")
except ImportError:
    pass
try:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64, like the other two
    backends.append("jax")
except ImportError:
    pass

# %%
# The same call on every backend. The first call on a backend pays some one-off costs
# (JAX dispatches and compiles each operation the first time it sees a shape), so each
# backend runs twice and the second run is timed.

results = {}
for backend in backends:
    tl.set_backend(backend)
    tensor, weight = tl.tensor(W), tl.tensor(sigma)
    tucker2_sigma(tensor, ranks, weight, **{**options, "n_iter_max": 2})  # warm-up
    start = time.perf_counter()
    tucker, errors = tucker2_sigma(tensor, ranks, weight, **options)
    seconds = time.perf_counter() - start
    results[backend] = (seconds, errors)
    print(f"{backend:>8}: {seconds:6.2f} s, {len(errors)} sweeps, final relative sigma-error {errors[-1]:.12f}")
tl.set_backend("numpy")

reference = np.array(results["numpy"][1])
for backend, (_, errors) in results.items():
    gap = np.max(np.abs(np.array(errors) - reference))
    print(f"{backend:>8}: largest difference to numpy over all sweeps {gap:.1e}")

# %%
# The errors coincide to round-off; only the time differs. On a GPU, move the tensor
# there (``tl.tensor(W, device="cuda")`` with the PyTorch backend) and ``sigma`` follows.

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
names = list(results)
ax0.bar(names, [results[b][0] for b in names], color=[f"C{i}" for i in range(len(names))])
ax0.set_ylabel(f"seconds for {options['n_iter_max']} sweeps")
ax0.set_title("wall time (CPU)")
for i, b in enumerate(names):
    ax1.plot(np.arange(1, len(results[b][1]) + 1), results[b][1], "o-", ms=4 + 2 * (len(names) - i), label=b, alpha=0.7)
ax1.set_xlabel("ALS sweep")
ax1.set_ylabel("relative sigma-error")
ax1.legend()
fig.tight_layout()
