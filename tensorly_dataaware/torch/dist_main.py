"""``torchrun``-launchable compression: sharded statistics, parallel decompositions.

Examples (see :mod:`tensorly_dataaware.torch.distributed` for multi-node runs)::

    torchrun --standalone --nproc_per_node=8 -m tensorly_dataaware.torch.dist_main \\
        --model-file net.pt --data calib.npz --method tucker2 --ratio 0.3 --output small.pt
    torchrun --standalone --nproc_per_node=2 -m tensorly_dataaware.torch.dist_main \\
        --embedded --ratio 0.3 --output resnet20_small.pt
    python -m tensorly_dataaware.torch.dist_main --embedded --ratio 0.3   # one process

Each rank: joins the process group (NCCL when CUDA is available, else gloo; ``env://``
variables from torchrun), uses GPU ``LOCAL_RANK``, collects the statistics of every
``world_size``-th calibration batch, all-reduces them, decomposes its share of the layers,
gathers the others'; rank 0 prints the report and writes ``--output`` atomically, only if
every rank succeeded. The exit code is 0 on success, 1 if any rank failed (every rank
prints the same error naming the failing rank), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "run_distributed", "build_parser", "default_layers"]


def _eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def default_layers(model, include_first: bool = False) -> list[str]:
    """Every ``k x k`` (not ``1 x 1``) ``nn.Conv2d`` with ``groups == 1`` except the first conv.

    The same default as ``tensorly-dataaware compress``.
    """
    from torch import nn

    convs = [
        name for name, m in model.named_modules()
        if type(m) is nn.Conv2d and tuple(m.kernel_size) != (1, 1) and m.groups == 1
    ]
    if convs and not include_first:
        first = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
        convs = [name for name in convs if name != first]
    return convs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _init(backend: str, timeout_s: float):
    """Join (or, without torchrun, create a world of one) and pick this rank's device."""
    import datetime

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise SystemExit("--backend nccl needs CUDA, which is not available; use gloo.")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _load_images(path: str, samples: int):
    """calibration images from .npz ('images'), .npy or a torch-saved tensor -> float32 (N, C, H, W)."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--data {path!r} is not a file.")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise ValueError(f"{path!r} has no array named 'images' (found {archive.files}).")
            images = archive["images"]
    elif p.suffix == ".npy":
        images = np.load(p, allow_pickle=False)
    else:
        images = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{path!r} does not hold a tensor.")
        images = images.numpy()
    images = np.asarray(images)[:samples]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"--data: images must have shape (N, H, W) or (N, C, H, W); got {images.shape}.")
    if images.dtype == np.uint8:
        if images.shape[1] == 1:
            from ..data import normalize

            return torch.from_numpy(normalize(images))
        return torch.from_numpy(images.astype(np.float32) / np.float32(255.0))
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def run_distributed(
    model,
    images,
    layers: Sequence[str] | None = None,
    *,
    method: str = "tucker2",
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    ranks: dict | None = None,
    norm: str = "sigma",
    centered: bool = True,
    damping: float = 1e-6,
    n_iter_max: int = 30,
    seed: int = 0,
    calib_samples: int | None = None,
    batch_size: int = 250,
    output: str | os.PathLike | None = None,
    stats_out: str | os.PathLike | None = None,
    max_memory: Any = None,
    progress: bool = True,
    backend: str = "auto",
    timeout_s: float = 1800.0,
    quiet: bool = False,
) -> int:
    """Join the process group, compress ``model`` on ``images`` across all ranks, clean up.

    The body of the entry point, callable from other front ends (e.g. the CLI's
    ``compress --distributed``) with an already loaded model and calibration tensor
    ``images`` (``(N, C, H, W)`` float, normalized). Returns the exit code (0 or 1).
    """
    import torch.distributed as dist

    from .compress import format_report
    from .distributed import (
        DistributedCompressionError,
        MemoryBudgetError,
        collect_covariances_distributed,
        compress_distributed,
        save_on_root,
        shard,
    )
    from .statistics import save_statistics

    device = _init(backend, timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 and not quiet else (lambda *a: None)
    try:
        model = model.to(device)
        if layers is None:
            layers = default_layers(model)
        n = images.shape[0] if calib_samples is None else min(calib_samples, images.shape[0])
        batches = [images[s : min(s + batch_size, n)] for s in range(0, n, batch_size)]
        start = time.perf_counter()
        stats = collect_covariances_distributed(
            model, shard(batches, rank, world), layers, seed=seed, progress=progress and rank == 0
        )
        say(f"statistics of {len(stats)} layers from {n} images on {world} rank(s) "
            f"({dist.get_backend()}) in {time.perf_counter() - start:.1f}s")
        if stats_out is not None and rank == 0:
            save_statistics(stats, stats_out)
        start = time.perf_counter()
        compressed, report = compress_distributed(
            model, stats, method, ranks=ranks, ratio=ratio, energy=energy, budget=budget, norm=norm,
            centered=centered, layers=layers, damping=damping, progress=progress and rank == 0,
            root_only=True, max_memory=max_memory, n_iter_max=n_iter_max, random_state=seed,
        )
        if rank == 0:
            say(f"decomposed {len(report)} layers on {world} rank(s) in {time.perf_counter() - start:.1f}s\n")
            say(format_report(report))
        if output is not None:
            save_on_root(compressed, output)
            say(f"\nwrote the compressed model to {output} (load it with "
                "tensorly_dataaware.torch.load_compressed(fresh_model, path))")
        return 0
    except (DistributedCompressionError, MemoryBudgetError, ValueError, RuntimeError) as exc:
        _eprint(f"[rank {rank}] error: {exc}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun ... -m tensorly_dataaware.torch.dist_main",
        description="Data-aware compression across processes (torchrun) or machines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-file", help="a torch.save'd nn.Module (loaded with weights_only=False: trusted files only)")
    src.add_argument("--embedded", action="store_true", help="the embedded Fashion-MNIST model (--model) and calibration subset")
    p.add_argument("--model", choices=("resnet20", "vgg"), default="resnet20", help="embedded model (with --embedded)")
    p.add_argument("--data", help="calibration images: .npz with 'images', .npy, or a torch-saved tensor (uint8 1-channel: Fashion-MNIST normalization)")
    p.add_argument("--calib-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--method", choices=("tucker2", "cp", "svd"), default="tucker2")
    p.add_argument("--norm", choices=("sigma", "frobenius"), default="sigma")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--ratio", type=float)
    sizes.add_argument("--energy", type=float)
    sizes.add_argument("--budget", type=float)
    p.add_argument("--ranks", help='JSON {"layer": R or [R_out, R_in]}')
    p.add_argument("--layers", nargs="+", help="layers to compress (default: every k x k conv but the first)")
    p.add_argument("--uncentered", action="store_true")
    p.add_argument("--damping", type=float, default=1e-6)
    p.add_argument("--n-iter-max", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-memory", help="per-process budget of one decomposition (e.g. 20GiB, or auto); checked before any work")
    p.add_argument("--output", help="compressed model (rank 0 writes it atomically, only if every rank succeeded)")
    p.add_argument("--stats-out", help="also save the all-reduced statistics (rank 0)")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto")
    p.add_argument("--timeout", type=float, default=1800.0, help="process-group timeout in seconds")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.embedded:
            from ..data import load_embedded_subset, normalize
            from ..models import load_pretrained

            model = load_pretrained(args.model)
            images = torch.from_numpy(normalize(load_embedded_subset()["calib_images"]))
        else:
            if not args.data:
                raise ValueError("--model-file needs --data.")
            model = torch.load(args.model_file, map_location="cpu", weights_only=False)
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"--model-file {args.model_file!r} does not hold an nn.Module.")
            images = None
        if args.data:
            images = _load_images(args.data, args.calib_samples)
        ranks = json.loads(Path(args.ranks).read_text() if Path(args.ranks or "").is_file() else args.ranks) if args.ranks else None
        if ranks is None and args.ratio is None and args.energy is None and args.budget is None:
            args.ratio = 0.5
    except (ValueError, OSError) as exc:
        _eprint(f"error: {exc}")
        return 2
    return run_distributed(
        model, images, args.layers, method=args.method, ratio=args.ratio, energy=args.energy,
        budget=args.budget, ranks=ranks, norm=args.norm, centered=not args.uncentered,
        damping=args.damping, n_iter_max=args.n_iter_max, seed=args.seed,
        calib_samples=args.calib_samples, batch_size=args.batch_size, output=args.output,
        stats_out=args.stats_out, max_memory=args.max_memory, progress=not args.no_progress,
        backend=args.backend, timeout_s=args.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
