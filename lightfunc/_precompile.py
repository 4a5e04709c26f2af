"""Precompiled steps: what Dynamo traced, saved too, so that a warm start skips tracing.

    step = lf.build(train_step, compile=lf.CompileOptions(precompile=True))

The compile cache (`lightfunc._compile_cache`) carries what comes *after*
tracing (AOTAutograd's and inductor's output); Dynamo still traces the step
again in every new process, which was most of a warm start (startup_findings.md).
A precompiled step is compiled with torch's ahead-of-time entry point
(`torch.compile(fn).aot_compile(example_inputs)`, torch 2.13): one
`AOTCompiledFunction` per input signature, holding the graph's compiled code,
Dynamo's bytecode and its guards, serializable. `save_compile_cache` writes
each into `compile_cache.bin`; after `load_compile_cache`, the same step built
in a new process runs the saved function instead of tracing.

What keeps a saved step from running when it no longer fits:
- torch's guards that serialize (tensor shapes, dtypes and strides, module
  types and flags, constants read from the closure, the grad mode ...),
  checked on every call as Dynamo checks them. torch drops every guard on a
  global; lightfunc keeps those on the step's own module-level names
  (`G['model']...`: a script's model), checked against this process's;
- those torch cannot serialize (the identity of functions, classes and
  modules a guard names, `ID_MATCH` / `FUNCTION_MATCH` / `CLOSURE_MATCH`):
  lightfunc records each with its source expression and an identity that
  holds across processes (`lightfunc._identity`: a function's module, name
  and bytecode hash; a class's or module's name; a constant's value),
  checks them on first use, and on every call for those reached through the
  arguments or globals;
- the source of every function the trace went through (torch's checksums of
  their lines), and the value of every module-level name those functions
  read as a global (lightfunc's, by the same identities), checked on first
  use; the user's module-level names are also re-checked on every call (the
  same objects), as Dynamo guards globals. torch's own module-level state is
  pinned by its version; lightfunc's modules keep none;
- the torch / Python versions and the machine (the file's header).

When any check fails the step is traced and compiled as usual: a stale
artifact costs a compile, never a wrong step. What lightfunc cannot check
makes it fall back, with a warning, to a plain `torch.compile` (full Dynamo
guards, nothing saved): a step that reads, from a module other than its
own, a module-level object with no lasting identity (`cfg.lr` of an
imported `cfg`), a guard it cannot evaluate, or an error of torch's
ahead-of-time compile.

A new input signature (the smaller last batch) is compiled ahead of time
too, up to `MAX_SIGNATURES` per step; past that the step falls back to a
plain `torch.compile`.

Trust: the saved function is torch's pickle (code); it is only read from a
file `load_compile_cache` trusts (owner, permissions, checksums).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._identity import (
    Hop,
    code_digest,
    global_identities,
    global_names,
    identity,
    imported,
    qualified_name,
)

MAX_SIGNATURES = 8  # ahead-of-time compiles per step; then a plain torch.compile takes over
_FORMAT = 1
# Guards torch 2.13 cannot serialize (`CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES`).
_IDENTITY_GUARDS = frozenset(
    {
        "DICT_VERSION",
        "NN_MODULE",
        "ID_MATCH",
        "FUNCTION_MATCH",
        "CLASS_MATCH",
        "MODULE_MATCH",
        "CLOSURE_MATCH",
        "WEAKREF_ALIVE",
    }
)

# Saved steps read from a compile cache file, by part name: the raw part bytes
# (parsed when a step asks). Process-wide, like torch's own compile caches.
_LOADED: dict[str, bytes] = {}
# The steps compiled ahead of time in this process, serialized when compiled (so that
# `save_compile_cache` finds them after the step is gone), by part name.
_COMPILED: dict[str, bytes] = {}


# -- the checks torch does not serialize ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IdentityCheck:
    """One guard torch could not serialize: its expression and the identity of its value.

    Attributes:
        expr: the guard's source expression (`L['state'].tx.update`: `L` is the
            compiled function's frame locals: its arguments and closure).
        identity: `identity(value)` when compiled, or None (then the check only
            holds in the compiling process, by object identity).
        per_call: the expression reads an argument, so it is checked on every call.
    """

    expr: str
    identity: str | None
    per_call: bool


_GLOBAL_ROOT = re.compile(r"G\['([A-Za-z_][A-Za-z0-9_]*)'\]")
_DYNAMO_GLOBAL = re.compile(r"^\w*_\d+_c\d+$")  # a global Dynamo installs: `<name>_<id>_c<compile>`


def _user_global_root(expr: str) -> str | None:
    """`name` when every global `expr` reads is `G['name']`, a name of the step's own module.

    Dynamo's own globals (`G['__import_torch...']`, `G['___unnamed_scope...']`,
    `G['_1398..._c0']`) exist only in the compiling process: None for those.
    """
    roots = set(_GLOBAL_ROOT.findall(expr))
    if len(roots) != 1 or expr.count("G[") != 1 or "___" in expr:
        return None
    root = roots.pop()
    return None if root.startswith("__") or _DYNAMO_GLOBAL.match(root) else root


class _Recorder:
    """A guard filter: what torch keeps for ahead-of-time guards, remembering what it drops.

    torch keeps a guard unless it names an object by identity (`_IDENTITY_GUARDS`)
    or reads a global. lightfunc also keeps the serializable guards on the
    step's own module-level names (`G['model']...`: a script's model), which
    torch's guards then check against this process's globals, and records
    each identity guard on the step's arguments, closure or own globals as an
    `IdentityCheck`. The rest (torch's and lightfunc's internals, read through
    Dynamo's import aliases) is covered by the source and global-name checks.
    """

    def __init__(self, arguments: frozenset[str]) -> None:
        self.arguments = arguments
        self.checks: list[tuple[IdentityCheck, Any]] = []
        self.unchecked: list[str] = []  # dropped guards lightfunc cannot evaluate
        self.guarded: set[str] = set()  # module-level names torch's kept guards read

    def __call__(self, entries: Any) -> list[bool]:
        keep = []
        for entry in entries:
            kinds = {entry.guard_type, *entry.derived_guard_types}
            identity_guard = bool(kinds & _IDENTITY_GUARDS)
            expr = entry.orig_guard.name
            root = _user_global_root(expr) if entry.is_global else None
            kept = not identity_guard and (not entry.is_global or root is not None)
            keep.append(kept)
            if kept and root is not None:
                self.guarded.add(root)
            elif not kept and (root is not None or not entry.is_global):
                self._record(expr, entry, per_call=root is not None)
        return keep

    def _record(self, expr: str, entry: Any, *, per_call: bool) -> None:
        if ("G[" in expr and _user_global_root(expr) is None) or not entry.has_value:
            self.unchecked.append(expr)
            return
        kinds = {entry.guard_type, *entry.derived_guard_types}
        value = entry.value
        ident = "alive" if kinds == {"WEAKREF_ALIVE"} else identity(value)
        per_call = per_call or any(f"L[{name!r}]" in expr for name in self.arguments)
        self.checks.append((IdentityCheck(expr, ident, per_call), value))


def _evaluate(code: types.CodeType, f_locals: dict[str, Any], f_globals: dict[str, Any]) -> Any:
    # torch's guard expressions, from this process or a trusted file
    return eval(code, {"L": f_locals, "G": f_globals, "__builtins__": builtins})


# -- one compiled signature ----------------------------------------------------------------


_UNSEEN = object()


class _Entry:
    """One ahead-of-time compiled signature of a step, with its checks."""

    def __init__(
        self,
        aot: Any,
        checks: list[tuple[IdentityCheck, Any]],
        part: str | None,
        globals_: dict[str, dict[str, str | None]],
        hops: list[Hop],
        guarded: frozenset[tuple[str, str]],
    ) -> None:
        self.aot = aot
        self.guarded = guarded  # module-level names torch's kept guards check
        self.globals = globals_  # module -> name -> identity: what the traced code read
        self.hops = hops  # re-checked on every call
        self.part = part  # the compile-cache part it was loaded from (None: compiled here)
        env = aot._artifacts.runtime_env
        self.run = aot.fn
        self.guards = aot._artifacts.guard_manager
        code = env.bytecode
        self.argnames = code.co_varnames[: code.co_argcount]
        self.cells = tuple(zip(code.co_freevars, env.closure or (), strict=True))
        self.checks = [check for check, _ in checks]
        self.compiled_checks = [compile(c.expr, "<guard>", "eval") for c in self.checks]
        self.per_call = [i for i, c in enumerate(self.checks) if c.per_call]
        # The object each check last accepted (compiled here: the object traced).
        self.seen: list[Any] = [value for _, value in checks]
        self.verified = part is None  # every check held once (checks not per call hold since)

    def locals_for(self, args: tuple[Any, ...]) -> dict[str, Any] | None:
        """The frame locals the guards read: the closure and the arguments by name."""
        if len(args) != len(self.argnames):
            return None
        f_locals = {name: cell.cell_contents for name, cell in self.cells}
        f_locals.update(zip(self.argnames, args, strict=True))
        return f_locals

    def _holds(self, i: int, f_locals: dict[str, Any]) -> bool:
        try:
            value = _evaluate(self.compiled_checks[i], f_locals, self.run.__globals__)
        except Exception:  # the path no longer exists: the guard fails
            return False
        if value is self.seen[i]:
            return True
        expected = self.checks[i].identity
        if expected is None:  # identity only within the compiling process
            return False
        if expected != "alive" and identity(value) != expected:
            return False
        self.seen[i] = value
        return True

    def matches(self, args: tuple[Any, ...]) -> bool:
        """Whether this entry may run `args`: torch's guards and lightfunc's checks hold."""
        f_locals = self.locals_for(args)
        if f_locals is None or not self.guards.check(f_locals):
            return False
        if not all(ns.get(name, _UNSEEN) is value for ns, name, value in self.hops):
            return False
        which = self.per_call if self.verified else range(len(self.checks))
        if not all(self._holds(i, f_locals) for i in which):
            return False
        self.verified = True
        return True


# -- the precompiled step ------------------------------------------------------------------


class PrecompiledFunction:
    """`torch.compile(fn)`, but compiled ahead of time so that its artifacts can be saved.

    What `lightfunc._compile.compile_fn` returns for `CompileOptions(precompile=True)`.
    A call runs the first entry whose guards and checks pass; otherwise a
    saved entry of this step loaded from a compile cache is tried, then a new
    ahead-of-time compile; past `MAX_SIGNATURES`, or when torch cannot compile
    the step ahead of time, the plain `torch.compile(fn)` runs it.
    """

    def __init__(self, fn: Callable[..., Any], compile_kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.key = step_key(fn, compile_kwargs)
        self._kwargs = compile_kwargs
        self._compiled = torch.compile(fn, **compile_kwargs)  # the fallback
        self._entries: list[_Entry] = []
        self._tried: set[str] = set()  # loaded parts already read
        self._pending: list[_Entry] = []  # read, but no call has matched them yet
        self._fallback_reason: str | None = None
        self.__qualname__ = getattr(fn, "__qualname__", "step")
        functools.update_wrapper(self, fn)

    @property
    def entries(self) -> int:
        """How many compiled signatures this step holds (loaded or compiled here)."""
        return len(self._entries)

    @property
    def loaded(self) -> int:
        """How many of them came from a compile cache file."""
        return sum(e.part is not None for e in self._entries)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or self._fallback_reason is not None:
            return self._compiled(*args, **kwargs)
        for entry in self._entries:
            if entry.matches(args):
                return entry.run(*args)
        new = self._from_loaded(args) or self._compile(args)
        if new is None:
            return self._compiled(*args)
        return new.run(*args)

    def _from_loaded(self, args: tuple[Any, ...]) -> _Entry | None:
        """A saved entry of this step that fits `args` (loaded parts are read on first need)."""
        prefix = f"step/{self.key}/"
        for part in [p for p in _LOADED if p.startswith(prefix) and p not in self._tried]:
            self._tried.add(part)
            try:
                self._pending.append(_deserialize(_LOADED[part], self.fn, part))
            except _Stale as reason:
                warnings.warn(
                    f"not using the saved compiled step {self.__qualname__} ({reason}); it is "
                    f"compiled again.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        for entry in self._pending:
            if entry.matches(args):
                self._pending.remove(entry)
                self._entries.append(entry)
                return entry
        return None

    def _compile(self, args: tuple[Any, ...]) -> _Entry | None:
        if len(self._entries) >= MAX_SIGNATURES:
            return self._fall_back(f"more than {MAX_SIGNATURES} input signatures")
        code = self.fn.__code__ if isinstance(self.fn, types.FunctionType) else None
        names = frozenset(code.co_varnames[: code.co_argcount]) if code else frozenset()
        recorder = _Recorder(names)
        kwargs = dict(self._kwargs)
        options = dict(kwargs.pop("options", None) or {})
        if "mode" in kwargs:
            from torch._inductor import list_mode_options

            options.update(list_mode_options(kwargs.pop("mode")))
        options["guard_filter_fn"] = recorder
        try:
            with _compile_callbacks():
                compiled: Any = torch.compile(self.fn, **kwargs, options=options)
                aot = compiled.aot_compile((args, {}))
        except Exception as error:  # torch cannot do it ahead of time: compile as usual
            return self._fall_back(f"{type(error).__name__}: {error}"[:300])
        if recorder.unchecked:
            # A dropped guard lightfunc cannot evaluate: only Dynamo's own guards are safe.
            return self._fall_back(f"a guard on {recorder.unchecked[0]} cannot be checked")
        module = getattr(self.fn, "__module__", None)
        guarded = frozenset((module, name) for name in recorder.guarded if module)
        try:
            table, hops = global_identities(
                global_names(aot._artifacts.source_info.inlined_sources), guarded
            )
        except (SyntaxError, ImportError, ValueError) as error:
            return self._fall_back(f"the traced source cannot be read ({error!r:.200})")
        opaque = [f"{m}.{n}" for m, t in table.items() for n, i in t.items() if i is None]
        if opaque:
            # Dynamo guards what the step reads of such an object; lightfunc cannot.
            return self._fall_back(f"it reads `{opaque[0]}`, an object with no lasting identity")
        entry = _Entry(aot, recorder.checks, None, table, hops, guarded)
        self._entries.append(entry)
        self._save(entry)
        return entry

    def _fall_back(self, reason: str) -> _Entry | None:
        """From now on a plain `torch.compile` runs this step (warned once, with `reason`)."""
        self._fallback_reason = reason
        warnings.warn(
            f"{self.__qualname__} is compiled by a plain torch.compile, not ahead of time "
            f"(nothing of it is saved in the compile cache): {reason}",
            RuntimeWarning,
            stacklevel=5,
        )
        return None

    def _save(self, entry: _Entry) -> None:
        """Serialize `entry` for `save_compile_cache`, or warn why it cannot be carried."""
        try:
            data = _serialize(entry, self.fn)
        except _Unsaveable as reason:
            warnings.warn(
                f"{self.__qualname__} is not saved ahead of time: {reason}. A compile cache "
                f"saved from this process makes a new one trace it again (the rest of the "
                f"cache still helps).",
                RuntimeWarning,
                stacklevel=5,
            )
            return
        digest = hashlib.sha256(data).hexdigest()[:32]
        _COMPILED[f"step/{self.key}/{digest}"] = data


def step_key(fn: Callable[..., Any], compile_kwargs: dict[str, Any]) -> str:
    """Which saved steps a built step may use: its code, name and compile options."""
    code = getattr(fn, "__code__", None)
    described = json.dumps(
        {k: v for k, v in compile_kwargs.items() if k != "options"}, sort_keys=True, default=repr
    )
    options = json.dumps(compile_kwargs.get("options") or {}, sort_keys=True, default=repr)
    h = hashlib.sha256()
    for part in (qualified_name(fn), described, options):
        h.update(part.encode() + b"\0")
    if isinstance(code, types.CodeType):
        h.update(code_digest(code).encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _compile_callbacks() -> Iterator[None]:
    """Dynamo's compile start / end callbacks (`CompileWatch`) around an ahead-of-time compile."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "precompile"):
        yield


# -- saving and loading --------------------------------------------------------------------


class _Stale(Exception):
    """A saved step that does not fit this process (changed code, values, versions)."""


def _globals_of(fn: Callable[..., Any]) -> dict[str, Any]:
    return getattr(fn, "__globals__", {})


def _external(fn: Callable[..., Any]) -> dict[str, Any]:
    """The objects of this process a saved step refers to instead of copies: the closure."""
    cells = getattr(fn, "__closure__", None) or ()
    return {f"closure:{i}": cell.cell_contents for i, cell in enumerate(cells)}


def _sources(aot: Any) -> list[tuple[str, int, int, str]]:
    return sorted(
        (s.module, s.firstlineno, s.lastlineno, s.checksum)
        for s in aot._artifacts.source_info.inlined_sources
    )


class _Unsaveable(Exception):
    """A compiled step whose checks cannot be carried to another process (the reason)."""


def _serialize(entry: _Entry, fn: Callable[..., Any]) -> bytes:
    """A saved step: a JSON header (the checks) and torch's serialized function.

    Raises:
        _Unsaveable: a check or a module-level value has no cross-process identity,
            or torch cannot serialize the function.
    """
    from torch._dynamo.aot_compile import AOTCompiledFunction

    unknown = [c.expr for c in entry.checks if c.identity is None]
    if unknown:
        raise _Unsaveable(f"the guard on {unknown[0]} names an object with no lasting identity")
    try:
        torch_part = AOTCompiledFunction.serialize(entry.aot, _external(fn)).serialized_data
    except Exception as error:  # an object torch cannot pickle
        raise _Unsaveable(f"torch cannot serialize it ({error!s:.200})") from None
    header = {
        "format": _FORMAT,
        "name": getattr(fn, "__qualname__", "step"),
        "sources": _sources(entry.aot),
        "globals": entry.globals,
        "guarded": sorted(entry.guarded),
        "checks": [dataclasses.asdict(c) for c in entry.checks],
        "external": sorted(_external(fn)),
    }
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + torch_part


def _deserialize(data: bytes, fn: Callable[..., Any], part: str) -> _Entry:
    """The saved step in `data`, bound to `fn`'s closure and globals; raises _Stale."""
    from torch._dynamo import convert_frame
    from torch._dynamo.aot_compile import AOTCompiledFunction
    from torch._dynamo.package import _hash_sourcelines
    from torch._dynamo.utils import get_metrics_context
    from torch._guards import CompileContext, TracingContext, compile_context, tracing

    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
        checks = [IdentityCheck(**c) for c in header["checks"]]
        guarded = frozenset((str(m), str(n)) for m, n in header["guarded"])
        sources = [tuple(s) for s in header["sources"]]
    except (ValueError, KeyError, TypeError) as error:
        raise _Stale(f"unreadable header: {error!r:.100}") from None
    if header.get("format") != _FORMAT:
        raise _Stale(f"format {header.get('format')!r}")
    external = _external(fn)
    if sorted(external) != header.get("external"):
        raise _Stale("its closure differs")
    for module_name, first, last, checksum in sources:
        try:
            now = _hash_sourcelines(imported(module_name), first, last)
        except Exception:
            raise _Stale(f"the source of {module_name} cannot be read") from None
        if now != checksum:
            raise _Stale(f"{module_name} lines {first}-{last} changed")
    saved_globals = header.get("globals", {})
    names = {m: set(table) for m, table in saved_globals.items()}
    try:
        current, hops = global_identities(names, guarded)
    except ImportError as error:
        raise _Stale(str(error)) from None
    for module_name, table in saved_globals.items():
        for name, ident in table.items():
            if current.get(module_name, {}).get(name) != ident:
                raise _Stale(f"{module_name}.{name} is not what it was")
    with (
        compile_context(CompileContext(convert_frame.get_compile_id({}))),
        get_metrics_context(),
        tracing(TracingContext(None)),
    ):
        try:
            aot = AOTCompiledFunction.deserialize(data[8 + size :], _globals_of(fn), external)
        except Exception as error:
            raise _Stale(
                f"torch could not load it ({type(error).__name__}: {error!s:.200})"
            ) from None
    return _Entry(aot, [(c, _UNSEEN) for c in checks], part, saved_globals, hops, guarded)


def saved_steps() -> list[tuple[str, bytes]]:
    """Every saved step of this process: those loaded and those compiled here."""
    return sorted({**_LOADED, **_COMPILED}.items())


def load_steps(parts: dict[str, bytes]) -> int:
    """Make saved steps available to the steps this process builds; returns how many."""
    _LOADED.update(parts)
    return len(parts)
