"""Reading and writing safetensors files: dtypes, checksums, errors with the file's name.

The file layer under the codec (`_codec`): it knows the safetensors container, not
lightfunc's trees. Every failure of the container (truncated file, garbage
bytes, bad header) is raised as `CheckpointError` naming the file; a missing
file stays a `FileNotFoundError`. Tensors are read with `pread` into memory
the caller owns (not a lazy memory map), so a checksum computed on them has
read every byte from the file.

Sizes are checked before anything is read: every tensor's byte range
(from the container's own header, read here too) must lie inside the file,
and `TensorFile.check` computes a tensor's CRC-32 in fixed-size chunks, so
verifying a file never holds more than `CHUNK_BYTES` of it in memory,
whatever its header declares.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._atomic import atomic_write, describe_os_error

#: The most bytes of a file `TensorFile.check` holds in memory at once.
CHUNK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not match the tree it is loaded into."""


def _dtype_codes() -> dict[torch.dtype, str]:
    codes = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.complex64: "C64",
    }
    optional = {  # dtypes some torch builds lack
        "uint16": "U16",
        "uint32": "U32",
        "uint64": "U64",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2",
        "float8_e4m3fnuz": "F8_E4M3FNUZ",
        "float8_e5m2fnuz": "F8_E5M2FNUZ",
        "float8_e8m0fnu": "F8_E8M0",
    }
    for name, code in optional.items():
        if isinstance(getattr(torch, name, None), torch.dtype):
            codes[getattr(torch, name)] = code
    return codes


#: torch dtype -> safetensors dtype code, for every dtype a file can hold.
DTYPE_CODES = _dtype_codes()
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def crc32(tensor: torch.Tensor) -> int:
    """zlib CRC-32 of a contiguous CPU tensor's raw bytes (reads every byte)."""
    raw = tensor.reshape(-1).view(torch.uint8)
    return zlib.crc32(raw.numpy().data) if raw.numel() else 0


def to_writable(tensor: torch.Tensor, path: str) -> torch.Tensor:
    """A dense, contiguous CPU copy-or-view of `tensor` that safetensors can write.

    Raises:
        TypeError: `tensor` is sparse, a tensor subclass (DTensor, ...), on
            the meta device, or of a dtype safetensors cannot hold.
    """
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
        raise TypeError(
            f"Cannot save the tensor at `{path}`: it is a {type(tensor).__name__} with layout "
            f"{tensor.layout}; only plain dense tensors can be saved. Convert it first "
            f"(`.full_tensor()` for a DTensor, `.to_dense()` for a sparse tensor)."
        )
    if tensor.device.type == "meta":
        raise TypeError(
            f"Cannot save the tensor at `{path}`: it is on the meta device and has no data. "
            f"Materialise it (e.g. `torch.empty_like(t, device='cpu')` filled with values) first."
        )
    if tensor.dtype not in DTYPE_CODES:
        raise TypeError(
            f"Cannot save the tensor at `{path}`: dtype {dtype_name(tensor.dtype)} is not supported "
            f"by safetensors. Supported: {', '.join(sorted(map(dtype_name, DTYPE_CODES)))}. "
            f"Convert it (e.g. complex128 -> `torch.view_as_real(t)`)."
        )
    return tensor.detach().cpu().contiguous()


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every tensor that shares storage with an earlier one copied.

    safetensors refuses overlapping tensors (a contiguous slice and its base,
    two views with different offsets); each is then stored as its own copy.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel():
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def write_file(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, *, fsync: bool
) -> Path:
    """Atomically write `tensors` (contiguous, CPU, unshared) and `metadata` to `path`.

    Raises:
        CheckpointError: the file could not be written, saying why: the disk
            is full, the directory is read-only, or safetensors refused the
            header (over 100 MB).
    """

    def write(tmp: Path) -> None:
        save_file(tensors, tmp, metadata=metadata)

    try:
        return atomic_write(path, write, fsync=fsync)
    except (SafetensorError, OSError) as e:
        if isinstance(e, IsADirectoryError):
            raise
        raise write_error(path, e) from e


def write_error(path: Path, error: BaseException) -> CheckpointError:
    """A `CheckpointError` saying why writing `path` failed (disk full, read-only, ...)."""
    cause = describe_os_error(error)
    if cause is not None:
        return CheckpointError(
            f"Cannot write the checkpoint '{path}': {cause} ({error}). Nothing was replaced: "
            f"the previous checkpoints are intact. Free space or write to another directory."
        )
    if isinstance(error, SafetensorError) and "header" in str(error).lower():
        return CheckpointError(
            f"Cannot write the checkpoint '{path}': safetensors refused it ({error}). The header "
            f"(metadata, paths and non-tensor leaves) must stay under 100 MB: pass less "
            f"`metadata` or keep large data in tensors."
        )
    return CheckpointError(
        f"Cannot write the checkpoint '{path}': {error}. Nothing was replaced: the previous "
        f"checkpoints are intact."
    )


class TensorFile:
    """An open safetensors file whose failures name the file and say what is wrong.

    Use as ``with TensorFile(path) as f: ...``.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: `path` is a directory, or not a complete safetensors file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            inside = sorted(p.name for p in path.glob("*.safetensors"))[:5]
            raise CheckpointError(
                f"Checkpoint path '{path}' is a directory; expected a .safetensors file written "
                f"by lightfunc.save. Files in it: {inside or 'no .safetensors files'}."
            )
        if not path.exists():
            raise FileNotFoundError(
                f"No checkpoint file at '{path}'. Check the path (and the working directory "
                f"'{Path.cwd()}'); checkpoints are written by lightfunc.save."
            )
        self._file: Any = None
        with self._errors("open"):
            try:
                self._file = safe_open(path, framework="pt", backend="pread")
                self._owned = True  # `pread` reads into memory we own
            except TypeError:  # safetensors < 0.8: no `backend`, tensors are memory-mapped
                self._file = safe_open(path, framework="pt")
                self._owned = False
            self.metadata: dict[str, str] = self._file.metadata() or {}
            self.names: list[str] = list(self._file.keys())
            self._ranges = self._byte_ranges()

    def _byte_ranges(self) -> dict[str, tuple[int, int]]:
        """Each tensor's absolute (start, end) byte offsets, checked to lie inside the file.

        Read from the container's own header, before any tensor is: a header
        declaring more bytes than the file holds is rejected here, not found
        out by reading (or allocating) what it declares.
        """
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            table = json.loads(f.read(length))
        start = 8 + length
        ranges = {}
        for name in self.names:
            begin, end = (int(x) for x in table[name]["data_offsets"])
            if not start <= start + begin <= start + end <= size:
                raise OSError(
                    f"tensor `{name}` declares bytes {begin}..{end} of the data section, but the "
                    f"file holds {size - start} data bytes"
                )
            ranges[name] = (start + begin, start + end)
        return ranges

    def nbytes(self, name: str) -> int:
        """The bytes tensor `name` takes in the file."""
        begin, end = self._ranges[name]
        return end - begin

    def check(self, name: str, checksum: int) -> None:
        """Compare tensor `name`'s CRC-32 with `checksum`, reading at most `CHUNK_BYTES` at a time.

        Raises:
            CheckpointError: the checksum differs, or the file cannot be read.
        """
        begin, end = self._ranges[name]
        actual = 0
        with self._errors(f"read tensor `{name}` from"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                offset = begin
                while offset < end:
                    chunk = os.pread(fd, min(CHUNK_BYTES, end - offset), offset)
                    if not chunk:
                        raise OSError(
                            f"the file ends at byte {offset}, before tensor `{name}` does"
                        )
                    actual = zlib.crc32(chunk, actual)
                    offset += len(chunk)
            finally:
                os.close(fd)
        if actual != checksum:
            raise _checksum_error(name, self.path, checksum, actual)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except (
            SafetensorError,
            OSError,
            ValueError,
            KeyError,
            TypeError,
            RecursionError,
            struct.error,
        ) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"Cannot {what} the checkpoint '{self.path}': {e}. The file is truncated, "
                f"corrupted, or not a safetensors file. Use another checkpoint, or save again."
            ) from e

    def dtype(self, name: str) -> torch.dtype | str:
        """The dtype of tensor `name` (its safetensors code when torch lacks it)."""
        with self._errors("read"):
            code = self._file.get_slice(name).get_dtype()
        return _CODE_DTYPES.get(code, code)

    def shape(self, name: str) -> tuple[int, ...]:
        with self._errors("read"):
            return tuple(self._file.get_slice(name).get_shape())

    def read(self, name: str, checksum: int | None) -> torch.Tensor:
        """Tensor `name` in owned CPU memory; its CRC-32 is compared with `checksum` if given.

        Raises:
            CheckpointError: the checksum differs (the file is corrupted).
        """
        with self._errors(f"read tensor `{name}` from"):
            tensor = self._file.get_tensor(name)
            if not self._owned:
                tensor = tensor.clone()
        if checksum is not None:
            actual = crc32(tensor)
            if actual != checksum:
                raise _checksum_error(name, self.path, checksum, actual)
        return tensor


def _checksum_error(name: str, path: Path, expected: int, actual: int) -> CheckpointError:
    return CheckpointError(
        f"Checksum mismatch for tensor `{name}` in '{path}': the file is corrupted "
        f"(stored crc32 {expected:#010x}, the bytes read give {actual:#010x}). Load an "
        f"earlier checkpoint; `verify=False` skips this check and loads the damaged values."
    )
