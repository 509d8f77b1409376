"""CUDA checks: run only where a GPU is present (never in CI, which has none)."""

import numpy as np
import pytest
import tensorly as tl
import torch

from tensorly_dataaware import parafac_sigma, relative_sigma_error, tucker2_sigma

from .conftest import correlated_sigma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_cuda_matches_cpu(method):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 10, 3, 3))
    sigma = correlated_sigma(rng, 90)
    results = {}
    with tl.backend_context("pytorch"):
        for device in ("cpu", "cuda"):
            for dtype in (torch.float64, torch.float32):
                Wt = torch.tensor(W, dtype=dtype, device=device)
                st = torch.tensor(sigma, dtype=dtype, device=device)
                if method == "tucker":
                    dec = tucker2_sigma(Wt, (5, 4), st, n_iter_max=15)
                    approx = tl.tucker_to_tensor(dec)
                else:
                    dec = parafac_sigma(Wt, 6, st, n_iter_max=15, init="random", random_state=0)
                    approx = tl.cp_to_tensor(dec)
                assert approx.device.type == device and approx.dtype == dtype
                results[(device, dtype)] = approx.double().cpu().numpy()
    ref = results[("cpu", torch.float64)]
    assert np.linalg.norm(results[("cuda", torch.float64)] - ref) / np.linalg.norm(ref) < 1e-6
    with tl.backend_context("numpy"):
        e64 = relative_sigma_error(W, ref, sigma)
        e32 = relative_sigma_error(W, results[("cuda", torch.float32)], sigma)
    assert abs(e32 - e64) < 1e-3 * e64 + 1e-4


def test_collect_and_compress_on_cuda():
    from tensorly_dataaware.data import load_embedded_subset, make_loader
    from tensorly_dataaware.models import load_pretrained
    from tensorly_dataaware.torch import collect_covariances, compress

    # The GPU forward pass uses TF32 convolutions by default (about 1e-3 relative error):
    # turn that off so the statistics can be compared with the CPU ones at 1e-4.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    data = load_embedded_subset()
    loader = make_loader(data["calib_images"][:256], data["calib_labels"][:256], batch_size=64)
    cpu_model = load_pretrained("resnet20")
    gpu_model = load_pretrained("resnet20").cuda()
    layers = ["layer2.1.conv1", "layer3.2.conv2", "fc"]
    s_cpu = collect_covariances(cpu_model, loader, layers=layers, progress=False)
    s_gpu = collect_covariances(gpu_model, loader, layers=layers, progress=False)
    for name in layers:
        assert s_gpu[name].sum_outer.device.type == "cuda"
        torch.testing.assert_close(s_gpu[name].sigma().cpu(), s_cpu[name].sigma(), rtol=1e-4, atol=1e-6)
    small_gpu = compress(gpu_model, s_gpu, "tucker2", ratio=0.3, layers=layers, progress=False, n_iter_max=10)
    small_cpu = compress(cpu_model, s_cpu, "tucker2", ratio=0.3, layers=layers, progress=False, n_iter_max=10)
    x = next(iter(loader))[0]
    with torch.no_grad():
        ref = cpu_model.eval()(x)
        dev_gpu = torch.linalg.norm(small_gpu.eval()(x.cuda()).cpu() - ref) / torch.linalg.norm(ref)
        dev_cpu = torch.linalg.norm(small_cpu.eval()(x) - ref) / torch.linalg.norm(ref)
    assert next(small_gpu.parameters()).device.type == "cuda"
    # The ALS is not unique to round-off, so compare what matters: how far each compressed
    # model's logits move from the original's.
    assert abs(float(dev_gpu) - float(dev_cpu)) < 0.1 * float(dev_cpu) + 1e-3


def _jax_gpus():
    """JAX's GPU devices, or ``[]`` when JAX or its CUDA plugin is missing."""
    try:
        import jax

        return jax.devices("gpu")
    except Exception:  # no jax, or a jax without a GPU backend (RuntimeError)
        return []


@pytest.mark.skipif(not _jax_gpus(), reason="needs JAX with a GPU device")
@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_jax_gpu_matches_numpy(method):
    """The solvers on JAX's GPU device: results stay on the GPU and equal the NumPy ones."""
    import jax

    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 10, 3, 3))
    sigma = correlated_sigma(rng, 90)
    gpu = _jax_gpus()[0]
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        def solve(W, sigma):
            if method == "tucker":
                return tl.tucker_to_tensor(tucker2_sigma(W, (5, 4), sigma, n_iter_max=15))
            return tl.cp_to_tensor(parafac_sigma(W, 6, sigma, n_iter_max=15, init="random", random_state=0))

        with tl.backend_context("numpy"):
            ref = solve(W, sigma)
        with tl.backend_context("jax"):
            approx = solve(jax.device_put(W, gpu), jax.device_put(sigma, gpu))
            assert approx.devices() == {gpu} and str(approx.dtype) == "float64"
        approx = np.asarray(approx)
    finally:
        jax.config.update("jax_enable_x64", x64)
    assert np.linalg.norm(approx - ref) / np.linalg.norm(ref) < 1e-6
