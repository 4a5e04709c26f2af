"""`python -m bench [--quick] [--out DIR] [--threads N] [--workloads mlp,cnn] [--impls a,b]`.

Writes DIR/results.json, DIR/results.md and DIR/results.png (see bench/harness.py for the
method). DIR defaults to a scratch folder; `--out bench/results` updates the committed results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .harness import QUICK, Config, run
from .report import add_out_argument, chart, markdown


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="lightfunc training-step benchmarks: every implementation on every "
        "workload, in one process, timed in paired windows against the raw eager loop.",
    )
    p.add_argument(
        "--quick", action="store_true", help="MLP only, short windows, no compile probes (< 2 min)"
    )
    add_out_argument(p)
    p.add_argument(
        "--threads", type=int, help="torch threads (default 1: steadier on shared machines)"
    )
    p.add_argument(
        "--workloads", help="comma-separated subset of mlp,cnn,gpt,wide (default: mlp,cnn,gpt)"
    )
    p.add_argument(
        "--impls",
        help="comma-separated implementations (default: all available; raw_eager is always "
        "run, as the baseline)",
    )
    p.add_argument(
        "--rounds", type=int, help="timing rounds per implementation (default 5, quick 3)"
    )
    p.add_argument(
        "--no-compile-probes",
        action="store_true",
        help="skip the cold/warm compile-time processes",
    )
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--title", help="chart title (default: names the workloads and families)")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: redraw the chart and table of an earlier results.json into --out",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.replot is not None:
        results = json.loads(args.replot.read_text())
    else:
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
    chart(results, args.out / "results.png", title=args.title)
    print(table)
    print(f"wrote {args.out}/results.json, results.md, results.png ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
