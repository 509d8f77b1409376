"""Solver speed: data-aware Tucker-2 / CP against TensorLy's Frobenius solvers and against
our implementation of the published reference approach, in the same process and backend.

For each layer shape (ResNet-18-like 3x3 convolutions by default) it builds a realistic
input covariance (patches of ReLU'd, spatially correlated random feature maps mixed across
channels: ill-conditioned and not Kronecker-separable), a Gaussian weight, and times

* ``partial_tucker`` (TensorLy, Frobenius) vs ``tucker2_sigma`` (ours) at the same ranks;
* ``parafac`` (TensorLy, Frobenius) vs ``parafac_sigma`` (ours) at the same rank;
* the reference Tucker-2-sigma ALS (unpreconditioned MINRES, dense 6-way einsum matvec,
  ``benchmarks/reference_tucker.py``) until it reaches our final error, or a time budget.

It prints one table row per run (wall time, sweeps, relative sigma-error, peak memory where
it can be measured) and the ratios, and writes everything to a JSON file.

Examples
--------
python benchmarks/speed.py --backend numpy --shapes 64x64x3x3 128x128x3x3
python benchmarks/speed.py --backend pytorch --device cuda --shapes 64x64x3x3 128x128x3x3 256x256x3x3 512x512x3x3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import tensorly as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Benchmark this checkout's package, not whichever copy is installed (an editable install
# may point to another worktree).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_tucker import reference_tucker2  # noqa: E402

from tensorly_dataaware import parafac_sigma, relative_sigma_error, tucker2_sigma  # noqa: E402


def image_like_covariance(S: int, kh: int, kw: int, *, n_images: int = 48, size: int = 12, seed: int = 0):
    """Second moment of ``kh x kw`` patches of synthetic feature maps, in unfold order.

    Latent fields with two correlation lengths (smooth and rough) are mixed into ``S``
    channels by two different matrices with power-law spectra and passed through a ReLU,
    so the covariance is ill-conditioned, channel-spatially coupled (not a Kronecker
    product) and has a non-zero mean, like a real post-ReLU activation.
    """
    rng = np.random.default_rng(seed)
    latent = max(8, S // 2)
    grid = np.arange(size)
    maps = np.zeros((n_images, S, size, size), dtype=np.float32)
    for length in (2.0, 0.6):
        kernel = np.exp(-((grid[:, None] - grid[None, :]) ** 2) / (2 * length**2))
        chol = np.linalg.cholesky(kernel + 1e-6 * np.eye(size))
        z = rng.standard_normal((n_images, latent, size, size)).astype(np.float32)
        fields = np.einsum("ij,nljk,mk->nlim", chol, z, chol, optimize=True)
        spectrum = (1.0 + np.arange(latent)) ** -2.0
        mix = np.linalg.qr(rng.standard_normal((S, latent)))[0] * spectrum[None, :]
        maps += np.einsum("sl,nlij->nsij", mix, fields, optimize=True).astype(np.float32)
    maps = np.maximum(maps + 0.2 * maps.std(), 0.0)
    padded = np.pad(maps, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    win = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))  # n,S,H,W,kh,kw
    patches = np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, S * kh * kw)
    sigma = np.zeros((S * kh * kw,) * 2)
    for chunk in np.array_split(patches, max(1, len(patches) // 4096)):
        c = chunk.astype(np.float64)
        sigma += c.T @ c
    return sigma / len(patches)


def _sync(out=None):
    """Wait for the device: CUDA streams on PyTorch, ``out``'s arrays on JAX (asynchronous dispatch)."""
    if tl.get_backend() == "pytorch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif tl.get_backend() == "jax" and out is not None:
        import jax

        # CPTensor / TuckerTensor are sequences of arrays (and lists of arrays), not pytrees.
        stack = [out]
        while stack:
            item = stack.pop()
            if isinstance(item, (tuple, list)) or hasattr(item, "factors"):
                stack.extend(list(item))
            elif hasattr(item, "block_until_ready"):
                jax.block_until_ready(item)


MEASURE_HOST_MEMORY = False


def timed(fn, *, device: str):
    """Run ``fn()``; return (result, seconds, peak MiB or None).

    CUDA peak memory comes from the caching allocator's counters at no cost. NumPy peak
    memory needs ``tracemalloc``, which slows NumPy-heavy Python code several-fold, so it
    is measured in a second, untimed run only with ``--memory``.
    """
    peak = None
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync(out)
    seconds = time.perf_counter() - start
    if device == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**20
    elif tl.get_backend() == "numpy" and MEASURE_HOST_MEMORY:
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, seconds, peak


def run_shape(shape, args, dtype_name):
    T, S, kh, kw = shape
    rng = np.random.default_rng(1)
    sigma_np = image_like_covariance(S, kh, kw)
    W_np = rng.standard_normal(shape) / np.sqrt(S * kh * kw)
    ctx = {"dtype": getattr(tl.backend, dtype_name)}
    if tl.get_backend() == "pytorch":
        ctx["device"] = args.device
    W = tl.tensor(W_np, **ctx)
    sigma = tl.tensor(sigma_np, **ctx)
    r_tucker = (max(1, T // args.tucker_div), max(1, S // args.tucker_div))
    r_cp = max(1, int(args.cp_keep * np.prod(shape) / sum(shape)))
    rows = []

    def err(approx):
        # Evaluate every result with the same float64 numpy code (to_numpy of the current
        # backend first: it knows how to bring a CUDA tensor to the host).
        host = np.asarray(tl.to_numpy(approx), dtype=np.float64)
        with tl.backend_context("numpy"):
            return relative_sigma_error(W_np, host, sigma_np)

    def row(name, seconds, sweeps, approx, peak, extra=None, error=None):
        rec = {
            "shape": "x".join(map(str, shape)),
            "dtype": dtype_name,
            "method": name,
            "seconds": seconds,
            "sweeps": sweeps,
            "sigma_error": err(approx) if error is None else error,
            "peak_mib": peak,
        }
        rec.update(extra or {})
        rows.append(rec)
        peak_s = f"{peak:9.1f}" if peak is not None else "      n/a"
        print(
            f"{rec['shape']:>14} {dtype_name:>7} {name:<22} {seconds:9.3f} s {sweeps:5d} sweeps "
            f"sigma-err {rec['sigma_error']:.6f} peak {peak_s} MiB",
            flush=True,
        )
        return rec

    from tensorly.decomposition import parafac, partial_tucker

    # Warm-up (JIT compilation, CUDA context, BLAS threads) outside the timings.
    tucker2_sigma(W, r_tucker, sigma, n_iter_max=2, threads=args.solver_threads)
    partial_tucker(W, rank=list(r_tucker), modes=[0, 1], n_iter_max=2)

    def pair(base_fn, ours_fn):
        """Time baseline and ours ``args.repeats`` times, interleaved (the order alternates so
        that neither always runs on a warmer cache or a quieter moment); medians decide."""
        base_runs, ours_runs = [], []
        for i in range(args.repeats):
            for fn, runs in ((base_fn, base_runs), (ours_fn, ours_runs))[:: 1 if i % 2 == 0 else -1]:
                runs.append(timed(fn, device=args.device))
        spread = {}
        for key, runs in (("base", base_runs), ("ours", ours_runs)):
            secs = sorted(r[1] for r in runs)
            spread[key] = {"seconds_all": secs, "seconds_min": secs[0], "seconds_max": secs[-1]}
        median = lambda runs: float(np.median([r[1] for r in runs]))  # noqa: E731
        # Every repeat computes the same result (deterministic); report the last one.
        return (base_runs[-1][0], median(base_runs), base_runs[-1][2], spread["base"]), (
            ours_runs[-1][0], median(ours_runs), ours_runs[-1][2], spread["ours"])

    def spread_text(rec):
        return f"median of {len(rec['seconds_all'])}, min {rec['seconds_min']:.3f} max {rec['seconds_max']:.3f}"

    if "tucker" in args.methods:
        (res_b, secs_b, peak_b, spread_b), (res, secs, peak, spread_o) = pair(
            lambda: partial_tucker(W, rank=list(r_tucker), modes=[0, 1], tol=args.tol, n_iter_max=args.n_iter_max),
            lambda: tucker2_sigma(
                W, r_tucker, sigma, tol=args.tol, n_iter_max=args.n_iter_max, return_errors=True, threads=args.solver_threads
            ),
        )
        (core, factors), tl_err = res_b
        base = row("tensorly partial_tucker", secs_b, len(tl_err), tl.tucker_to_tensor((core, factors)), peak_b, spread_b)
        tucker, errors = res
        ours = row("tucker2_sigma", secs, len(errors), tl.tucker_to_tensor(tucker), peak, {"ranks": r_tucker, **spread_o})
        ours["ratio_vs_tensorly"] = ours["seconds"] / base["seconds"]
        if args.reference and dtype_name in args.reference_dtypes:
            (res, secs, peak) = timed(
                lambda: reference_tucker2(
                    W, r_tucker, sigma, n_iter_max=args.n_iter_max, tol=args.tol,
                    target_error=errors[-1], time_budget=args.reference_budget,
                ),
                device=args.device,
            )
            # The reference reports its own error trace (same formula, float64 in its dtype).
            rec = row(
                "reference MINRES",
                secs,
                len(res["errors"]),
                None,
                peak,
                {"reason": res["reason"], "matvecs_per_sweep": res["matvecs"]},
                error=res["errors"][-1],
            )
            reached = res["errors"][-1] <= errors[-1] * (1 + 1e-9)
            rec["reached_our_error"] = bool(reached)
            ours["speedup_vs_reference"] = rec["seconds"] / ours["seconds"]
            print(
                f"{'':>14} {'':>7} reference stopped: {res['reason']}, final sigma-error {res['errors'][-1]:.6f}, "
                f"MINRES matvecs per sweep {res['matvecs'][:5]}..., speed-up of ours "
                f"{'>=' if not reached else ''}{ours['speedup_vs_reference']:.1f}x",
                flush=True,
            )
        print(
            f"{'':>14} {'':>7} tucker2_sigma / partial_tucker time ratio: {ours['ratio_vs_tensorly']:.2f} "
            f"(ours {spread_text(ours)}; partial_tucker {spread_text(base)})",
            flush=True,
        )

    if "cp" in args.methods:
        (res_b, secs_b, peak_b, spread_b), (res, secs, peak, spread_o) = pair(
            lambda: parafac(W, r_cp, tol=args.tol, n_iter_max=args.n_iter_max, return_errors=True),
            lambda: parafac_sigma(
                W, r_cp, sigma, tol=args.tol, n_iter_max=args.n_iter_max, return_errors=True, threads=args.solver_threads
            ),
        )
        cp, tl_err = res_b
        base = row("tensorly parafac", secs_b, len(tl_err), tl.cp_to_tensor(cp), peak_b, spread_b)
        cp, errors = res
        ours = row("parafac_sigma", secs, len(errors), tl.cp_to_tensor(cp), peak, {"rank": r_cp, **spread_o})
        ours["ratio_vs_tensorly"] = ours["seconds"] / base["seconds"]
        print(
            f"{'':>14} {'':>7} parafac_sigma / parafac time ratio: {ours['ratio_vs_tensorly']:.2f} "
            f"(ours {spread_text(ours)}; parafac {spread_text(base)})",
            flush=True,
        )
    return rows


def _process_threads():
    """Thread pools the baselines run with (what OMP_NUM_THREADS & co. gave the process)."""
    from threadpoolctl import threadpool_info

    pools = {f"{lib['internal_api']}:{lib['prefix']}": lib["num_threads"] for lib in threadpool_info()}
    if tl.get_backend() == "pytorch":
        import torch

        pools["torch"] = torch.get_num_threads()
    return pools


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "pytorch", "jax"])
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (pytorch backend only)")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--shapes", nargs="+", default=["64x64x3x3", "128x128x3x3", "256x256x3x3"])
    parser.add_argument("--methods", nargs="+", default=["tucker", "cp"], choices=["tucker", "cp"])
    parser.add_argument("--tucker-div", type=int, default=2, help="Tucker ranks = (T, S) // this (default 2)")
    parser.add_argument("--cp-keep", type=float, default=0.25, help="CP rank keeps this fraction of parameters")
    parser.add_argument("--tol", type=float, default=1e-6, help="same stopping tolerance for every solver")
    parser.add_argument("--n-iter-max", type=int, default=100)
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="timed runs of each solver, baseline and ours interleaved; medians are reported (default 3)",
    )
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--reference-dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--reference-budget", type=float, default=300.0, help="seconds before the reference is cut")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--memory", action="store_true", help="also measure NumPy peak memory (extra untimed run)")
    parser.add_argument(
        "--solver-threads", type=int, default=None,
        help="threads= for our solvers (default: their policy, 1 thread on NumPy/JAX, the process's settings on PyTorch; 0: the process's settings). "
        "TensorLy's solvers always run with the process's settings (OMP_NUM_THREADS etc.).",
    )
    args = parser.parse_args(argv)
    global MEASURE_HOST_MEMORY
    MEASURE_HOST_MEMORY = args.memory

    if args.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    tl.set_backend(args.backend)
    info = {
        "command": " ".join(["python", "benchmarks/speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "backend": args.backend,
        "device": args.device,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "tensorly": tl.__version__,
        "numpy": np.__version__,
        "solver_threads": args.solver_threads,
        "process_threads": _process_threads(),
    }
    if args.backend == "jax":
        import jax

        # JAX puts the arrays on its default device: a GPU where its CUDA plugin finds one.
        info["jax"] = jax.__version__
        info["jax_default_device"] = str(jax.devices()[0])
    if args.backend == "pytorch":
        import torch

        info["torch"] = torch.__version__
        if args.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(info), flush=True)
    rows = []
    for shape_s in args.shapes:
        shape = tuple(int(x) for x in shape_s.split("x"))
        for dtype_name in args.dtypes:
            rows.extend(run_shape(shape, args, dtype_name))
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str))
        tmp.replace(out)
    return rows


if __name__ == "__main__":
    main()
