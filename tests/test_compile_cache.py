"""The portable compile cache: its file format, what it refuses to load, the manager and `fit` hooks.

The unit tests stand in for torch's artifacts with known bytes (no compile);
the compiled test runs a cold process that saves and a fresh process, with an
empty inductor cache, that loads and must hit the cache for every graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_script
from torch.compiler._cache import CacheInfo

import lightfunc as lf
from lightfunc import _compile_cache
from lightfunc._compile_cache import FILENAME, load_compile_cache, save_compile_cache

ARTIFACTS = b"torch's artifact bytes \x00\x01\x02"
PROBE_KEY = "c" + "a" * 51  # an inductor-style key: 'c' + base32 hash


@pytest.fixture
def fake_torch(monkeypatch, tmp_path):
    """torch's save / load of cache artifacts replaced by known bytes; inductor's cache in tmp."""
    loaded: list[bytes] = []
    info = CacheInfo()
    info.artifacts["inductor"].append("k1")
    info.artifacts["aot_autograd"].append("k2")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (ARTIFACTS, info))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    inductor = tmp_path / "inductor"
    inductor.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor))
    importlib.import_module("torch._dynamo")  # save looks for it: nothing compiles without it
    return loaded, inductor


def _probe(inductor: Path, data: bytes = b"\x7fELF probe") -> Path:
    """An instruction-set probe library as inductor leaves it: source and binary."""
    folder = inductor / PROBE_KEY[1:3]
    folder.mkdir(exist_ok=True)
    (folder / f"{PROBE_KEY}.cpp").write_text('extern "C" void __avx_chk_kernel() {}')
    (folder / f"{PROBE_KEY}.so").write_bytes(data)
    return folder / f"{PROBE_KEY}.so"


def test_round_trip_carries_artifacts_and_kernels(fake_torch, tmp_path):
    loaded, inductor = fake_torch
    probe = _probe(inductor)
    run = tmp_path / "run"
    saved = save_compile_cache(run)
    assert saved is not None and saved.path == run / FILENAME
    assert saved.graphs == {"inductor": 1, "aot_autograd": 1} and saved.kernels == 1
    probe.unlink()  # a fresh machine: the library is not there
    info = load_compile_cache(run)
    assert loaded == [ARTIFACTS]
    assert info is not None and info.installed == 1 and info.kernels == 1
    assert probe.read_bytes() == b"\x7fELF probe"
    assert info.bytes == (run / FILENAME).stat().st_size


def test_load_keeps_a_kernel_library_already_there(fake_torch, tmp_path):
    _, inductor = fake_torch
    probe = _probe(inductor)
    save_compile_cache(tmp_path)
    probe.write_bytes(b"local build")
    info = load_compile_cache(tmp_path)
    assert info is not None and info.installed == 0 and probe.read_bytes() == b"local build"


def test_nothing_compiled_writes_nothing(fake_torch, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert save_compile_cache(tmp_path) is None
    assert list(tmp_path.iterdir()) == [tmp_path / "inductor"]


def test_missing_file_loads_nothing_quietly(fake_torch, tmp_path, recwarn):
    assert load_compile_cache(tmp_path / "nowhere") is None
    assert not recwarn.list


def _refused(path: Path, match: str, loaded: list[bytes]) -> None:
    with pytest.warns(RuntimeWarning, match=match):
        assert load_compile_cache(path) is None
    assert loaded == []  # torch never saw the bytes


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[:-3], "SHA-256|length"),
        (lambda b: b[:-5] + b"XXXXX", "SHA-256"),
        (lambda b: b"not a cache" + b[11:], "magic"),
        (lambda b: b + b"trailing", "length does not match"),
        (lambda b: b[:30], "header length"),
    ],
    ids=["truncated", "flipped", "magic", "trailing", "short"],
)
def test_damaged_file_is_refused(fake_torch, tmp_path, damage, match):
    loaded, _ = fake_torch
    save_compile_cache(tmp_path)
    path = tmp_path / FILENAME
    path.write_bytes(damage(path.read_bytes()))
    _refused(tmp_path, match, loaded)


def _write(path: Path, header: dict, parts: list[bytes]) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(
        _compile_cache._MAGIC + len(encoded).to_bytes(8, "little") + encoded + b"".join(parts)
    )


def _header(parts: list[tuple[str, bytes]], **changes) -> dict:
    return {
        "format": 1,
        **_compile_cache._environment(),
        "graphs": {"inductor": 1},
        "parts": [
            {"name": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in parts
        ],
        **changes,
    }


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"torch": "1.0.0"}, "written by"),
        ({"machine": "vax"}, "written by"),
        ({"format": 99}, "format 99"),
        ({"graphs": "nope"}, "header is unreadable"),
    ],
)
def test_other_environment_or_format_is_refused(fake_torch, tmp_path, changes, match):
    loaded, _ = fake_torch
    parts = [("artifacts", ARTIFACTS)]
    _write(tmp_path / FILENAME, _header(parts, **changes), [d for _, d in parts])
    _refused(tmp_path, match, loaded)


@pytest.mark.parametrize(
    "name",
    [
        "../../evil.so",
        "ab/cxyz.py",
        "/etc/ld.so",
        "ab/../../x.so",
        "step/../../x.so",
        f"step/{'a' * 32}/../../{'b' * 26}",
        f"step/{'A' * 32}/{'b' * 32}",
    ],
)
def test_part_outside_the_kernel_and_step_names_is_refused(fake_torch, tmp_path, name):
    loaded, inductor = fake_torch
    parts = [("artifacts", ARTIFACTS), (name, b"code")]
    _write(tmp_path / FILENAME, _header(parts), [d for _, d in parts])
    _refused(tmp_path, "not a kernel library's or a step's name", loaded)
    assert not (tmp_path / "evil.so").exists() and not list(inductor.rglob("*.so"))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_others_can_write_is_refused(fake_torch, tmp_path):
    loaded, _ = fake_torch
    save_compile_cache(tmp_path)
    (tmp_path / FILENAME).chmod(0o666)
    _refused(tmp_path, "writable by other users", loaded)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_directory_others_can_write_is_refused(fake_torch, tmp_path):
    loaded, _ = fake_torch
    run = tmp_path / "run"
    save_compile_cache(run)
    run.chmod(0o777)
    _refused(run, "directory is writable by other users", loaded)


def test_link_is_refused(fake_torch, tmp_path):
    loaded, _ = fake_torch
    save_compile_cache(tmp_path / "elsewhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / FILENAME).symlink_to(tmp_path / "elsewhere" / FILENAME)
    _refused(tmp_path / "run", "link", loaded)


# -- the manager and fit ------------------------------------------------------------------


def _loop_state(step: int = 1) -> lf.LoopState:
    model = torch.nn.Linear(2, 1)
    return lf.LoopState(state=lf.TrainState.create(model, lf.optim.sgd(0.1)), step=step)


def test_manager_writes_the_cache_only_after_a_compile(fake_torch, monkeypatch, tmp_path):
    graphs = {"n": 0}
    monkeypatch.setattr("lightfunc._manager._graphs_compiled", lambda: graphs["n"])
    manager = lf.CheckpointManager(tmp_path / "ckpt", every_n_steps=1)
    manager.save(_loop_state(1))
    assert not (tmp_path / "ckpt" / FILENAME).exists()  # an eager run: nothing compiled
    graphs["n"] = 1
    manager.save(_loop_state(2))
    assert (tmp_path / "ckpt" / FILENAME).is_file()
    assert manager.latest() == tmp_path / "ckpt" / "last.safetensors"  # not a checkpoint
    loaded, _ = fake_torch
    assert manager.load_compile_cache() is not None and loaded == [ARTIFACTS]


def test_manager_compile_cache_off(fake_torch, monkeypatch, tmp_path):
    monkeypatch.setattr("lightfunc._manager._graphs_compiled", lambda: 5)
    manager = lf.CheckpointManager(tmp_path, every_n_steps=1, compile_cache=False)
    manager.save(_loop_state())
    assert not (tmp_path / FILENAME).exists()


# A cold process trains one epoch compiled under fit (writing the cache beside
# its checkpoint), then a fresh process with an empty inductor cache resumes
# it: every graph must then come from the cache, and the resumed run must
# match an uninterrupted one.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import lightfunc as lf
    from torch._dynamo.utils import counters

    root, epochs = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]

    def train_step(state, batch):
        x, y = batch

        def loss_of(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return ((out - y) ** 2).mean()

        loss, grads = lf.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = lf.TrainState.create(model, lf.optim.adam(1e-2))
    final = lf.fit(lf.build(train_step, compile=True), state, data, max_epochs=epochs,
                   default_root_dir=root, ckpt_path="last", logger=False,
                   enable_progress_bar=False, enable_model_summary=False)
    print(json.dumps({
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "params": {k: v.tolist() for k, v in final.state.params.items()},
    }))
    """
)


def _run(tmp_path: Path, root: Path, epochs: int) -> dict:
    inductor = tmp_path / f"inductor-{len(list(tmp_path.glob('inductor-*')))}"
    return run_script(tmp_path / "train.py", _SCRIPT, [str(root), str(epochs)], inductor)


@pytest.mark.compiled
@pytest.mark.multiprocess
@pytest.mark.slow
def test_resumed_run_in_a_fresh_process_starts_warm(tmp_path):
    first = _run(tmp_path, tmp_path / "runs", 1)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert (tmp_path / "runs" / "version_0" / "checkpoints" / FILENAME).is_file()
    resumed = _run(tmp_path, tmp_path / "runs", 2)
    assert resumed["hits"] >= 1 and resumed["misses"] == 0
    straight = _run(tmp_path, tmp_path / "straight", 2)
    for name, value in straight["params"].items():
        torch.testing.assert_close(
            torch.tensor(resumed["params"][name]), torch.tensor(value), rtol=0, atol=0
        )


# -- regional compilation ---------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = (
            torch.nn.LayerNorm(8),
            torch.nn.Linear(8, 16),
            torch.nn.Linear(16, 8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class _Tower(torch.nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(depth))
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_regions_default_to_the_repeated_blocks():
    names = lf._compile.compile_regions(_Tower(), compile=False)
    assert names == ["blocks.0", "blocks.1", "blocks.2"]  # not `head`: its members differ


def test_regions_by_class_or_predicate():
    assert lf._compile.compile_regions(_Tower(2), _Block, compile=False) == ["blocks.0", "blocks.1"]
    picked = lf._compile.compile_regions(_Tower(), lambda n, m: n == "embed", compile=False)
    assert picked == ["embed"]


def test_regions_matching_nothing_raise():
    with pytest.raises(ValueError, match=r"`regions=.*` matches no sub-module of _Tower"):
        lf._compile.compile_regions(_Tower(), torch.nn.Conv2d, compile=False)
    with pytest.raises(ValueError, match="matches no sub-module of Linear"):
        lf._compile.compile_regions(torch.nn.Linear(2, 2))


def _train(model: torch.nn.Module, steps: int = 3) -> lf.TrainState:
    torch.manual_seed(1)
    data = [(torch.randn(6, 4), torch.randn(6, 1)) for _ in range(steps)]

    def train_step(state, batch):
        x, y = batch

        def loss_of(params):
            out, _ = lf.apply(model, params, state.buffers, x, train=True)
            return ((out - y) ** 2).mean()

        loss, grads = lf.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    step = lf.build(train_step, compile=False)
    state = lf.TrainState.create(model, lf.optim.adamw(1e-2))
    for batch in data:
        state, _ = step(state, batch)
    return state


@pytest.mark.compiled
# Dynamo reads `.grad` of the non-leaf parameters `lf.apply` swaps in, once, while tracing.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_regional_step_compiles_one_graph_for_all_blocks_and_matches_eager():
    torch.manual_seed(0)
    model, reference = _Tower(4), _Tower(4)
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    before = lf._compile.compile_counts()["graphs"]
    lf._compile.compile_regions(model, compile=lf.CompileOptions(backend="aot_eager"))
    regional = _train(model)
    assert lf._compile.compile_counts()["graphs"] - before == 1  # one block graph, reused
    eager = _train(reference)
    # float32, the same ops in the same order (aot_eager runs the traced aten graph):
    # equal to 1e-6.
    for name, value in eager.params.items():
        torch.testing.assert_close(regional.params[name], value, rtol=1e-6, atol=1e-6)


@pytest.mark.compiled
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_regions_compile_the_forward_and_leave_the_hooks_eager():
    # FSDP's per-unit gathers are forward hooks that must run around the compiled region;
    # a hook that graph-breaks (a contextlib stack, as FSDP's) would fail inside it.
    torch.manual_seed(0)
    model = _Tower(2)
    calls = []

    def hook(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(contextlib.nullcontext())
        calls.append(stack)

    for block in model.blocks:
        block.register_forward_pre_hook(hook)
    torch._dynamo.reset()
    before = lf._compile.compile_counts()["graphs"]
    lf._compile.compile_regions(model, compile=lf.CompileOptions(backend="aot_eager"))
    x = torch.randn(3, 4)
    for _ in range(3):
        model(x)
    assert len(calls) == 6  # every block, every call: the hooks ran eagerly
    assert lf._compile.compile_counts()["graphs"] - before == 1
    # Compiling again compiles the original forward, not the compiled one.
    lf._compile.compile_regions(model, compile=lf.CompileOptions(backend="aot_eager"))
    model(x)
    assert len(calls) == 8


@pytest.mark.compiled
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_copy_of_a_regionally_compiled_model_computes_with_its_own_parameters():
    import copy

    torch.manual_seed(0)
    model = _Tower(2)
    lf._compile.compile_regions(model, compile=lf.CompileOptions(backend="aot_eager"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.blocks.parameters():
            p.add_(1.0)
    x = torch.randn(3, 4)
    expected = _Tower(2)
    expected.load_state_dict(twin.state_dict())
    # A compiled bound method would run the original blocks (their parameters) from the copy.
    torch.testing.assert_close(twin(x), expected(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(twin(x), model(x))


def test_startup_bench_report_tables():
    from bench.startup import markdown

    def first(cpu: float) -> dict:
        return {"cpu_s": cpu, "wall_s": cpu * 2, "to_first_step_s": cpu * 3, "cache_bytes": 2e6}

    rows = [
        {"config": "mlp", "repeat": r, "cold": first(20.0), "warm": first(w)}
        for r, w in enumerate((5.0, 6.0))
    ]
    reached = {"to_target_s": 10.0, "to_target_cpu_s": 4.0, "steps": 88, "import_s": 1.0}
    digits = [
        {"runner": "lightfunc_eager", "repeat": 0, **reached},
        {"runner": "lightning", "repeat": 0, **reached, "to_target_s": None, "steps": None},
    ]
    env = {"torch": "2", "lightfunc": "0", "python": "3", "machine": "x", "cpus": 2}
    text = markdown(
        {"environment": {**env, "load_average": (1, 2, 3)}, "compile": rows, "digits": digits}
    )
    assert "| mlp | 20.0 (20.0-20.0) | 5.5 (5.0-6.0) | 28% (25%-30%) |" in text
    assert "| lightfunc_eager | 10.0 | 4.0 | 88 | 1.0 |" in text
    assert "| lightning | never (1 of 1 never reached it)" in text
