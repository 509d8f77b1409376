"""The package's one atomic-write helper: permissions, umask, fsync, clean-up, messages."""

import os
import stat

import pytest

from tensorly_dataaware import _atomic
from tensorly_dataaware._atomic import atomic_write, atomic_write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_match_plain_open_and_umask_is_untouched(tmp_path, umask):
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        with open(plain, "w") as handle:
            handle.write("x")
        atomic = tmp_path / "atomic.txt"
        atomic_write_text(atomic, "x")
        assert _mode(atomic) == _mode(plain) == 0o666 & ~umask
        # the process-wide umask is exactly what it was (no os.umask(0) flip left behind)
        assert os.umask(umask) == umask
    finally:
        os.umask(previous)


def test_existing_file_keeps_its_mode_like_open(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640


def test_fsync_is_called_on_the_data(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_size)
        return real(fd)

    monkeypatch.setattr(_atomic.os, "fsync", spy)
    atomic_write(tmp_path / "f.bin", lambda handle: handle.write(b"12345"))
    assert 5 in synced  # the file itself, with its content, before the rename


def test_failure_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")

    def boom(handle):
        handle.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]


def test_errors_name_the_users_path(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such" / "out.txt"
    with pytest.raises(FileNotFoundError, match="out.txt"):
        atomic_write_text(missing, "x")
    with pytest.raises(IsADirectoryError, match=str(tmp_path.name)):
        atomic_write_text(tmp_path, "x")

    def no_space(src, dst):
        raise OSError(28, "No space left on device", src)

    monkeypatch.setattr(_atomic.os, "replace", no_space)
    with pytest.raises(OSError, match="cannot write .*full.txt.*No space left"):
        atomic_write_text(tmp_path / "full.txt", "x")
    assert os.listdir(tmp_path) == []


def test_symlink_is_written_through_not_replaced(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


@pytest.mark.parametrize("bad", [None, 3, True, ["a"]])
def test_bad_path_type(bad):
    with pytest.raises(TypeError, match="path"):
        atomic_write_text(bad, "x")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_device_or_pipe_is_refused_not_replaced(tmp_path):
    """os.replace swapped a FIFO (or, as root, /dev/null) for a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_trailing_separator_is_refused(tmp_path):
    """realpath dropped the slash: `out/` wrote a file named `out`."""
    with pytest.raises(IsADirectoryError, match="path separator"):
        atomic_write_text(str(tmp_path / "out") + os.sep, "x")
    assert list(tmp_path.iterdir()) == []
