"""One command line for distributed runs: ``torchrun -m tensorly_dataaware compress --distributed``."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from tensorly_dataaware.cli import main  # noqa: E402
from tensorly_dataaware.torch import distributed as tdd  # noqa: E402
from tensorly_dataaware.torch import load_compressed, load_statistics  # noqa: E402

from .test_cli import TinyNet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    state = tmp_path / "state.pt"
    torch.save(TinyNet(width=12).state_dict(), state)
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (48, 12, 12), dtype=np.uint8), labels=rng.integers(0, 4, 48))
    return ["--model-file", str(state), "--model-class", "tests.test_cli:TinyNet", "--model-kwargs", '{"width": 12}',
            "--data-dir", str(data)]


def test_unknown_layer_is_reported_as_unknown_not_as_empty_shards(torch_single_thread):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        batches = [torch.randn(2, 1, 8, 8) for _ in range(2)]
        with pytest.raises(tdd.DistributedCompressionError) as info:
            tdd.collect_covariances_distributed(TinyNet(), batches, ["conv2", "conv2x"], progress=False)
        assert "conv2x" in str(info.value) and "unknown" in str(info.value)
        assert "empty" not in str(info.value)
        # an empty shard on its own is still fine when another rank has data (here: none at all)
        with pytest.raises(ValueError, match="empty"):
            tdd.collect_covariances_distributed(TinyNet(), [], ["conv2"], progress=False)
    finally:
        dist.destroy_process_group()


def test_compress_distributed_in_one_process(files, tmp_path, capsys):
    out = tmp_path / "small.pt"
    stats = tmp_path / "stats.pt"
    code = main(["compress", *files, "--distributed", "--backend", "gloo", "--ratio", "0.5", "--n-iter-max", "3",
                 "--no-progress", "--output", str(out), "--stats-out", str(stats)])
    assert code == 0, capsys.readouterr().err
    assert "on 1 rank(s)" in capsys.readouterr().out
    loaded = load_compressed(TinyNet(width=12), out)
    assert type(loaded.conv2).__name__ == "Tucker2Conv2d" and stats.is_file()
    # --positions-per-image reaches the distributed collection (it was dropped): 48 images
    # of TinyNet's conv2, 5 positions each.
    code = main(["compress", *files, "--distributed", "--backend", "gloo", "--ratio", "0.5", "--n-iter-max", "3",
                 "--no-progress", "--positions-per-image", "5", "--stats-out", str(tmp_path / "sub.pt")])
    assert code == 0, capsys.readouterr().err
    assert {st.count for st in load_statistics(tmp_path / "sub.pt").values()} == {48 * 5}
    # A plan over --max-memory fails after the statistics: nothing is written then (the
    # statistics file was, although the help promises outputs only when every step succeeds).
    code = main(["compress", *files, "--distributed", "--backend", "gloo", "--ratio", "0.5", "--n-iter-max", "3",
                 "--no-progress", "--max-memory", "1KiB", "--stats-out", str(tmp_path / "fail.pt"),
                 "--output", str(tmp_path / "fail_model.pt")])
    assert code == 1 and "memory budget" in capsys.readouterr().err
    assert not (tmp_path / "fail.pt").exists() and not (tmp_path / "fail_model.pt").exists()
    # --sequential needs a batch per rank: 48 images in one batch for 2 ranks was refused by
    # rank 1 with "`batches` yielded no batch". Two ranks are pretended (the check comes
    # before any collective).
    import torch.distributed as tdist

    real = tdist.get_world_size
    tdist.get_world_size = lambda *a, **k: 2
    try:
        code = main(["compress", *files, "--distributed", "--backend", "gloo", "--sequential", "--ratio", "0.5",
                     "--batch-size", "64", "--no-progress"])
    finally:
        tdist.get_world_size = real
    err = capsys.readouterr().err
    assert code == 1 and "at least one calibration batch per rank" in err and "--batch-size" in err, err
    # the same validation as without --distributed, before any process group exists
    code = main(["compress", *files, "--distributed", "--layers", "conv9", "--no-progress"])
    assert code == 2 and "conv9" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_dist_main_is_no_second_command_line():
    result = subprocess.run([sys.executable, "-m", "tensorly_dataaware.torch.dist_main", "--help"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "compress --distributed" in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes(files, tmp_path):
    out = tmp_path / "small.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tensorly_dataaware", "compress", "--distributed", "--backend", "gloo", "--timeout", "120",
               *files, "--ratio", "0.5", "--n-iter-max", "3", "--no-progress"]
    result = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 rank(s)" in result.stdout
    load_compressed(TinyNet(width=12), out)
    # a bad argument: every rank stops with the CLI's one-line message, nothing is written
    bad = tmp_path / "bad.pt"
    result = subprocess.run([*command, "--layers", "conv9", "--output", str(bad)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=env)
    assert result.returncode != 0
    # the ranks print the one-line message (torchrun may stop the second rank before it
    # prints, once the first has exited); the only traceback is torchrun's own report
    assert result.stderr.count("tensorly-dataaware compress: error: unknown or unsupported layer(s) ['conv9']") >= 1
    assert "tensorly_dataaware/" not in result.stderr
    assert not bad.exists()
