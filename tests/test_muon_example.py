"""The char LM's `--optimizer muon` and bench/muon_vs_adamw.py: wiring, smoke runs, the sweep.

Tolerances: the example's Muon step against torch.optim.Muon + torch.optim.AdamW
on the same gradients, fp32 eager: 1e-8 (measured over 5 steps: 59 of the
~11,000 matrix elements differ, by one rounding, at most 1.9e-9: small weights
that moved by more than their own size, where `p + (new - p)` is not exact;
the AdamW part as much as the Muon part). Compiled against eager on
the char LM's own step: see `test_compiled_muon_step_agrees_with_eager`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lightfunc as lf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import char_lm  # noqa: E402

# Compiled vs eager, 4 steps of the tiny char LM below (fp32; Muon at 0.02, AdamW at 3e-3),
# measured: losses within 8.8e-5; the Muon matrices within 2.2e-3 (they moved by up to 6e-2:
# inductor rounds the fused bfloat16 Newton-Schulz once where eager rounds after every op),
# the AdamW part within 5.7e-4 (Adam moves an element with a near-zero gradient by about
# +-lr whatever the gradient's size, so a rounding in the gradient can flip such a step).
COMPILED_LOSS_ATOL = 1e-3
COMPILED_ATOL = {"muon": 1e-2, "adamw": 3e-3}
TINY = dict(width=16, layers=1, heads=2, seq=8, dropout=0.0)


def tiny_params(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = char_lm.CharTransformer(**TINY)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_muon_takes_the_blocks_matrices_and_adamw_the_embeddings_head_and_vectors():
    labels = char_lm.hidden_matrices(tiny_params())
    assert {k for k, v in labels.items() if v == "muon"} == {
        "blocks.0.qkv.weight",
        "blocks.0.proj.weight",
        "blocks.0.mlp.0.weight",
        "blocks.0.mlp.2.weight",
    }
    # The other matrices (the embeddings and the output head) stay with AdamW.
    assert labels["tok.weight"] == labels["pos"] == labels["head.weight"] == "adamw"


def test_the_examples_muon_is_torch_muon_on_the_matrices_and_adamw_on_the_rest():
    params = tiny_params()
    labels = char_lm.hidden_matrices(params)
    g = torch.Generator().manual_seed(1)
    grads = [
        {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in params.items()} for _ in range(5)
    ]

    tx = char_lm.optimizer("muon", 3e-3, 0.02)
    p, s = params, tx.init(params)
    for grad in grads:
        updates, s = tx.update(grad, s, p)
        p = lf.optim.apply_updates(p, updates)

    ref = {k: v.clone() for k, v in params.items()}
    muon = torch.optim.Muon([ref[k] for k in ref if labels[k] == "muon"], lr=0.02)
    adamw = torch.optim.AdamW(
        [ref[k] for k in ref if labels[k] == "adamw"], lr=3e-3, weight_decay=0.1
    )
    for grad in grads:
        for k, v in ref.items():
            v.grad = grad[k].clone()
        muon.step()
        adamw.step()
    for k in params:
        torch.testing.assert_close(p[k], ref[k], rtol=0, atol=1e-8, msg=k)
        if labels[k] == "muon":
            assert (p[k] - params[k]).abs().max() > 1e-3  # it moved: the check can fail


def test_the_examples_adamw_is_unchanged():
    params = tiny_params()
    g = torch.Generator().manual_seed(2)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    want, _ = lf.optim.adamw(3e-3, weight_decay=0.1).update(
        grads, lf.optim.adamw(3e-3, weight_decay=0.1).init(params), params
    )
    tx = char_lm.optimizer("adamw", 3e-3, 0.02)
    got, _ = tx.update(grads, tx.init(params), params)
    assert all(torch.equal(got[k], want[k]) for k in params)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(
        ValueError, match=r"`optimizer` must be one of \('adamw', 'muon'\), got 'sgd'"
    ):
        char_lm.optimizer("sgd", 3e-3, 0.02)
    with pytest.raises(SystemExit):
        char_lm.main(["--optimizer", "sgd"])


@pytest.mark.slow
def test_char_lm_smoke_runs_with_muon(capsys, tmp_path):
    bits = char_lm.main(["--smoke", "--optimizer", "muon", "--run-dir", str(tmp_path)])
    assert 1.0 < bits < 8.5  # bits per byte: 8 is a uniform guess over 256 values
    out = capsys.readouterr().out
    assert "20 steps (" in out and "--- sample ---\ndef " in out
    from safetensors import safe_open

    # The run's optimizer state holds Muon momentum buffers for the block's four matrices only.
    with safe_open(tmp_path / "version_0" / "checkpoints" / "last.safetensors", "pt") as f:
        names = f.keys()
    buffers = {k.rsplit("momentum_buffer.", 1)[1] for k in names if "momentum_buffer." in k}
    matrices = ("qkv", "proj", "mlp.0", "mlp.2")
    assert buffers == {f"blocks.0.{m}.weight" for m in matrices}


def test_sweep_tries_past_an_edge_of_the_grid_only():
    from bench.muon_vs_adamw import sweep

    def tried(grid, best):
        seen = []

        def score(lr):
            seen.append(lr)
            return abs(lr - best)

        return sweep(grid, score, lambda _: None), seen

    assert tried([1.0, 2.0, 4.0], 2.0) == (2.0, [1.0, 2.0, 4.0])
    # Past the top until a value is worse: 8 is best, then 16 is worse than 8.
    assert tried([4.0, 1.0, 2.0], 10.0) == (8.0, [1.0, 2.0, 4.0, 8.0, 16.0])
    # Past the bottom, at most three more values.
    assert tried([0.01, 0.03, 0.1], 0.0) == (0.00037, [0.01, 0.03, 0.1, 0.00333, 0.00111, 0.00037])
    assert tried([3e-3], 1.0) == (3e-3, [3e-3])  # a single value: nothing to extend


def test_bench_help_lists_every_option_with_its_default(capsys):
    from bench.muon_vs_adamw import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for option in ("--steps", "--seeds", "--adamw-lrs", "--muon-lrs", "--threads", "--out"):
        assert f" {option} " in flat
    assert "(default: 400)" in flat and "lightfunc-bench" in flat  # --out: a scratch folder


def test_bench_tiny_run_writes_the_table(tmp_path):
    from bench.muon_vs_adamw import main

    threads = torch.get_num_threads()
    options = "--steps 2 --seeds 0 1 --adamw-lrs 3e-3 --muon-lrs 0.02 --bytes 20000 --width 16"
    results = main([*options.split(), "--layers", "1", "--seq", "16", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # restored
    runs = [(r["optimizer"], r["seed"]) for r in results["records"]]
    assert runs == [("adamw", 0), ("muon", 0), ("adamw", 1), ("muon", 1)]
    assert all(0.0 < r["bits_per_byte"] < 9.0 for r in results["records"])
    text = (tmp_path / "muon_vs_adamw.md").read_text()
    assert "| adamw | 0.003 |" in text and "| muon | 0.02 |" in text
    assert "Muon minus AdamW" in text
    assert json.loads((tmp_path / "muon_vs_adamw.json").read_text())["best_lr"] == {
        "adamw": 3e-3,
        "muon": 0.02,
    }


@pytest.mark.compiled
@pytest.mark.slow
def test_compiled_muon_step_agrees_with_eager(fresh_dynamo):
    torch.manual_seed(0)
    model = char_lm.CharTransformer(**TINY)
    tx = lf.optim.chain(lf.optim.clip_by_global_norm(1.0), char_lm.optimizer("muon", 3e-3, 0.02))
    state = lf.TrainState.create(model, tx, seed=0)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (4, TINY["seq"] + 1), generator=g) for _ in range(4)]

    def train_step(state, batch):
        x, y = batch[:, :-1], batch[:, 1:]

        def loss_fn(params):
            logits, _ = lf.apply(model, params, state.buffers, x, train=True)
            return F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))

        loss, grads = lf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    finals, losses = [], []
    for compile_ in (False, True):
        step, s, seen = lf.build(train_step, compile=compile_), state, []
        for batch in batches:
            s, metrics = step(s, batch)
            seen.append(float(metrics["loss"]))
        finals.append(s.params)
        losses.append(seen)
    eager, compiled = finals
    assert lf.compile_counts()["graphs"] == 1  # it compiled, once
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=COMPILED_LOSS_ATOL)
    labels = char_lm.hidden_matrices(eager)
    for k, v in eager.items():
        atol = COMPILED_ATOL[labels[k]]
        torch.testing.assert_close(compiled[k], v, rtol=0, atol=atol, msg=k)
    moved = max(float((eager[k] - state.params[k]).abs().max()) for k in eager)
    assert moved > 3 * COMPILED_ATOL["muon"]  # the weights moved well beyond the tolerance
