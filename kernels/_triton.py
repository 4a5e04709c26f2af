"""Where the Triton kernels run, and how an op is registered with or without Triton.

Every op in this package has a Triton path and a pure-torch reference path.
An op takes the Triton path only where its kernels can actually run:

- on CUDA tensors, when `triton` imports (the kernels are compiled by Triton;
  under `torch.compile` they are traced into the graph through `wrap_triton`);
- on CPU tensors, when `triton` was imported with ``TRITON_INTERPRET=1``:
  Triton's interpreter then runs the same kernels with NumPy, one program at
  a time. It runs eagerly only, so a traced call (fake or functional tensors,
  i.e. inside `torch.compile`) takes the reference path on CPU.

Everywhere else (no Triton, CPU without the interpreter, tensor subclasses,
or after ``set_enabled(False)``) the op computes its reference: it never
raises for lack of a GPU or of Triton.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # the ops fall back to their references
    triton = None
    tl = None

#: Whether `triton` imports here.
HAS_TRITON = triton is not None
#: Whether triton runs its interpreter. Triton decides when it is first imported
#: (``TRITON_INTERPRET=1`` then makes its own library functions interpreted);
#: the environment variable may have changed since, so ask one of those functions.
INTERPRET = HAS_TRITON and isinstance(tl.sum, InterpretedFunction)

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the Triton paths on or off for every op (on by default where they can run).

    Off, every op computes its pure-torch reference. A step compiled before
    the switch keeps the path it was traced with; compile it again to change.

    Raises:
        TypeError: `enabled` is not a bool.
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__} ({enabled!r}).")
    _enabled = enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """A context in which every op computes its pure-torch reference."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the ops run their Triton kernels on `tensor` here (else their references).

    True for CUDA tensors when Triton is installed, and for plain CPU tensors
    when Triton runs its interpreter (``TRITON_INTERPRET=1`` set before
    `triton` was imported); False after ``set_enabled(False)``.
    """
    if not (HAS_TRITON and _enabled):
        return False
    if INTERPRET:
        # The interpreter reads real memory: not fake, functional or batched tensors.
        return type(tensor) is torch.Tensor
    return tensor.device.type == "cuda"


def jit(fn: Callable[..., None]) -> Any:
    """`triton.jit` in the mode triton was imported in; the plain function without Triton.

    (Without Triton the function is never launched.)
    """
    if not HAS_TRITON:
        return fn
    return InterpretedFunction(fn) if INTERPRET else JITFunction(fn)


def register_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Register a functional op ``lightfunc::<name>`` whose body may launch Triton kernels.

    With Triton, `torch.library.triton_op`: the body is also the fake
    implementation, and `torch.compile` traces through it (the kernels
    launched with `wrap_triton` become graph nodes). Without Triton, the same
    body (which then only computes the reference) as a `custom_op` with itself
    as the fake implementation, so the op, its schema and its tests are the
    same everywhere.
    """
    qualname = f"lightfunc::{name}"

    def register(fn: Callable[..., Any]) -> Any:
        if HAS_TRITON:
            return torch.library.triton_op(qualname, mutates_args=())(fn)
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register


def num_warps_for(block: int) -> int:
    """Warps for a program that holds `block` elements of a row (Liger's rule of thumb)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (>= 1)."""
    return 1 << max(0, n - 1).bit_length()


def num_programs(device: torch.device) -> int:
    """How many persistent programs to launch for a reduction over rows on `device`."""
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(device).multi_processor_count * 2
    return 4  # the interpreter runs programs one after another: few and long is fastest
