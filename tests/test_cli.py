"""The ``tensorly-dataaware`` command line, run in-process through ``main([...])``."""

import json
import os
import pathlib
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorly_dataaware.cli import main  # noqa: E402
from tensorly_dataaware.torch import compress, load_compressed, load_statistics  # noqa: E402


class TinyNet(nn.Module):
    """Three 3x3 convolutions and a classifier, small enough for a fast round trip."""

    def __init__(self, width: int = 12, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class NoneAuxNet(TinyNet):
    """TinyNet returning ``(logits, None)``: an output ONNX cannot hold."""

    def forward(self, x):
        return super().forward(x), None


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems; extra threads only contend on a busy machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_files(tmp_path):
    """A trained-looking TinyNet saved both ways, and a .npz of random labelled images."""
    torch.manual_seed(0)
    model = TinyNet(width=12).eval()
    full = tmp_path / "tiny_full.pt"
    torch.save(model, full)
    state = tmp_path / "tiny_state.pt"
    torch.save(model.state_dict(), state)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(96, 12, 12), dtype=np.uint8)
    data = tmp_path / "calib.npz"
    np.savez(data, images=images, labels=rng.integers(0, 4, size=96))
    return {"model": model, "full": full, "state": state, "data": data, "images": images}


@pytest.mark.parametrize("command", [[], ["demo"], ["compress"], ["collect"], ["info"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: tensorly-dataaware" in out
    if command and command[0] != "info":
        assert "examples:" in out


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "tensorly_dataaware", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "compress" in result.stdout


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tensorly-dataaware" in out and "pytorch" in out and "CUDA" in out
    assert "resnet20" in out and "test accuracy" in out


def test_demo_small_end_to_end(tmp_path, capsys):
    out_base = tmp_path / "demo.json"
    code = main([
        "demo", "--calib-samples", "200", "--eval-samples", "300", "--ratios", "0.3",
        "--n-iter-max", "5", "--no-progress", "--threads", "1", "--output", str(out_base),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sigma" in printed and "frobenius" in printed and "original" in printed and "sequential" in printed

    payload = json.loads(out_base.read_text())
    assert payload["config"]["calib_samples"] == 200 and payload["config"]["eval_samples"] == 300
    assert "conv1" not in payload["config"]["layers"]  # the first conv stays dense by default
    rows = payload["rows"]
    assert [r["norm"] for r in rows] == ["original", "sigma", "frobenius", "sequential"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
    original = rows[0]
    for row in rows[1:]:
        assert row["ratio"] == 0.3 and row["method"] == "tucker2"
        assert row["params_before"] == original["params_before"]
        # ranks are the largest that keep at most the ratio in every layer
        assert 0.15 < row["kept_fraction"] <= 0.3
        assert row["params_after"] == pytest.approx(row["kept_fraction"] * row["params_before"])
        assert row["model_conv_params"] < original["model_conv_params"]
        assert row["accuracy_drop"] == pytest.approx(original["accuracy"] - row["accuracy"])
        assert len(row["layers"]) == len(payload["config"]["layers"])
    csv_lines = (tmp_path / "demo.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("model,ratio,method,norm") and len(csv_lines) == 1 + len(rows)
    # written like a plain open() would (not the owner-only 0600 of a bare mkstemp)
    plain = tmp_path / "plain"
    plain.write_text("")
    for name in ("demo.json", "demo.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


@pytest.mark.parametrize("how", ["full", "state_dict"])
def test_compress_round_trip(tiny_files, tmp_path, how, capsys):
    out = tmp_path / "small.pt"
    stats_path = tmp_path / "stats.pt"
    if how == "full":
        model_args = ["--model-file", str(tiny_files["full"]), "--allow-pickle"]
    else:
        model_args = ["--model-file", str(tiny_files["state"]), "--model-class", "tests.test_cli:TinyNet",
                      "--model-kwargs", '{"width": 12}']
    code = main([
        "compress", *model_args, "--data-dir", str(tiny_files["data"]), "--ratio", "0.5",
        "--n-iter-max", "10", "--no-progress", "--stats-out", str(stats_path), "--output", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "conv3" in printed and "kept" in printed
    assert "accuracy on 96 calibration images" in printed

    # The saved file rebuilds into a fresh TinyNet ...
    loaded = load_compressed(TinyNet(width=12), out).eval()
    assert type(loaded.conv1) is nn.Conv2d  # the first conv is left dense by default
    assert type(loaded.conv2).__name__ == "Tucker2Conv2d"
    # ... that computes what the library's compress computes with the same statistics.
    stats = load_statistics(stats_path)
    assert sorted(stats) == ["conv2", "conv3"]
    expected = compress(tiny_files["model"], stats, "tucker2", ratio=0.5, layers=["conv2", "conv3"],
                        progress=False, n_iter_max=10, random_state=0).eval()
    x = torch.from_numpy(((tiny_files["images"][:16, None] / 255.0 - 0.286) / 0.353).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(loaded(x), tiny_files["model"](x))


def test_compress_sequential(tiny_files, tmp_path, capsys):
    from tensorly_dataaware.torch import compress_sequential

    out = tmp_path / "seq.pt"
    code = main([
        "compress", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
        "--ratio", "0.5", "--sequential", "--batch-size", "32", "--n-iter-max", "10", "--no-progress",
        "--output", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sequential calibration of 2 layers on 96 images" in printed
    loaded = load_compressed(TinyNet(width=12), out).eval()
    x = torch.from_numpy(((tiny_files["images"][:, None] / 255.0 - 0.286) / 0.353).astype(np.float32))
    expected = compress_sequential(
        tiny_files["model"], [x[s : s + 32] for s in range(0, 96, 32)], "tucker2", ratio=0.5,
        layers=["conv2", "conv3"], progress=False, n_iter_max=10, random_state=0,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:16]), expected(x[:16]), rtol=1e-5, atol=1e-6)
    # It streams its own statistics: files of statistics do not apply.
    code = main([
        "compress", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
        "--ratio", "0.5", "--sequential", "--stats-out", str(tmp_path / "s.pt"), "--no-progress",
    ])
    err = capsys.readouterr().err
    assert code == 2 and "--sequential" in err and len(err.strip().splitlines()) == 1


def test_compress_sequential_refit(tiny_files, tmp_path, capsys):
    from tensorly_dataaware.torch import compress_sequential

    out = tmp_path / "seq.pt"
    args = ["compress", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
            "--ratio", "0.5", "--batch-size", "32", "--n-iter-max", "10", "--no-progress"]
    assert main(args + ["--sequential", "--refit", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "refit" in printed and "fc" in printed
    loaded = load_compressed(TinyNet(width=12), out).eval()
    x = torch.from_numpy(((tiny_files["images"][:, None] / 255.0 - 0.286) / 0.353).astype(np.float32))
    batches = [x[s : s + 32] for s in range(0, 96, 32)]
    options = dict(ratio=0.5, layers=["conv2", "conv3"], progress=False, n_iter_max=10, random_state=0)
    expected = compress_sequential(tiny_files["model"], batches, "tucker2", refit=True, **options).eval()
    plain = compress_sequential(tiny_files["model"], batches, "tucker2", **options).eval()
    # The classifier was refitted (it differs from the plain sequential run's) and the file holds it.
    assert not torch.equal(expected.fc.weight, plain.fc.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:16]), expected(x[:16]), rtol=1e-5, atol=1e-6)
    # --refit only means something during sequential calibration.
    assert main(args + ["--refit"]) == 2
    err = capsys.readouterr().err
    assert "--refit" in err and "--sequential" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", [["--fisher"], ["--fisher", "kfac"]], ids=["fisher", "kfac"])
def test_compress_sequential_fisher(tiny_files, tmp_path, capsys, flag):
    from tensorly_dataaware.torch import compress_sequential

    out = tmp_path / "seq_fisher.pt"
    args = ["compress", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
            "--budget", "0.5", "--batch-size", "32", "--n-iter-max", "10", "--no-progress"]
    assert main(args + ["--sequential", *flag, "--output", str(out)]) == 0
    capsys.readouterr()
    loaded = load_compressed(TinyNet(width=12), out).eval()
    x = torch.from_numpy(((tiny_files["images"][:, None] / 255.0 - 0.286) / 0.353).astype(np.float32))
    batches = [x[s : s + 32] for s in range(0, 96, 32)]
    options = dict(budget=0.5, layers=["conv2", "conv3"], progress=False, n_iter_max=10, random_state=0)
    expected = compress_sequential(tiny_files["model"], batches, "tucker2", budget_weighting="fisher",
                                   fit_weighting=flag[-1].lstrip("-"), **options).eval()
    plain = compress_sequential(tiny_files["model"], batches, "tucker2", **options).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:16]), expected(x[:16]), rtol=1e-5, atol=1e-6)
        # ... and the weighting made a difference (the flag was not silently dropped).
        assert not torch.allclose(loaded(x[:16]), plain(x[:16]), rtol=1e-4, atol=1e-5)
    # --fisher only means something during sequential calibration.
    assert main(args + ["--fisher"]) == 2
    err = capsys.readouterr().err
    assert "--fisher" in err and "--sequential" in err and len(err.strip().splitlines()) == 1


def test_compress_sequential_target_damping(tiny_files, tmp_path, capsys):
    from tensorly_dataaware.torch import compress_sequential

    out = tmp_path / "seq_tcv.pt"
    args = ["compress", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
            "--ratio", "0.5", "--batch-size", "32", "--n-iter-max", "10", "--no-progress"]
    assert main(args + ["--sequential", "--target-damping", "cv", "--output", str(out)]) == 0
    capsys.readouterr()
    loaded = load_compressed(TinyNet(width=12), out).eval()
    x = torch.from_numpy(((tiny_files["images"][:, None] / 255.0 - 0.286) / 0.353).astype(np.float32))
    batches = [x[s : s + 32] for s in range(0, 96, 32)]
    options = dict(ratio=0.5, layers=["conv2", "conv3"], progress=False, n_iter_max=10, random_state=0)
    expected = compress_sequential(tiny_files["model"], batches, "tucker2", target_damping="cv", **options).eval()
    heavy = compress_sequential(tiny_files["model"], batches, "tucker2", target_damping=10.0, **options).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:16]), expected(x[:16]), rtol=1e-5, atol=1e-6)
    # A number is passed on as the ridge (a large one changes the fit: the flag is not dropped).
    heavy_out = tmp_path / "seq_heavy.pt"
    assert main(args + ["--sequential", "--target-damping", "10", "--output", str(heavy_out)]) == 0
    capsys.readouterr()
    with torch.no_grad():
        got = load_compressed(TinyNet(width=12), heavy_out).eval()(x[:16])
        torch.testing.assert_close(got, heavy(x[:16]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, expected(x[:16]), rtol=1e-4, atol=1e-5)
    # It only means something during sequential calibration, and takes 'cv' or a number >= 0.
    assert main(args + ["--target-damping", "cv"]) == 2
    err = capsys.readouterr().err
    assert "--target-damping" in err and "--sequential" in err and len(err.strip().splitlines()) == 1
    for bad in ("-1", "abc", "inf"):
        assert main(args + ["--sequential", "--target-damping", bad]) == 2
        assert "--target-damping" in capsys.readouterr().err


def test_collect_then_compress_with_stats_in(tiny_files, tmp_path, capsys):
    stats_path = tmp_path / "all.pt"
    assert main(["collect", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
                 "--all-layers", "--no-progress", "--output", str(stats_path)]) == 0
    assert sorted(load_statistics(stats_path)) == ["conv1", "conv2", "conv3", "fc"]
    out = tmp_path / "small.pt"
    assert main(["compress", "--model-file", str(tiny_files["full"]), "--allow-pickle", "--data-dir", str(tiny_files["data"]),
                 "--stats-in", str(stats_path), "--ranks", '{"conv3": [6, 6]}', "--norm", "frobenius",
                 "--no-progress", "--output", str(out)]) == 0
    loaded = load_compressed(TinyNet(width=12), out)
    assert type(loaded.conv2) is nn.Conv2d and list(loaded.conv3.ranks) == [6, 6]
    assert "(6, 6)" in capsys.readouterr().out


class Exploding(nn.Module):
    """A model class whose constructor fails (any exception must become a one-line error)."""

    def __init__(self, **kwargs):
        super().__init__()
        raise ZeroDivisionError("the constructor blew up")


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _error(capsys, argv):
    """Run ``main(argv)``: exit code 2 and exactly one line on stderr, no traceback."""
    code = main([*argv, "--no-progress"])  # progress bars also write to stderr
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _tree(folder):
    """Every file under ``folder`` with its bytes (to prove that nothing was written)."""
    return {p: p.read_bytes() for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def _state_args(tiny_files):
    return ["--model-file", str(tiny_files["state"]), "--model-class", "tests.test_cli:TinyNet",
            "--model-kwargs", '{"width": 12}']


# ---------------------------------------------------------------------------------------
# Item 1: no output may overwrite an input or another output
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["model", "data", "collect_model", "stats_vs_output", "stats_in",
                                  "symlink", "hardlink", "ranks_file", "demo_json_csv"])
def test_outputs_never_overwrite_inputs(tiny_files, tmp_path, capsys, case):
    model = _state_args(tiny_files)
    data = ["--data-dir", str(tiny_files["data"])]
    stats = tmp_path / "stats.pt"
    stats.write_bytes(b"pretend statistics")
    ranks = tmp_path / "ranks.json"
    ranks.write_text('{"conv2": [4, 4]}')
    link = tmp_path / "link.pt"
    if case == "symlink":
        link.symlink_to(tiny_files["state"])
    if case == "hardlink":
        os.link(tiny_files["state"], link)
    if case == "demo_json_csv":
        (tmp_path / "table.csv").write_text("csv")
        (tmp_path / "table.json").symlink_to(tmp_path / "table.csv")
    argv = {
        "model": ["compress", *model, *data, "--output", str(tiny_files["state"])],
        "data": ["compress", *model, *data, "--output", str(tiny_files["data"])],
        "collect_model": ["collect", *model, *data, "--output", str(tiny_files["state"])],
        "stats_vs_output": ["compress", *model, *data, "--stats-out", str(tmp_path / "x.pt"),
                            "--output", str(tmp_path / "x.pt")],
        "stats_in": ["compress", *model, *data, "--stats-in", str(stats), "--output", str(stats)],
        "symlink": ["compress", *model, *data, "--output", str(link)],
        "hardlink": ["compress", *model, *data, "--output", str(link)],
        "ranks_file": ["compress", *model, *data, "--ranks", str(ranks), "--output", str(ranks)],
        "demo_json_csv": ["demo", "--output", str(tmp_path / "table")],
    }[case]
    before = _tree(tmp_path)
    err = _error(capsys, argv)
    assert "same file" in err
    assert _tree(tmp_path) == before  # nothing written, nothing replaced


def test_an_output_over_the_model_class_source_is_refused(tmp_path, capsys, monkeypatch):
    """The module --model-class imports is an input too: --stats-out mynet.py replaced it."""
    source = tmp_path / "mynet_audit.py"
    source.write_text("from tests.test_cli import TinyNet as Net\n")
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    before = source.read_bytes()
    err = _error(capsys, ["compress", "--model-file", "w.pt", "--model-class", "mynet_audit:Net",
                          "--embedded", "--stats-out", "mynet_audit.py"])
    assert "same file" in err and "--model-class" in err, err
    assert source.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind", ["fifo", "trailing-slash"])
def test_outputs_that_are_not_regular_files_are_refused(tiny_files, tmp_path, capsys, monkeypatch, kind):
    """A FIFO or device (e.g. /dev/null) was replaced by a regular file; `out/` wrote `out`."""
    _no_work(monkeypatch)
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
        text, match = str(target), "not a regular file"
    else:
        text, match = str(tmp_path / "newdir") + os.sep, "ends with a path separator"
    err = _error(capsys, ["compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]),
                          "--output", text])
    assert match in err, err
    assert not (tmp_path / "newdir").exists()
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_options_that_would_be_ignored_are_refused(tiny_files, capsys, monkeypatch):
    """--model-class with the embedded --model, and --damping / --uncentered with a one-shot
    Frobenius fit, changed nothing and said nothing."""
    _no_work(monkeypatch)
    data = ["--data-dir", str(tiny_files["data"])]
    for extra in (["--model-class", "tests.test_cli:TinyNet"], ["--model-kwargs", "{}"], ["--allow-pickle"]):
        err = _error(capsys, ["compress", "--model", "resnet20", "--embedded", *extra])
        assert extra[0] in err and "--model resnet20" in err, err
    base = ["compress", *_state_args(tiny_files), *data, "--norm", "frobenius"]
    for extra, flag in ((["--damping", "0.1"], "--damping"), (["--uncentered"], "--uncentered")):
        err = _error(capsys, [*base, *extra])
        assert flag in err and "frobenius" in err, err
    # Where they matter they are accepted: --uncentered ranks --energy / --budget by the
    # whitened spectra, and the sequential targets use both.
    for extra in (["--uncentered", "--budget", "0.5"], ["--sequential", "--damping", "0.1"]):
        with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
            main([*base, *extra, "--no-progress"])


def test_state_dict_mismatch_names_the_keys(tiny_files, tmp_path, capsys):
    """The message stopped at load_state_dict's first line ('Error(s) in loading state_dict
    for Net:'), without the keys and shapes that differ."""
    state = TinyNet(width=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.pt")
    err = _error(capsys, ["compress", "--model-file", str(tmp_path / "wrong.pt"), "--model-class",
                          "tests.test_cli:TinyNet", "--data-dir", str(tiny_files["data"])])
    assert "extra.weight" in err and "conv1.weight" in err and "size mismatch" in err, err


def test_collect_refuses_a_layer_the_forward_never_calls(tiny_files, tmp_path, capsys):
    """collect wrote statistics without the layer (only a RuntimeWarning said so); compress
    announced statistics of every layer before refusing."""
    class Unused(TinyNet):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.spare = nn.Conv2d(24, 24, 3)

    import tests.test_cli as this

    this.UnusedAudit = Unused  # importable by --model-class
    torch.save(Unused(width=12).state_dict(), tmp_path / "unused.pt")
    model = ["--model-file", str(tmp_path / "unused.pt"), "--model-class", "tests.test_cli:UnusedAudit",
             "--data-dir", str(tiny_files["data"]), "--calib-samples", "8"]
    try:
        err = _error(capsys, ["collect", *model, "--layers", "conv2", "spare", "--output", str(tmp_path / "s.pt")])
        assert "never called ['spare']" in err and not (tmp_path / "s.pt").exists(), err
        code = main(["compress", *model, "--layers", "conv2", "spare", "--no-progress"])
        captured = capsys.readouterr()
        assert code == 2 and "never called ['spare']" in captured.err
        assert "statistics of 2 layers" not in captured.out
    finally:
        del this.UnusedAudit


def test_the_model_is_saved_before_the_report_is_printed(tiny_files, tmp_path, capsys, monkeypatch):
    """Output piped into `head` ended with a broken pipe before --output was written."""
    import tensorly_dataaware.torch as adapter

    def broken(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(adapter, "format_report", broken)
    out = tmp_path / "small.pt"
    code = main(["compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--calib-samples",
                 "16", "--ratio", "0.5", "--n-iter-max", "2", "--output", str(out), "--no-progress"])
    assert code == 2 and out.is_file()
    assert type(load_compressed(TinyNet(width=12), out).conv2).__name__ == "Tucker2Conv2d"


def test_sigterm_unwinds_like_ctrl_c_and_the_handler_is_restored(monkeypatch, capsys):
    """SIGTERM killed the process where it stood, leaving an atomic write's temporary file."""
    import signal

    import tensorly_dataaware.cli as cli_module

    cleaned = []

    def run(_args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)
        return 0

    monkeypatch.setattr(cli_module, "_run", run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info"]) == 143 and cleaned == [True]
    assert "terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_file_that_is_not_numpy_is_not_called_pickled(tiny_files, tmp_path, capsys, monkeypatch):
    """np.load read any non-NumPy file as a pickle: the message said the file 'contains pickled
    data' and suggested allow_pickle=True, i.e. loading an untrusted file unsafely."""
    _no_work(monkeypatch)
    for name in ("text.npz", "text.npy"):
        (tmp_path / name).write_text("not numpy")
        err = _error(capsys, ["compress", *_state_args(tiny_files), "--data-dir", str(tmp_path / name)])
        assert "is not a NumPy" in err and "pickle" not in err.lower(), err


def test_usage_errors_are_one_line_and_bars_need_a_terminal(tiny_files, tmp_path, capsys):
    """argparse printed its 20-30 lines of usage before a bad option value; progress bars
    were drawn (with carriage returns) into stderr that is not a terminal, e.g. a log file."""
    for argv in (["compress", "--ratio", "2"], ["demo", "--methods", "svdx"], ["--frobnicate"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "usage:" not in err and "--help" in err, err
    # capsys's stderr is no terminal: the same run draws no bar with or without --no-progress.
    out = tmp_path / "s.pt"
    assert main(["collect", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--calib-samples",
                 "8", "--output", str(out)]) == 0
    assert "\r" not in capsys.readouterr().err and out.is_file()


def test_outputs_into_the_package_are_refused():
    from tensorly_dataaware._cli_io import InputError, check_outputs
    from tensorly_dataaware.models import weights_path

    with pytest.raises(InputError, match="package"):
        check_outputs([("--output", str(weights_path("resnet20")))], [])


# ---------------------------------------------------------------------------------------
# Item 2: no code from --model-file runs unless --allow-pickle
# ---------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this object creates a file: the signature of code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("with_class", [False, True])
def test_model_file_runs_no_code_without_allow_pickle(tiny_files, tmp_path, capsys, with_class):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    model = ["--model-file", str(evil)]
    if with_class:
        model += ["--model-class", "tests.test_cli:TinyNet"]
    err = _error(capsys, ["compress", *model, "--data-dir", str(tiny_files["data"])])
    assert not marker.exists()
    assert "--allow-pickle" in err
    # a whole pickled module: refused with the same hint, accepted with --allow-pickle
    err = _error(capsys, ["collect", "--model-file", str(tiny_files["full"]), "--data-dir", str(tiny_files["data"]),
                          "--output", str(tmp_path / "s.pt")])
    assert "--allow-pickle" in err and "arbitrary code" in err
    assert not (tmp_path / "s.pt").exists()


def test_allow_pickle_help_says_what_it_means(capsys):
    assert main(["compress", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--allow-pickle" in out and "ARBITRARY CODE" in out


# ---------------------------------------------------------------------------------------
# Items 9 and fuzzing: every bad input is one line on stderr and exit code 2
# ---------------------------------------------------------------------------------------
def _bad_inputs(tiny_files, tmp_path):
    model = _state_args(tiny_files)
    data = ["--data-dir", str(tiny_files["data"])]
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((8, 3, 12, 12), np.uint8), labels=np.zeros(8, np.int64))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_text("not a zip")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    np.savez(tmp_path / "noimg.npz", pictures=np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / "zero.npz", images=np.zeros((0, 12, 12), np.uint8))
    np.savez(tmp_path / "nan.npz", images=np.full((4, 1, 12, 12), np.nan, np.float32))
    np.savez(tmp_path / "labels.npz", images=np.zeros((4, 12, 12), np.uint8), labels=np.zeros(3, np.int64))
    np.savez(tmp_path / "flabels.npz", images=np.zeros((4, 12, 12), np.uint8), labels=np.zeros(4, np.float32))
    np.savez(tmp_path / "neglabels.npz", images=np.zeros((4, 12, 12), np.uint8), labels=np.array([0, 1, -1, 2]))
    np.savez(tmp_path / "biglabels.npz", images=np.zeros((4, 12, 12), np.uint8), labels=np.array([0, 1, 9, 2]))
    np.savez(tmp_path / "strings.npz", images=np.array([["a"]]))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "img1d.npy", np.zeros(5, np.uint8))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "two").mkdir()
    for k in range(2):
        np.savez(tmp_path / "two" / f"{k}.npz", images=np.zeros((4, 12, 12), np.uint8))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong_state.pt")
    (tmp_path / "badmod.py").write_text("raise RuntimeError('import-time failure')\n")
    stats_text = tmp_path / "stats.txt"
    stats_text.write_text("not statistics")
    return {
        "ranks bool": ["compress", *model, *data, "--ranks", '{"conv2": true}'],
        "ranks cp pair": ["compress", *model, *data, "--method", "cp", "--ranks", '{"conv2": [2, 2]}'],
        "ranks zero": ["compress", *model, *data, "--ranks", '{"conv2": 0}'],
        "ranks negative pair": ["compress", *model, *data, "--ranks", '{"conv2": [-1, 2]}'],
        "ranks too large": ["compress", *model, *data, "--ranks", '{"conv2": [100, 4]}'],
        "ranks string": ["compress", *model, *data, "--ranks", '{"conv2": "8"}'],
        "ranks float": ["compress", *model, *data, "--ranks", '{"conv2": 2.5}'],
        "ranks triple": ["compress", *model, *data, "--ranks", '{"conv2": [1, 2, 3]}'],
        "ranks list": ["compress", *model, *data, "--ranks", "[1, 2]"],
        "ranks empty": ["compress", *model, *data, "--ranks", "{}"],
        "ranks bad json": ["compress", *model, *data, "--ranks", '{"conv2": [2, 2]'],
        "ranks missing file": ["compress", *model, *data, "--ranks", str(tmp_path / "none.json")],
        "ranks folder": ["compress", *model, *data, "--ranks", str(tmp_path)],
        "ranks unknown layer": ["compress", *model, *data, "--ranks", '{"conv9": 2}'],
        "ranks svd too large": ["compress", *model, *data, "--ranks", '{"fc": 1000}', "--ratio", "0.5"],
        "3 channels into 1": ["compress", *model, "--data-dir", str(rgb), "--normalize", "unit"],
        "constructor raises": ["compress", "--model-file", str(tiny_files["state"]), "--model-class",
                               "tests.test_cli:Exploding", *data],
        "import raises": ["compress", "--model-file", str(tiny_files["state"]), "--model-class", "badmod:Net", *data],
        "class missing": ["compress", "--model-file", str(tiny_files["state"]), "--model-class", "tests.test_cli:Nope", *data],
        "class no colon": ["compress", "--model-file", str(tiny_files["state"]), "--model-class", "tests.test_cli", *data],
        "class not callable": ["compress", "--model-file", str(tiny_files["state"]), "--model-class",
                               "tests.test_cli:DEADLINE", *data],
        "kwargs bad json": [*["compress", *model[:4]], "--model-kwargs", "{width: 12}", *data],
        "kwargs not object": [*["compress", *model[:4]], "--model-kwargs", "[12]", *data],
        "kwargs wrong key": [*["compress", *model[:4]], "--model-kwargs", '{"depth": 3}', *data],
        "kwargs without class": ["compress", "--model-file", str(tiny_files["state"]), "--model-kwargs", "{}", *data],
        "state does not fit": ["compress", "--model-file", str(tmp_path / "wrong_state.pt"), "--model-class",
                               "tests.test_cli:TinyNet", *data],
        "model missing": ["compress", "--model-file", str(tmp_path / "nope.pt"), *data],
        "model is folder": ["compress", "--model-file", str(tmp_path), *data],
        "model empty": ["compress", "--model-file", str(tmp_path / "empty.pt"), *data],
        "model text": ["compress", "--model-file", str(tmp_path / "text.pt"), *data],
        "model tensor": ["compress", "--model-file", str(tmp_path / "tensor.pt"), *data],
        "model state without class": ["compress", "--model-file", str(tiny_files["state"]), *data],
        "no model": ["compress", *data],
        "no data": ["compress", *model],
        "data missing": ["compress", *model, "--data-dir", str(tmp_path / "missing")],
        "data empty folder": ["compress", *model, "--data-dir", str(tmp_path / "empty_dir")],
        "data two npz": ["compress", *model, "--data-dir", str(tmp_path / "two")],
        "data empty npz": ["compress", *model, "--data-dir", str(tmp_path / "empty.npz")],
        "data text npz": ["compress", *model, "--data-dir", str(tmp_path / "text.npz")],
        "data no images": ["compress", *model, "--data-dir", str(tmp_path / "noimg.npz")],
        "data zero images": ["compress", *model, "--data-dir", str(tmp_path / "zero.npz")],
        "data nan": ["compress", *model, "--data-dir", str(tmp_path / "nan.npz")],
        "data label count": ["compress", *model, "--data-dir", str(tmp_path / "labels.npz")],
        "data float labels": ["compress", *model, "--data-dir", str(tmp_path / "flabels.npz")],
        "data negative labels": ["compress", *model, "--data-dir", str(tmp_path / "neglabels.npz")],
        "data labels beyond the classes": ["compress", *model, "--data-dir", str(tmp_path / "biglabels.npz")],
        "grouped layer named": ["compress", *_net_and_data_args(tmp_path, GroupedNet), "--layers", "conv2"],
        "data strings": ["compress", *model, "--data-dir", str(tmp_path / "strings.npz")],
        "data object npy": ["compress", *model, "--data-dir", str(tmp_path / "obj.npy")],
        "data 1-D npy": ["compress", *model, "--data-dir", str(tmp_path / "img1d.npy")],
        "data wrong suffix": ["compress", *model, "--data-dir", str(tmp_path / "text.pt")],
        "fashion on rgb": ["compress", *model, "--data-dir", str(rgb), "--normalize", "fashion"],
        "unknown layer": ["compress", *model, *data, "--layers", "conv9"],
        "empty layers": ["compress", *model, *data, "--layers", ","],
        "container layer": ["compress", *model, *data, "--layers", ""],
        "stats-in missing": ["compress", *model, *data, "--stats-in", str(tmp_path / "none.pt")],
        "stats-in text": ["compress", *model, *data, "--stats-in", str(stats_text)],
        "stats-in folder": ["compress", *model, *data, "--stats-in", str(tmp_path)],
        "output folder": ["compress", *model, *data, "--output", str(tmp_path)],
        "output no folder": ["compress", *model, *data, "--output", str(tmp_path / "no" / "dir" / "x.pt")],
        "output empty": ["compress", *model, *data, "--output", ""],
        "stats-out folder": ["compress", *model, *data, "--stats-out", str(tmp_path)],
        "bad device": ["compress", *model, *data, "--device", "banana"],
        "cuda missing": ["compress", *model, *data, "--device", "cuda:7"],
        "dist option alone": ["compress", *model, *data, "--max-memory", "1GiB"],
        "dist with stats-in": ["compress", *model, *data, "--distributed", "--stats-in", str(stats_text)],
        "bad max memory": ["compress", *model, *data, "--distributed", "--max-memory", "lots"],
        "collect both layer options": ["collect", *model, *data, "--layers", "conv2", "--all-layers",
                                       "--output", str(tmp_path / "s.pt")],
        "collect output folder": ["collect", *model, *data, "--output", str(tmp_path)],
        "demo output folder": ["demo", "--output", str(tmp_path)],
        "demo unknown layer": ["demo", "--layers", "nope", "--calib-samples", "8"],
        # argparse's own errors
        "ratio > 1": ["compress", *model, *data, "--ratio", "2"],
        "ratio nan": ["compress", *model, *data, "--ratio", "nan"],
        "damping negative": ["compress", *model, *data, "--damping", "-1"],
        "damping nan": ["compress", *model, *data, "--damping", "nan"],
        "two sizes": ["compress", *model, *data, "--ratio", "0.5", "--energy", "0.9"],
        "threads 0": ["compress", *model, *data, "--threads", "0"],
        "threads huge": ["compress", *model, *data, "--threads", str(2**31)],
        "timeout negative": ["compress", *model, *data, "--distributed", "--timeout", "-1"],
        "demo ratios": ["demo", "--ratios", "2"],
        "demo method": ["demo", "--methods", "svdx"],
        "unknown option": ["compress", "--frobnicate"],
    }


def test_bad_inputs_give_one_line_and_exit_2(tiny_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `badmod` is importable from the working folder, like the user's modules
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent))
    failures = []
    for label, argv in _bad_inputs(tiny_files, tmp_path).items():
        code = main([*argv, "--no-progress"])  # progress bars also write to stderr
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if argv[0] in ("compress", "collect", "demo") and "usage:" in err:
            lines = [line for line in lines if not line.startswith(("usage:", " "))]  # argparse prints usage first
        if code != 2 or len(lines) != 1 or "error" not in lines[0] or "Traceback" in err:
            failures.append(f"{label}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)


def test_layer_and_label_errors_come_before_any_statistics(tiny_files, tmp_path, capsys, monkeypatch):
    """A named layer the library cannot compress and labels the model can never predict are
    reported before the statistics are collected (both used to fail, or pass silently,
    after the work)."""
    import tensorly_dataaware.cli as cli_module

    monkeypatch.setattr(cli_module, "_collect", lambda *a, **k: pytest.fail("statistics were collected"))
    err = _error(capsys, ["compress", *_net_and_data_args(tmp_path, GroupedNet), "--layers", "conv2", "--ratio", "0.5"])
    assert "conv2 (grouped convolutions" in err
    labels = tmp_path / "big.npz"
    np.savez(labels, images=np.zeros((4, 12, 12), np.uint8), labels=np.array([0, 1, 9, 2]))
    err = _error(capsys, ["compress", *_state_args(tiny_files), "--data-dir", str(labels), "--ratio", "0.5"])
    assert "labels go up to 9 but the model has 4 classes" in err
    for damping in ("-1", "nan", "inf"):  # were checked by the library, after the statistics
        code = main(["compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]),
                     "--ratio", "0.5", "--damping", damping, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "argument --damping: expected a finite number >= 0" in err, err


def test_explicit_messages(tiny_files, tmp_path, capsys):
    model = _state_args(tiny_files)
    data = ["--data-dir", str(tiny_files["data"])]
    assert "positive int" in _error(capsys, ["compress", *model, *data, "--ranks", '{"conv2": true}'])
    assert "cp" in _error(capsys, ["compress", *model, *data, "--method", "cp", "--ranks", '{"conv2": [2, 2]}'])
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((8, 3, 12, 12), np.float32))
    assert "calibration images (3, 12, 12)" in _error(capsys, ["compress", *model, "--data-dir", str(rgb)])
    err = _error(capsys, ["compress", "--model-file", str(tiny_files["state"]), "--model-class",
                          "tests.test_cli:Exploding", *data])
    assert "ZeroDivisionError" in err and "blew up" in err
    scripted = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in new torch
        torch.jit.script(tiny_files["model"]).save(str(scripted))
    assert "eager" in _error(capsys, ["compress", "--model-file", str(scripted), *data])


DEADLINE = 3  # a module attribute that is not a class (for "class not callable")


def _net_and_data_args(tmp_path, net_class) -> list[str]:
    """``--model-file``/``--model-class``/``--data-dir`` arguments for a freshly initialized
    ``net_class`` of this module (saved as a state dict) and 16 random 10x10 images."""
    torch.manual_seed(0)
    state = tmp_path / f"{net_class.__name__}.pt"
    torch.save(net_class().state_dict(), state)
    data = tmp_path / "d.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (16, 10, 10), dtype=np.uint8))
    return ["--model-file", str(state), "--model-class", f"tests.test_cli:{net_class.__name__}", "--data-dir", str(data)]


def test_grouped_convolutions_are_reported(tmp_path, capsys):
    assert main(["compress", *_net_and_data_args(tmp_path, GroupedNet), "--ratio", "0.5", "--n-iter-max", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "conv2 (grouped convolutions (groups=4)" in out
    assert "conv3" in out


class SharedNet(nn.Module):
    """A convolution applied twice (shared weights) between two ordinary ones."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_sequential_default_selection_keeps_shared_layers_dense(tmp_path, capsys):
    """A layer called twice per forward pass cannot be calibrated sequentially: the default
    selection keeps it dense and says so (it stopped the run with an error before)."""
    net_and_data = _net_and_data_args(tmp_path, SharedNet)
    assert main(["compress", *net_and_data, "--ratio", "0.5", "--sequential", "--n-iter-max", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept dense 1 layer(s) sequential calibration cannot compress: shared (called 2 times per forward pass)" in out
    assert "sequential calibration of 1 layers" in out
    # Named explicitly, it is still an error.
    err = _error(capsys, ["compress", *net_and_data, "--ratio", "0.5", "--sequential", "--layers", "conv2", "shared",
                          "--no-progress"])
    assert "called 2 times" in err


def test_collect_prints_the_sample_count(tiny_files, tmp_path, capsys):
    assert main(["collect", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]),
                 "--layers", "conv2", "--no-progress", "--output", str(tmp_path / "s.pt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["layer", "weight", "shape", "patch", "dim", "samples"]
    row = next(line for line in out if line.startswith("conv2")).split()
    # conv2 sees 96 images of 12 x 12 positions (padding 1): 13824 patches of 12 * 3 * 3 = 108
    assert row[2:] == ["108", "13824"]


def _no_work(monkeypatch):
    """Make loading a model or collecting statistics fail the test (errors must come first)."""
    import tensorly_dataaware.cli as cli_module

    monkeypatch.setattr(cli_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(cli_module, "_collect", lambda *a, **k: pytest.fail("statistics were collected"))


UNUSABLE_DEVICES = ["meta", pytest.param("xpu", marks=pytest.mark.skipif(
    hasattr(torch, "xpu") and torch.xpu.is_available(), reason="this torch has a usable XPU"))]


@pytest.mark.parametrize("device", UNUSABLE_DEVICES)
def test_unusable_device_is_refused_before_any_work(tiny_files, tmp_path, capsys, monkeypatch, device):
    """Only a missing CUDA was checked: --device xpu / meta ended in a traceback (exit 1),
    `compress --device meta` only after collecting and decomposing."""
    _no_work(monkeypatch)
    model, data = _state_args(tiny_files), ["--data-dir", str(tiny_files["data"])]
    for argv in (["compress", *model, *data], ["collect", *model, *data, "--output", str(tmp_path / "s.pt")],
                 ["demo", "--calib-samples", "8"]):
        err = _error(capsys, [*argv, "--device", device])
        assert f"--device {device}:" in err, err


def test_stats_in_refuses_collection_options(tiny_files, tmp_path, capsys, monkeypatch):
    """--calib-samples / --positions-per-image were silently ignored with --stats-in; they are
    refused when given, even at their default values (and only when given)."""
    stats = tmp_path / "stats.pt"
    stats.write_bytes(b"")  # never read: the refusal comes first
    _no_work(monkeypatch)
    base = ["compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--stats-in", str(stats)]
    for extra in (["--calib-samples", "1000"], ["--positions-per-image", "0"], ["--batch-size", "250"],
                  ["--calib-samples", "8", "--positions-per-image", "5"]):
        err = _error(capsys, [*base, *extra])
        assert "--stats-in" in err and all(flag in err for flag in extra if flag.startswith("--")), err
    # Without them the command goes on (here to loading the model).
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
        main([*base, "--no-progress"])

def test_sequential_refuses_positions_per_image(tiny_files, capsys, monkeypatch):
    """--positions-per-image was silently ignored by --sequential (it streams every patch)."""
    _no_work(monkeypatch)
    base = ["compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--sequential"]
    for extra in ([], ["--distributed"]):
        err = _error(capsys, [*base, *extra, "--positions-per-image", "5"])
        assert "--positions-per-image" in err and "--sequential" in err, err
    # 0 (every patch) is what --sequential does anyway.
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
        main([*base, "--positions-per-image", "0", "--no-progress"])


def test_info_hint_only_when_the_data_is_missing(tmp_path, capsys, monkeypatch):
    found = tmp_path / "fashion"
    found.mkdir()
    (found / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("TENSORLY_DATAAWARE_FASHION_ROOT", str(found))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "found in" in out and "apt-get" not in out
    monkeypatch.setenv("TENSORLY_DATAAWARE_FASHION_ROOT", str(tmp_path / "absent"))
    assert main(["info"]) == 0
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out


def test_threads_default_to_one_and_are_restored(tiny_files, tmp_path, monkeypatch):
    from tensorly_dataaware.cli import build_parser

    for argv in (["demo"], ["compress"], ["collect", "--output", "x"]):
        assert build_parser().parse_args(argv).threads == 1
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    real(2)
    assert main(["collect", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--layers", "conv2",
                 "--no-progress", "--output", str(tmp_path / "s.pt")]) == 0
    assert seen[0] == 1 and torch.get_num_threads() == 2  # the caller's setting is back


def test_compress_export_onnx(tiny_files, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "small.onnx"
    code = main([
        "compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--ratio", "0.5",
        "--method", "cp", "--n-iter-max", "5", "--no-progress", "--export-onnx", str(onnx_path),
    ])
    assert code == 0, capsys.readouterr().err
    assert "wrote the ONNX model" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = ((tiny_files["images"][:5, None] / 255.0 - 0.286) / 0.353).astype(np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape == (5, 4) and np.isfinite(out).all()
    # The ONNX file is an output like the others: it may not overwrite an input.
    code = main(["compress", *_state_args(tiny_files), "--data-dir", str(tiny_files["data"]), "--ratio", "0.5",
                 "--no-progress", "--export-onnx", str(tiny_files["data"])])
    assert code == 2 and "--export-onnx" in capsys.readouterr().err


def test_compress_export_onnx_unsupported_output_is_a_one_line_error(tiny_files, tmp_path, capsys):
    onnx_path = tmp_path / "small.onnx"
    code = main([
        "compress", "--model-file", str(tiny_files["state"]), "--model-class", "tests.test_cli:NoneAuxNet",
        "--model-kwargs", '{"width": 12}', "--data-dir", str(tiny_files["data"]), "--layers", "conv2",
        "--ratio", "0.5", "--n-iter-max", "5", "--no-progress", "--export-onnx", str(onnx_path),
    ])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--export-onnx" in lines[0] and "output[1] has type NoneType" in lines[0]
    assert not any(name.endswith(".onnx") for name in os.listdir(tmp_path))  # no temporary file either
