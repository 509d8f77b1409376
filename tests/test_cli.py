"""The ``tensorly-dataaware`` command line, run in-process through ``main([...])``."""

import json
import subprocess
import sys
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
    assert "sigma" in printed and "frobenius" in printed and "original" in printed

    payload = json.loads(out_base.read_text())
    assert payload["config"]["calib_samples"] == 200 and payload["config"]["eval_samples"] == 300
    assert "conv1" not in payload["config"]["layers"]  # the first conv stays dense by default
    rows = payload["rows"]
    assert [r["norm"] for r in rows] == ["original", "sigma", "frobenius"]
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


@pytest.mark.parametrize("how", ["full", "state_dict"])
def test_compress_round_trip(tiny_files, tmp_path, how, capsys):
    out = tmp_path / "small.pt"
    stats_path = tmp_path / "stats.pt"
    if how == "full":
        model_args = ["--model-file", str(tiny_files["full"])]
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


def test_collect_then_compress_with_stats_in(tiny_files, tmp_path, capsys):
    stats_path = tmp_path / "all.pt"
    assert main(["collect", "--model-file", str(tiny_files["full"]), "--data-dir", str(tiny_files["data"]),
                 "--all-layers", "--no-progress", "--output", str(stats_path)]) == 0
    assert sorted(load_statistics(stats_path)) == ["conv1", "conv2", "conv3", "fc"]
    out = tmp_path / "small.pt"
    assert main(["compress", "--model-file", str(tiny_files["full"]), "--data-dir", str(tiny_files["data"]),
                 "--stats-in", str(stats_path), "--ranks", '{"conv3": [6, 6]}', "--norm", "frobenius",
                 "--no-progress", "--output", str(out)]) == 0
    loaded = load_compressed(TinyNet(width=12), out)
    assert type(loaded.conv2) is nn.Conv2d and list(loaded.conv3.ranks) == [6, 6]
    assert "(6, 6)" in capsys.readouterr().out


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error" in err and "Traceback" not in err
    return err


def test_bad_input_exits_2_with_message(tiny_files, tmp_path, capsys):
    data = ["--data-dir", str(tiny_files["data"])]
    assert "does not exist" in _error(capsys, ["compress", "--model-file", str(tmp_path / "nope.pt"), *data])
    assert "--model-class" in _error(capsys, ["compress", "--model-file", str(tiny_files["state"]), *data])
    assert "does not exist" in _error(capsys, ["compress", "--model-file", str(tiny_files["full"]),
                                               "--data-dir", str(tmp_path / "missing")])
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((4, 8, 8), np.uint8))
    assert "'images'" in _error(capsys, ["compress", "--model-file", str(tiny_files["full"]),
                                         "--data-dir", str(tmp_path / "bad.npz")])
    assert "layer" in _error(capsys, ["compress", "--model-file", str(tiny_files["full"]), *data,
                                      "--layers", "conv9"])
    assert "folder" in _error(capsys, ["compress", "--model-file", str(tiny_files["full"]), *data,
                                       "--output", str(tmp_path / "no" / "dir" / "x.pt")])
    # TorchScript cannot be modified: the message says to pass an eager model.
    scripted = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in new torch
        torch.jit.script(tiny_files["model"]).save(str(scripted))
    assert "eager" in _error(capsys, ["compress", "--model-file", str(scripted), *data])
    # argparse errors: exit code 2 and a usage message.
    assert "--ratios" in _error(capsys, ["demo", "--ratios", "2"])
    assert "invalid choice" in _error(capsys, ["demo", "--methods", "svdx"])
