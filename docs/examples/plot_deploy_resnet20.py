"""
Deploying a compressed ResNet-20: faster inference and an ONNX file
===================================================================

Fewer weights do not make a network faster by themselves: a factorized layer is a chain of
small convolutions, each a pass over the activations. This example

1. compresses the shipped ResNet-20 to 10 % of its ``3 x 3`` convolution weights with
   sequential calibration (no fine-tuning);
2. lets :func:`~tensorly_dataaware.torch.optimize_for_inference` fold the BatchNorms into
   the convolutions and pick, by timing each layer on the deployment batch, the fastest
   equivalent form (chain, merged chain or dense kernel) and memory layout;
3. compares its latency with the original model as shipped and with the original given the
   same treatment (BatchNorm folding and layout), the fair baseline;
4. exports it to ONNX, checked against ONNX Runtime, when ``onnxruntime`` is installed.

Timings depend on the machine and its load: they are medians of interleaved runs in one
process, and the ratios, not the milliseconds, are what carries over.
"""

import os
import statistics
import tempfile

import matplotlib.pyplot as plt
import torch

from tensorly_dataaware.data import load_embedded_subset, make_loader
from tensorly_dataaware.models import load_pretrained
from tensorly_dataaware.torch import compress_sequential, format_deploy_report, optimize_for_inference
from tensorly_dataaware.torch.deploy import time_interleaved

# Deploy with the thread count you measure with.
torch.set_num_threads(1)
torch.manual_seed(0)

model = load_pretrained("resnet20")
data = load_embedded_subset()
calib = make_loader(data["calib_images"][:200], data["calib_labels"][:200], batch_size=100)
test = make_loader(data["eval_images"][:500], data["eval_labels"][:500], batch_size=250)
layers = [name for name, m in model.named_modules()
          if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)][1:]


@torch.no_grad()
def accuracy(net):
    correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in test)
    return correct / 500


small = compress_sequential(model, calib, "tucker2", ratio=0.1, layers=layers, progress=False,
                            n_iter_max=10, random_state=0)

# %%
# Optimize for a batch of 64 images on one thread. The report lists, per factorized layer,
# its parameters, multiply-adds, the form chosen and its latency before and after.
batch = torch.randn(64, 1, 28, 28)
fast, report = optimize_for_inference(small, batch, threads=1, repeats=5, return_report=True)
baseline = optimize_for_inference(model, batch, threads=1, repeats=5)  # fold + layout only
print(format_deploy_report(report))
print(f"BatchNorms folded: {len(report.folded_batchnorm)}")

# %%
# Whole-model latency, all four variants timed round-robin in one process.
times = time_interleaved({
    "original": lambda: model(batch),
    "original, optimized": lambda: baseline(batch),
    "compressed": lambda: small(batch),
    "compressed, optimized": lambda: fast(batch),
}, repeats=7)
medians = {key: statistics.median(t) for key, t in times.items()}
for key, ms in medians.items():
    print(f"{key:24s} {ms:8.2f} ms  x{medians['original'] / ms:.2f}")
print(f"accuracy: original {accuracy(model):.3f}, compressed and optimized {accuracy(fast):.3f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(medians), list(medians.values()), color=["grey", "tab:green", "tab:blue", "tab:orange"])
ax.set_xlabel("latency per batch of 64, ms (median, one thread)")
ax.invert_yaxis()
fig.tight_layout()

# %%
# Export to ONNX (``pip install "tensorly-dataaware[onnx]"``): the file is written
# atomically and ONNX Runtime's output is compared with PyTorch's.
try:
    import onnxruntime  # noqa: F401
except ImportError:
    print("onnxruntime is not installed: skipping the export")
else:
    from tensorly_dataaware.torch import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(fast, os.path.join(folder, "resnet20_small.onnx"), batch[:4])
        print(f"exported {os.path.getsize(path) / 1e3:.0f} kB, checked against ONNX Runtime")
