"""The benchmark harness: its implementations compute the same step, and --quick runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report
from bench.impls import RUNNERS, LightfuncEager, RawEager
from bench.workloads import make_workload

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt"])
def test_workloads_are_deterministic_and_count_flops(name):
    a, b = make_workload(name), make_workload(name)
    assert len(a.batches) >= 8 and a.flops_per_step > 0
    for (xa, ya), (xb, yb) in zip(a.batches[:2], b.batches[:2], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for pa, pb in zip(a.make_model().parameters(), b.make_model().parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_mlp_flop_count_matches_the_formula():
    # 3 x (forward matmuls): 2 * batch * (64*256 + 256*256 + 256*10)
    assert make_workload("mlp").flops_per_step == 3 * 2 * 64 * (64 * 256 + 256 * 256 + 256 * 10)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_lightfunc_eager_and_the_raw_loop_take_the_same_steps(name):
    workload = make_workload(name)
    raw, lightfunc = RawEager(workload), LightfuncEager(workload)
    torch.testing.assert_close(
        torch.tensor(lightfunc.first_losses(3)),
        torch.tensor(raw.first_losses(3)),
        rtol=1e-5,
        atol=0,
    )


def test_every_eager_runner_reports_its_state_size():
    workload = make_workload("mlp")
    params = sum(p.numel() * 4 for p in workload.make_model().parameters())
    for name in ("raw_eager", "lightfunc_eager"):
        runner = RUNNERS[name](workload)
        runner.first_losses(1)
        assert 3 * params <= runner.state_bytes() <= 3 * params + 1024  # params + two AdamW moments


def test_report_renders_a_table_and_a_chart(tmp_path):
    record = {
        "workload": "mlp", "impl": "raw_eager", "steps_per_s": 100.0, "steps_per_s_spread": 0.1,
        "ratio_to_raw_eager": 1.0, "ratio_spread": 0.0, "ratio_to_lightning": None, "compile_s": 0.0,
        "compile_cold_s": None, "compile_warm_s": None, "peak_mem_mb": 2.0, "state_mb": 1.0, "step_peak_mb": 1.0,
        "model_gflops_per_s": 3.0, "fraction_of_matmul_peak": 0.3,
    }  # fmt: skip
    results = {
        "machine": {
            "torch": "2.13",
            "lightfunc": "0",
            "cpu": "cpu",
            "cpus": 2,
            "threads": 1,
            "device": "cpu",
        },
        "matmul_peak_gflops": 10.0,
        "records": [record],
    }
    table = report.markdown(results)
    assert "| mlp | raw_eager | 100.0 | 10% | 1.00x" in table
    report.chart(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.compiled
def test_quick_benchmark_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--rounds", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    impls = {r["impl"] for r in results["records"]}
    assert {
        "raw_eager",
        "raw_compiled_module",
        "raw_compiled_functional",
        "lightfunc_eager",
        "lightfunc_compiled",
    } <= impls
    for record in results["records"]:
        assert (
            record["workload"] == "mlp" and record["steps_per_s"] > 0 and record["peak_mem_mb"] > 0
        )
        for key in (
            "steps_per_s_spread",
            "compile_s",
            "ratio_to_raw_eager",
            "fraction_of_matmul_peak",
        ):
            assert key in record
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
