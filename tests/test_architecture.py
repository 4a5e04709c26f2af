"""The package's shape, read from its source: one-way layers, no import cycle, no hidden state.

The import graph is built with `ast` from every module under `lightfunc/`
(and `kernels/`, installed as `lightfunc.kernels`). Every import counts:
at the top level, inside functions (lazy), under `if TYPE_CHECKING:`,
relative and absolute, and `importlib.import_module("lightfunc....")` with
a string literal. Importing `lightfunc.a.b` from outside `lightfunc.a` also
runs `lightfunc/a/__init__.py`, so it counts as an import of `lightfunc.a`
too; a package's `__init__` importing its submodules counts as imports by
the package. Only the package root is left out: `lightfunc/__init__.py` may
re-export everything, and nothing may import it.

The layers, bottom to top, are `LAYERS` below (README, "Architecture"): a
module imports only from its own layer or the ones below it.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import textwrap
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightfunc"

# Bottom to top. An entry is a module's dotted name, or `<package>.*` for a
# package and everything in it. Every module must appear exactly once.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "utilities",
        (
            "lightfunc._tree",
            "lightfunc._validate",
            "lightfunc._version",
            "lightfunc._atomic",
            "lightfunc._tensorfile",
            "lightfunc._seed",  # seeding torch / numpy / random and loader workers
            "lightfunc.testing",  # assert_trees_close: a pytree walk, imported by nothing
            "lightfunc.kernels.*",  # self-contained Triton ops; optim(fused=True) calls them
        ),
    ),
    ("contract", ("lightfunc._contract", "lightfunc._rng", "lightfunc._callback")),
    (
        "functions",
        (
            "lightfunc._func",
            "lightfunc._sharded_func",
            "lightfunc._precision",
            "lightfunc._metrics",
            "lightfunc.optim.*",
        ),
    ),
    (
        "state and codec",
        (
            "lightfunc._state",
            "lightfunc._codec",
            "lightfunc._checkpoint",
            "lightfunc._params_file",
            "lightfunc._lightning_ckpt",  # reads a Lightning .ckpt (weights_only) into a TrainState
        ),
    ),
    (
        "transforms",
        (
            "lightfunc._precision_step",
            "lightfunc._accumulate",
            "lightfunc._strategy",
            "lightfunc._compile",
            "lightfunc._compile_cache",  # compile_cache.bin: torch's cache artifacts + CPU kernels
            "lightfunc._precompile",  # CompileOptions(precompile=True): Dynamo's trace saved too
            "lightfunc._identity",  # identities across processes, for _precompile's checks
            "lightfunc._donate",  # build(donate=True): new state written into the old storage
            "lightfunc._step_checks",  # the checks of a built step's first call
            "lightfunc._build",
            "lightfunc.distributed.*",
        ),
    ),
    (
        "loop",
        (
            "lightfunc._device",
            "lightfunc._data",
            "lightfunc._evaluate",
            "lightfunc._loop",
            "lightfunc._compose",
        ),
    ),
    (
        "around the loop",
        (
            "lightfunc._manager",
            "lightfunc._run_dir",  # versioned run directories, for `fit`
            "lightfunc.callbacks.*",
            "lightfunc.loggers.*",
            "lightfunc._fit",
            "lightfunc._tune_lr",  # lr_find: a sweep on a trial state, for `lightfunc.tune`
            "lightfunc._tune_batch",  # find_batch_size: measured peak memory per batch size
            "lightfunc.tune",  # the public tuning namespace
        ),
    ),
    ("command line", ("lightfunc.__main__",)),
)

# Module-level state that is truly needed: "module.name" -> why.
ALLOWED_STATE = {
    "lightfunc.kernels._triton._enabled": (
        "the public `lightfunc.kernels.set_enabled` switch: a process-wide user setting"
        " (like torch.backends flags) read when an op is traced"
    ),
    "lightfunc._precompile._LOADED": (
        "precompiled steps read from a compile cache file, found by the steps built later in"
        " the process: a process-wide cache, like torch's own compile caches"
    ),
    "lightfunc._precompile._COMPILED": (
        "the steps this process compiled ahead of time, serialized, for `save_compile_cache`"
        " (as torch.compiler.save_cache_artifacts finds torch's own cache entries)"
    ),
}

# Calls that make a mutable container.
CONTAINERS = frozenset(
    [
        "list",
        "dict",
        "set",
        "bytearray",
        "defaultdict",
        "OrderedDict",
        "Counter",
        "deque",
        "ChainMap",
        "WeakSet",
        "WeakKeyDictionary",
        "WeakValueDictionary",
    ]
)
# Methods that change a container in place.
MUTATORS = frozenset(
    [
        "append",
        "extend",
        "insert",
        "pop",
        "popitem",
        "popleft",
        "remove",
        "clear",
        "update",
        "setdefault",
        "add",
        "discard",
        "sort",
        "reverse",
        "appendleft",
        "extendleft",
        "rotate",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "__setitem__",
        "__delitem__",
        "__iadd__",
    ]
)
# A constant's name: ALL_CAPS (private or not), or a dunder such as `__all__`.
CONSTANT_NAME = re.compile(r"_*[A-Z][A-Z0-9_]*|__\w+__")


# ---------------------------------------------------------------------------
# Reading the source


@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "lightfunc.distributed._dp"
    path: str  # relative to the repository, for messages
    is_package: bool  # an __init__.py
    tree: ast.Module


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # "lightfunc/_loop.py:186"
    kind: str  # "top level", "lazy" or "TYPE_CHECKING"
    implicit: bool = False  # `target` is a package whose __init__ runs before its submodule

    def describe(self) -> str:
        how = f"{self.kind}, runs the package's __init__" if self.implicit else self.kind
        return f"{self.where}, {how}"


def module_name(path: Path) -> str:
    """`lightfunc/a/b.py` -> "lightfunc.a.b"; `kernels/x.py` -> "lightfunc.kernels.x"."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, PACKAGE)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover() -> dict[str, Module]:
    """Every module of the package, parsed, by dotted name."""
    paths = sorted((ROOT / PACKAGE).rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    modules = {}
    for path in paths:
        name = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(ROOT))
        modules[name] = Module(name, rel, path.name == "__init__.py", tree)
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def nodes_with_kind(tree: ast.AST, kind: str = "top level") -> Iterator[tuple[ast.AST, str]]:
    """Every node under `tree`, with how it runs: "top level", "lazy" (in a function) or
    "TYPE_CHECKING" (in an `if TYPE_CHECKING:` body, wherever that is)."""
    for child in ast.iter_child_nodes(tree):
        yield child, kind
        if isinstance(child, ast.If) and is_type_checking(child.test):
            yield from nodes_with_kind(child.test, kind)
            for stmt in child.body:
                yield stmt, "TYPE_CHECKING"
                yield from nodes_with_kind(stmt, "TYPE_CHECKING")
            for stmt in child.orelse:
                yield stmt, kind
                yield from nodes_with_kind(stmt, kind)
            continue
        inner = kind
        if kind == "top level" and isinstance(
            child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
        ):
            inner = "lazy"
        yield from nodes_with_kind(child, inner)


def resolve_relative(module: Module, level: int, name: str | None) -> str:
    """The absolute name `from <level dots><name> import ...` means inside `module`."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"{module.path}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def is_dynamic_import(call: ast.Call) -> bool:
    """Whether `call` is `importlib.import_module(...)` or `__import__(...)`."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return called in ("import_module", "__import__") and bool(call.args)


def import_module_target(call: ast.Call) -> str | None:
    """ "lightfunc.x" for `importlib.import_module("lightfunc.x")` / `__import__("lightfunc.x")`."""
    if not is_dynamic_import(call):
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and in_package(first.value):
        return first.value
    return None


def imported_names(module: Module, known: set[str]) -> Iterator[tuple[str, ast.AST, str]]:
    """(target module, node, kind) for every import of the package in `module`.

    `from X import y` imports `X.y` when that is a module, and `X` itself
    otherwise (y is then an attribute of X's __init__).
    """
    for node, kind in nodes_with_kind(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if in_package(alias.name):
                    yield alias.name, node, kind
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(module, node.level, node.module) if node.level else node.module
            if base is None or not in_package(base):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node, kind
        elif isinstance(node, ast.Call):
            target = import_module_target(node)
            if target is not None:
                yield target, node, kind


def enclosing_packages(name: str) -> list[str]:
    """The packages above `name`, root excluded: "lightfunc.a.b.c" -> ["lightfunc.a", "lightfunc.a.b"]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def edges_of(module: Module, known: set[str]) -> list[Edge]:
    """The import edges out of `module`, with the package __init__s they run."""
    edges = []
    for target, node, kind in imported_names(module, known):
        where = f"{module.path}:{getattr(node, 'lineno', '?')}"
        if target != module.name:
            edges.append(Edge(module.name, target, where, kind))
        for package in enclosing_packages(target):
            inside = module.name == package or module.name.startswith(package + ".")
            if not inside:  # a module inside the package runs while it is being imported
                edges.append(Edge(module.name, package, where, kind, implicit=True))
    return edges


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return discover()


@pytest.fixture(scope="module")
def edges(modules: dict[str, Module]) -> list[Edge]:
    known = set(modules)
    return [edge for module in modules.values() for edge in edges_of(module, known)]


def graph_edges(edges: list[Edge]) -> list[Edge]:
    """The edges of the graph that must be acyclic: the root's re-exports left out."""
    return [edge for edge in edges if edge.source != PACKAGE]


# ---------------------------------------------------------------------------
# Cycles


def strongly_connected(nodes: set[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def shortest_path(start: str, goal: str, succ: dict[str, set[str]], within: set[str]) -> list[str]:
    """A shortest path start -> ... -> goal through `within` (breadth first)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for child in sorted(succ[node] & within):
            if child not in seen:
                seen.add(child)
                previous[child] = node
                queue.append(child)
    path = [goal]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def find_cycles(edges: list[Edge]) -> list[str]:
    """One readable report per group of modules that import each other.

    Each report lists the group and, for every import inside it, the
    shortest cycle through that import, hop by hop with file:line.
    """
    succ: dict[str, set[str]] = defaultdict(set)
    first: dict[tuple[str, str], Edge] = {}
    for edge in sorted(edges, key=lambda e: (e.source, e.target, e.implicit, e.where)):
        succ[edge.source].add(edge.target)
        first.setdefault((edge.source, edge.target), edge)
    nodes = set(succ) | {e.target for e in edges}
    reports = []
    for component in strongly_connected(nodes, succ):
        members = set(component)
        if len(component) == 1 and component[0] not in succ[component[0]]:
            continue
        cycles = set()
        for source in component:
            for target in sorted(succ[source] & members):
                cycle = [source, *shortest_path(target, source, succ, members)]
                turn = cycle.index(min(cycle[:-1]))
                cycles.add(tuple(cycle[turn:-1] + cycle[:turn] + [cycle[turn]]))
        lines = [f"{len(component)} modules import each other: {', '.join(component)}"]
        for cycle in sorted(cycles, key=lambda c: (len(c), c)):
            hops = [f"{a} -> {b} ({first[a, b].describe()})" for a, b in itertools.pairwise(cycle)]
            lines.append("  cycle:\n    " + "\n    ".join(hops))
        reports.append("\n".join(lines))
    return reports


def test_the_import_graph_has_no_cycle(edges):
    reports = find_cycles(graph_edges(edges))
    assert not reports, "import cycles (lazy and TYPE_CHECKING imports count):\n\n" + "\n\n".join(
        reports
    )


def test_no_module_imports_the_package_root(edges):
    bad = [
        f"{edge.source} imports the package root `lightfunc` ({edge.describe()})"
        for edge in edges
        if edge.target == PACKAGE and edge.source != PACKAGE
    ]
    assert not bad, (
        "import what you need from its own module (the version from `lightfunc._version`), "
        "never from `lightfunc/__init__.py`:\n" + "\n".join(bad)
    )


def test_every_import_of_the_package_names_a_module(modules, edges):
    unknown = sorted(
        f"{edge.source} imports {edge.target}, which does not exist ({edge.describe()})"
        for edge in edges
        if edge.target not in modules
    )
    assert not unknown, "imports of missing modules:\n" + "\n".join(unknown)


def test_dynamic_imports_name_their_module_with_a_literal(modules):
    """`importlib.import_module(name)` with a computed name would hide an edge from this file."""
    hidden = sorted(
        f"{module.path}:{node.lineno}"
        for module in modules.values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call) and is_dynamic_import(node)
        if not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))
        or node.args[0].value.startswith(".")
    )
    assert not hidden, (
        "import by a computed or relative name; write the absolute name as a string literal, "
        'e.g. importlib.import_module("lightfunc.distributed"): ' + ", ".join(hidden)
    )


# ---------------------------------------------------------------------------
# Layers


def entry_matches(entry: str, name: str) -> bool:
    if entry.endswith(".*"):
        package = entry[:-2]
        return name == package or name.startswith(package + ".")
    return name == entry


def layer_table(modules: dict[str, Module]) -> dict[str, int]:
    """Module name -> layer index, for every module but the root."""
    table = {}
    for name in modules:
        if name == PACKAGE:
            continue
        for index, (_, entries) in enumerate(LAYERS):
            if any(entry_matches(entry, name) for entry in entries):
                table[name] = index
                break
    return table


def test_every_module_has_exactly_one_layer(modules):
    problems = []
    for name in sorted(set(modules) - {PACKAGE}):
        found = [
            f"{layer}: {entry}"
            for layer, entries in LAYERS
            for entry in entries
            if entry_matches(entry, name)
        ]
        if not found:
            problems.append(
                f"{name} is in no layer: add it to LAYERS in tests/test_architecture.py"
            )
        elif len(found) > 1:
            problems.append(f"{name} is listed {len(found)} times: {found}")
    for layer, entries in LAYERS:
        for entry in entries:
            if not any(entry_matches(entry, name) for name in modules):
                problems.append(f"LAYERS[{layer!r}] lists {entry}, which does not exist")
    assert not problems, "\n".join(problems)


def test_no_module_imports_from_a_layer_above_it(modules, edges):
    table = layer_table(modules)
    names = [layer for layer, _ in LAYERS]
    bad = sorted(
        f"{edge.source} ({names[table[edge.source]]}) imports {edge.target} "
        f"({names[table[edge.target]]}) at {edge.describe()}"
        for edge in graph_edges(edges)
        if edge.source in table and edge.target in table
        if table[edge.target] > table[edge.source]
    )
    assert not bad, (
        "imports from a higher layer (layers, bottom to top: "
        + " -> ".join(names)
        + "):\n"
        + "\n".join(bad)
    )


def readme_layers() -> dict[str, set[str]]:
    """Layer -> the module names in the README's "Architecture" diagram, as written there."""
    text = (ROOT / "README.md").read_text().split("## Architecture", 1)[1]
    rows = text.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    first = re.split(r"(\s{2,})", rows[0])  # label, gap, modules, gap, description
    start = len(first[0]) + len(first[1])
    end = start + len(first[2]) + len(first[3])
    layers: dict[str, set[str]] = {}
    label = ""
    for row in rows:
        label = row[:start].strip() or label
        names = {name.strip() for name in row[start:end].split(",")}
        layers.setdefault(label, set()).update(name for name in names if name)
    return layers


def written(entry: str) -> str:
    """How the README writes a table entry: "lightfunc.optim.*" -> "optim/"."""
    short = entry.removeprefix(PACKAGE + ".")
    return short[:-2] + "/" if short.endswith(".*") else short


def test_the_readme_draws_the_same_layers():
    drawn = readme_layers()
    assert list(drawn) == [layer for layer, _ in reversed(LAYERS)]
    for layer, entries in LAYERS:
        assert drawn[layer] == {written(entry) for entry in entries}, layer


# ---------------------------------------------------------------------------
# Module-level state


def top_level_bindings(tree: ast.Module) -> Iterator[tuple[str, ast.expr, int]]:
    """(name, value, line) for each name bound at module level (also under top-level if/try/with)."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        stmt = pending.pop(0)
        if isinstance(stmt, ast.If | ast.With | ast.Try):
            for field in ("body", "orelse", "finalbody"):
                pending.extend(getattr(stmt, field, []))
            for handler in getattr(stmt, "handlers", []):
                pending.extend(handler.body)
            continue
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                yield from paired(target, stmt.value, stmt.lineno)
        elif isinstance(stmt, ast.AnnAssign | ast.AugAssign) and stmt.value is not None:
            yield from paired(stmt.target, stmt.value, stmt.lineno)


def paired(target: ast.expr, value: ast.expr, line: int) -> Iterator[tuple[str, ast.expr, int]]:
    if isinstance(target, ast.Name):
        yield target.id, value, line
    elif (
        isinstance(target, ast.Tuple | ast.List)
        and isinstance(value, ast.Tuple | ast.List)
        and len(target.elts) == len(value.elts)
    ):
        for inner_target, inner_value in zip(target.elts, value.elts, strict=True):
            yield from paired(inner_target, inner_value, line)


def called_name(value: ast.expr) -> str | None:
    if not isinstance(value, ast.Call):
        return None
    func = value.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def state_kind(value: ast.expr) -> tuple[str, bool] | None:
    """(what `value` makes, always state?) when it is mutable, else None."""
    if isinstance(value, ast.List | ast.ListComp):
        return "a list", False
    if isinstance(value, ast.Dict | ast.DictComp):
        return "a dict", False
    if isinstance(value, ast.Set | ast.SetComp):
        return "a set", False
    called = called_name(value)
    if called == "ContextVar":
        return "a ContextVar", True
    if called == "local" and isinstance(value, ast.Call):
        return "a threading.local()", True
    if called in CONTAINERS:
        return f"a {called}()", False
    return None


def aliases_in(module: Module, owner: Module, name: str) -> tuple[set[str], set[str]]:
    """In `module`, the local names bound to `owner.name` and those bound to `owner` itself."""
    if module.name == owner.name:
        return {name}, set()
    direct, via_module = set(), set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve_relative(module, node.level, node.module) if node.level else node.module
            for alias in node.names:
                bound = alias.asname or alias.name
                if base == owner.name and alias.name == name:
                    direct.add(bound)
                elif base is not None and f"{base}.{alias.name}" == owner.name:
                    via_module.add(bound)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == owner.name and alias.asname:
                    via_module.add(alias.asname)
    return direct, via_module


def refers(expr: ast.expr, name: str, direct: set[str], via_module: set[str]) -> bool:
    if isinstance(expr, ast.Name):
        return expr.id in direct
    return (
        isinstance(expr, ast.Attribute)
        and expr.attr == name
        and isinstance(expr.value, ast.Name)
        and expr.value.id in via_module
    )


def mutations(modules: dict[str, Module], owner: Module, name: str) -> list[str]:
    """Where anything in the package changes `owner.name` in place or rebinds it."""
    sites = []
    for module in modules.values():
        direct, via_module = aliases_in(module, owner, name)
        if not direct and not via_module:
            continue
        for node in ast.walk(module.tree):
            where = f"{module.path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Global) and module is owner and name in node.names:
                sites.append(f"{where} (global)")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS
                and refers(node.func.value, name, direct, via_module)
            ):
                sites.append(f"{where} (.{node.func.attr})")
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
                targets = (
                    node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
                )
                for target in targets:
                    item = isinstance(target, ast.Subscript) and refers(
                        target.value, name, direct, via_module
                    )
                    rebound = isinstance(target, ast.Attribute) and refers(
                        target, name, direct, via_module
                    )
                    grown = isinstance(node, ast.AugAssign) and refers(
                        target, name, direct, via_module
                    )
                    if item or rebound or grown:
                        sites.append(f"{where} ({type(node).__name__.lower()})")
    return sorted(set(sites))


def rebound_globals(module: Module) -> Iterator[tuple[str, int]]:
    """(name, line) for every `global name` in a function of `module`."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Global):
            for name in node.names:
                yield name, node.lineno


def module_state(modules: dict[str, Module]) -> dict[str, str]:
    """ "module.name" -> why it is module-level mutable state, for the whole package."""
    found = {}
    for module in modules.values():
        for name, line in rebound_globals(module):
            found[f"{module.name}.{name}"] = (
                f"{module.path}:{line} rebinds the module-level `{name}` through `global`"
            )
        for name, value, line in top_level_bindings(module.tree):
            kind = state_kind(value)
            if kind is None:
                continue
            what, always = kind
            key = f"{module.name}.{name}"
            where = f"{module.path}:{line}"
            if always:
                found[key] = f"{where}: `{name}` is {what}, state shared by every caller"
            elif not CONSTANT_NAME.fullmatch(name):
                found[key] = (
                    f"{where}: `{name}` is {what} under a variable's name; make it a tuple, "
                    "frozenset or MappingProxyType, or an ALL_CAPS constant nothing changes"
                )
            else:
                sites = mutations(modules, module, name)
                if sites:
                    found[key] = f"{where}: the constant `{name}` ({what}) is changed at " + (
                        ", ".join(sites)
                    )
    return found


def test_no_module_level_mutable_state(modules):
    found = module_state(modules)
    bad = sorted(why for key, why in found.items() if key not in ALLOWED_STATE)
    assert not bad, (
        "module-level mutable state (keep it in the state, an optimizer's state or an "
        "argument; a transform must not read a global):\n" + "\n".join(bad)
    )


def test_every_allowed_state_entry_is_still_needed(modules):
    stale = sorted(set(ALLOWED_STATE) - set(module_state(modules)))
    assert not stale, f"ALLOWED_STATE entries that match nothing any more, remove them: {stale}"


# ---------------------------------------------------------------------------
# The checker itself: it sees every kind of import and every kind of state.

SAMPLE = textwrap.dedent(
    """
    from __future__ import annotations
    import importlib
    from typing import TYPE_CHECKING
    from . import _a
    from ._b import thing
    from .sub import attr
    from .. import __version__

    if TYPE_CHECKING:
        from .sub._c import C

    def lazy():
        from lightfunc.pkg.sub import _d
        return importlib.import_module("lightfunc.pkg.sub._e")

    STACK = []
    table = {}
    FROZEN = {"a": 1}
    CURRENT = ContextVar("current")

    def push(x):
        STACK.append(x)

    def toggle():
        global flag
        flag = True
    """
)


def sample_module(name: str = "lightfunc.pkg._m", source: str = SAMPLE) -> Module:
    path = name.replace(".", "/") + ".py"
    return Module(name, path, False, ast.parse(textwrap.dedent(source)))


def test_the_checker_finds_every_kind_of_import():
    known = {
        "lightfunc",
        "lightfunc.pkg",
        "lightfunc.pkg._a",
        "lightfunc.pkg._b",
        "lightfunc.pkg.sub",
        "lightfunc.pkg.sub._c",
        "lightfunc.pkg.sub._d",
        "lightfunc.pkg.sub._e",
    }
    found = {(e.target, e.kind, e.implicit) for e in edges_of(sample_module(), known)}
    assert found == {
        ("lightfunc.pkg._a", "top level", False),
        ("lightfunc.pkg._b", "top level", False),
        ("lightfunc.pkg.sub", "top level", False),
        ("lightfunc", "top level", False),
        ("lightfunc.pkg.sub._c", "TYPE_CHECKING", False),
        ("lightfunc.pkg.sub", "TYPE_CHECKING", True),
        ("lightfunc.pkg.sub._d", "lazy", False),
        ("lightfunc.pkg.sub", "lazy", True),
        ("lightfunc.pkg.sub._e", "lazy", False),
    }


def test_the_checker_reports_a_cycle_hop_by_hop():
    edges = [
        Edge("lightfunc.a", "lightfunc.b", "lightfunc/a.py:1", "top level"),
        Edge("lightfunc.b", "lightfunc.c", "lightfunc/b.py:2", "lazy"),
        Edge("lightfunc.c", "lightfunc.a", "lightfunc/c.py:3", "TYPE_CHECKING"),
        Edge("lightfunc.c", "lightfunc.d", "lightfunc/c.py:4", "top level"),
    ]
    (report,) = find_cycles(edges)
    assert report == (
        "3 modules import each other: lightfunc.a, lightfunc.b, lightfunc.c\n"
        "  cycle:\n"
        "    lightfunc.a -> lightfunc.b (lightfunc/a.py:1, top level)\n"
        "    lightfunc.b -> lightfunc.c (lightfunc/b.py:2, lazy)\n"
        "    lightfunc.c -> lightfunc.a (lightfunc/c.py:3, TYPE_CHECKING)"
    )
    assert find_cycles(edges[:2] + edges[3:]) == []


def test_the_checker_finds_every_kind_of_module_state():
    module = sample_module()
    found = module_state({module.name: module})
    assert sorted(found) == [
        "lightfunc.pkg._m.CURRENT",
        "lightfunc.pkg._m.STACK",
        "lightfunc.pkg._m.flag",
        "lightfunc.pkg._m.table",
    ]
    assert "changed at lightfunc/pkg/_m.py:23 (.append)" in found["lightfunc.pkg._m.STACK"]


@pytest.mark.parametrize(
    "source",
    [
        "from ._m import FROZEN as F\nF['b'] = 2",
        "from . import _m\n_m.FROZEN.update(b=2)",
        "import lightfunc.pkg._m as m\ndel m.FROZEN['a']",
    ],
)
def test_the_checker_sees_a_constant_changed_from_another_module(source):
    modules = {
        name: sample_module(name, src)
        for name, src in [("lightfunc.pkg._m", SAMPLE), ("lightfunc.pkg._n", source)]
    }
    found = module_state(modules)
    assert "lightfunc/pkg/_n.py:2" in found["lightfunc.pkg._m.FROZEN"]
