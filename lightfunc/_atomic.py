"""Atomic file replacement: a reader sees the old file or the new one, never half of one.

The new content is written inside a private temporary directory next to the
destination (same filesystem, so the final `os.replace` is an atomic
rename), flushed to disk with `fsync`, given the mode a plain `open()` would
have given it, renamed over the destination, and the directory entry is
fsynced too, so the rename itself survives a power loss.

Temporary names carry the writer's host and process id
(``.<name>.<host>.<pid>.<random>.tmp``), so debris left by a killed writer
can be told apart from a file another live process is writing: `remove_orphans`
deletes only what belongs to a process of this host that no longer exists.
Whatever a writer creates (safetensors writes its own ``.tmpXXXXXX`` before
renaming) lives inside that private directory.

A failed write is reported by what happened: `describe_os_error` turns
ENOSPC into "the disk is full" and EROFS / EACCES into "the directory is
read-only", instead of a misleading guess.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
# .<name>.<host>.<pid>.<hex>.tmp, the name possibly holding dots itself.
_TMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def temp_name(name: str) -> str:
    """A hidden temporary name for `name`, unique to this host, process and call."""
    return f".{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: Path, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Create or replace `path` atomically with what `write(tmp_path)` writes.

    Args:
        path: the destination file; missing parent directories are created.
        write: writes the whole new file at the path it is given (and may
            create and rename its own temporary files in the same directory:
            that directory is private to this call).
        fsync: flush the file and its directory to disk before returning.
            Without it the replacement is still atomic for other processes
            and against a crash of this one, but not against a power loss.

    Returns:
        `path`, absolute.

    Raises:
        IsADirectoryError: `path` is an existing directory.
        Whatever `write` raises; the temporary directory is removed first
        (a failure to remove it, on a read-only directory, never masks it).
    """
    path = Path(path).absolute()
    if path.is_dir():
        raise IsADirectoryError(
            f"Cannot write a file at '{path}': it is an existing directory. "
            f"Give a file path inside it, e.g. '{path / 'checkpoint.safetensors'}'."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(temp_name(path.name))
    os.mkdir(private)
    tmp = private / path.name
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    shutil.rmtree(private, ignore_errors=True)
    if fsync:
        fsync_dir(path.parent)
    return path


def remove_orphans(directory: Path) -> list[Path]:
    """Delete the temporary files and directories that dead writers of this host left in `directory`.

    Only names written by `temp_name` are considered, and only those whose
    process id is not running on this host: a file another live process (or
    another machine sharing the filesystem) is writing is never touched.

    Returns:
        The paths removed.
    """
    removed = []
    try:
        candidates = list(directory.iterdir())
    except OSError:
        return []
    for path in candidates:
        match = _TMP_NAME.match(path.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # read-only, or removed by someone else: leave it
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists under another user (or cannot be asked): not ours to delete
    return True


def describe_os_error(error: BaseException) -> str | None:
    """What a failed write means for the user, when the cause is a full or read-only disk; else None.

    Recognises an `OSError`'s errno and the "(os error N)" text that
    safetensors' Rust errors carry.
    """
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(error))
        code = int(found[1]) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (no space left on the device, or the quota is exhausted)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the directory is read-only (or not writable by this user)"
    return None


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only way to read it is to set it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush the directory `path` (its entries: a rename into it) to disk; a no-op on Windows."""
    if os.name == "nt":  # directories cannot be opened (or fsynced) on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
