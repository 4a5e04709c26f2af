"""The portable compile cache: what `torch.compile` built, saved beside the checkpoints.

    info = lf.save_compile_cache("runs/digits/version_0/checkpoints")   # after a compiled step
    ...                                                                 # a new process, or rank
    lf.load_compile_cache("runs/digits/version_0/checkpoints")          # before the first step

A resumed run, or another rank, then finds its graphs in inductor's caches
instead of compiling them again. `CheckpointManager` writes the file at its
save points and `fit(ckpt_path="last")` loads it, so users of those get it
without a call.

What the file holds (`compile_cache.bin`):
- `torch.compiler.save_cache_artifacts()`'s bytes: AOTAutograd's and
  inductor's cache entries for every graph this process compiled or found in
  its caches;
- on CPU, the kernels' compiled shared libraries (`.so`) from inductor's
  cache directory, and its instruction-set probes. torch's artifacts carry
  the kernels' C++ source, not the binaries, so without them a warm start
  still runs the C++ compiler for every kernel (measured: most of a cold
  compile on CPU). A library is only ever used under the name inductor gives
  it, the hash of its source and compiler command, so it is found only by the
  same code built the same way;
- the precompiled steps (`CompileOptions(precompile=True)`,
  `lightfunc._precompile`): Dynamo's bytecode and guards with the compiled
  graph, so that the same step built in a new process skips tracing too. A
  step is used only when its checks pass (the source it traced, the values
  it read, the objects its guards name); otherwise it is compiled again.

Loading it runs code, so it is loaded only from a file we can trust:
`torch.compiler.load_cache_artifacts` writes the entries into inductor's
cache directory, and torch *unpickles* them when a compile looks them up
(`FxGraphCache`, `AOTAutogradCache`: `pickle.loads`; on GPU already while
loading, for the Triton bundle), then imports the generated Python and
loads the libraries; a precompiled step is torch's pickle too
(`AOTCompiledFunction.deserialize`), unpickled when a step first needs it. A file crafted by someone else
can therefore run anything in this process, as a Python file in your
project could. `load_compile_cache` refuses (with a warning, never an
error: a cache must not stop a run) a file that is a link, that is not owned
by this user, or that this user's group or others could write, in a
directory others could write; and checks the SHA-256 of every byte against
its header (which catches truncation and corruption, not a forger: only the
permissions keep others out). Load caches only from runs you wrote.

lightfunc itself neither pickles nor unpickles: the file is a JSON header
and raw bytes; the pickles inside are torch's, read by torch.

The format (2; format 1, without steps, is still read): the magic line
`lightfunc-compile-cache\\n`, an 8-byte little-endian header length, the
UTF-8 JSON header (format, torch and Python versions, machine, and per part
its name, size and SHA-256), then the parts' bytes in header order: torch's
artifacts, the kernel libraries (`<2 chars>/c<hash>.so`), the steps
(`step/<step key>/<digest>`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write
from ._precompile import load_steps, saved_steps

FILENAME = "compile_cache.bin"
_MAGIC = b"lightfunc-compile-cache\n"
_FORMAT = 2  # 2: adds the precompiled steps' parts ("step/...")
_READS = (1, 2)
_MAX_HEADER = 1 << 20  # bytes; a longer header is garbage
# An inductor kernel library's path inside its cache directory: `<2 chars>/<hash>[.main].so`.
_KERNEL = re.compile(r"^[a-z0-9]{2}/c[a-z0-9]{40,80}(\.main)?\.so$")
# A precompiled step (`lightfunc._precompile`): `step/<step key>/<digest>`.
_STEP = re.compile(r"^step/[0-9a-f]{32}/[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class CompileCacheInfo:
    """What a compile cache file holds (written or loaded).

    Attributes:
        path: the file.
        graphs: torch's cache entries by kind ("inductor", "aot_autograd", ...) -> count.
        kernels: how many compiled kernel libraries it carries (CPU).
        bytes: the file's size.
        installed: on load, the kernel libraries written into inductor's cache
            directory (those already there are left as they are).
        steps: how many precompiled steps it carries (`CompileOptions(precompile=True)`:
            Dynamo's trace too, so a new process that builds the same step skips it).
    """

    path: Path
    graphs: dict[str, int]
    kernels: int
    bytes: int
    installed: int = 0
    steps: int = 0


def save_compile_cache(directory: str | os.PathLike[str]) -> CompileCacheInfo | None:
    """Write what this process compiled to `directory/compile_cache.bin`, atomically.

    Args:
        directory: the run's checkpoint directory (created if missing).

    Returns:
        What was written, or None when this process compiled nothing (the
        file is then left as it is).
    """
    if "torch._dynamo" not in sys.modules:  # nothing was ever compiled in this process
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    artifacts, info = saved
    parts: list[tuple[str, bytes]] = [("artifacts", artifacts)]
    parts += [(name, data) for name, data in _kernel_files()]
    steps = saved_steps()
    parts += steps
    graphs = {kind: len(keys) for kind, keys in info.artifacts.items()}
    header = {
        "format": _FORMAT,
        **_environment(),
        "graphs": graphs,
        "parts": [
            {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in parts
        ],
    }
    encoded = json.dumps(header).encode()
    path = Path(directory) / FILENAME

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + len(encoded).to_bytes(8, "little") + encoded)
            for _, data in parts:
                f.write(data)

    atomic_write(path, write)
    kernels = len(parts) - 1 - len(steps)
    return CompileCacheInfo(path, graphs, kernels, path.stat().st_size, steps=len(steps))


def load_compile_cache(directory: str | os.PathLike[str]) -> CompileCacheInfo | None:
    """Load `directory/compile_cache.bin` into torch's compile caches, before the first step.

    The next compile of a graph it holds is then a cache hit. Nothing is
    compiled here. A file that is missing gives None quietly; one that
    cannot be trusted or used (see the module doc: a link, another owner,
    writable by others, a checksum mismatch, another torch version or
    machine) gives None with a warning saying why, and the run compiles as
    if there were no cache.

    Args:
        directory: the checkpoint directory a run of yours saved it in.

    Returns:
        What was loaded, or None.
    """
    if Path(directory).is_file():
        raise ValueError(
            f"`directory` '{directory}' is a file: pass the checkpoint directory that holds "
            f"{FILENAME} (its parent, '{Path(directory).parent}')."
        )
    path = Path(directory) / FILENAME
    if not path.exists() and not path.is_symlink():
        return None
    try:
        _check_trusted(path)
        header, parts = _read(path)
    except (OSError, ValueError) as error:
        warnings.warn(
            f"not loading the compile cache {path}: {error}. The run compiles from scratch; "
            f"delete the file to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    torch.compiler.load_cache_artifacts(parts["artifacts"])
    steps = {k: v for k, v in parts.items() if _STEP.match(k)}
    kernels = {k: v for k, v in parts.items() if _KERNEL.match(k)}
    installed = _install_kernels(kernels)
    load_steps(steps)
    return CompileCacheInfo(
        path, dict(header["graphs"]), len(kernels), path.stat().st_size, installed, len(steps)
    )


def _environment() -> dict[str, str]:
    """What must match for the cache to be of use (torch refuses others' entries anyway)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _check_trusted(path: Path) -> None:
    """Raise ValueError unless `path` is a plain file only this user (or root) can have written."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise ValueError("it is a link or not a regular file")
    if os.name != "posix":
        return
    uid = os.getuid()
    for what, st in (("file", info), ("directory", path.parent.stat())):
        if st.st_uid not in (uid, 0):
            raise ValueError(f"its {what} belongs to user id {st.st_uid}, not to this user ({uid})")
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = what == "directory" and st.st_mode & stat.S_ISVTX
        if writable_by_others and not sticky:
            raise ValueError(
                f"its {what} is writable by other users (mode {stat.filemode(st.st_mode)}), "
                f"who could have put code in it"
            )


def _read(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The header and the parts of a cache file, every checksum checked.

    Raises:
        ValueError: not a cache file, damaged, or written for another torch / machine.
    """
    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError("it is not a lightfunc compile cache (wrong magic bytes)")
    at = len(_MAGIC)
    size = int.from_bytes(data[at : at + 8], "little")
    if size > _MAX_HEADER or at + 8 + size > len(data):
        raise ValueError(f"its header length ({size} bytes) does not fit the file; truncated?")
    try:
        header = json.loads(data[at + 8 : at + 8 + size])
        declared = [(str(p["name"]), int(p["bytes"]), str(p["sha256"])) for p in header["parts"]]
        header["graphs"] = {str(k): int(v) for k, v in header["graphs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise ValueError(f"its header is unreadable ({error!r:.200})") from None
    if header.get("format") not in _READS:
        raise ValueError(f"it is format {header.get('format')!r}, this lightfunc reads {_READS}")
    theirs = {key: header.get(key) for key in _environment()}
    if theirs != _environment():
        raise ValueError(f"it was written by {theirs}, this process is {_environment()}")
    parts, offset = {}, at + 8 + size
    for name, length, digest in declared:
        chunk = data[offset : offset + length]
        if len(chunk) != length or hashlib.sha256(chunk).hexdigest() != digest:
            raise ValueError(f"its part {name!r} fails its SHA-256 check (damaged or truncated)")
        if name != "artifacts" and not _KERNEL.match(name) and not _STEP.match(name):
            raise ValueError(f"its part {name!r} is not a kernel library's or a step's name")
        parts[name], offset = chunk, offset + length
    if offset != len(data) or "artifacts" not in parts:
        raise ValueError("its length does not match its header")
    return header, parts


def _inductor_cache_dir() -> Path:
    # Inductor's cache directory (TORCHINDUCTOR_CACHE_DIR, else a per-user one in /tmp).
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _kernel_files() -> list[tuple[str, bytes]]:
    """Inductor's compiled kernel libraries this process loaded, and the ISA probes.

    The loaded ones are read off `/proc/self/maps` (Linux; elsewhere none
    are carried). The instruction-set probes are compiled once per cache
    directory and only ever loaded by a probing subprocess, so they are
    found by their source (a `*_chk_kernel` function); carrying them saves
    their compile, and the probe still runs on the loading machine.
    """
    root = _inductor_cache_dir().resolve()
    found: set[Path] = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rstrip("\n").split(maxsplit=5)[-1]
                if name.endswith(".so") and name.startswith(str(root) + os.sep):
                    found.add(Path(name))
    except OSError:
        return []
    for source in root.glob("??/c*.cpp"):
        library = source.with_suffix(".so")
        small = source.stat().st_size < 4096  # a probe's source is a few lines; kernels are longer
        if small and library.is_file() and "_chk_kernel(" in source.read_text(errors="replace"):
            found.add(library)
    files = []
    for library in sorted(found):
        name = library.relative_to(root).as_posix()
        if _KERNEL.match(name):
            files.append((name, library.read_bytes()))
    return files


def _write_bytes(path: Path, *, data: bytes) -> None:
    path.write_bytes(data)


def _install_kernels(kernels: dict[str, bytes]) -> int:
    """Write the kernel libraries into inductor's cache directory; returns how many were new."""
    root = _inductor_cache_dir()
    written = 0
    for name, data in kernels.items():
        target = root / name
        if target.exists():
            continue  # the local build is as good; never replace a library in use
        target.parent.mkdir(parents=True, exist_ok=True)

        atomic_write(target, functools.partial(_write_bytes, data=data), fsync=False)
        written += 1
    return written
