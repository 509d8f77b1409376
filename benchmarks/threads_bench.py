"""Solver time with 1 vs 2 BLAS/PyTorch threads (the ``threads=`` argument), interleaved.

Fixed number of sweeps (``tol=0``) so that both settings do the same work; NumPy float64
and PyTorch CPU float32 and float64; Tucker-2 at ranks (C/2, C/2) and CP at 25% of the parameters.

Usage: python benchmarks/threads_bench.py CHANNELS SWEEPS REPS OUT.json
e.g.   python benchmarks/threads_bench.py 64,128,256 5 3 benchmarks/results/threads.json
"""
import argparse, sys, time, json
import numpy as np, tensorly as tl
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package
from speed import image_like_covariance
from tensorly_dataaware import tucker2_sigma, parafac_sigma
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="e.g. python benchmarks/threads_bench.py 64,128,256 5 3 benchmarks/results/threads.json")
parser.add_argument("channels", help="comma-separated channel counts C (layers C x C x 3 x 3)")
parser.add_argument("sweeps", type=int, help="ALS sweeps per run (tol=0)")
parser.add_argument("reps", type=int, help="interleaved repeats")
parser.add_argument("out", help="JSON output path")
args = parser.parse_args()
shapes = [int(c) for c in args.channels.split(",")]
sweeps, reps = args.sweeps, args.reps
res = []
for C in shapes:
    sigma = image_like_covariance(C, 3, 3)
    W = np.random.default_rng(1).standard_normal((C, C, 3, 3)) / np.sqrt(9 * C)
    for backend, dtype in [("numpy", "float64"), ("pytorch", "float32"), ("pytorch", "float64")]:
        with tl.backend_context(backend):
            Wt, st = tl.tensor(W, dtype=getattr(tl.backend, dtype)), tl.tensor(sigma, dtype=getattr(tl.backend, dtype))
            for method in ("tucker", "cp"):
                fn = (lambda th: tucker2_sigma(Wt, (C // 2, C // 2), st, tol=0.0, n_iter_max=sweeps, threads=th)) if method == "tucker" \
                    else (lambda th: parafac_sigma(Wt, max(1, int(0.25 * W.size / sum(W.shape))), st, tol=0.0, n_iter_max=sweeps, threads=th))
                fn(1)
                times = {1: [], 2: []}
                for _ in range(reps):
                    for th in (1, 2):
                        t = time.perf_counter(); fn(th); times[th].append(time.perf_counter() - t)
                m1, m2 = np.median(times[1]), np.median(times[2])
                print(f"C={C} {backend} {dtype} {method}: 1 thread {m1:.3f}s [{min(times[1]):.3f}-{max(times[1]):.3f}], 2 threads {m2:.3f}s [{min(times[2]):.3f}-{max(times[2]):.3f}], 2/1 = {m2/m1:.2f}", flush=True)
                res.append(dict(C=C, backend=backend, dtype=dtype, method=method, t1=times[1], t2=times[2]))
json.dump(res, open(args.out, "w"))
