"""`spawn`: run a function on N local processes, each with its `Mesh`, for tests and notebooks.

    def check(mesh, n):
        return mesh.all_reduce(torch.tensor(float(mesh.global_rank + n)), op="sum")

    results = spawn(check, 2, args=(1,), timeout=60)    # [tensor(3.), tensor(3.)]

A small, bounded helper: the parent hosts the rendezvous store (as the
elastic agent does), starts the processes, and returns each rank's result,
or raises as soon as one rank fails or the time is up, killing the others.
It never hangs and never restarts anything. Training runs are launched with
`lightfunc run` / `lightfunc.distributed.launch` (torch's elastic launcher).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from ._mesh import Mesh, init_mesh


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    start_method: Literal["spawn", "fork", "forkserver"] = "spawn",
    accelerator: Literal["cpu", "cuda", "gpu", "auto"] = "cpu",
) -> list[Any]:
    """Run `fn(mesh, *args)` on `nprocs` new local processes; return their results by rank.

    Args:
        fn: the function; with "spawn" it must be importable by name (defined
            at the top level of a module). Its return value travels back by pickle.
        nprocs: number of processes (ranks), >= 1.
        args: extra positional arguments of every call.
        timeout: seconds for the whole run, and for any single collective.
        start_method: how processes start ("spawn": clean, ~2 s per process).
        accelerator: the device each rank computes on (see `init_mesh`).

    Returns:
        A list: element `r` is what `fn` returned on rank `r`.

    Raises:
        ValueError: `nprocs < 1` or `timeout <= 0`.
        RuntimeError: a rank raised (its traceback is in the message) or died.
        TimeoutError: the run took longer than `timeout`; every process is killed.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"`nprocs` must be an int >= 1, got {nprocs!r}.")
    if not timeout > 0:
        raise ValueError(f"`timeout` must be positive seconds, got {timeout!r}.")
    ctx: Any = multiprocessing.get_context(start_method)
    results: queue.Queue[tuple[int, bool, Any]] = ctx.Queue()
    # The parent hosts the store, like the elastic agent; ranks connect as clients.
    store = dist.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, nprocs, store.port, tuple(args), results, timeout, accelerator),
            name=f"lightfunc-rank{rank}",
        )
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    ok = False
    try:
        out = _collect(procs, results, nprocs, time.monotonic() + timeout, timeout)
        ok = True
        return out
    finally:
        _stop(procs, grace=10.0 if ok else 0.0)
        del store


def _collect(
    procs: list[Any], results: queue.Queue[Any], n: int, deadline: float, timeout: float
) -> list[Any]:
    out: dict[int, Any] = {}
    while len(out) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"`spawn`: ranks {sorted(set(range(n)) - set(out))} did not finish within "
                f"timeout={timeout} s; all processes were killed."
            )
        try:
            rank, ok, value = results.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
            if dead:
                time.sleep(0.2)  # a failing rank reports before it exits; give the report a moment
                if results.empty():
                    raise RuntimeError(
                        f"`spawn`: rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                        f"before returning."
                    ) from None
            continue
        if not ok:
            raise RuntimeError(f"`spawn`: rank {rank} raised:\n{value}")
        out[rank] = pickle.loads(value)
    return [out[r] for r in range(n)]


def _stop(procs: list[Any], grace: float) -> None:
    """Give the processes `grace` seconds to exit (closing their process groups); kill the rest."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    results: queue.Queue[Any],
    timeout: float,
    accelerator: Any,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0",
    )
    # N processes share the machine's cores (torchrun sets OMP_NUM_THREADS=1 likewise).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    mesh: Mesh | None = None
    succeeded = False
    try:
        mesh = init_mesh(accelerator=accelerator, timeout=datetime.timedelta(seconds=timeout))
        # Pickled here, by value: the queue's own pickler would share tensors through
        # file descriptors that die with this process.
        results.put((rank, True, pickle.dumps(fn(mesh, *args))))
        succeeded = True
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if mesh is not None:
            mesh.close(wait_for_others=succeeded)
