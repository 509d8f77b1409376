"""The body of ``tensorly-dataaware compress --distributed``: one rank of a torchrun job.

There is one command line: run the distributed compression with ::

    torchrun --standalone --nproc_per_node=8 -m tensorly_dataaware compress --distributed \\
        --model-file sd.pt --model-class mypkg.nets:Net --data-dir calib.npz --ratio 0.3 --output small.pt
    torchrun --standalone --nproc_per_node=2 -m tensorly_dataaware compress --distributed \\
        --model resnet20 --embedded --ratio 0.3 --output resnet20_small.pt
    python -m tensorly_dataaware compress --distributed --model resnet20 --embedded --ratio 0.3  # one process

The command line (:mod:`tensorly_dataaware.cli`) parses and checks the arguments and loads
the model and the data on every rank, then calls :func:`run_distributed`. Each rank joins
the process group (NCCL when CUDA is available, else gloo; ``env://`` variables from
torchrun), uses GPU ``LOCAL_RANK``, collects the statistics of every ``world_size``-th
calibration batch, all-reduces them, decomposes its share of the layers and gathers the
others'; rank 0 prints the report and writes ``output`` atomically, only if every rank
succeeded. ``run_distributed`` returns 0 on success, 1 if any rank failed (every rank prints
the same error naming the failing rank), 2 if the process group cannot be set up.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Sequence

__all__ = ["run_distributed"]


def _eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _init(backend: str, timeout_s: float):
    """Join (or, without torchrun, create a world of one) and pick this rank's device."""
    import datetime

    import torch
    import torch.distributed as dist

    # Without torchrun: a world of one process on a free local port (the environment of the
    # calling process is left alone, so the function can run again in the same process).
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if under_torchrun else 0
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--backend nccl needs CUDA, which is not available; use gloo.")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    if under_torchrun:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    return device


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
    sequential: bool = False,
    refit: bool = False,
    fisher: bool | str = False,
    target_damping: float | str | None = "auto",
    positions_per_image: int | None = None,
) -> int:
    """Join the process group, compress ``model`` on ``images`` across all ranks, clean up.

    The body of the entry point, callable from other front ends (e.g. the CLI's
    ``compress --distributed``) with an already loaded model and calibration tensor
    ``images`` (``(N, C, H, W)`` float, normalized). Returns the exit code (0 or 1).
    With ``sequential=True`` the layers are fitted one after the other
    (:func:`~tensorly_dataaware.torch.distributed.compress_sequential_distributed`): every
    rank streams its shard, rank 0 factorizes; ``stats_out`` does not apply then, and
    ``refit=True`` also refits the dense layers after the first compressed one
    (``compress_sequential(..., refit=True)``) and ``fisher=True`` (or ``'fisher'``) sets
    ``budget_weighting='fisher'`` and ``fit_weighting='fisher'`` (``fisher='kfac'``:
    ``fit_weighting='kfac'``); ``target_damping`` is
    passed on as it is. ``positions_per_image`` sub-samples the one-shot statistics
    (``max_positions_per_image`` of the collection; not with ``sequential=True``).
    """
    import torch.distributed as dist

    from .compress import format_report
    from .distributed import (
        DistributedCompressionError,
        MemoryBudgetError,
        collect_covariances_distributed,
        compress_distributed,
        compress_sequential_distributed,
        save_on_root,
        shard,
    )
    from .statistics import save_statistics

    try:
        device = _init(backend, timeout_s)
    except (ValueError, RuntimeError) as exc:  # e.g. no CUDA for nccl, a torchrun variable missing
        _eprint(f"error: cannot join the process group: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        return 2
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 and not quiet else (lambda *a: None)
    try:
        model = model.to(device)
        if layers is None:
            from ..cli import default_layers  # the command line's default selection

            layers = default_layers(model)
        n = images.shape[0] if calib_samples is None else min(calib_samples, images.shape[0])
        batches = [images[s : min(s + batch_size, n)] for s in range(0, n, batch_size)]
        if sequential and len(batches) < world:
            # Every rank needs a shard for the sequential passes (an empty one is refused);
            # the one-shot collection lets empty shards contribute zeros.
            raise ValueError(
                f"--sequential needs at least one calibration batch per rank: {n} image(s) in batches of "
                f"{batch_size} make {len(batches)} batch(es) for {world} ranks; lower --batch-size "
                f"(at most {max(1, n // world)}) or use fewer ranks."
            )
        if sequential:
            if positions_per_image:
                raise ValueError("positions_per_image sub-samples one-shot statistics; sequential calibration "
                                 "streams every patch.")
            start = time.perf_counter()
            compressed, report = compress_sequential_distributed(
                model, shard(batches, rank, world), method, ranks=ranks, ratio=ratio, energy=energy, budget=budget,
                norm=norm, centered=centered, layers=layers, damping=damping, progress=progress and rank == 0,
                return_report=True, n_iter_max=n_iter_max, random_state=seed, refit=refit or None,
                **(dict(budget_weighting="fisher", fit_weighting=fisher if isinstance(fisher, str) else "fisher")
                   if fisher else {}),
                target_damping=target_damping,
            )
            say(f"sequential calibration of {len(report)} layers from {n} images on {world} rank(s) "
                f"({dist.get_backend()}) in {time.perf_counter() - start:.1f}s\n")
            say(format_report(report))
            if output is not None:
                save_on_root(compressed, output)
                say(f"\nwrote the compressed model to {output}")
            return 0
        start = time.perf_counter()
        stats = collect_covariances_distributed(
            model, shard(batches, rank, world), layers, seed=seed, progress=progress and rank == 0,
            max_positions_per_image=positions_per_image or None,
        )
        say(f"statistics of {len(stats)} layers from {n} images on {world} rank(s) "
            f"({dist.get_backend()}) in {time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        compressed, report = compress_distributed(
            model, stats, method, ranks=ranks, ratio=ratio, energy=energy, budget=budget, norm=norm,
            centered=centered, layers=layers, damping=damping, progress=progress and rank == 0,
            root_only=True, max_memory=max_memory, n_iter_max=n_iter_max, random_state=seed,
        )
        # Only now: the outputs are written only if every step succeeded on every rank (a
        # plan over --max-memory fails above, after the statistics).
        if stats_out is not None and rank == 0:
            save_statistics(stats, stats_out)
        if rank == 0:
            say(f"decomposed {len(report)} layers on {world} rank(s) in {time.perf_counter() - start:.1f}s\n")
            say(format_report(report))
        if output is not None:
            save_on_root(compressed, output)
            say(f"\nwrote the compressed model to {output} (load it with "
                "tensorly_dataaware.torch.load_compressed(fresh_model, path))")
        return 0
    except (DistributedCompressionError, MemoryBudgetError, ValueError, RuntimeError, OSError) as exc:
        _eprint(f"[rank {rank}] error: {exc}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _eprint(
        "tensorly_dataaware.torch.dist_main is no longer a command: run "
        "`torchrun ... -m tensorly_dataaware compress --distributed ...` (same options as `compress`)."
    )
    sys.exit(2)
