"""One atomic-write helper for the whole package.

Every file the package writes (compressed models, statistics, the command line's JSON, CSV
and text outputs) goes through :func:`atomic_write`: the bytes go to a temporary file in the
destination's own folder (same file system, so the final rename is atomic), are flushed and
``fsync``-ed, and the temporary file is renamed over the destination with :func:`os.replace`.
A reader therefore sees either the old file or the complete new one, never a partial file,
even if the process dies or the disk fills up half-way; on any failure the temporary file is
removed and the destination is left as it was.

Permissions are those a plain ``open(path, "w")`` would give: for a new file ``0o666``
minus the process umask (the kernel applies the umask to ``os.open(..., 0o666)`` exactly as it
does for ``open``, so the process-wide umask is never read by flipping it, which would race
with other threads), and for an existing file its current mode, which ``open`` keeps too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import IO, Any

__all__ = ["atomic_write", "atomic_open", "atomic_write_text"]


def _destination(path: Any) -> str:
    """The real file that ``open(path, "w")`` would write (symlinks followed), as a str."""
    if isinstance(path, bool) or not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike; got {type(path).__name__}.")
    text = os.fsdecode(os.fspath(path))
    if not text:
        raise ValueError("`path` is empty.")
    if text.endswith(("/", os.sep)):
        # open("name/", "w") refuses a name with a trailing separator; realpath would drop it
        # and write a file where the caller meant a folder.
        raise IsADirectoryError(21, f"cannot write {text!r}: a file name cannot end with a path separator")
    # A plain open() writes through a symbolic link; replacing the link itself by a regular
    # file would silently detach it from its target.
    return os.path.realpath(text)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _renamed(exc: OSError, user_path: str) -> OSError:
    """The same kind of OSError, naming the path the user gave instead of the temporary file."""
    return type(exc)(exc.errno, f"cannot write {user_path!r}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file to fill; on a clean exit it atomically becomes ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination. Symbolic links are followed (as ``open`` does). Its folder must exist.
    mode : {'wb', 'w'}, default 'wb'
        Binary or text.
    encoding, newline : str, optional
        As in :func:`open`, text mode only (``encoding`` defaults to UTF-8).

    Yields
    ------
    file object

    Raises
    ------
    TypeError
        If ``path`` is not a str or path-like.
    ValueError
        If ``path`` exists and is not a regular file (a device such as ``/dev/null``, a FIFO
        or a socket: renaming over it would replace the node itself).
    FileNotFoundError, IsADirectoryError, PermissionError, OSError
        With a message that names ``path`` as given.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"`mode` must be 'wb' or 'w'; got {mode!r}.")
    target = _destination(path)
    user_path = os.fsdecode(os.fspath(path))
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise IsADirectoryError(21, f"cannot write {user_path!r}: it is a folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(2, f"cannot write {user_path!r}: folder {folder!r} does not exist")
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise _renamed(exc, user_path) from exc
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        # A device (/dev/null), FIFO or socket: the rename would replace the node itself by
        # a regular file (as root, /dev/null). Such a file cannot be written atomically.
        raise ValueError(f"cannot write {user_path!r}: it exists and is not a regular file (a device, pipe or "
                         "socket); give the path of a regular file.")
    existing_mode = None if existing is None else stat.S_IMODE(existing.st_mode)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL: never clobber anything; 0o666: the kernel subtracts the umask, as for open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise _renamed(exc, user_path) from exc
    try:
        if mode == "w":
            handle = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
        else:
            handle = os.fdopen(fd, "wb")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if existing_mode is not None:
            os.chmod(tmp, existing_mode)  # open() on an existing file keeps its mode
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename in (tmp, target, None):
            raise _renamed(exc, user_path) from exc
        raise
    _fsync_folder(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(handle)`` on a binary temporary file, then atomically move it to ``path``.

    For example ``atomic_write(path, lambda f: torch.save(obj, f))``. See :func:`atomic_open`.
    """
    with atomic_open(path, "wb") as handle:
        write(handle)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (UTF-8, newlines as given). See :func:`atomic_open`."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
    with atomic_open(path, "w", encoding=encoding, newline="") as handle:
        handle.write(text)
