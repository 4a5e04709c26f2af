"""Atomic file replacement: a reader sees the old file or the new one, never half of one.

The new content is written to a hidden temporary file in the destination's
directory (same filesystem, so the final `os.replace` is an atomic rename),
flushed to disk with `fsync`, given the mode a plain `open()` would have
given it, renamed over the destination, and the directory entry is fsynced
too, so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Create or replace `path` atomically with what `write(tmp_path)` writes.

    Args:
        path: the destination file; missing parent directories are created.
        write: writes the whole new file at the path it is given (and may
            create and rename its own temporary files in the same directory).
        fsync: flush the file and its directory to disk before returning.
            Without it the replacement is still atomic for other processes
            and against a crash of this one, but not against a power loss.

    Returns:
        `path`, absolute.

    Raises:
        IsADirectoryError: `path` is an existing directory.
        Whatever `write` raises; the temporary file is removed first.
    """
    path = Path(path).absolute()
    if path.is_dir():
        raise IsADirectoryError(
            f"Cannot write a file at '{path}': it is an existing directory. "
            f"Give a file path inside it, e.g. '{path / 'checkpoint.safetensors'}'."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, unique per process and call, ends in `.tmp`: easy to recognise as debris.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


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
