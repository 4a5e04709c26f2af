"""Results as a Markdown table and a PNG bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"torch {m['torch']}, lightfunc {m['lightfunc']}"
        + (f", lightning {m['lightning']}" if m.get("lightning") else "")
        + f"; {m['cpu']} ({m['cpus']} CPUs), {m['threads']} thread(s), device {m['device']}; "
        f"matmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s.",
        "",
        "| workload | impl | steps/s | spread | vs raw eager | vs Lightning | compile s (first / cold / warm) "
        "| peak MB (state + step) | GFLOP/s | of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        compile_s = f"{r['compile_s']:.1f} / {_num(r['compile_cold_s'], '.1f')} / {_num(r['compile_warm_s'], '.1f')}"
        lines.append(
            f"| {r['workload']} | {r['impl']} | {r['steps_per_s']:.1f} | {r['steps_per_s_spread']:.0%} "
            f"| {r['ratio_to_raw_eager']:.2f}x (±{r['ratio_spread'] / 2:.0%}) | {_num(r['ratio_to_lightning'], '.2f')}x "
            f"| {compile_s} | {r['peak_mem_mb']:.1f} ({r['state_mb']:.1f} + {r['step_peak_mb']:.1f}) "
            f"| {r['model_gflops_per_s']:.1f} | {r['fraction_of_matmul_peak']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: each implementation's steps/s relative to the raw eager loop, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["records"]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(workloads) + 2), 4.5))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            r = next((r for r in records if r["workload"] == w and r["impl"] == impl), None)
            if r is not None:
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(r["ratio_to_raw_eager"])
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("steps/s relative to raw PyTorch eager")
    m = results["machine"]
    ax.set_title(
        f"Training step speed (torch {m['torch']}, {m['threads']} thread(s), {m['device']})",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
