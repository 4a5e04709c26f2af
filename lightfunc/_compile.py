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
import types
from collections.abc import Callable
from typing import Any, Literal

import torch

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
    """

    mode: Mode = "default"
    fullgraph: bool = True
    dynamic: bool | None = False
    deterministic: bool = False
    backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(map(repr, _MODES))}, got {self.mode!r}."
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
    fn = _with_own_code(fn)
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
    return torch.compile(fn, **kwargs)


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
