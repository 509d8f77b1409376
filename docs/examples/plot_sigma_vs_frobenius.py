"""
Sigma-weighted Tucker-2 and CP on NumPy (and JAX)
=================================================

The data-aware decompositions are general tensor routines: they take any tensor of shape
``(T, S, ...)`` and a symmetric positive semi-definite weight ``sigma`` on the flattened
input modes, and minimize :math:`\\|(W - \\tilde W)\\Sigma^{1/2}\\|_F`.

Here we build a convolution-like weight and a realistic, strongly correlated input
covariance, and compare

* :func:`tensorly_dataaware.tucker2_sigma` with TensorLy's ``partial_tucker``;
* :func:`tensorly_dataaware.parafac_sigma` with TensorLy's ``parafac``;

both measured in the sigma-norm, iteration by iteration.
"""

import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import tensorly as tl
from scipy.ndimage import gaussian_filter
from tensorly.decomposition import parafac, partial_tucker
from threadpoolctl import threadpool_limits

from tensorly_dataaware import parafac_sigma, relative_sigma_error, tucker2_sigma

tl.set_backend("numpy")
# One BLAS thread: small matrices, for which extra threads mostly wait on a busy machine.
threadpool_limits(1)
rng = np.random.default_rng(0)

# %%
# A correlated input covariance
# -----------------------------
# Input feature maps that look like real activations: spatially smooth, mixed across
# channels with a decaying spectrum, rectified. The covariance of their ``3 x 3`` patches
# (in ``unfold`` order: channel, kernel row, kernel column) is ill-conditioned and couples
# channels and positions, unlike the identity that the Frobenius norm implicitly assumes.

T, S, k = 32, 16, 3
n = S * k * k
maps = gaussian_filter(rng.standard_normal((64, S, 20, 20)), sigma=(0, 0, 1.5, 1.5))
mixing = rng.standard_normal((S, S)) * (0.7 ** np.arange(S))[None, :]
maps = np.maximum(np.einsum("cs,bshw->bchw", mixing, maps), 0)
patches = np.lib.stride_tricks.sliding_window_view(maps, (k, k), axis=(2, 3))
patches = patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, n)  # (positions, S * k * k)
sigma = np.cov(patches, rowvar=False, bias=True)
eigvals = np.linalg.eigvalsh(sigma)
print(f"sigma: {n} x {n}, condition number {eigvals[-1] / max(eigvals[0], 1e-300):.1e}")

W = rng.standard_normal((T, S, k, k))

# %%
# Tucker-2
# --------
# ``return_errors=True`` gives the relative sigma-error after every sweep; it never
# increases because every block update is an exact minimizer.
# The Frobenius baseline is TensorLy's ``partial_tucker`` on the two channel modes, whose
# result we measure in the same sigma-norm.

ranks = (12, 6)
start = time.perf_counter()
tucker, tucker_errors = tucker2_sigma(W, ranks, sigma, n_iter_max=30, tol=1e-10, return_errors=True)
print(f"tucker2_sigma: {len(tucker_errors)} sweeps in {time.perf_counter() - start:.2f} s")

(core, factors), _ = partial_tucker(W, rank=list(ranks), modes=[0, 1], init="svd", tol=1e-10)
frob_tucker = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
frob_tucker_error = relative_sigma_error(W, frob_tucker, sigma)
print(f"sigma-error: Frobenius Tucker-2 {frob_tucker_error:.4f}, sigma Tucker-2 {tucker_errors[-1]:.4f}")

# %%
# CP
# --
# For TensorLy's ``parafac`` we record the sigma-error of every iterate with its
# ``callback``, so that both curves are per iteration.

rank = 16
start = time.perf_counter()
cp, cp_errors = parafac_sigma(W, rank, sigma, n_iter_max=20, tol=1e-10, random_state=0, return_errors=True)
print(f"parafac_sigma: {len(cp_errors)} sweeps in {time.perf_counter() - start:.2f} s")

frob_cp_errors = []
with warnings.catch_warnings():  # TensorLy notes that the SVD init is padded when rank > S
    warnings.simplefilter("ignore", UserWarning)
    parafac(
        W,
        rank,
        n_iter_max=20,
        tol=1e-10,
        init="svd",
        random_state=0,
        callback=lambda cp_tensor, _err: frob_cp_errors.append(relative_sigma_error(W, cp_tensor, sigma)),
    )
print(f"sigma-error: Frobenius CP {frob_cp_errors[-1]:.4f}, sigma CP {cp_errors[-1]:.4f}")

# %%
# Error per iteration
# -------------------

fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=False)
axes[0].plot(np.arange(1, len(tucker_errors) + 1), tucker_errors, "o-", ms=3, label="tucker2_sigma")
axes[0].axhline(frob_tucker_error, color="C1", ls="--", label="partial_tucker (Frobenius)")
axes[0].set_title(f"Tucker-2, ranks {ranks}")
axes[1].plot(np.arange(1, len(cp_errors) + 1), cp_errors, "o-", ms=3, label="parafac_sigma")
axes[1].plot(np.arange(1, len(frob_cp_errors) + 1), frob_cp_errors, "s-", ms=3, color="C1", label="parafac (Frobenius)")
axes[1].set_title(f"CP, rank {rank}")
for ax in axes:
    ax.set_xlabel("ALS sweep")
    ax.set_ylabel("relative sigma-error")
    ax.legend()
fig.tight_layout()

# %%
# The same call on JAX
# --------------------
# Nothing in the solvers is NumPy-specific: with TensorLy's ``jax`` backend (64-bit
# enabled) the same decomposition gives the same error.

try:
    import jax
except ImportError:  # JAX is optional
    jax = None

if jax is not None:
    jax.config.update("jax_enable_x64", True)
    tl.set_backend("jax")
    start = time.perf_counter()
    tucker_jax, errors_jax = tucker2_sigma(
        tl.tensor(W), ranks, tl.tensor(sigma), n_iter_max=30, tol=1e-10, return_errors=True
    )
    print(f"jax: {len(errors_jax)} sweeps in {time.perf_counter() - start:.2f} s (op-by-op, no jit)")
    tl.set_backend("numpy")
    print(f"final sigma-error, numpy {tucker_errors[-1]:.12f}  jax {errors_jax[-1]:.12f}")
else:
    print("JAX is not installed: skipped.")

tl.set_backend("numpy")
