r"""Scale out with ``torch.distributed``: data-parallel statistics, sharded decompositions.

Nothing here is a home-made cluster: processes are started by ``torchrun`` (or any launcher
that sets the ``env://`` variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), talk through a ``torch.distributed`` process group (NCCL on GPUs, gloo on
CPUs), and every function below is a *collective*: all ranks of the group must call it, in
the same order, with the same arguments (except the data shard).

What it does
------------
1. **Statistics** (:func:`collect_covariances_distributed`, :func:`all_reduce_statistics`):
   each rank accumulates the float64 moment sums (``count``, ``sum``, ``sum_outer``) of the
   layers' input patches on *its own shard* of the calibration data, then one ``all_reduce``
   (SUM) per tensor merges them. The sums are plain sums, so the result is the statistics of
   the union of the shards: equal to a single-process run over the same batches up to float64
   round-off (the summation order differs), and bit-identical on every rank.
2. **Decompositions** (:func:`compress_distributed`): every rank plans the same jobs
   (:func:`~tensorly_dataaware.torch.plan_compression` is deterministic), the jobs are split
   by estimated cost (:func:`assign_layers`, longest-processing-time first), each rank
   factorizes its share with :func:`~tensorly_dataaware.torch.decompose_layer`, and the new
   modules are gathered and installed in plan order. With the same statistics, arguments,
   seeds (``random_state``), hardware and thread settings, the compressed model is identical
   to :func:`~tensorly_dataaware.torch.compress` in one process.
3. **Failures**: each rank reports ``(ok, error)`` to all the others before anything is
   exchanged or written; if any rank failed, *every* rank raises a
   :class:`DistributedCompressionError` that names the failing ranks, layers and errors, so
   no rank hangs in a collective waiting for a dead peer. Files are written on rank 0 only,
   after every rank succeeded, atomically (:func:`save_on_root`).
4. **Memory**: :func:`estimate_memory` predicts the peak working memory of one
   decomposition and :func:`check_memory` refuses a plan, before any work starts, when a
   layer would exceed a budget (``max_memory``), instead of crashing half-way.

How to run
----------
The command line does everything (``tensorly-dataaware compress --distributed``, the same
options and checks as ``compress``): collect on sharded calibration data, all-reduce,
compress in parallel, write on rank 0, print the report.

One machine, 8 GPUs (NCCL is chosen automatically when CUDA is available; each rank uses
GPU ``LOCAL_RANK``)::

    torchrun --standalone --nproc_per_node=8 -m tensorly_dataaware compress --distributed \
        --model-file resnet50_state.pt --model-class torchvision.models:resnet50 \
        --data-dir calib.npz --method tucker2 --ratio 0.3 --max-memory auto --output resnet50_small.pt

Several machines (run the same command on every node, ``--node_rank`` 0..N-1; ``host:port``
is reachable from all nodes, e.g. node 0)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 \
        --rdzv_backend=c10d --rdzv_endpoint=node0.example.com:29400 --rdzv_id=compress1 \
        -m tensorly_dataaware compress --distributed --model-file resnet50_state.pt \
        --model-class torchvision.models:resnet50 --data-dir calib.npz \
        --method tucker2 --ratio 0.3 --output /shared/resnet50_small.pt

CPU only (gloo), e.g. 4 processes on one machine; give each process its share of the cores::

    torchrun --standalone --nproc_per_node=4 -m tensorly_dataaware compress --distributed \
        --threads 4 --model resnet20 --embedded --ratio 0.3 --output small.pt

The embedded example (``--model resnet20 --embedded``: the Fashion-MNIST ResNet-20 and its
calibration subset) needs no file. ``python -m tensorly_dataaware compress --distributed ...``
without ``torchrun`` runs as a world of one process. The output is written by rank 0 only:
on several nodes, point ``--output`` to the file system of node 0 (or a shared one). Load it
with :func:`~tensorly_dataaware.torch.load_compressed`.

From Python, inside a process started by ``torchrun``::

    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from tensorly_dataaware.torch import distributed as tdd

    dist.init_process_group("nccl")               # or "gloo" on CPUs
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Each rank sees its own part of the data: a DistributedSampler (shuffle=False, and
    # drop_last=False: its padding repeats a few samples, which then count twice) or shard().
    loader = DataLoader(dataset, batch_size=64,
                        sampler=DistributedSampler(dataset, shuffle=False))
    stats = tdd.collect_covariances_distributed(model, loader, layers)
    small, report = tdd.compress_distributed(model, stats, "tucker2", ratio=0.3,
                                             random_state=0, max_memory="auto")
    tdd.save_on_root(small, "small.pt")           # rank 0 writes, atomically, if all succeeded

Notes and limits
----------------
* Every rank holds the whole model, all the statistics and the planned covariances of all
  selected layers (``n**2`` float64 each): about 1 GB for ResNet-50. Only the decompositions
  are split. The statistics tensors are reduced on the rank's CUDA device for NCCL (and moved
  back), on the CPU for gloo; ``chunk_bytes`` bounds the extra device memory for that.
* With ``max_positions_per_image`` each rank draws its positions with ``seed + rank``: the
  statistics are then statistically, not bitwise, equivalent to one process.
* Identical results across runs need identical numerics: the same device type, library
  versions and ``torch`` thread count (reductions split across threads round differently).
* A rank that dies without raising (killed, segfault) cannot report; its peers then wait in
  the next collective until the process-group ``timeout`` (``torchrun`` also stops the other
  workers when one exits with an error), and nothing is written.
"""

from __future__ import annotations

import copy
import datetime
import heapq
import itertools
import math
import os
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..decomposition import DIRECT_SOLVE_MAX_UNKNOWNS
from .compress import (
    METHODS,
    NORMS,
    LayerJob,
    LayerReport,
    _check_choice,
    _set_module,
    check_flags,
    check_solver_options,
    decompose_layer,
    dense_report_row,
    plan_compression,
)
from .sequential import _Local, _run_sequential
from .serialization import save_compressed
from .statistics import LayerStatistics, check_eager_model, collect_covariances

__all__ = [
    "DistributedCompressionError",
    "MemoryBudgetError",
    "all_reduce_statistics",
    "collect_covariances_distributed",
    "shard",
    "assign_layers",
    "compress_distributed",
    "compress_sequential_distributed",
    "save_on_root",
    "estimate_memory",
    "check_memory",
    "parse_bytes",
    "available_memory",
]

#: Default bound on the size of one all_reduce of a ``sum_outer`` tensor (bytes).
DEFAULT_CHUNK_BYTES = 256 * 2**20


class DistributedCompressionError(RuntimeError):
    """A rank failed; raised on *every* rank, with the failing ranks and their errors."""


class MemoryBudgetError(ValueError, MemoryError):
    """A planned decomposition would exceed the memory budget (raised before any work)."""


# --------------------------------------------------------------------------------------------
# Process-group helpers
# --------------------------------------------------------------------------------------------


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() "
            "first (processes started by torchrun get their rank and world size from the "
            "environment), or use the single-process functions collect_covariances / compress."
        )


def _rank_world(group) -> tuple[int, int]:
    _require_initialized()
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    """Where the tensors of a collective must live: the rank's CUDA device for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if not torch.cuda.is_available():  # pragma: no cover - NCCL needs CUDA
            raise RuntimeError("The NCCL backend needs CUDA, which is not available.")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(obj: Any, group) -> list:
    _, world = _rank_world(group)
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _format_exception(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _agree(ok: bool, error: str | None, what: str, group) -> None:
    """Every rank shares whether its step succeeded; if any failed, every rank raises.

    This is what keeps a failure on one rank from leaving the others blocked in the next
    collective: the status exchange is a collective that every rank reaches, failed or not.
    """
    statuses = _all_gather((bool(ok), error), group)
    failed = [(rank, err) for rank, (good, err) in enumerate(statuses) if not good]
    if failed:
        details = "; ".join(f"rank {rank}: {err}" for rank, err in failed)
        ranks = ", ".join(str(rank) for rank, _ in failed)
        raise DistributedCompressionError(
            f"{what} failed on rank{'s' if len(failed) > 1 else ''} {ranks} of {len(statuses)}: {details}"
        )


def _model_fingerprint(model: nn.Module) -> list[tuple]:
    """Per parameter and buffer: name, shape, and the float64 sum and absolute sum."""
    rows = []
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.device.type == "meta" or tensor.is_complex():
                rows.append((name, tuple(tensor.shape), 0.0, 0.0))
                continue
            wide = tensor.detach().to(torch.float64)
            rows.append((name, tuple(tensor.shape), float(wide.sum()), float(wide.abs().sum())))
    return rows


def _check_same_model(model: nn.Module, what: str, group) -> None:
    """Raise on every rank unless every rank holds the same model (names, shapes, weights).

    Ranks with different weights were accepted: the result mixed them (each layer factorized
    from the weights of the rank that decomposed it). Sums differ between devices by rounding
    only, hence the relative tolerance.
    """
    prints = _all_gather(_model_fingerprint(model), group)

    def same(a, b) -> bool:
        return len(a) == len(b) and all(
            x[:2] == y[:2] and abs(x[2] - y[2]) <= 1e-6 * max(x[3], y[3]) + 1e-300 and abs(x[3] - y[3]) <= 1e-6 * max(x[3], y[3]) + 1e-300
            for x, y in zip(a, b)
        )

    differ = [rank for rank, p in enumerate(prints) if not same(p, prints[0])]
    if differ:
        raise DistributedCompressionError(
            f"{what}: the model on rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} differs from rank "
            "0's (parameter or buffer names, shapes or values): every rank must hold the same model."
        )


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _signature(name: str, st: LayerStatistics) -> tuple:
    return (name, st.kind, tuple(st.weight_shape), st.groups, repr(sorted(st.hyper_parameters.items())))


def _reduce_tensor_(tensor: torch.Tensor, comm: torch.device, group, chunk_elems: int) -> torch.Tensor:
    """SUM-all_reduce ``tensor`` (any device) across the group; returns the reduced tensor."""
    buf = tensor.detach().to(comm).contiguous()
    flat = buf.view(-1)
    for start in range(0, flat.numel(), max(1, chunk_elems)):
        dist.all_reduce(flat[start : start + chunk_elems], op=dist.ReduceOp.SUM, group=group)
    return buf.to(tensor.device)


def all_reduce_statistics(
    stats: Mapping[str, LayerStatistics],
    group=None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, LayerStatistics]:
    """Sum the statistics of all ranks, in place; every rank gets the merged statistics.

    Parameters
    ----------
    stats : mapping name -> LayerStatistics
        This rank's statistics (on its shard of the data). Every rank must hold the same
        layers (same names, kinds, weight shapes, groups and hyper-parameters).
    group : ProcessGroup, optional
        Default: the whole world.
    chunk_bytes : int, default 256 MiB
        Each ``sum_outer`` is reduced in chunks of at most this size, which bounds the
        temporary communication buffers.

    Returns
    -------
    dict name -> LayerStatistics
        The same objects, now holding the statistics of the union of all shards (on their
        original devices), in the input order.

    Raises
    ------
    RuntimeError
        If the process group is not initialized, or the ranks do not hold the same layers
        (checked with one ``all_gather_object`` before anything is reduced, so no rank hangs).

    Notes
    -----
    Layers are reduced in sorted name order, so the collectives match on every rank whatever
    the order of the mappings. ``count`` travels as an int64 tensor (exact); ``sum`` and
    ``sum_outer`` as float64. For NCCL the tensors are reduced on the current CUDA device
    (``torch.cuda.set_device`` first), for gloo on the CPU.
    """
    rank, world = _rank_world(group)
    if not isinstance(stats, Mapping):
        raise TypeError(f"`stats` must be a mapping name -> LayerStatistics; got {type(stats).__name__}.")
    for name, st in stats.items():
        if not isinstance(st, LayerStatistics):
            raise TypeError(f"`stats[{name!r}]` is a {type(st).__name__}, not a LayerStatistics.")
    names = sorted(stats)
    mine = [_signature(name, stats[name]) for name in names]
    everyone = _all_gather(mine, group)
    reference = everyone[0]
    bad = [r for r, sig in enumerate(everyone) if sig != reference]
    if bad:
        ref_names = {s[0]: s for s in reference}
        lines = []
        for r in bad:
            theirs = {s[0]: s for s in everyone[r]}
            missing = sorted(set(ref_names) - set(theirs))
            extra = sorted(set(theirs) - set(ref_names))
            differ = sorted(k for k in set(theirs) & set(ref_names) if theirs[k] != ref_names[k])
            lines.append(
                f"rank {r} vs rank 0: missing {missing}, extra {extra}, different shapes/settings {differ}"
            )
        raise RuntimeError(
            "all_reduce_statistics: the ranks hold statistics of different layers, so they cannot be "
            "summed (did every rank run the same model and layer selection, and did every layer "
            "see data on every rank?): " + "; ".join(lines)
        )
    if world == 1 or not names:
        return dict(stats)
    comm = _comm_device(group)
    chunk = max(1, int(chunk_bytes) // 8)
    counts = torch.tensor([int(stats[name].count) for name in names], dtype=torch.int64, device=comm)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    # The small first moments travel together in one buffer.
    sums = torch.cat([stats[name].sum.detach().reshape(-1).to(comm, torch.float64) for name in names])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for name, count in zip(names, counts.tolist()):
        st = stats[name]
        size = st.sum.numel()
        st.sum = sums[offset : offset + size].reshape(st.sum.shape).to(st.device).clone()
        offset += size
        st.sum_outer = _reduce_tensor_(st.sum_outer.to(torch.float64), comm, group, chunk)
        st.count = int(count)
    return dict(stats)


def shard(batches: Iterable[Any], rank: int | None = None, world_size: int | None = None):
    """This rank's share of ``batches``: every ``world_size``-th batch, starting at ``rank``.

    A list or tuple gives a list; any other iterable (e.g. a ``DataLoader``) a lazy one-shot
    iterator (every rank still iterates, i.e. loads, all batches: for big data sets prefer a
    ``DistributedSampler``, which loads only the rank's samples; and
    :func:`compress_sequential_distributed`, which reads its batches once per layer, needs a
    list or a ``DataLoader``). ``rank`` and
    ``world_size`` default to those of the initialized default process group. The union of
    the shards of all ranks is exactly ``batches``.
    """
    if rank is None or world_size is None:
        r, w = _rank_world(None)
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"Need 0 <= rank < world_size; got rank={rank!r}, world_size={world_size!r}.")
    if isinstance(batches, (list, tuple)):
        return list(batches[rank::world_size])
    return itertools.islice(batches, rank, None, world_size)


class _Counting:
    """Wrap an iterable and count what it yields (to tell an empty shard from an error)."""

    def __init__(self, iterable: Iterable[Any]):
        self.iterable = iterable
        self.yielded = 0
        self.exhausted = False  # iterated to the end: an empty shard only if nothing came out

    def __iter__(self):
        for item in self.iterable:
            self.yielded += 1
            yield item
        self.exhausted = True


def collect_covariances_distributed(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str] | str | None = None,
    *,
    group=None,
    seed: int = 0,
    progress: bool | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    **kwargs,
) -> dict[str, LayerStatistics]:
    """Collect the input statistics on this rank's shard, then sum them over all ranks.

    Parameters
    ----------
    model : nn.Module
        The same network on every rank (on the rank's device).
    batches : iterable
        **This rank's shard** of the calibration batches: e.g. a ``DataLoader`` with a
        ``DistributedSampler(dataset, shuffle=False)``, or ``shard(all_batches)``. A rank
        whose shard is empty contributes zeros.
    layers : list of str, optional
        As in :func:`~tensorly_dataaware.torch.collect_covariances` (the same on all ranks).
    group : ProcessGroup, optional
    seed : int, default 0
        Rank ``r`` uses ``seed + r`` for its position sub-sampling
        (``max_positions_per_image``), so ranks draw independently.
    progress : bool, optional
        Progress bar; default: on rank 0 only.
    chunk_bytes : int
        See :func:`all_reduce_statistics`.
    **kwargs
        Passed to :func:`~tensorly_dataaware.torch.collect_covariances` (``max_batches`` and
        ``max_samples`` then apply per rank).

    Returns
    -------
    dict name -> LayerStatistics
        The statistics of the union of all shards, identical on every rank.

    Raises
    ------
    DistributedCompressionError
        On every rank, if collecting failed on any rank (naming it and its error).
    RuntimeError
        If the ranks ended up with different layers.
    """
    rank, world = _rank_world(group)
    if progress is None:
        progress = rank == 0
    _check_same_model(model, "collect_covariances_distributed", group)
    counted = _Counting(batches)
    stats = None
    error = None
    try:
        stats = collect_covariances(model, counted, layers, seed=seed + rank, progress=progress, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        # Only "this rank's shard was empty" is not an error; a ValueError raised before the
        # batches were read (e.g. an unknown layer name) is reported like any other.
        if not (counted.exhausted and counted.yielded == 0 and isinstance(exc, ValueError)):
            error = _format_exception(exc)
    _agree(error is None, error, "collecting statistics", group)
    # Ranks with an empty shard build zero statistics for the layers the others saw.
    shapes = _all_gather(None if stats is None else list(stats), group)
    seen = next((names for names in shapes if names is not None), None)
    if seen is None:
        raise ValueError("collect_covariances_distributed: every rank's shard of `batches` is empty.")
    if stats is None:
        modules = dict(model.named_modules())
        device = _compress_device(model)
        stats = {name: LayerStatistics.from_module(modules[name], device=device) for name in seen}
    return all_reduce_statistics(stats, group, chunk_bytes=chunk_bytes)


def _compress_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Work assignment
# --------------------------------------------------------------------------------------------


def assign_layers(jobs: Sequence[Any], world_size: int) -> list[list[int]]:
    """Split jobs over ``world_size`` ranks, balancing their estimated cost.

    Greedy longest-processing-time: jobs by decreasing cost (ties: plan order) each go to the
    rank with the least work so far (ties: lowest rank). The largest total is at most 4/3 of
    the optimum. Deterministic, so every rank computes the same assignment.

    Parameters
    ----------
    jobs : sequence of LayerJob (anything with a ``cost`` attribute) or of numbers
    world_size : int

    Returns
    -------
    list of ``world_size`` lists of job indices, each in increasing (plan) order.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int; got {world_size!r}.")
    costs = []
    for index, job in enumerate(jobs):
        cost = float(job.cost if hasattr(job, "cost") else job)
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"Job {index} has an invalid cost {cost!r}.")
        costs.append(cost)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, rank) for rank in range(world_size)]
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        load, rank = heapq.heappop(heap)
        parts[rank].append(i)
        heapq.heappush(heap, (load + costs[i], rank))
    return [sorted(p) for p in parts]


# --------------------------------------------------------------------------------------------
# Memory estimates
# --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``'16GiB'``, ``'500MB'``, ``'2e9'`` or a number of bytes -> int bytes."""
    if isinstance(value, bool):
        raise TypeError(f"Not a memory size: {value!r}.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"A memory size must be a positive number of bytes; got {value!r}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"Not a memory size: {value!r} (examples: 8GiB, 500MB, 2e9).")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"A memory size must be positive; got {value!r}.")
    return int(size)


def available_memory(device: torch.device | str | None = None, *, local_world_size: int | None = None) -> int:
    """Memory this process may use on ``device``: free GPU memory, or its share of the RAM.

    For the CPU, the available RAM (``/proc/meminfo`` ``MemAvailable``, else the physical
    RAM) divided by the number of processes on this machine (``local_world_size``, default
    the ``LOCAL_WORLD_SIZE`` environment variable that torchrun sets, else 1).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
            total = 2**62
    return int(total // max(1, local_world_size))


def _rank_pair(rank, shape) -> tuple[int, int]:
    if isinstance(rank, (tuple, list)):
        r_out, r_in = (int(r) for r in rank)
    else:
        r_out = r_in = int(rank)
    return min(r_out, shape[0]), min(r_in, shape[1])


def _resident_elems(shape: Sequence[int]) -> int:
    """Elements a planned job holds before it runs: sigma (n^2), weight (T n), mean (n)."""
    n_out, n = shape[0], math.prod(shape[1:])
    return n * n + n_out * n + n


def estimate_memory(
    job_or_shape: LayerJob | Sequence[int],
    rank: Any = None,
    method: str | None = None,
    dtype_bytes: int = 8,
    *,
    check_psd: bool = True,
    solver: str = "auto",
) -> int:
    r"""Peak memory (bytes) of decomposing one layer, including its planned inputs.

    The estimate follows the solvers' largest simultaneous allocations, with ``n = S P``
    (``S`` input channels, ``P = kh kw``), ``T`` output channels and ranks ``R``:

    * always: the planned ``sigma`` and the solver's damped copy (``2 n^2``), the weight
      and ``W sigma`` (``2 T n``); while ``sigma`` is validated, up to three more ``n^2``
      (symmetrization, damping) and, with ``check_psd``, four on the host (the float64
      Cholesky check);
    * Tucker-2 ``(R_out, R_in)``: ``sigma Z`` (``n R_in P``) and a transposed copy of
      ``sigma`` made by the contraction (``n^2``), the ``(R_in P)^2`` core system and its
      eigendecomposition fallback, ``T x n`` model/error terms; the CG input-factor solve
      (``2 R_out n``), or, for the dense solve of small systems, ``(S R_in)^2`` terms;
    * CP rank ``R``: ``M`` and ``sigma M`` (``2 n R``), the spatial-mode contractions
      (``n d R`` for a spatial size ``d``, plus ``n P R`` intermediates), the dense
      ``(d R)^2`` spatial systems and their eigendecompositions, ``R^2`` output systems,
      the CG channel solve (``min(T, R) R P`` core and ``2 min(T, R) n`` products);
    * SVD (linear and ``1 x 1`` layers): ``sigma W^T``, ``T^2`` Gram matrix and eigh.

    The constants were calibrated against measured peaks (``torch.cuda.max_memory_allocated``
    on an H200 and the resident set size on a CPU) for 256x256x3x3 and 512x512x3x3 layers,
    Tucker-2 ranks up to 460 and CP ranks 300-2000: the estimate was 1.1 to 1.8 times the
    measured peak, on the safe side; a 10 % margin is included. It is an estimate, not a
    guarantee (other solver options, backends or library versions allocate differently).

    Parameters
    ----------
    job_or_shape : LayerJob or sequence of int
        A planned job (its weight shape, rank and method are used unless given) or a weight
        shape ``(T, S, kh, kw)`` / ``(T, S)``.
    rank : int or (int, int), optional
        Required with a shape. Tucker-2: ``(R_out, R_in)`` or an int for both.
    method : {'tucker2', 'cp', 'svd'}, optional
        Required with a shape (2-D shapes and ``1 x 1`` kernels are always ``'svd'``).
    dtype_bytes : int, default 8
        Bytes per element (8 for float64, the dtype of every planned decomposition).
    check_psd : bool, default True
        Count the host-side PSD check of ``sigma`` (the solvers do it by default).
    solver : {'auto', 'cg', 'direct'}
        The input-factor solver the decomposition will use.

    Returns
    -------
    int
        Bytes.
    """
    if isinstance(job_or_shape, LayerJob):
        shape = tuple(int(d) for d in job_or_shape.weight.shape)
        rank = job_or_shape.rank if rank is None else rank
        method = job_or_shape.method if method is None else method
    else:
        shape = tuple(int(d) for d in job_or_shape)
        if rank is None or method is None:
            raise ValueError("Give `rank` and `method` with a weight shape.")
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"Not a weight shape: {shape}.")
    if method not in ("tucker2", "cp", "svd"):
        raise ValueError(f"`method` must be 'tucker2', 'cp' or 'svd'; got {method!r}.")
    T, S = shape[0], shape[1]
    spatial = shape[2:]
    P = math.prod(spatial) if spatial else 1
    n = S * P
    if P == 1:
        method = "svd"
    n2 = n * n
    # Held throughout: planned sigma + damped copy, weight and W sigma (and the mean).
    base = 2 * n2 + 2 * T * n + n
    # Validating and damping sigma: clone, |sigma - sigma^T| temporaries, eye + sum.
    build = 3 * n2 + (4 * n2 if check_psd else 0)
    model_terms = 5 * T * n  # W~, W~ sigma and the explicit error's temporaries
    if method == "svd":
        r = int(min(rank) if isinstance(rank, (tuple, list)) else rank)
        work = T * n + 6 * T * T + 2 * r * n + model_terms  # eigh of the T x T Gram: workspace
    elif method == "tucker2":
        r_out, r_in = _rank_pair(rank, shape)
        k = r_in * P
        joint = n2 + 2 * n * k + 3 * k * k + 3 * T * k + T * T + model_terms
        use_direct = solver == "direct" or (solver == "auto" and S * r_in <= DIRECT_SOLVE_MAX_UNKNOWNS)
        if use_direct:
            inner = n2 + (r_in * P) ** 2 + 3 * (S * r_in) ** 2
        else:
            inner = 3 * r_out * n + r_out * r_in * P + 8 * S * r_in + 3 * r_in * r_in
        # 2 n^2: the solver's (S P P) x S copy of sigma and, kept as margin, a transposed copy
        # that the CG matvec no longer makes (calibrated with it; an overestimate now).
        work = 2 * n2 + r_out * n + max(joint, inner)
    else:  # cp
        r = int(rank)
        a = min(T, r)
        d = max(spatial) if spatial else 1
        factors = n * r  # M (Khatri-Rao), kept with the input factors
        output = 2 * n * r + 3 * r * r + 2 * T * r + model_terms
        spatial_step = n * d * r + n * P * r + 3 * (d * r) ** 2
        use_direct = solver == "direct" or (solver == "auto" and S * r <= DIRECT_SOLVE_MAX_UNKNOWNS)
        if use_direct:
            channel = n2 + (r * P) ** 2 + 3 * (S * r) ** 2
        else:
            channel = a * r * P + 3 * a * n + 8 * S * r + 3 * r * r
        init = 2 * T * n + (T + S + sum(spatial)) * r
        # 8 n^2: sigma reshaped/transposed by the multi-operand contractions of the spatial
        # and channel steps (measured: 7.5 to 11 n^2 above the resident terms at n = 2304-4608,
        # before the spatial steps reused one n x P R product; now an overestimate).
        work = 8 * n2 + factors + max(output, spatial_step, channel, init)
    peak = base + max(build, work)
    return int(math.ceil(1.1 * peak * int(dtype_bytes)))


def _fmt_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def check_memory(
    jobs: Sequence[LayerJob],
    limit_bytes: int | float | str,
    *,
    resident: bool = True,
    dtype_bytes: int = 8,
    check_psd: bool = True,
    solver: str = "auto",
) -> dict[str, int]:
    """Refuse, before any work starts, a plan whose decompositions exceed a memory budget.

    Parameters
    ----------
    jobs : sequence of LayerJob
        From :func:`~tensorly_dataaware.torch.plan_compression` (or fake jobs with ``meta``
        tensors, which cost nothing).
    limit_bytes : int, float or str
        The budget of one process, e.g. ``16 * 2**30`` or ``'16GiB'``.
    resident : bool, default True
        Also count what the plan keeps for the *other* jobs while one runs (their ``sigma``,
        weight and mean), as a process holding the whole plan does.
    dtype_bytes, check_psd, solver
        See :func:`estimate_memory`.

    Returns
    -------
    dict name -> bytes
        The estimated peak of each job (plan residency included when ``resident``).

    Raises
    ------
    MemoryBudgetError
        (a ``ValueError`` and a ``MemoryError``) listing every layer over the budget with
        its estimate, and what to do about it.
    """
    limit = parse_bytes(limit_bytes)
    planned = sum(_resident_elems(tuple(job.weight.shape)) for job in jobs) * dtype_bytes if resident else 0
    needs: dict[str, int] = {}
    over = []
    for job in jobs:
        own = estimate_memory(job, dtype_bytes=dtype_bytes, check_psd=check_psd, solver=solver)
        others = planned - _resident_elems(tuple(job.weight.shape)) * dtype_bytes if resident else 0
        need = own + max(0, others)
        needs[job.name] = need
        if need > limit:
            over.append(
                f"{job.name} ({'x'.join(map(str, job.weight.shape))}, {job.method}, rank {job.rank}): "
                f"about {_fmt_bytes(need)}"
                + (f" (decomposition {_fmt_bytes(own)} + planned data of the other layers {_fmt_bytes(others)})"
                   if resident and others > 0 else "")
            )
    if over:
        raise MemoryBudgetError(
            f"Not starting: {len(over)} layer(s) would exceed the memory budget of {_fmt_bytes(limit)} "
            f"per process: " + "; ".join(over) + ". Lower their ranks (ratio/ranks), use a device with "
            "more memory, compress them in a separate run (layers=...), or raise the budget."
        )
    return needs


# --------------------------------------------------------------------------------------------
# Sharded compression
# --------------------------------------------------------------------------------------------


def _plan_signature(jobs: Sequence[LayerJob]) -> list:
    return [(job.name, job.method, repr(job.rank), tuple(job.weight.shape)) for job in jobs]


def compress_distributed(
    model: nn.Module,
    stats: Mapping[str, LayerStatistics],
    method: str = "tucker2",
    *,
    ranks: Mapping[str, Any] | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    norm: str = "sigma",
    centered: bool = True,
    bias_correction: bool | None = None,
    layers: Iterable[str] | None = None,
    inplace: bool = False,
    damping: float = 1e-6,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    group=None,
    root_only: bool = False,
    max_memory: int | float | str | None = None,
    **solver_options,
):
    """:func:`~tensorly_dataaware.torch.compress`, with the layers decomposed on all ranks.

    Every rank plans the same jobs, decomposes the share :func:`assign_layers` gives it,
    and the new modules (moved to the CPU for the exchange) and report rows are gathered and
    installed in plan order. Call it on every rank with the same model, statistics (e.g.
    from :func:`collect_covariances_distributed`) and arguments.

    Parameters
    ----------
    model, stats, method, ranks, ratio, energy, budget, norm, centered, bias_correction, layers, inplace, damping, device
        As in :func:`~tensorly_dataaware.torch.compress`.
    progress : bool, optional
        Progress bar over this rank's layers; default: on rank 0 only.
    group : ProcessGroup, optional
        Default: the whole world.
    root_only : bool, default False
        Gather the modules on rank 0 only (``gather_object``): rank 0 returns the model and
        the report, the other ranks return ``(None, None)``.
    max_memory : int, float, str or 'auto', optional
        Per-process budget for one decomposition (bytes or e.g. ``'20GiB'``), checked with
        :func:`check_memory` on the plan before any decomposition starts. ``'auto'``: the
        free memory of the decomposition device (:func:`available_memory`). Default: no check.
    **solver_options
        Passed to the solvers (``n_iter_max``, ``tol``, ``random_state``, ...).

    Returns
    -------
    (nn.Module, list of LayerReport)
        Like ``compress(..., return_report=True)``: one row per compressed layer and per
        layer kept dense (unsupported, e.g. a grouped convolution), in the model's module
        order. The rows hold each layer's own decomposition time (measured on the rank that
        ran it).

    Raises
    ------
    TypeError
        On every rank, before any work, for a model that is not an eager ``nn.Module``
        (e.g. TorchScript) or solver options the method and norm do not accept (the
        checks of :func:`~tensorly_dataaware.torch.compress`).
    DistributedCompressionError
        On every rank, if planning or a decomposition failed on any rank; the message names
        the ranks, layers and errors. Nothing is installed in ``model`` then.
    MemoryBudgetError
        On every rank, before any work, if ``max_memory`` is exceeded.
    """
    rank, world = _rank_world(group)
    if progress is None:
        progress = rank == 0
    # The argument checks of compress, before any collective: the arguments are the same on
    # every rank, so every rank raises the same error (no peer is left waiting). Without
    # them a TorchScript model came back uncompressed (its layers are script modules, all
    # "skipped"), and a misspelt or ignored solver option was silently dropped.
    check_eager_model(model)
    _check_choice(norm, "norm", NORMS)
    _check_choice(method, "method", METHODS)
    check_solver_options(method, norm, solver_options)
    check_flags(centered=centered, inplace=inplace, root_only=root_only)
    for name, value in (("bias_correction", bias_correction), ("progress", progress)):
        if value is not None:
            check_flags(**{name: value})
    if bias_correction is None:
        bias_correction = norm == "sigma" and centered
    _check_same_model(model, "compress_distributed", group)

    # 1. Plan (the same on every rank); agree that it worked and that it is the same.
    jobs: list[LayerJob] = []
    skipped: list = []  # (name, reason) of the layers kept dense: report rows, as in compress
    error = None
    try:
        jobs = plan_compression(
            model, stats, method, ranks=ranks, ratio=ratio, energy=energy, budget=budget,
            centered=centered, layers=layers, device=device, skipped=skipped,
        )
    except Exception as exc:  # noqa: BLE001 - reported to every rank
        error = f"planning: {_format_exception(exc)}"
    _agree(error is None, error, "compress_distributed", group)
    plans = _all_gather(_plan_signature(jobs), group)
    if any(p != plans[0] for p in plans):
        differ = [r for r, p in enumerate(plans) if p != plans[0]]
        raise DistributedCompressionError(
            f"compress_distributed: ranks {differ} planned different layers or ranks than rank 0 "
            "(different models, statistics or arguments on different ranks?)."
        )

    # 2. Memory budget: the plan is identical everywhere, so every rank decides the same.
    if max_memory is not None:
        if isinstance(max_memory, str) and max_memory.strip().lower() == "auto":
            target_device = torch.device(device) if device is not None else _compress_device(model)
            limit = available_memory(target_device)
        else:
            limit = parse_bytes(max_memory)
        # With 'auto' the free memory may differ by rank: agree on the outcome.
        failure = None
        try:
            check_memory(jobs, limit)
        except MemoryBudgetError as exc:
            failure = str(exc)
        verdicts = _all_gather(failure, group)
        first = next((v for v in verdicts if v is not None), None)
        if first is not None:
            raise MemoryBudgetError(first)

    # 3. Decompose this rank's share.
    mine = assign_layers(jobs, world)[rank]
    results = []
    error = None
    current = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(mine, desc=f"compress rank {rank} ({method}, {norm})", disable=not progress, leave=False)
        for index in bar:
            current = jobs[index].name
            new, row = decompose_layer(
                jobs[index], norm=norm, bias_correction=bias_correction, damping=damping, **solver_options
            )
            results.append((index, new.to("cpu"), row))
    except Exception as exc:  # noqa: BLE001 - reported to every rank
        error = f"layer {current!r}: {_format_exception(exc)}"
    _agree(error is None, error, "compress_distributed", group)

    # 4. Exchange (CPU modules: pickling CUDA tensors would pin them to a device index).
    if root_only:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=_global_rank(group, 0), group=group)
        if rank != 0:
            return None, None
    else:
        gathered = _all_gather(results, group)
    by_index: dict[int, tuple[nn.Module, LayerReport]] = {}
    for part in gathered:
        for index, new, row in part:
            by_index[index] = (new, row)
    missing = [jobs[i].name for i in range(len(jobs)) if i not in by_index]
    if missing:  # pragma: no cover - would be a bug in the assignment
        raise DistributedCompressionError(f"compress_distributed: no result for layers {missing}.")

    # 5. Install in plan order, on the layers' own devices (as compress does).
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())  # before installing: the original names and order
    report = [dense_report_row(name, modules[name], reason) for name, reason in skipped]
    for index, job in enumerate(jobs):
        new, row = by_index[index]
        dev = job.module.weight.device
        _set_module(target, job.name, new.to(dev))
        report.append(row)
    position = {name: i for i, name in enumerate(modules)}
    report.sort(key=lambda row: position[row.name])
    return target, report


def _global_rank(group, group_rank: int) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def save_on_root(model: nn.Module | None, path: str | os.PathLike, *, group=None) -> None:
    """Write ``model`` with :func:`~tensorly_dataaware.torch.save_compressed` on rank 0 only.

    A collective: rank 0 writes atomically (temporary file + rename), then every rank learns
    whether it worked and raises :class:`DistributedCompressionError` if not. Call it only
    after :func:`compress_distributed` returned on every rank (i.e. every rank succeeded),
    so a failed run never leaves an output file. Other ranks may pass ``None``.
    """
    rank, _ = _rank_world(group)
    error = None
    if rank == 0:
        try:
            if model is None:
                raise ValueError("rank 0 has no model to save.")
            save_compressed(model, path)
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            error = f"writing {os.fspath(path)!r}: {_format_exception(exc)}"
    _agree(error is None, error, "save_on_root", group)


def default_timeout() -> datetime.timedelta:
    """Process-group timeout from ``TDA_DIST_TIMEOUT`` seconds (default 30 minutes)."""
    return datetime.timedelta(seconds=float(os.environ.get("TDA_DIST_TIMEOUT", "1800")))


# --------------------------------------------------------------------------------------------
# Sequential calibration
# --------------------------------------------------------------------------------------------


def _portable(module: nn.Module) -> nn.Module:
    """``module`` itself if it holds no accelerator tensor, else a CPU copy of it.

    What a broadcast pickles: a CUDA tensor would be unpickled on the sender's device index.
    A copy, because ``nn.Module.to`` moves in place and the sender keeps using its module.
    Meta tensors carry no data and pickle without a device index: they travel as they are.
    """
    tensors = itertools.chain(module.parameters(), module.buffers())
    if all(t.device.type in ("cpu", "meta") for t in tensors):
        return module
    return copy.deepcopy(module).to("cpu")


class _Collectives(_Local):
    """The collective steps of :func:`compress_sequential_distributed` (see ``_Local``).

    ``model`` is this rank's model: :meth:`decide` returns each new module on the device
    of this rank's layer (e.g. ``cuda:LOCAL_RANK``), as the single-process run installs it.
    """

    def __init__(self, group, chunk_bytes: int, model: nn.Module):
        self.group = group
        self.rank, self.world = _rank_world(group)
        self.chunk = max(1, int(chunk_bytes) // 8)
        self.model = model

    def agree(self, error, what):
        message = None if error is None else f"{what}: {_format_exception(error)}"
        _agree(error is None, message, "compress_sequential_distributed", self.group)

    def same(self, value, what):
        values = _all_gather(value, self.group)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedCompressionError(
                f"compress_sequential_distributed: ranks {differ} found a different {what} than rank 0 "
                "(different models or arguments on different ranks?)."
            )

    def reduce(self, moments):
        if self.world == 1:
            return
        comm = _comm_device(self.group)
        count = torch.tensor([moments.count], dtype=torch.int64, device=comm)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.group)
        moments.count = int(count.item())
        for tensor in moments.sum_tensors():
            self.reduce_tensor(tensor)

    def reduce_tensor(self, tensor):
        if self.world > 1:
            tensor.copy_(_reduce_tensor_(tensor, _comm_device(self.group), self.group, self.chunk))

    def _layer_device(self, name) -> torch.device:
        # The layer is not replaced yet when decide runs (in the model itself with inplace).
        try:
            return _compress_device(self.model.get_submodule(name))
        except AttributeError:  # pragma: no cover - the plan only holds the model's layers
            return _compress_device(self.model)

    def decide(self, compute, name):
        # Rank 0 factorizes and every rank installs its module: bit-identical models on all
        # ranks, whatever the ranks' devices and thread counts. The module travels on the CPU
        # and comes back on this rank's layer device: the caller installs it as it is, so a
        # CPU module in a CUDA model would break the next layer's pass. Rank 0 returns its own
        # module, which the broadcast must not move (nn.Module.to works in place).
        device = self._layer_device(name)
        payload = [None]
        new = None
        if self.rank == 0:
            try:
                new, row = compute()
                payload = [("ok", _portable(new), row)]
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                payload = [("error", f"rank 0, layer {name!r}: {_format_exception(exc)}", None)]
        dist.broadcast_object_list(payload, src=_global_rank(self.group, 0), group=self.group)
        status, received, row = payload[0]
        if status != "ok":
            raise DistributedCompressionError(f"compress_sequential_distributed failed: {received}")
        if self.rank == 0:
            return new.to(device), row
        return received.to(device), row

    def collect(self, model, batches, layers, max_batches):
        return collect_covariances_distributed(model, batches, layers, max_batches=max_batches, progress=False, group=self.group)


def compress_sequential_distributed(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "tucker2",
    *,
    ranks: Mapping[str, Any] | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    norm: str = "sigma",
    layers: Iterable[str] | None = None,
    centered: bool = True,
    bias_correction: bool = True,
    inplace: bool = False,
    return_report: bool = False,
    progress: bool | None = None,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    damping: float = 1e-6,
    cache_bytes: int = 2**30,
    refit: Iterable[str] | bool | None = None,
    refit_damping: float | str | None = "cv",
    target_damping: float | str | None = "auto",
    budget_weighting: str = "relative",
    fit_weighting: str | None = None,
    group=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    **solver_options,
):
    """:func:`~tensorly_dataaware.torch.compress_sequential` over data shards on all ranks.

    Every rank streams the paired patches of *its own shard* of the calibration batches
    (a ``DataLoader`` with a ``DistributedSampler``, or :func:`shard` of a *list* of batches:
    ``shard`` of a ``DataLoader`` is a one-shot iterator, which a sequential pass cannot
    re-read; ``max_batches`` applies per rank), the per-layer sums are all-reduced, rank 0
    factorizes the layer and broadcasts the new module, which every rank installs before
    the next layer. All ranks end with the same compressed model, equal to a single process
    over the union of the shards up to the float64 round-off of the summation order, with
    one exception: cross-validated ridges (below) use folds of each rank's own stream, so
    they can differ from a single process's unless every rank's batches hold a multiple of
    4 images. Call it on every rank with the same model (checked: names, shapes and values)
    and arguments.

    Parameters
    ----------
    model, batches, method, ranks, ratio, energy, budget, norm, layers, centered, bias_correction, inplace, return_report, max_batches, device, damping, cache_bytes, refit, refit_damping, target_damping, budget_weighting, fit_weighting, **solver_options
        As in :func:`~tensorly_dataaware.torch.compress_sequential`; ``batches`` is this
        rank's shard (re-iterable) and must not be empty. With ``refit_damping='cv'`` or
        ``target_damping='cv'`` (or ``'auto'`` on an underdetermined layer) the moments of
        every fold of images are all-reduced (fold
        ``k`` holds the images ``k``, ``k + 4``, ... of every rank's stream of batches); with a
        ``'fisher'`` weighting, the per-channel Fisher sums are all-reduced as well.
    progress : bool, optional
        Default: on rank 0 only.
    group : ProcessGroup, optional
        Default: the whole world.
    chunk_bytes : int, default 256 MiB
        Bound on one all-reduce buffer.

    Returns
    -------
    nn.Module or (nn.Module, list of LayerReport)

    Raises
    ------
    DistributedCompressionError
        On every rank, when a step failed on any rank (the message names the rank, the
        layer and the error).
    """
    _require_initialized()
    comm = _Collectives(group, chunk_bytes, model)
    if isinstance(model, nn.Module):  # else _run_sequential refuses it, on every rank alike
        _check_same_model(model, "compress_sequential_distributed", group)
    return _run_sequential(
        model, batches, method, ranks=ranks, ratio=ratio, energy=energy, budget=budget, norm=norm,
        layers=layers, centered=centered, bias_correction=bias_correction, inplace=inplace,
        return_report=return_report, progress=comm.rank == 0 if progress is None else progress,
        max_batches=max_batches, device=device, damping=damping, solver_options=solver_options,
        cache_bytes=cache_bytes, refit=refit, refit_damping=refit_damping, target_damping=target_damping,
        budget_weighting=budget_weighting, fit_weighting=fit_weighting, collectives=comm,
    )
