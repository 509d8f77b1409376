"""
Compressing a ResNet-20 without fine-tuning
===========================================

The package ships a small ResNet-20 trained on Fashion-MNIST and a subset of the data, so
this example needs no download. We

1. collect the covariance of the input patches of every ``3 x 3`` convolution (except
   the first one, whose single input channel leaves little to compress) on a few hundred
   calibration images;
2. replace those layers by Tucker-2 factorized convolutions keeping 30 % of their weights,
   once with the data-aware (sigma) decomposition and once with the classical Frobenius
   one (TensorLy's ``partial_tucker``);
3. compare the test accuracies, with no fine-tuning.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from tensorly_dataaware.data import load_embedded_subset, make_loader
from tensorly_dataaware.models import load_pretrained
from tensorly_dataaware.torch import collect_covariances, compress, format_report

# Small layers: one thread is fastest, especially on a busy machine (also for the BLAS behind NumPy).
torch.set_num_threads(1)
threadpool_limits(1)
torch.manual_seed(0)

model = load_pretrained("resnet20")
data = load_embedded_subset()
calib = make_loader(data["calib_images"][:300], data["calib_labels"][:300], batch_size=100)
test = make_loader(data["eval_images"][:500], data["eval_labels"][:500], batch_size=250)


def accuracy(net):
    correct = 0
    with torch.no_grad():
        for x, y in test:
            correct += int((net(x).argmax(1) == y).sum())
    return correct / len(test.dataset)


# %%
# Input statistics
# ----------------
# One pass over the calibration images with forward pre-hooks. Each layer keeps float64
# sums of its patch vectors and their outer products. ``max_positions_per_image`` samples
# output positions uniformly (an unbiased estimate), which keeps this fast.

layers = [
    name
    for name, module in model.named_modules()
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1) and name != "conv1"
]
start = time.perf_counter()
stats = collect_covariances(model, calib, layers=layers, max_positions_per_image=64, progress=False)
print(f"{len(stats)} layers, {time.perf_counter() - start:.1f} s")
print(stats["layer3.0.conv2"])

# %%
# Both decompositions at the same ranks
# -------------------------------------
# ``ratio=0.3`` gives every layer the same Tucker-2 ranks in both runs. With the default
# ``centered=True`` the sigma run also corrects each bias by :math:`(W - \tilde W)\mu`.
# Solver options such as ``n_iter_max`` go to :func:`tensorly_dataaware.tucker2_sigma`;
# ``check_psd=False`` skips the positive semi-definiteness check, which covariances
# computed by ``collect_covariances`` pass by construction.

ratio = 0.3
results = {}
for norm in ("frobenius", "sigma"):
    start = time.perf_counter()
    options = {"n_iter_max": 10, "check_psd": False} if norm == "sigma" else {}
    small, report = compress(
        model, stats, method="tucker2", ratio=ratio, norm=norm, return_report=True, progress=False, **options
    )
    results[norm] = (accuracy(small), report)
    print(f"{norm:>9}: {time.perf_counter() - start:.1f} s, accuracy {results[norm][0]:.3f}")

print(format_report(results["sigma"][1][:4]))

# %%
# Accuracy and per-layer error
# ----------------------------

base = accuracy(model)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 2.2]})
labels = ["original", "Frobenius", "sigma"]
values = [base, results["frobenius"][0], results["sigma"][0]]
bars = ax0.bar(labels, values, color=["0.6", "C1", "C0"])
ax0.bar_label(bars, fmt="%.3f")
ax0.set_ylim(0, 1)
ax0.set_ylabel(f"test accuracy ({len(test.dataset)} images)")
ax0.set_title(f"Tucker-2, {ratio:.0%} of the conv weights")

x = np.arange(len(layers))
for offset, norm, color in ((-0.2, "frobenius", "C1"), (0.2, "sigma", "C0")):
    errors = [r.sigma_error for r in results[norm][1]]
    ax1.bar(x + offset, errors, width=0.4, color=color, label=norm)
ax1.set_xticks(x, [name.replace("layer", "L") for name in layers], rotation=70, fontsize=7)
ax1.set_ylabel("relative sigma-error")
ax1.legend()
fig.tight_layout()
