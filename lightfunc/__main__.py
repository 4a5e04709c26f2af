"""The `lightfunc` command (also `python -m lightfunc`).

lightfunc run --nproc-per-node 2 train.py --lr 1e-3
lightfunc run --help
lightfunc ckpt verify runs/lightfunc/version_0/checkpoints   # exit 0 when every file is good
lightfunc ckpt show runs/lightfunc/version_0/checkpoints/last.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__


def _torch_version() -> str:
    """torch's version from its package metadata (importing torch takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    """The `lightfunc` argument parser, with one sub-parser per command."""
    from .distributed._launch import add_run_parser

    parser = argparse.ArgumentParser(
        prog="lightfunc",
        description="lightfunc: functional-style training for PyTorch.",
    )
    parser.add_argument(
        "--version", action="version", version=f"lightfunc {__version__} (torch {_torch_version()})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_run_parser(commands)
    add_ckpt_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lightfunc` command line; returns the process exit code.

    Argument errors exit with code 2 and a usage message (argparse's convention).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


# -- lightfunc ckpt ----------------------------------------------------------------


def add_ckpt_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `ckpt` command (`verify`, `show`) to `lightfunc`'s sub-command parsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ckpt",
        help="check or describe checkpoints without writing Python",
        description="Check (verify) or describe (show) lightfunc checkpoints.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    verify = actions.add_parser(
        "verify",
        help="run every check on checkpoints; exit 0 if all are good, 1 otherwise",
        description=(
            "Run every check a resume makes that needs no template: the container (every "
            "tensor inside the file), the header's CRC-32 (counters, RNG keys, every "
            "non-tensor value), its format and version, and every tensor's CRC-32. PATH is a "
            "checkpoint file, a sharded checkpoint directory, or a directory of checkpoints "
            "(each one in it is checked). Prints one verdict line per checkpoint."
        ),
    )
    verify.add_argument("paths", nargs="+", metavar="PATH")
    verify.set_defaults(handler=_ckpt_verify)
    show = actions.add_parser(
        "show",
        help="print a checkpoint's step, epoch, tree (shapes, dtypes, sizes) and metadata",
        description=(
            "Describe a checkpoint from its header (tensor data is not read: run "
            "`lightfunc ckpt verify` to check it). For a directory of checkpoints, one line "
            "per checkpoint."
        ),
    )
    show.add_argument("path", metavar="PATH")
    show.set_defaults(handler=_ckpt_show)
    return parser


def _ckpt_verify(args: argparse.Namespace) -> int:
    from ._tensorfile import CheckpointError

    failed = checked = 0
    for given in args.paths:
        targets = _checkpoints_in(Path(given))
        if not targets:
            print(
                f"FAIL  {given}: no checkpoint found (a .safetensors file or a sharded directory)"
            )
            failed += 1
        for path in targets:
            checked += 1
            try:
                summary = _verify_one(path)
            except (CheckpointError, OSError) as error:
                failed += 1
                print(f"FAIL  {path}: {_one_line(error)}")
            else:
                print(f"OK    {path}: {summary}")
    if checked > 1 or failed:
        print(f"{checked - failed if checked else 0} of {checked} checkpoints verified")
    return 1 if failed else 0


def _ckpt_show(args: argparse.Namespace) -> int:
    from ._tensorfile import CheckpointError

    path = Path(args.path)
    targets = _checkpoints_in(path)
    if not targets:
        print(f"{path}: no checkpoint found (a .safetensors file or a sharded directory)")
        return 1
    try:
        if len(targets) == 1 and targets[0] == path:
            print("\n".join(_describe(path)))
        else:
            for target in targets:
                try:
                    header, infos = _read(target)
                    print(f"{target.name}: {_counters(header)}, {_size(infos)}")
                except (CheckpointError, OSError) as error:
                    print(f"{target.name}: unreadable header: {_one_line(error)}")
    except (CheckpointError, OSError) as error:
        print(f"{path}: {_one_line(error)}")
        return 1
    return 0


def _is_sharded(path: Path) -> bool:
    index = path / "index.json"
    if not index.is_file():
        return False
    try:
        return str(json.loads(index.read_text()).get("format", "")).startswith("lightfunc")
    except (OSError, ValueError, AttributeError, RecursionError):
        return True  # a damaged sharded index: verify reports it


def _checkpoints_in(path: Path) -> list[Path]:
    """`path` itself when it is a checkpoint, else the checkpoints directly inside it, else
    those in the `checkpoints/` directories under it (a run root: `version_N/checkpoints`)."""
    if path.is_file() or _is_sharded(path):
        return [path]
    if not path.is_dir():
        return []
    inside = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    found = [p for p in inside if (p.is_file() and p.suffix == ".safetensors") or _is_sharded(p)]
    if found:
        return found
    runs = sorted(d for d in path.glob("**/checkpoints") if d.is_dir())
    return [p for d in runs if d != path for p in _checkpoints_in(d)]


def _verify_one(path: Path) -> str:
    """Verify one checkpoint; returns its one-line summary."""
    if path.is_dir():
        from .distributed import verify_sharded

        verify_sharded(path)
        header, infos = _read(path)
        return f"sharded, {_counters(header)}, {_size(infos)}, every chunk's CRC-32 matches"
    from ._codec import PARAMS_FORMAT, Header
    from ._tensorfile import TensorFile

    with TensorFile(path) as f:
        fmt = f.metadata.get("format")
        header = Header.read(f, fmt=PARAMS_FORMAT) if fmt == PARAMS_FORMAT else Header.read(f)
        unchecked = [n for n in f.names if n not in header.checksums]
        for name in f.names:
            if name in header.checksums:
                f.check(name, header.checksums[name])
        total = sum(f.nbytes(n) for n in f.names)
    note = f", {len(unchecked)} tensors without a checksum" if unchecked else ""
    return f"{_counters(header)}, {len(f.names)} tensors, {_bytes(total)}, checksums match{note}"


def _read(path: Path) -> tuple[Any, dict[str, tuple[tuple[int, ...], str, int]]]:
    """A checkpoint's checked header and (shape, dtype, bytes) per stored tensor."""
    from ._tensorfile import dtype_name

    if path.is_dir():
        from .distributed._shard_format import Index

        index = Index.read(path)
        infos = {}
        for name, shape in index.shapes.items():
            dtype = index.dtypes[name]
            numel = 1
            for n in shape:
                numel *= n
            infos[name] = (tuple(shape), dtype_name(dtype), numel * dtype.itemsize)
        return index.header, infos
    from ._codec import PARAMS_FORMAT, Header
    from ._tensorfile import TensorFile

    with TensorFile(path) as f:
        fmt = f.metadata.get("format")
        header = Header.read(f, fmt=PARAMS_FORMAT) if fmt == PARAMS_FORMAT else Header.read(f)
        infos = {}
        for name in f.names:
            code = f.dtype(name)
            infos[name] = (
                f.shape(name),
                dtype_name(code) if not isinstance(code, str) else code,
                f.nbytes(name),
            )
    return header, infos


def _describe(path: Path) -> list[str]:
    header, infos = _read(path)
    kind = "parameters file" if header.fmt == "params" else "checkpoint"
    kind = f"sharded {kind}" if path.is_dir() else kind
    lines = [
        f"{path}: lightfunc {kind}, written by lightfunc {header.lightfunc_version or '?'} "
        f"with torch {header.torch_version or '?'}; header checked (not the tensor data: "
        f"run `lightfunc ckpt verify`)",
        f"  {_counters(header)}",
        f"  size: {_size(infos)}",
        f"  metadata: {json.dumps(header.user)}",
        f"  tree ({len(header.leaves)} leaves):",
    ]
    width = min(60, max((len(p) for p in header.leaves), default=0))
    for leaf in header.leaves.values():
        if leaf.kind == "tensor":
            stored = header.aliases.get(leaf.path, leaf.path)
            shape, dtype, nbytes = infos[stored]
            tied = f"  (tied to {stored})" if stored != leaf.path else ""
            what = f"{dtype:<9} {list(shape)!s:<16} {_bytes(nbytes)}{tied}"
        elif leaf.kind == "rng":
            what = f"RngKey(seed={leaf.value.seed}, counter={leaf.value.counter})"
        else:
            what = f"{leaf.kind:<9} {leaf.value!r}"
        lines.append(f"    {leaf.path:<{width}}  {what}")
    return lines


def _counters(header: Any) -> str:
    names = ("step", "epoch", "batch_idx", "eval_at_step")
    found = [(n, header.leaves[n].value) for n in names if n in header.leaves]
    found = [(n, v) for n, v in found if isinstance(v, int)]
    if not found:
        return "no loop counters (not a LoopState)"
    return ", ".join(f"{n} {v}" for n, v in found)


def _size(infos: dict[str, tuple[tuple[int, ...], str, int]]) -> str:
    return f"{len(infos)} stored tensors, {_bytes(sum(i[2] for i in infos.values()))}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


if __name__ == "__main__":
    sys.exit(main())
