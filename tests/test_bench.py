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
    # Params and two AdamW moments; raw eager also keeps its gradients between steps
    # (`zero_grad` comes before `backward`), so they count as held between steps too.
    for name, copies in (("raw_eager", 4), ("lightfunc_eager", 3)):
        runner = RUNNERS[name](workload)
        runner.first_losses(1)
        assert copies * params <= runner.state_bytes() <= copies * params + 1024, name


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
    assert (
        "| mlp | raw_eager | 100.0 (10%) | 1.00 | - | - | - | - | 0.0 | - / - | 2.0 (1.0 + 1.0) |"
        in table
    )
    ours = {**record, "impl": "lightfunc_compiled", "ratio_to_raw_eager": 1.5, "ratio_min": 1.2,
            "ratio_max": 1.8, "cpu_ratio_to_raw_eager": 1.4, "cpu_ratio_min": 1.3,
            "cpu_ratio_max": 1.6, "ratio_to_lightning": 2.0, "ratio_to_lightning_barebones": 1.7,
            "time_to_first_step_s": 9.5, "cpu_ratio_to_limit": 1.05, "cpu_ratio_to_limit_min": 0.98,
            "cpu_ratio_to_limit_max": 1.1}  # fmt: skip
    results["records"].append(ours)
    table = report.markdown(results)
    assert (
        "| lightfunc_compiled | 100.0 (10%) | 1.50 (1.20-1.80) | 1.40 (1.30-1.60) | 1.05 (0.98-1.10) | 2.00 | 1.70 | 9.5 |"
        in table
    )
    report.chart(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_colours_group_implementations_by_family():
    impls = ["raw_eager", "raw_compiled_functional", "lightfunc_eager", "lightfunc_compiled",
             "lightning_trainer", "lightning_barebones"]  # fmt: skip
    colours = report.family_colours(impls)
    assert len(set(colours.values())) == len(impls)  # no colour repeats
    for a, b in [(0, 1), (2, 3), (4, 5)]:  # same family: same hue, different shade
        ra, ga, ba, _ = colours[impls[a]]
        rb, gb, bb, _ = colours[impls[b]]
        assert (ra >= ba) == (rb >= bb) and (ba >= ga) == (bb >= gb)
    assert colours["lightfunc_eager"][2] > colours["lightfunc_eager"][0]  # Blues
    assert colours["lightning_trainer"][0] > colours["lightning_trainer"][2]  # Oranges


class _ReplacesItsState(RawEager):
    """A step that allocates one new 1 MB state and drops the old one, nothing else."""

    def __init__(self, workload):
        super().__init__(workload)
        self.state = torch.zeros(2**18)

    def step(self):
        self.state = self.state + 1
        return self.state[0]

    def state_bytes(self):
        return self.state.numel() * 4


def test_step_peak_counts_a_replaced_state_once():
    # During the step the old and the new state are both alive: the peak above
    # the state held between steps is exactly one state. Profiling a window
    # whose input state was allocated before it began would miss the old
    # state's free and report two.
    from bench.harness import step_peak_bytes

    runner = _ReplacesItsState(make_workload("mlp"))
    assert 2**20 <= step_peak_bytes(runner) < 2**20 + 1024  # plus a few bytes of bookkeeping


def _parser_of(main, monkeypatch):
    """The ArgumentParser a bench `main` builds (captured at parse_args)."""
    import argparse

    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main([])
    return seen[0]


@pytest.mark.parametrize(
    "module", ["bench.__main__", "bench.precision", "bench.checkpoint_io", "bench.kernels"]
)
def test_every_bench_option_has_help_and_results_go_to_a_scratch_folder(module, monkeypatch):
    import importlib

    parser = _parser_of(importlib.import_module(module).main, monkeypatch)
    for action in parser._actions:
        assert action.help, f"{module}: {action.option_strings} has no help"
    out = next(a for a in parser._actions if "--out" in a.option_strings)
    assert out.default == report.SCRATCH
    assert "bench/results" not in str(out.default)


def test_replot_redraws_an_earlier_run_without_measuring(tmp_path):
    from bench.__main__ import main

    record = {
        "workload": "mlp", "impl": "raw_eager", "steps_per_s": 100.0, "steps_per_s_spread": 0.1,
        "ratio_to_raw_eager": 1.0, "ratio_spread": 0.0, "compile_s": 0.0, "peak_mem_mb": 2.0,
        "state_mb": 1.0, "step_peak_mb": 1.0, "model_gflops_per_s": 3.0,
    }  # fmt: skip
    machine = {
        "torch": "2.13",
        "lightfunc": "0",
        "cpu": "c",
        "cpus": 2,
        "threads": 1,
        "device": "cpu",
    }
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"machine": machine, "matmul_peak_gflops": 1.0, "seconds": 1.0,
                                   "records": [record]}))  # fmt: skip
    main(["--replot", str(earlier), "--out", str(tmp_path / "out"), "--title", "Fit overhead"])
    assert (tmp_path / "out" / "results.png").exists()
    assert "| mlp | raw_eager |" in (tmp_path / "out" / "results.md").read_text()


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
            "cpu_ratio_to_raw_eager",
            "time_to_first_step_s",
            "ratio_min",
            "ratio_max",
        ):
            assert key in record
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
