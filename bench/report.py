"""Results as a Markdown table and a PNG bar chart, and the command-line options every bench shares."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

#: Where results go unless `--out` says otherwise: a scratch folder, so a trial
#: run never overwrites the committed `bench/results`.
SCRATCH = Path(tempfile.gettempdir()) / "lightfunc-bench"

#: Bar colours by family (raw PyTorch, lightfunc, Lightning): one colour map
#: each, a darker shade per implementation within the family.
FAMILIES = (("raw", "Greys"), ("lightfunc", "Blues"), ("lightning", "Oranges"))


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """`--out DIR`, defaulting to the scratch folder."""
    parser.add_argument(
        "--out",
        type=Path,
        default=SCRATCH,
        help="folder for the results (default: %(default)s, a scratch folder; "
        "pass --out bench/results to update the committed results)",
    )


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(r: dict[str, Any], key: str, prefix: str) -> str:
    """`median (min-max)` of a ratio measured over rounds (`prefix`_min, `prefix`_max)."""
    lo, hi = r.get(f"{prefix}_min"), r.get(f"{prefix}_max")
    text = f"{r[key]:.2f}"
    return text if lo is None or hi is None or lo == hi else f"{text} ({lo:.2f}-{hi:.2f})"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"torch {m['torch']}, lightfunc {m['lightfunc']}"
        + (f", lightning {m['lightning']}" if m.get("lightning") else "")
        + f"; {m['cpu']} ({m['cpus']} CPUs), {m['threads']} thread(s), device {m['device']}; "
        f"matmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s.",
        "",
        "Ratios are medians over rounds of paired windows, (min-max) over rounds; *wall* is "
        "steps per second, *CPU* steps per CPU-second of the process (steadier on a loaded "
        "machine). *Hand-written compiled* is `raw_compiled_functional` (torch.func grads and "
        "a hand-written AdamW in one compiled graph), divided round by round. Lightning ratios "
        "divide wall ratios: *defaults* is `Trainer()` as it comes, *barebones* is "
        "`Trainer(barebones=True)`.",
        "",
        "| workload | impl | steps/s (spread) | vs raw eager, wall | vs raw eager, CPU "
        "| vs hand-written compiled, CPU "
        "| vs Lightning defaults | vs Lightning barebones | first step s | compile s (cold / warm) "
        "| peak MB (state + step) | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        compile_s = (
            f"{_num(r.get('compile_cold_s'), '.1f')} / {_num(r.get('compile_warm_s'), '.1f')}"
        )
        cpu = (
            _ratio(r, "cpu_ratio_to_raw_eager", "cpu_ratio")
            if "cpu_ratio_to_raw_eager" in r
            else "-"
        )
        limit = (
            _ratio(r, "cpu_ratio_to_limit", "cpu_ratio_to_limit")
            if r.get("cpu_ratio_to_limit")
            else "-"
        )
        lines.append(
            f"| {r['workload']} | {r['impl']} | {r['steps_per_s']:.1f} ({r['steps_per_s_spread']:.0%}) "
            f"| {_ratio(r, 'ratio_to_raw_eager', 'ratio')} | {cpu} | {limit} "
            f"| {_num(r.get('ratio_to_lightning'), '.2f')} "
            f"| {_num(r.get('ratio_to_lightning_barebones'), '.2f')} "
            f"| {_num(r.get('time_to_first_step_s', r.get('compile_s')), '.1f')} | {compile_s} "
            f"| {r['peak_mem_mb']:.1f} ({r['state_mb']:.1f} + {r['step_peak_mb']:.1f}) "
            f"| {r['model_gflops_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def family_colours(impls: list[str]) -> dict[str, Any]:
    """A colour per implementation: its family's colour map, one shade per member."""
    from matplotlib import colormaps

    colours: dict[str, Any] = {}
    for prefix, cmap in FAMILIES:
        members = [i for i in impls if i.startswith(prefix)]
        for k, impl in enumerate(members):
            colours[impl] = colormaps[cmap](0.35 + 0.55 * k / max(len(members) - 1, 1))
    for impl in impls:
        colours.setdefault(impl, colormaps["Greens"](0.6))
    return colours


def chart(results: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Grouped bars of each implementation's speed relative to raw eager, with min-max error bars.

    Bars are the median ratio over rounds, in steps per CPU-second when the
    results have it (else per second); the error bar spans the lowest and
    highest round (older results without them: +-half the recorded spread).
    `title` defaults to one naming the workloads and implementation families.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["records"]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    colours = family_colours(impls)
    # Steps per CPU-second where measured (steadier on a loaded machine), else per second.
    cpu = all("cpu_ratio_to_raw_eager" in r for r in records)
    key, prefix = (
        ("cpu_ratio_to_raw_eager", "cpu_ratio") if cpu else ("ratio_to_raw_eager", "ratio")
    )
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(7, 2.8 * len(workloads) + 3), 5))
    top = 1.0
    for i, impl in enumerate(impls):
        xs, ys, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            r = next((r for r in records if r["workload"] == w and r["impl"] == impl), None)
            if r is None:
                continue
            y = r[key]
            half = y * r.get(f"{prefix}_spread", 0.0) / 2
            xs.append(j + (i - (len(impls) - 1) / 2) * width)
            ys.append(y)
            lo.append(y - r.get(f"{prefix}_min", y - half))
            hi.append(r.get(f"{prefix}_max", y + half) - y)
            top = max(top, y + hi[-1])
        ax.bar(xs, ys, width, label=impl, color=colours[impl], edgecolor="black", linewidth=0.3)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", elinewidth=0.7, capsize=1.5)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    per = "CPU-second" if cpu else "second"
    ax.set_ylabel(f"steps per {per} relative to raw PyTorch eager\n(median, min-max over rounds)")
    ax.set_ylim(0, top * 1.45)  # headroom for the legend inside the axes
    m = results["machine"]
    families = [p for p, _ in FAMILIES if any(i.startswith(p) for i in impls)]
    ax.set_title(
        title
        or f"Training-step speed, {' / '.join(families)}: {', '.join(workloads)} "
        f"(torch {m['torch']}, {m['threads']} thread(s), {m['device']})",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=3, loc="upper left", frameon=True, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
