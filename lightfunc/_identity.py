"""Identities that hold across processes, and the module-level names traced code reads.

What a precompiled step (`lightfunc._precompile`) checks in a new process
in place of the guards torch cannot serialize: `identity(obj)` is a string
equal in two processes exactly when the object is the same thing there (a
function by its name and a hash of its code, a class or module by its name,
a constant by its value); `global_names` finds the module-level names a
traced function reads, `global_identities` what they name now.
"""

from __future__ import annotations

import ast
import enum
import functools
import hashlib
import symtable
import sys
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch

# Library code whose module-level names are pinned by the versions in a cache file's header.
PINNED = frozenset({"torch", "optree", "functorch", "typing_extensions", *sys.stdlib_module_names})
_MAX_ITEMS = 256  # a container with more items has no identity (too costly to compare)


def identity(value: Any, _depth: int = 0) -> str | None:
    """A string equal in two processes exactly when `value` is the same thing, or None.

    Functions: module, qualified name and a hash of their bytecode (constants
    and nested code included). Classes and modules: their names. Constants
    (None, bools, numbers, strings, enum members, dtypes, devices) and small
    containers of them: their value. Anything else: None.
    """
    if _depth > 8:
        return None
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return f"{type(value).__name__}:{value!r}"
    if value is Ellipsis or value is NotImplemented:
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"enum:{qualified_name(type(value))}.{value.name}"
    if isinstance(value, torch.dtype | torch.device | torch.layout | torch.memory_format):
        return f"{type(value).__name__}:{value}"
    if (
        isinstance(value, types.UnionType | types.GenericAlias)
        or type(value).__module__ == "typing"
    ):
        return f"typing:{value!r}"
    if isinstance(value, types.ModuleType):
        return f"module:{value.__name__}"
    if isinstance(value, type):
        return f"class:{qualified_name(value)}"
    if isinstance(value, types.FunctionType):
        return f"function:{qualified_name(value)}:{code_digest(value.__code__)}"
    if isinstance(value, types.BuiltinFunctionType | types.WrapperDescriptorType):
        owner = getattr(value, "__self__", None)
        where = getattr(owner, "__name__", None) or qualified_name(type(owner))
        return f"builtin:{where}.{value.__qualname__}"
    if isinstance(value, types.MethodType):
        func = identity(value.__func__, _depth + 1)
        return None if func is None else f"method:{func}:{qualified_name(type(value.__self__))}"
    if isinstance(value, functools.partial):
        parts = [value.func, value.args, tuple(sorted(value.keywords.items()))]
        inner = identity(tuple(parts), _depth + 1)
        return None if inner is None else f"partial:{inner}"
    if isinstance(value, tuple | list | frozenset | set | dict) and len(value) <= _MAX_ITEMS:
        items = list(value.items()) if isinstance(value, dict) else list(value)
        ids = [identity(item, _depth + 1) for item in items]
        if any(i is None for i in ids):
            return None
        if isinstance(value, set | frozenset):  # no order of their own
            ids = sorted(ids)  # type: ignore[type-var]
        return f"{type(value).__name__}:[{','.join(ids)}]"  # type: ignore[arg-type]
    return None


def code_digest(code: types.CodeType) -> str:
    """A hash of what `code` does: bytecode, constants (nested code too), names, flags.

    Not `marshal.dumps`, whose bytes depend on reference counts (they differ
    between processes); not the file name or line numbers (another checkout
    of the same code is the same code; the source checks cover lines).
    """
    h = hashlib.sha256()

    def feed(c: types.CodeType) -> None:
        h.update(c.co_code)
        for name in (*c.co_names, *c.co_varnames, *c.co_freevars, *c.co_cellvars, c.co_qualname):
            h.update(name.encode() + b"\0")
        h.update(f"{c.co_argcount},{c.co_kwonlyargcount},{c.co_flags}".encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                feed(const)
            else:
                h.update(_const_repr(const).encode() + b"\0")

    feed(code)
    return h.hexdigest()[:32]


def _const_repr(const: Any) -> str:
    """A code constant's repr, the same in every process (a frozenset's order is not)."""
    if isinstance(const, frozenset):
        return f"frozenset:{sorted(_const_repr(c) for c in const)}"
    if isinstance(const, tuple):
        return f"tuple:({','.join(_const_repr(c) for c in const)})"
    return f"{type(const).__name__}:{const!r}"


def qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def global_names(sources: Iterable[Any]) -> dict[str, set[str]]:
    """Module -> the dotted global names the traced source lines of that module read.

    A name counts when a function on those lines reads it as a global
    (`symtable`: not a local, a parameter or a closure variable) outside
    an annotation; an attribute chain on it counts whole (`F.relu`).
    """
    found: dict[str, set[str]] = {}
    for s in sources:  # torch's `InlinedSource`s: module, line range, module text
        if s.module.split(".")[0] in PINNED:
            continue
        tree, annotations, table = _parsed(s.module, s.content)
        in_range = range(s.firstlineno, s.lastlineno)
        global_ = {
            sym.get_name()
            for scope in _scopes(table)
            if scope.get_type() != "module" and scope.get_lineno() in in_range
            for sym in scope.get_symbols()
            if sym.is_global()
        }
        names = found.setdefault(s.module, set())
        for node in ast.walk(tree):
            if getattr(node, "lineno", 0) not in in_range or id(node) in annotations:
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id in global_:
                    names.add(node.id)
            elif isinstance(node, ast.Attribute):
                dotted = _dotted(node)
                if dotted is not None and dotted.split(".")[0] in global_:
                    names.add(dotted)
    return found


@functools.lru_cache(maxsize=64)
def _parsed(module: str, source: str) -> tuple[ast.AST, frozenset[int], symtable.SymbolTable]:
    """A module's syntax tree, the ids of its annotation nodes, and its symbol table.

    Cached: a train and an eval step trace through the same modules (about
    0.5 CPU-s for lightfunc's, measured on the bench MLP step).
    """
    tree = ast.parse(source)
    skip = frozenset(id(n) for a in _annotations(tree) for n in ast.walk(a))
    return tree, skip, symtable.symtable(source, module, "exec")


def _scopes(table: symtable.SymbolTable) -> Iterator[symtable.SymbolTable]:
    yield table
    for child in table.get_children():
        yield from _scopes(child)


def _annotations(tree: ast.AST) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            yield node.annotation
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            yield node.returns


def _dotted(node: ast.Attribute) -> str | None:
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    return ".".join([current.id, *reversed(parts)])


def imported(name: str) -> types.ModuleType:
    """The module `name`, imported already (a saved step never imports anything itself)."""
    module = sys.modules.get(name)
    if module is None:
        raise ImportError(f"{name} is not imported in this process")
    return module


Hop = tuple[dict[str, Any], str, Any]  # (a module's namespace, a name in it, the object it names)


def global_identities(
    names: dict[str, set[str]], guarded: frozenset[tuple[str, str]] = frozenset()
) -> tuple[dict[str, dict[str, str | None]], list[Hop]]:
    """Module -> dotted name -> identity of what it names now; and the hops to re-check.

    A dotted name resolves through modules only (`F.relu`, `lf.optim.adamw`):
    the first value that is not a module is what it names; a name that is not
    a module-level one (a local, a builtin) is skipped. A value without an
    identity that belongs to a library pinned by version (`sys.modules`) is
    library state, not checked: it is left out. The hops are every lookup
    made in a module that is neither lightfunc's nor pinned (the user's): a
    step re-checks them on every call, by object identity, as Dynamo guards
    globals (lightfunc's modules hold no mutable module-level state).
    `guarded` (module, name) pairs are objects torch's kept guards check
    (a script's global model): their identity is their type's name.
    """
    out: dict[str, dict[str, str | None]] = {}
    hops: list[Hop] = []
    for module_name, dotted_names in names.items():
        module = imported(module_name)
        table = out.setdefault(module_name, {})
        for dotted in sorted(dotted_names):
            head, *rest = dotted.split(".")
            if head not in module.__dict__:
                continue
            owner, value, used = module, module.__dict__[head], [head]
            path = [(owner, head, value)]
            for attr in rest:
                if not isinstance(value, types.ModuleType) or attr not in value.__dict__:
                    break
                owner, value, used = value, value.__dict__[attr], [*used, attr]
                path.append((owner, attr, value))
            ident = identity(value)
            if ident is None and (module_name, head) in guarded and len(path) == 1:
                ident = f"guarded:{qualified_name(type(value))}"
            if ident is None and owner.__name__.split(".")[0] in PINNED:
                continue
            table[".".join(used)] = ident
            hops += [(m.__dict__, k, v) for m, k, v in path if _users(m.__name__)]
    return out, hops


def _users(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top != "lightfunc" and top not in PINNED
