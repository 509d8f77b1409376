"""torch.distributed scale-out: gloo processes on the loopback interface, compared to one process.

Every multi-process test starts its workers with ``torch.multiprocessing.start_processes``
(spawn), on 127.0.0.1 with a free port, a 60 s process-group timeout and a hard deadline;
afterwards no worker may be alive.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch import nn  # noqa: E402

from tensorly_dataaware.torch import collect_covariances, compress, plan_compression  # noqa: E402
from tensorly_dataaware.torch import distributed as tdd  # noqa: E402
from tensorly_dataaware.torch.compress import LayerJob  # noqa: E402

DEADLINE_S = 120
N_BATCHES = 11  # not a multiple of 2 or 3: uneven shards


# ------------------------------------------------------------------------------------------
# The model, the data and the worker (module level: spawn pickles them by reference)
# ------------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.proj(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_model():
    torch.manual_seed(0)
    return SmallNet()


def make_batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(N_BATCHES)]


COMPRESS_KW = {
    "tucker2": dict(ratio=0.5, n_iter_max=4, random_state=0, progress=False),
    "cp": dict(ratio=0.5, n_iter_max=4, random_state=0, progress=False, init="random"),
}


def _join_gloo(rank, world, port):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo" if sys.platform.startswith("linux") else os.environ.get("GLOO_SOCKET_IFNAME", "lo0")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _worker(rank, world, port, outdir, method, fail_layer):
    _join_gloo(rank, world, port)
    result = {}
    try:
        model = make_model()
        stats = tdd.collect_covariances_distributed(model, tdd.shard(make_batches(), rank, world), progress=False)
        result["stats"] = {k: v.state_dict() for k, v in stats.items()}
        if fail_layer is not None and rank == 1:
            original = tdd.decompose_layer

            def failing(job, **kw):
                if job.name == fail_layer:
                    raise FloatingPointError(f"injected failure in {job.name}")
                return original(job, **kw)

            tdd.decompose_layer = failing
        out = os.path.join(outdir, "model.pt")
        try:
            small, report = tdd.compress_distributed(model, stats, method, **COMPRESS_KW[method])
            tdd.save_on_root(small, out)
            result["state"] = {k: v.clone() for k, v in small.state_dict().items()}
            result["report"] = [(r.name, r.rank, r.sigma_error, r.params_after) for r in report]
        except tdd.DistributedCompressionError as exc:
            result["error"] = str(exc)
            result["error_type"] = type(exc).__name__
            result["is_runtime_error"] = isinstance(exc, RuntimeError)
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(worker, world, outdir, *args):
    """Start ``world`` workers, wait (bounded), make sure none is left alive, load results."""
    import torch.multiprocessing as tmp

    ctx = tmp.start_processes(
        worker, args=(world, _free_port(), str(outdir), *args), nprocs=world, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} workers did not finish within {DEADLINE_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():  # only on failure of the test itself
                proc.kill()
            proc.join(5)
    assert not any(p.is_alive() for p in ctx.processes)
    assert all(p.exitcode == 0 for p in ctx.processes)
    assert not multiprocessing.active_children()
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _run(world, outdir, method="tucker2", fail_layer=None):
    return _spawn(_worker, world, outdir, method, fail_layer)


class _one_thread:
    """Match the workers' numerics (reductions split over threads round differently)."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


# ------------------------------------------------------------------------------------------
# Multi-process tests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, method", [(2, "tucker2"), (3, "cp")])
def test_statistics_and_compression_match_one_process(tmp_path, world, method):
    results = _run(world, tmp_path, method)
    model = make_model()
    with _one_thread():
        reference = collect_covariances(model, make_batches(), progress=False)
    # (a) all-reduced statistics == single-process statistics over the union of the shards
    for res in results:
        assert list(res["stats"]) == list(reference)
        for name, ref in reference.items():
            got = res["stats"][name]
            assert got["count"] == ref.count
            torch.testing.assert_close(got["sum"], ref.sum, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got["sum_outer"], ref.sum_outer, rtol=1e-10, atol=1e-10)
    # ... and bit-identical on every rank
    for res in results[1:]:
        for name in reference:
            assert torch.equal(res["stats"][name]["sum_outer"], results[0]["stats"][name]["sum_outer"])

    # (b) the compressed model == single-process compress on the same statistics
    from tensorly_dataaware.torch import LayerStatistics

    stats = {k: LayerStatistics.from_state_dict(v) for k, v in results[0]["stats"].items()}
    with _one_thread():
        small, report = compress(model, stats, method, return_report=True, **COMPRESS_KW[method])
    expected = small.state_dict()
    for res in results:
        assert list(res["state"]) == list(expected)
        for key, value in expected.items():
            assert torch.equal(res["state"][key], value), key
        assert res["report"] == [(r.name, r.rank, r.sigma_error, r.params_after) for r in report]
    assert (tmp_path / "model.pt").is_file()
    # the file rank 0 wrote loads into a fresh model and reproduces the compressed one
    from tensorly_dataaware.torch import load_compressed

    loaded = load_compressed(make_model(), tmp_path / "model.pt")
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_failing_rank_fails_every_rank_and_writes_nothing(tmp_path):
    results = _run(3, tmp_path, "tucker2", fail_layer="conv2")
    for res in results:
        assert "state" not in res
        assert res["is_runtime_error"]
        message = res["error"]
        assert "rank 1" in message and "conv2" in message and "injected failure" in message
        assert "FloatingPointError" in message
    assert not (tmp_path / "model.pt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp") or p.startswith(".tmp")]


# ------------------------------------------------------------------------------------------
# Single-process tests
# ------------------------------------------------------------------------------------------


def test_requires_initialized_process_group():
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        tdd.all_reduce_statistics({})


def test_shard_covers_everything_once():
    items = list(range(11))
    parts = [tdd.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert list(tdd.shard(iter(items), 1, 3)) == parts[1]
    with pytest.raises(ValueError):
        tdd.shard(items, 3, 3)


def test_assign_layers_balances_cost_not_count():
    costs = [100, 1, 1, 1, 1, 1, 1, 90]
    parts = tdd.assign_layers(costs, 2)
    assert sorted(sum(parts, [])) == list(range(len(costs)))
    assert parts == [[0], [1, 2, 3, 4, 5, 6, 7]]  # loads 100 / 96; a 4/4 count split gives >= 103
    assert all(p == sorted(p) for p in parts)
    # deterministic tie-breaks: equal costs go round-robin from rank 0
    assert tdd.assign_layers([1, 1, 1, 1], 3) == [[0, 3], [1], [2]]
    assert tdd.assign_layers([], 2) == [[], []]
    assert tdd.assign_layers([5], 3) == [[0], [], []]
    # with real jobs
    model = make_model()
    with _one_thread():
        stats = collect_covariances(model, make_batches()[:2], progress=False)
    jobs = plan_compression(model, stats, "tucker2", ratio=0.5)
    parts = tdd.assign_layers(jobs, 2)
    assert sorted(sum(parts, [])) == list(range(len(jobs)))
    with pytest.raises(ValueError):
        tdd.assign_layers(jobs, 0)


def _fake_job(name, shape, rank, method):
    n = 1
    for d in shape[1:]:
        n *= d
    return LayerJob(
        name, nn.Identity(), method, torch.empty(shape, device="meta"),
        torch.empty(n, n, device="meta"), torch.empty(n, device="meta"), rank,
    )


def test_estimate_memory_resnet50_layer4():
    shape = (512, 512, 3, 3)
    n = 4608
    cp = tdd.estimate_memory(shape, 1200, "cp")
    tucker = tdd.estimate_memory(shape, (256, 256), "tucker2")
    # at least the two n x n float64 matrices every solver holds, and sigma M terms for CP
    assert cp > 2 * n * n * 8 + 2 * n * 1200 * 8
    assert tucker > 2 * n * n * 8
    assert cp < 40 * n * n * 8 and tucker < 40 * n * n * 8
    assert tdd.estimate_memory(shape, 1200, "cp", dtype_bytes=4) < cp
    assert tdd.estimate_memory(shape, 2000, "cp") > cp  # grows with the rank
    job = _fake_job("layer4.0.conv2", shape, 1200, "cp")
    assert tdd.estimate_memory(job) == cp
    assert tdd.estimate_memory((10, 20), 5, "svd") > 0
    with pytest.raises(ValueError):
        tdd.estimate_memory(shape, None, "cp")


def test_check_memory_refuses_with_a_clear_message():
    jobs = [
        _fake_job("layer4.0.conv2", (512, 512, 3, 3), 1200, "cp"),
        _fake_job("layer1.0.conv2", (64, 64, 3, 3), 32, "cp"),
    ]
    with pytest.raises(tdd.MemoryBudgetError) as info:
        tdd.check_memory(jobs, "512MiB")
    message = str(info.value)
    assert "layer4.0.conv2" in message and "512x512x3x3" in message and "rank 1200" in message
    assert "MiB" in message or "GiB" in message
    assert "layer1.0.conv2" not in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)
    needs = tdd.check_memory(jobs, "1TiB")
    assert set(needs) == {"layer4.0.conv2", "layer1.0.conv2"}
    assert tdd.parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert tdd.parse_bytes(1000) == 1000
    with pytest.raises(ValueError):
        tdd.parse_bytes("lots")
    assert tdd.available_memory("cpu") > 0


# ------------------------------------------------------------------------------------------
# Sequential calibration over shards
# ------------------------------------------------------------------------------------------

# refit=True: the 1x1 `proj` and `fc` are refitted with a cross-validated ridge, from the
# all-reduced moments of every fold of images; target_damping='cv' does the same for the
# targets of the compressed layers after the first.
SEQ_KW = dict(
    ratio=0.5, n_iter_max=4, random_state=0, progress=False, return_report=True,
    layers=["conv1", "conv2", "conv3"], refit=True, target_damping="cv",
)
# The Fisher options: the per-channel Fisher sums are all-reduced too.
SEQ_KW_FISHER = dict(
    budget=0.5, n_iter_max=4, random_state=0, progress=False, return_report=True,
    layers=["conv1", "conv2", "conv3"], budget_weighting="fisher", fit_weighting="fisher",
)


def _sequential_worker(rank, world, port, outdir, fail, kw=None):
    kw = SEQ_KW if kw is None else kw
    _join_gloo(rank, world, port)
    result = {}
    try:
        batches = tdd.shard(make_batches(), rank, world)
        if fail and rank == 1:
            batches[0] = batches[0].clone()
            batches[0][0, 0, 0, 0] = float("nan")
        try:
            small, report = tdd.compress_sequential_distributed(make_model(), batches, "tucker2", **kw)
            result["state"] = {k: v.clone() for k, v in small.state_dict().items()}
            result["report"] = [(r.name, r.rank, r.params_after, r.notes) for r in report]
        except tdd.DistributedCompressionError as exc:
            result["error"] = str(exc)
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _run_sequential_workers(world, outdir, fail=False, kw=None):
    return _spawn(_sequential_worker, world, outdir, fail, kw)


# The full (K-FAC) Fisher: its T x T sums are all-reduced as one flat tensor.
SEQ_KW_KFAC = {**SEQ_KW_FISHER, "fit_weighting": "kfac"}


@pytest.mark.parametrize("kw", [SEQ_KW, SEQ_KW_FISHER, SEQ_KW_KFAC], ids=["cv-ridges", "fisher", "kfac"])
def test_sequential_distributed_matches_one_process(tmp_path, kw):
    from tensorly_dataaware.torch import compress_sequential

    results = _run_sequential_workers(2, tmp_path, kw=kw)
    with _one_thread():
        small, report = compress_sequential(make_model(), make_batches(), "tucker2", **kw)
    expected = small.state_dict()
    for res in results:
        assert "error" not in res, res.get("error")
        # The same layers, ranks and (cross-validated) ridges.
        assert res["report"] == [(r.name, r.rank, r.params_after, r.notes) for r in report]
        for key, value in expected.items():
            # Sums over shards round differently from one sum: equal up to that round-off.
            torch.testing.assert_close(res["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    # ... and every rank holds exactly the same model.
    for key in expected:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key])


def test_sequential_distributed_failure_reaches_every_rank(tmp_path):
    results = _run_sequential_workers(2, tmp_path, fail=True)
    for res in results:
        assert "state" not in res
        assert "rank 1" in res["error"] and "NaN" in res["error"]


def _failure_modes_worker(rank, world, port, outdir):
    """Failures that used to hang the other rank, or went unnoticed: each must end with a
    DistributedCompressionError naming rank 1 on every rank (the group stays usable)."""
    _join_gloo(rank, world, port)

    def other_model():
        model = make_model()
        if rank == 1:
            with torch.no_grad():
                model.conv2.weight.mul_(1.5)
        return model

    def nan_in_second_batch():
        batches = [b.clone() for b in tdd.shard(make_batches(), rank, world)]
        if rank == 1:
            batches[1][0, 0, 0, 0] = float("nan")
        return batches

    shard = tdd.shard(make_batches(), rank, world)
    same_stats = tdd.collect_covariances_distributed(make_model(), shard, progress=False)
    modes = {
        "collect, other model": lambda: tdd.collect_covariances_distributed(other_model(), shard, progress=False),
        "compress, other model": lambda: tdd.compress_distributed(other_model(), same_stats, "tucker2",
                                                                   **COMPRESS_KW["tucker2"]),
        "sequential, other model": lambda: tdd.compress_sequential_distributed(other_model(), shard, "tucker2",
                                                                                **SEQ_KW),
        # The output Fisher's all-reduce waited for the rank that had failed before it.
        "sequential fisher, NaN": lambda: tdd.compress_sequential_distributed(
            make_model(), nan_in_second_batch(), "tucker2", **{**SEQ_KW_FISHER, "cache_bytes": 0}),
        # The reference cache's pass raised on one rank only.
        "sequential, NaN": lambda: tdd.compress_sequential_distributed(make_model(), nan_in_second_batch(), "tucker2",
                                                                       **SEQ_KW),
        "sequential, one-shot iterator": lambda: tdd.compress_sequential_distributed(
            make_model(), iter(shard) if rank == 1 else shard, "tucker2", **SEQ_KW),
    }
    result = {}
    try:
        for mode, run in modes.items():
            try:
                run()
                result[mode] = None
            except tdd.DistributedCompressionError as exc:
                result[mode] = str(exc)
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_failures_on_one_rank_stop_every_rank_without_hanging(tmp_path):
    results = _spawn(_failure_modes_worker, 2, tmp_path)
    for res in results:
        for mode, error in res.items():
            assert error is not None and "rank 1" in error, (mode, error)
    assert "differs from rank 0" in results[0]["compress, other model"]
    assert "NaN" in results[0]["sequential fisher, NaN"]
    assert "one-shot iterator" in results[0]["sequential, one-shot iterator"]


# ------------------------------------------------------------------------------------------
# Argument checks, reports and devices (a world of one process, in this process)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(monkeypatch):
    """A gloo process group of this process alone, destroyed afterwards."""
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialized")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "method, norm, options",
    [("svd", "sigma", {"n_iter_maxx": 3}), ("tucker2", "frobenius", {"n_iter_maxx": 3}), ("cp", "frobenius", {"init": "svd"})],
)
def test_distributed_refuses_solver_options_like_compress(world_of_one, method, norm, options):
    # compress_distributed used to drop them silently: a typo or an option the Frobenius
    # solvers ignore must fail, before any work, as in compress and compress_sequential.
    from tensorly_dataaware.torch import compress_sequential

    model = make_model()
    with _one_thread():
        stats = collect_covariances(model, make_batches()[:2], progress=False)
    kw = dict(ratio=0.5, norm=norm, progress=False, **options)
    with pytest.raises(TypeError, match="Unknown solver option") as expected:
        compress(model, stats, method, **kw)
    with pytest.raises(TypeError, match="Unknown solver option") as got:
        tdd.compress_distributed(model, stats, method, **kw)
    assert str(got.value) == str(expected.value)
    batches = make_batches()[:2]
    with pytest.raises(TypeError, match="Unknown solver option") as expected:
        compress_sequential(model, batches, method, **kw)
    with pytest.raises(TypeError, match="Unknown solver option") as got:
        tdd.compress_sequential_distributed(model, batches, method, **kw)
    assert str(got.value) == str(expected.value)


def test_distributed_refuses_torchscript_like_compress(world_of_one):
    # A script module's layers are script modules: every layer was "skipped" and the model
    # came back uncompressed, with an empty report and only per-layer warnings.
    model = make_model().eval()
    with _one_thread():
        stats = collect_covariances(model, make_batches()[:2], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    with pytest.raises(TypeError, match="TorchScript") as expected:
        compress(scripted, stats, "tucker2", ratio=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old path warned about every layer instead
        with pytest.raises(TypeError, match="TorchScript") as got:
            tdd.compress_distributed(scripted, stats, "tucker2", ratio=0.5, progress=False)
        with pytest.raises(TypeError, match="torch.nn.Module"):
            tdd.compress_distributed(model.state_dict(), stats, "tucker2", ratio=0.5, progress=False)
    assert str(got.value) == str(expected.value)


class GroupedNet(nn.Module):
    """A grouped convolution (kept dense, with a report row) between two compressed layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.grouped(torch.relu(self.conv1(x)))))


def test_distributed_report_lists_dense_layers_like_compress(world_of_one):
    torch.manual_seed(0)
    model = GroupedNet()
    with _one_thread():
        stats = collect_covariances(model, make_batches()[:2], progress=False)
        with pytest.warns(UserWarning, match="grouped"):
            _, expected = compress(model, stats, "tucker2", return_report=True, **COMPRESS_KW["tucker2"])
        with pytest.warns(UserWarning, match="grouped"):
            _, report = tdd.compress_distributed(model, stats, "tucker2", **COMPRESS_KW["tucker2"])

    def rows(rep):
        return [(r.name, r.method, r.rank, r.params_after, r.sigma_error, r.notes) for r in rep]

    assert [r.name for r in report] == ["conv1", "grouped", "conv2"]  # module order
    assert report[1].method == "dense" and "kept dense" in report[1].notes[0]
    assert rows(report) == rows(expected)


class _Row:
    """A picklable stand-in for a report row."""


def test_sequential_decide_does_not_move_the_module_of_rank_0(world_of_one):
    # decide used to send new.to("cpu"): nn.Module.to moves in place, so rank 0 installed
    # its layer on the CPU in a CUDA model (and the next layer's pass failed). The meta
    # device stands in for CUDA on a CPU-only machine.
    model = nn.Sequential(nn.Linear(4, 3)).to("meta")
    new = nn.Linear(4, 3, device="meta")
    comm = tdd._Collectives(None, tdd.DEFAULT_CHUNK_BYTES, model)
    got, row = comm.decide(lambda: (new, _Row()), "0")
    assert got is new
    assert got.weight.device.type == "meta" and got.bias.device.type == "meta"
    assert isinstance(row, _Row)


def _decide_worker(rank, world, port, outdir):
    _join_gloo(rank, world, port)
    result = {}
    try:
        # Rank 0's layer on the CPU, rank 1's on 'meta': as cuda:0 and cuda:1, each rank must
        # get the broadcast module on its own layer's device (it used to stay on the CPU).
        model = nn.Sequential(nn.Linear(4, 3)).to("cpu" if rank == 0 else "meta")
        torch.manual_seed(0)
        new = nn.Linear(4, 3)
        comm = tdd._Collectives(None, tdd.DEFAULT_CHUNK_BYTES, model)
        got, _ = comm.decide(lambda: (new, _Row()), "0")
        result["device"] = str(got.weight.device)
        result["same_object"] = got is new
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_sequential_decide_returns_modules_on_each_ranks_device(tmp_path):
    results = _spawn(_decide_worker, 2, tmp_path)
    assert results[0]["device"] == "cpu" and results[0]["same_object"]
    assert results[1]["device"] == "meta"
