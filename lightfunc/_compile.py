"""The one place lightfunc calls `torch.compile`.

Defaults, and why:
- `fullgraph=True`: a pure step has no reason to break the graph; a break is
  a bug we want to hear about at the first call, not a silent slowdown.
- `dynamic=False`: every distinct batch shape gets its own static graph. The
  last smaller batch of an epoch compiles once (the first epoch), and every
  later epoch reuses both graphs. Dynamic shapes would avoid that one extra
  compile, but in torch 2.13 `torch.func.grad` over `nn.Dropout` fails to
  trace with a symbolic batch size, and static graphs are faster. Pass
  `drop_last=True` to the DataLoader to avoid the extra graph altogether.
- `deterministic=True` sets inductor's `fallback_random`, so random ops
  (dropout) draw exactly the numbers eager PyTorch would, at some speed cost.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types
from collections.abc import Callable
from typing import Any, Literal

import torch

from ._precompile import PrecompiledFunction

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How a step is compiled.

    Attributes:
        mode: `torch.compile` mode.
        fullgraph: fail on graph breaks instead of splitting the graph.
        dynamic: `torch.compile`'s `dynamic` (False: one static graph per shape).
        deterministic: random ops match eager bit for bit (inductor `fallback_random`).
        backend: the `torch.compile` backend ("inductor"; "aot_eager" for debugging).
        precompile: compile ahead of time (`torch.compile(...).aot_compile`), so
            that `save_compile_cache` also keeps what Dynamo traced and a new
            process that loads it skips tracing (`lightfunc._precompile`).
            Needs `fullgraph=True`.
    """

    mode: Mode = "default"
    fullgraph: bool = True
    dynamic: bool | None = False
    deterministic: bool = False
    backend: str = "inductor"
    precompile: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(map(repr, _MODES))}, got {self.mode!r}."
            )
        if self.precompile and not self.fullgraph:
            raise ValueError(
                "`precompile=True` needs `fullgraph=True` (torch compiles ahead of time only "
                "whole graphs); got `fullgraph=False`. Drop one of the two."
            )


def as_compile_options(compile: bool | str | CompileOptions) -> CompileOptions | None:
    """Normalise `build`'s `compile=` argument: False -> None (eager), a mode string or options."""
    if compile is False:
        return None
    if compile is True:
        return CompileOptions()
    if isinstance(compile, str):
        return CompileOptions(mode=compile)  # type: ignore[arg-type]
    if isinstance(compile, CompileOptions):
        return compile
    raise TypeError(
        f"`compile` must be True, False, a mode string ({', '.join(_MODES)}) or a "
        f"lightfunc.CompileOptions, got {compile!r}."
    )


def compile_fn(fn: Callable[..., Any], options: CompileOptions) -> Callable[..., Any]:
    """`torch.compile(fn)` with `options`, on a copy of `fn` with its own code object.

    torch.compile caches graphs per code object. The transforms of a step
    are closures made by the same few factories, so two built steps (a train
    and an eval step, a deferring and an updating micro-batch) would share
    one code object, one cache and one recompile limit, and recompile each
    other out of it. Compiling a copy with a fresh code object gives each
    its own; `fn` itself is left as it is.
    """
    if options.precompile:
        return PrecompiledFunction(_with_own_code(fn), _compile_kwargs(options))
    return torch.compile(_with_own_code(fn), **_compile_kwargs(options))


def _compile_kwargs(options: CompileOptions) -> dict[str, Any]:
    """`torch.compile`'s keyword arguments for `options`."""
    inductor_options: dict[str, Any] = {}
    if options.deterministic and options.backend == "inductor":
        inductor_options["fallback_random"] = True
    kwargs: dict[str, Any] = dict(
        fullgraph=options.fullgraph, dynamic=options.dynamic, backend=options.backend
    )
    if options.backend == "inductor":
        # torch.compile takes either `mode` or `options`, not both.
        if inductor_options:
            inductor_options.update(torch._inductor.list_mode_options(options.mode))
            kwargs["options"] = inductor_options
        else:
            kwargs["mode"] = options.mode
    return kwargs


def compile_regions(
    model: torch.nn.Module,
    regions: type[torch.nn.Module] | Callable[[str, torch.nn.Module], bool] | None = None,
    *,
    compile: bool | str | CompileOptions = True,
) -> list[str]:
    """Compile each repeated block of `model` in place, as graphs shared by all of them.

    Regional compilation: instead of one graph for the whole step (whose
    compile time grows with the number of blocks), each block's forward is
    compiled on its own. The blocks are instances of one class with the same
    shapes, so torch.compile traces them once and reuses the graph
    (parameters are graph inputs): in practice two graphs, the first block's
    (its input needs no gradient) and one every later block shares, so the
    compile time is flat in depth. Use it with an eager step, `lf.build(step,
    compile=False)`: the gradient is then taken by `torch.autograd.grad`
    around the compiled blocks (in torch 2.13 `torch.func.grad` cannot
    differentiate a compiled function from eager code, and a whole compiled
    step cannot hold regions: see bench/results/startup.md).

        compile_regions(model)                     # every block of a ModuleList
        step = lf.build(train_step, compile=False)

    Each block's `forward` is compiled, not its `__call__`: the module's
    hooks run eagerly around the compiled region. That is what lets a
    fully-sharded step (`strategy=FSDP(mesh)`, eager) keep its per-unit
    gathers with compiled blocks: each block's parameters are all-gathered
    by its forward pre-hook, the compiled forward computes, and its
    backward re-gathers them (see `lightfunc.distributed.FSDP`).

    The blocks must be your own module classes: dynamo does not compile a
    frame of torch's own modules (`nn.Linear`, ...) as the top of a graph.
    torch 2.13 may warn once, while tracing, that the `.grad` of a non-leaf
    tensor is read (the parameters `lf.apply` swaps in); harmless.

    Args:
        model: the module; its blocks are compiled in place (each block's
            `forward` replaced by its compiled form).
        regions: which sub-modules to compile: a module class, or a predicate
            over (name, module). Default: the members of every
            `nn.ModuleList` / `nn.Sequential` whose members are all of one class
            (at least two of them).
        compile: how (as `build`'s `compile=`; False compiles nothing).

    Returns:
        The names of the modules compiled.

    Raises:
        ValueError: nothing in `model` matches `regions`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"`model` must be the torch.nn.Module whose blocks to compile, got "
            f"{type(model).__name__} {model!r:.80}."
        )
    options = as_compile_options(compile)
    if regions is None:
        chosen = _repeated_blocks(model)
    else:
        kind = regions if isinstance(regions, type) else None
        wanted: Callable[[str, torch.nn.Module], bool] = (
            (lambda _, m: isinstance(m, kind)) if kind is not None else regions  # type: ignore[assignment]
        )
        chosen = [(n, m) for n, m in model.named_modules() if n and wanted(n, m)]
    if not chosen:
        raise ValueError(
            f"`regions={regions!r}` matches no sub-module of {type(model).__name__}. Pass the "
            f"blocks' class (e.g. `regions=Block`) or a predicate `(name, module) -> bool`."
        )
    if options is not None:
        kwargs = _compile_kwargs(options)
        for _, module in chosen:
            # The block's `forward`, not `module.compile()` (which compiles `_call_impl`, the
            # module's hooks included): hooks then run eagerly around the compiled region, as
            # FSDP's per-unit gathers must (a collective and its saved-tensor hooks cannot be
            # traced into the block's graph). The class's function is compiled and bound to
            # the module as a method, so that `deepcopy` binds it to the copy: a compiled
            # *bound* method would keep running the original module, its parameters included,
            # from every copy. A second call recompiles the original function.
            own = module.__dict__.get("forward")
            if own is None or (isinstance(own, types.MethodType) and own.__self__ is module):
                function = type(module).forward if own is None else own.__func__
                function = getattr(function, "_torchdynamo_orig_callable", function)
                module.forward = types.MethodType(torch.compile(function, **kwargs), module)
            else:  # a callable the user set on the instance: compiled as it is
                own = getattr(own, "_torchdynamo_orig_callable", own)
                module.forward = torch.compile(own, **kwargs)
    return [name for name, _ in chosen]


def _repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The members of every ModuleList / Sequential in `model` whose 2+ members share one class."""
    found = []
    for name, container in model.named_modules():
        if not isinstance(container, torch.nn.ModuleList | torch.nn.Sequential):
            continue
        members = list(container.named_children())
        if len(members) >= 2 and len({type(m) for _, m in members}) == 1:
            prefix = f"{name}." if name else ""
            found += [(prefix + child, m) for child, m in members]
    return found


def _with_own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    if not isinstance(fn, types.FunctionType):  # a method or callable object: nothing to copy
        return fn
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy


def compile_counts() -> dict[str, int]:
    """Process-wide counts of graphs compiled by torch.compile so far.

    `graphs` grows by one for every graph dynamo hands to the backend, first
    compiles and recompiles alike; compare it before and after a stretch of
    steps to see whether anything recompiled.
    """
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["ok"]),
    }


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    """One compile `torch.compile` ran (a first compile or a recompile).

    Attributes:
        name: the compiled function's name (`"train_step"`), or "a step" when unknown.
        seconds: wall time from the start to the end of the compile.
        cached: True when inductor's caches served every graph it needed (a warm cache).
        started: `time.perf_counter()` at the start.
    """

    name: str
    seconds: float
    cached: bool
    started: float


class CompileWatch:
    """Observe the compiles `torch.compile` runs while this watch is open.

    What the progress bar and the run summary use to say "compiling
    train_step ... 14.2 s" and to keep compile time out of the speed. It
    registers start / end callbacks with dynamo's callback handler (torch's
    own hook for this) and reads inductor's cache counters around each
    compile. Nothing is registered when `torch._dynamo` was never imported
    (an eager run builds no compiled step, so nothing can compile).

    Args:
        on_start: called with the function's name when a compile starts.
        on_end: called with the `CompileEvent` when it ends.

    Attributes:
        events: the compiles seen so far, oldest first.
    """

    def __init__(
        self,
        on_start: Callable[[str], None] | None = None,
        on_end: Callable[[CompileEvent], None] | None = None,
    ) -> None:
        self.events: list[CompileEvent] = []
        self._on_start, self._on_end = on_start, on_end
        self._open: tuple[str, float, int, int] | None = None  # name, start, hits, misses
        self._handler: Any = None
        if "torch._dynamo" in sys.modules:
            from torch._dynamo.callback import callback_handler

            self._handler = callback_handler
            callback_handler.register_start_callback(self._started)
            callback_handler.register_end_callback(self._ended)

    @property
    def seconds(self) -> float:
        """Total compile time seen so far."""
        return sum(e.seconds for e in self.events)

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if self._handler is not None:
            self._handler.remove_start_callback(self._started)
            self._handler.remove_end_callback(self._ended)
            self._handler = None

    def _started(self, *args: Any) -> None:
        name = _compiling_name()
        hits, misses = _cache_counts()
        self._open = (name, time.perf_counter(), hits, misses)
        if self._on_start is not None:
            self._on_start(name)

    def _ended(self, *args: Any) -> None:
        if self._open is None:
            return
        name, start, hits, misses = self._open
        self._open = None
        new_hits, new_misses = _cache_counts()
        cached = new_hits > hits and new_misses == misses
        event = CompileEvent(name, time.perf_counter() - start, cached, start)
        self.events.append(event)
        if self._on_end is not None:
            self._on_end(event)


def _compiling_name() -> str:
    """The name of the step being compiled, read off the stack.

    Dynamo's callbacks only get a compile id. Up the stack is the built step
    that called its compiled function (a `lightfunc.Step`: a `self` with a
    `kind` and the user's `__name__`, "train_step"); failing that, the name
    of the code dynamo compiles (a transform's wrapper, for a built step).
    """
    frame: types.FrameType | None = sys._getframe(1)
    code_name = "a step"
    while frame is not None:
        if frame.f_code.co_name == "_compile" and "convert_frame" in frame.f_code.co_filename:
            code = frame.f_locals.get("code")
            if isinstance(code, types.CodeType) and code_name == "a step":
                code_name = code.co_name
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if getattr(owner, "kind", None) in ("train", "eval"):
            name = getattr(owner, "__name__", None)
            if isinstance(name, str):
                return name
        frame = frame.f_back
    return code_name


def _cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache and AOTAutograd's cache so far."""
    from torch._dynamo.utils import counters

    hits = (
        counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    )
    misses = (
        counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]
    )
    return int(hits), int(misses)
