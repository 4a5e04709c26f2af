"""`python -m bench [--quick] [--out DIR] [--threads N] [--workloads mlp,cnn] [--impls a,b]`.

Writes DIR/results.json, DIR/results.md and DIR/results.png (see bench/harness.py for the method).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .harness import QUICK, Config, run
from .report import chart, markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="lightfunc training-step benchmarks"
    )
    parser.add_argument(
        "--quick", action="store_true", help="MLP only, short windows, no compile probes (< 2 min)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--threads", type=int, help="torch threads (default 1: steadier on shared machines)"
    )
    parser.add_argument("--workloads", help="comma-separated subset of mlp,cnn,gpt")
    parser.add_argument("--impls", help="comma-separated implementations (default: all available)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument(
        "--no-compile-probes", action="store_true", help="skip cold/warm compile processes"
    )
    parser.add_argument("--device", help="cpu (default) or cuda")
    args = parser.parse_args(argv)

    config = QUICK if args.quick else Config()
    changes: dict = {}
    if args.threads:
        changes["threads"] = args.threads
    if args.workloads:
        changes["workloads"] = tuple(args.workloads.split(","))
    if args.impls:
        changes["impls"] = tuple(args.impls.split(","))
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.no_compile_probes:
        changes["compile_probes"] = False
    if args.device:
        changes["device"] = args.device
    config = dataclasses.replace(config, **changes)

    results = run(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    chart(results, args.out / "results.png")
    print(table)
    print(f"wrote {args.out}/results.json, results.md, results.png ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
