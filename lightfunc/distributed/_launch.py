"""Starting N processes per node: `lightfunc run` and `launch`, on torch's elastic launcher.

    lightfunc run --nproc-per-node 2 train.py --lr 1e-3          # one machine, 2 processes
    lightfunc run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --nproc-per-node 8 train.py
    lightfunc run --nnodes 1:2 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 train.py
    results = launch(train, nproc_per_node=2, args=(config,))      # from Python or a notebook

Both build one `torch.distributed.launcher.api.LaunchConfig` and hand it to
`elastic_launch`, the engine behind `torchrun`: it starts the workers, sets
their `RANK` / `LOCAL_RANK` / `WORLD_SIZE` / `MASTER_ADDR` / `MASTER_PORT` /
`TORCHELASTIC_RESTART_COUNT` environment, stops the others when one fails and,
with `max_restarts`, restarts the whole group. `lightfunc run` is torchrun's
command line: its options come from torchrun's own parser
(`torch.distributed.run.get_args_parser`, both spellings, `$PET_*`
defaults) and its `LaunchConfig` from torchrun's `config_from_args`. This
module adds clear errors for bad values and unknown options (argparse alone
took an unknown option's value for the script), `$NODE_RANK` /
`$MASTER_ADDR` / `$MASTER_PORT` as defaults, SIGUSR1 among the signals
forwarded to the workers, one rendezvous timeout for both backends
(`--rdzv-conf timeout=S`), and messages for failed workers and rendezvous.

Rendezvous, as torchrun chooses it: one node without a port (or
`--standalone`) -> `c10d` on a free local port with a fresh run id;
otherwise the `static` rendezvous at `master_addr:master_port` (node 0 hosts
the store), or the one `--rdzv-backend` / `--rdzv-endpoint` name.

Restarts start every worker again from the top of the script, so a script
that should continue where it stopped restores its newest checkpoint first.
Its process group must not reuse the previous attempt's keys in the
launcher's store: create it with `lightfunc.distributed.init_mesh`, whose
store is prefixed by `TORCHELASTIC_RESTART_COUNT`. Measured on torch 2.13,
2 gloo ranks, one SIGKILLed, `--max-restarts 1`: with torch's plain `env://`
group the restarted attempt hung or failed to connect in 2 of 4 tries (5 of 7
in an earlier measurement); with the prefixed store it finished in 5 of 5.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The signals torch's launcher takes over (and forwards to the workers); SIGUSR1 is SLURM's
# warning before a job's time runs out (`--signal=USR1@90`).
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
DEFAULT_PORT = 29500  # torchrun's default port for the static rendezvous


@dataclass(frozen=True)
class LaunchOptions:
    """Validated launcher arguments (what `lightfunc run` and `launch` share).

    Attributes:
        nproc_per_node: processes started on this node.
        nnodes: number of nodes taking part (each runs the same command).
        node_rank: this node's index in [0, nnodes).
        master_addr: address of node 0, where the rendezvous store lives;
            required on the other nodes, 127.0.0.1 by default on node 0.
        master_port: its port; None on a single node picks a free one.
        max_restarts: how many times a failed group is restarted (0: none).
        start_method: how workers start: "spawn", "fork" or "forkserver".
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    max_restarts: int = 0
    start_method: str = "spawn"

    def __post_init__(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if type(self.max_restarts) is not int or self.max_restarts < 0:
            raise ValueError(f"`max_restarts` must be an integer >= 0, got {self.max_restarts!r}.")
        if type(self.node_rank) is not int or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"`node_rank` must be an integer in [0, nnodes={self.nnodes}), got "
                f"{self.node_rank!r}. Give each node its own rank, 0 on the node at `master_addr`."
            )
        port = self.master_port
        if port is not None and (type(port) is not int or not 1 <= port <= 65535):
            raise ValueError(f"`master_port` must be an integer in [1, 65535], got {port!r}.")
        if self.master_addr is None and self.node_rank > 0:
            raise ValueError(
                f"`master_addr` is required on node {self.node_rank}: give the address of node "
                f"0 (where `node_rank` is 0), e.g. master_addr='10.0.0.1'."
            )
        if self.master_addr is not None and not self.master_addr:
            raise ValueError("`master_addr` must be a host name or IP address, got ''.")
        if self.start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(
                f"`start_method` must be 'spawn', 'fork' or 'forkserver', got "
                f"{self.start_method!r}."
            )

    def config(self, log_dir: str | None = None) -> Any:
        """The `torch.distributed.launcher.api.LaunchConfig` for these options.

        `log_dir`: where torch elastic keeps each worker's error file (None:
        a `torchelastic_*` folder of its own in the temporary directory, which
        it never removes; `launch` and `run_script` pass one they remove).
        """
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
        from torch.distributed.launcher.api import LaunchConfig

        if self.nnodes == 1 and self.master_port is None:
            backend, endpoint, configs = "c10d", "localhost:0", {}
            run_id = uuid.uuid4().hex  # fresh per launch: no state shared with another run
        else:
            port = DEFAULT_PORT if self.master_port is None else self.master_port
            backend, endpoint = "static", f"{self.master_addr or '127.0.0.1'}:{port}"
            configs, run_id = {"rank": self.node_rank}, "lightfunc"
        return LaunchConfig(
            min_nodes=self.nnodes,
            max_nodes=self.nnodes,
            nproc_per_node=self.nproc_per_node,
            run_id=run_id,
            rdzv_backend=backend,
            rdzv_endpoint=endpoint,
            rdzv_configs=configs,
            max_restarts=self.max_restarts,
            start_method=self.start_method,
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
            signals_to_handle=",".join(_SIGNALS),
        )


def launch(
    fn: Callable[..., Any],
    *,
    nproc_per_node: int,
    args: Sequence[Any] = (),
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    max_restarts: int = 0,
    start_method: str | None = None,
) -> dict[int, Any]:
    """Run `fn(*args)` in `nproc_per_node` new processes and return what each returned.

    The Python twin of `lightfunc run`, for notebooks and scripts that start
    their own workers. Each worker finds its rank in the environment (`RANK`,
    `LOCAL_RANK`, `WORLD_SIZE`) and creates its process group with
    `lightfunc.distributed.init_mesh()`. This process only supervises: it
    blocks until every worker has finished.

    Args:
        fn: the worker function. With the "spawn" start method it must be
            importable by name (defined at the top level of a module, or of a
            script guarded by ``if __name__ == "__main__"``); `args` and the
            return values travel between processes with pickle.
        nproc_per_node: processes to start on this node.
        args: positional arguments for every call of `fn`.
        nnodes, node_rank, master_addr, master_port: for several machines, as
            in `lightfunc run` (call `launch` on each, with its own `node_rank`).
        max_restarts: restart all workers this many times when one fails.
        start_method: "spawn", "fork" or "forkserver". Default: "fork" in an
            interactive session (a notebook, whose functions spawned workers
            cannot import), else "spawn".

    Returns:
        dict global rank -> the value `fn` returned there, for this node's workers.

    Raises:
        TypeError: `fn` is not callable.
        ValueError: an argument is out of range (its name is given).
        KeyboardInterrupt: interrupted (Ctrl-C); the workers were stopped.
        RuntimeError: a worker failed (after the allowed restarts); the
            message names its rank and gives its error.

    Example:
        >>> def world_size() -> int:  # doctest: +SKIP
        ...     return int(os.environ["WORLD_SIZE"])
        >>> launch(world_size, nproc_per_node=2)  # doctest: +SKIP
        {0: 2, 1: 2}
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be a function to run in each worker, got {type(fn).__name__}.")
    if start_method is None:
        start_method = "fork" if _interactive() else "spawn"
    options = LaunchOptions(
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        max_restarts=max_restarts,
        start_method=start_method,
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    with (
        _launcher_environment(options.nproc_per_node),
        tempfile.TemporaryDirectory(prefix="lightfunc-launch-") as logs,
    ):
        try:
            results: dict[int, Any] = elastic_launch(options.config(logs), fn)(*args)
        except ChildFailedError as error:
            name = getattr(fn, "__name__", repr(fn))
            message = _failure_message(error, name, options.nproc_per_node, options.max_restarts)
            raise RuntimeError(message) from None
        except SignalException as error:
            if error.sigval == signal.SIGINT:  # Ctrl-C / a notebook's interrupt: workers stopped
                raise KeyboardInterrupt from None
            raise
    return results


def run_script(
    script: str,
    script_args: Sequence[str] = (),
    options: LaunchOptions | None = None,
    *,
    module: bool = False,
) -> int:
    """Run a Python script (or `-m` module) in every worker; returns the exit code for the shell.

    Workers run ``python -u script args...`` with this interpreter. Their
    output goes straight to this process's stdout and stderr.

    Returns:
        0 when every worker exited with 0, else 1 (after printing which
        failed), or 128 + the signal number when the launcher was stopped by one.
    """
    options = options or LaunchOptions(nproc_per_node=1)
    command = ["-u", *(["-m"] if module else []), script, *script_args]
    with (
        _launcher_environment(options.nproc_per_node),
        tempfile.TemporaryDirectory(prefix="lightfunc-launch-") as logs,
    ):
        return run_config(options.config(logs), sys.executable, command, what=script)


def run_config(config: Any, entrypoint: Any, args: Sequence[str], *, what: str) -> int:
    """Launch `entrypoint(*args)` under a `LaunchConfig`; turn failures into a message and a code.

    Returns:
        0 when every worker exited with 0; 1 when one failed (after the
        allowed restarts) or the rendezvous could not complete, after printing
        why; 128 + the signal number when the launcher was stopped by a signal
        (it forwards it to the workers first, so a `lightfunc.loop` with a
        checkpoint manager saves and stops).
    """
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as error:
        message = _failure_message(error, what, config.nproc_per_node, config.max_restarts)
        print(f"lightfunc run: {message}", file=sys.stderr)
        return 1
    except (RendezvousError, DistStoreError, DistNetworkError) as error:
        # The workers' errors arrive as ChildFailedError: these are the launcher's own
        # rendezvous (c10d: RendezvousTimeoutError; static: its TCP store timing out).
        print(f"lightfunc run: {_rendezvous_message(error, config)}", file=sys.stderr)
        return 1
    except SignalException as error:
        print(
            f"lightfunc run: stopped by {error.sigval.name}, which was forwarded to the workers.",
            file=sys.stderr,
        )
        return 128 + int(error.sigval)
    return 0


def _interactive() -> bool:
    return not hasattr(sys.modules.get("__main__"), "__file__")


@contextmanager
def _launcher_environment(nproc_per_node: int) -> Iterator[None]:
    """Launch with one thread per worker (torchrun's default); restore this process's state after.

    torch's launcher installs its own signal handlers and environment entries
    in the calling process; a notebook keeps running afterwards, so both are
    put back.
    """
    saved_env = {
        k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")
    }
    handlers = {}
    for name in _SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            handlers[number] = signal.getsignal(number)
    if saved_env["OMP_NUM_THREADS"] is None and nproc_per_node > 1:
        # N processes each with a thread per core would oversubscribe the CPU.
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)


def _rendezvous_message(error: Any, config: Any) -> str:
    """Why the nodes did not meet, and what to check."""
    conf = config.rdzv_configs
    # c10d waits `join_timeout` (torch's default 600 s); static, `timeout` (LaunchConfig's 900 s).
    c10d = config.rdzv_backend == "c10d"
    wait = conf.get("join_timeout", 600) if c10d else conf.get("timeout")
    nodes = (
        str(config.min_nodes)
        if config.min_nodes == config.max_nodes
        else f"{config.min_nodes} to {config.max_nodes}"
    )
    why = f"{type(error).__name__}: {error}".strip().rstrip(":")
    return (
        f"the rendezvous did not complete ({why}).\n"
        f"It waited up to {wait} s for {nodes} nodes at {config.rdzv_endpoint} "
        f"(--rdzv-backend {config.rdzv_backend}, --rdzv-id {config.run_id}). Start every node "
        f"with the same --nnodes, --rdzv-backend, --rdzv-id and --rdzv-endpoint (or "
        f"--master-addr and --master-port), check that this machine reaches that address, and "
        f"change the wait with --rdzv-conf timeout=SECONDS."
    )


def _failure_message(error: Any, what: str, nproc_per_node: int, max_restarts: int) -> str:
    """Which workers failed and how, from a ChildFailedError: the cause first, then the stopped."""
    failures = sorted(error.failures.items())
    # Workers the launcher stopped because another failed end with its SIGTERM.
    stopped = [(r, f) for r, f in failures if f.exitcode == -signal.SIGTERM]
    causes = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or stopped
    lines = [f"  rank {r} (local rank {f.local_rank}, pid {f.pid}) {_how(f)}" for r, f in causes]
    if stopped and causes is not stopped:
        lines.append(
            f"  then stopped by the launcher: rank {', '.join(str(r) for r, _ in stopped)}"
        )
    restarts = f" (after {max_restarts} restarts)" if max_restarts else ""
    return (
        f"{what}: {len(causes)} of {nproc_per_node} workers on this node failed"
        f"{restarts}:\n"
        + "\n".join(lines)
        + "\nThe failing worker's traceback is in the output above."
    )


def _how(failure: Any) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    how = f"exited with code {failure.exitcode}"
    message = failure.message
    if isinstance(message, dict):  # an error file written by @record / a function worker
        message = message.get("message", "")
    text = str(message).strip()
    if not text or text.startswith("To enable traceback"):
        return how
    return f"{how}: {text.splitlines()[-1]}"  # the exception line of a traceback


# -- the command line ---------------------------------------------------------

_NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")


class _RunParser(argparse.ArgumentParser):
    """`lightfunc run`'s parser: an unknown option before SCRIPT is an error that names it.

    Plain argparse takes an unknown option's value for SCRIPT and hands the
    rest to the script, then complains about something else.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if args is not None:
            self._check_launcher_options(list(args))
        return super().parse_known_args(args, namespace)

    def _check_launcher_options(self, args: list[str]) -> None:
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] not in ("-", "--"):
            i += self._option_width(args[i])

    def _option_width(self, token: str) -> int:
        """How many arguments option `token` spans (itself and its value); unknown: an error."""
        name = token.split("=", 1)[0]
        action = self._option_string_actions.get(name)
        if action is not None:
            return 1 if "=" in token or action.nargs == 0 else 2
        short = None if name.startswith("--") else self._option_string_actions.get(name[:2])
        if short is not None and short.nargs != 0:  # `-r3` is `-r 3`
            return 1
        self.error(
            f"unrecognized option {name!r} before SCRIPT. `lightfunc run` takes torchrun's "
            f"options (listed by `lightfunc run --help`); options for the script go after it."
        )


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `run` command, with torchrun's options (`torch.distributed.run`'s parser)."""
    from torch.distributed.run import get_args_parser

    # argparse makes every sub-parser of the parent's class; this one needs its own.
    parser_class = subparsers._parser_class
    subparsers._parser_class = _RunParser
    try:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            "run",
            parents=[get_args_parser()],
            conflict_handler="resolve",  # both define -h
            allow_abbrev=False,
            help="start a training script in N processes per node (torchrun's options)",
            description=(
                "Start SCRIPT in --nproc-per-node processes on this node, with RANK, "
                "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set for "
                "torch.distributed: torch's elastic launcher, with torchrun's options (dashes or "
                "underscores: --nproc-per-node or --nproc_per_node). For several nodes, run the "
                "same command on each. Options after SCRIPT are passed to it."
            ),
            epilog=(
                "examples:\n"
                "  lightfunc run --nproc-per-node 2 train.py --lr 1e-3\n"
                "  lightfunc run --nproc-per-node auto train.py      # one per GPU (else per CPU)\n"
                "  # two nodes, static rendezvous at node 0:\n"
                "  lightfunc run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 "
                "--master-port 29500 --nproc-per-node 8 train.py\n"
                "  # two nodes (or one to two: --nnodes 1:2), c10d rendezvous:\n"
                "  lightfunc run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 "
                "--rdzv-id job42 --nproc-per-node 8 train.py\n"
                "  lightfunc run --nproc-per-node 4 --max-restarts 3 train.py   "
                "# restart all workers when one fails\n"
                "\n"
                "A rendezvous that cannot complete fails after --rdzv-conf timeout=SECONDS "
                "(default: torch's, 600 s for c10d, 900 s for static). SIGTERM, SIGINT, SIGUSR1 "
                "reach every worker; a lightfunc.loop with a CheckpointManager then saves and "
                "stops at the next step."
            ),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    finally:
        subparsers._parser_class = parser_class
    helps = {
        "training_script": "the training script (or module, with -m)",
        "training_script_args": "its arguments",
        "node_rank": "this node's rank for the static rendezvous, 0 on the node at "
        "--master-addr (default: $PET_NODE_RANK, $NODE_RANK or 0)",
        "master_addr": "address of node 0 for the static rendezvous, required on the other "
        "nodes (default: $PET_MASTER_ADDR or $MASTER_ADDR; 127.0.0.1 on node 0)",
        "master_port": f"its port (default: $PET_MASTER_PORT or $MASTER_PORT; else "
        f"{DEFAULT_PORT} for several nodes, a free port for one)",
        "signals_to_handle": f"signals forwarded to the workers (default: {','.join(_SIGNALS)})",
    }
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)
        if action.dest == "training_script":
            action.metavar = "SCRIPT"
        elif action.dest == "training_script_args":
            action.metavar = "..."
    env = os.environ
    defaults: dict[str, Any] = {
        "master_addr": env.get("PET_MASTER_ADDR", env.get("MASTER_ADDR")) or None
    }
    for dest, fallback in (("node_rank", "NODE_RANK"), ("master_port", "MASTER_PORT")):
        if f"PET_{dest.upper()}" not in env and fallback in env:
            defaults[dest] = env[fallback]
    if "PET_SIGNALS_TO_HANDLE" not in env:
        defaults["signals_to_handle"] = ",".join(_SIGNALS)  # torchrun's, plus SIGUSR1
    parser.set_defaults(**defaults, handler=functools.partial(_run_command, parser=parser))
    return parser


def _run_command(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    from torch.distributed.run import config_from_args

    nproc = _check_run_arguments(args, parser)
    with (
        _launcher_environment(nproc),
        tempfile.TemporaryDirectory(prefix="lightfunc-launch-") as logs,
    ):
        if getattr(args, "log_dir", None) is None:  # else torch elastic leaves a torchelastic_*
            args.log_dir = logs
        config, entrypoint, entry_args = config_from_args(args)
        return run_config(config, entrypoint, entry_args, what=args.training_script)


def _check_run_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check `lightfunc run`'s arguments (clear errors, exit 2) and choose the rendezvous as
    torchrun does; returns the number of processes on this node."""
    min_nodes, max_nodes = _nnodes(args.nnodes, parser)
    nproc = _nproc(args.nproc_per_node, parser)
    args.nproc_per_node = str(nproc)
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        parser.error(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.node_rank < 0:
        parser.error(f"--node-rank must be >= 0, got {args.node_rank}")
    timeout = _rendezvous_timeout(args, parser)
    if args.standalone and max_nodes > 1:
        parser.error(
            f"--standalone runs one node, but --nnodes is {args.nnodes}: drop --standalone and "
            f"give the nodes a rendezvous (--rdzv-backend c10d --rdzv-endpoint HOST:PORT)."
        )
    static = args.rdzv_backend == "static"
    if args.standalone or (
        static and not args.rdzv_endpoint and args.master_port is None and max_nodes == 1
    ):  # one node: c10d on a free local port, a fresh run id (torchrun's --standalone)
        args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"
        args.rdzv_id, static = uuid.uuid4().hex, False
    if static:
        if min_nodes != max_nodes:
            parser.error(
                f"--nnodes {args.nnodes} (a range of nodes) needs an elastic rendezvous: add "
                f"--rdzv-backend c10d --rdzv-endpoint HOST:PORT (the same on every node)."
            )
        if args.node_rank >= max_nodes:
            parser.error(
                f"--node-rank {args.node_rank} is out of range for --nnodes {args.nnodes}: give "
                f"each node a rank in 0..{max_nodes - 1} (0 on the node at --master-addr)."
            )
        if args.master_addr is None and args.node_rank > 0 and not args.rdzv_endpoint:
            parser.error(
                f"--master-addr is required on node {args.node_rank}: give the address of node 0 "
                f"(or set $MASTER_ADDR)."
            )
    elif not args.rdzv_endpoint:
        parser.error(
            f"--rdzv-backend {args.rdzv_backend} needs --rdzv-endpoint HOST:PORT, the same on "
            f"every node (the host runs the rendezvous store)."
        )
    args.master_addr = args.master_addr or "127.0.0.1"
    if args.master_port is None:
        args.master_port = DEFAULT_PORT
    if timeout is not None and args.rdzv_backend == "c10d" and "join_timeout" not in args.rdzv_conf:
        # c10d waits `join_timeout` for the nodes; `timeout` is the one knob for both backends.
        args.rdzv_conf = f"{args.rdzv_conf},join_timeout={timeout}".lstrip(",")
    if not (args.module or args.no_python) and not Path(args.training_script).is_file():
        parser.error(
            f"no script file at '{args.training_script}' (working directory '{Path.cwd()}'); "
            f"give the path of a Python file, or -m for a module name."
        )
    return nproc


def _nnodes(text: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    """`--nnodes N` or `MIN:MAX`, as (min, max)."""
    parts = str(text).split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        parser.error(
            f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}; e.g. --nnodes 2, "
            f"or --nnodes 1:4 for an elastic run (with --rdzv-backend c10d)."
        )
    return low, high


def _nproc(text: str, parser: argparse.ArgumentParser) -> int:
    """`--nproc-per-node`: an int >= 1, or auto / cpu / gpu / xpu (torchrun's words)."""
    from torch.distributed.run import determine_local_world_size

    if str(text).strip().lstrip("-").isdigit():
        if int(text) < 1:
            parser.error(f"--nproc-per-node must be >= 1, got {text}")
        return int(text)
    if text not in _NPROC_WORDS:
        parser.error(
            f"--nproc-per-node must be an integer >= 1 or one of {', '.join(_NPROC_WORDS)}, got "
            f"{text!r}"
        )
    try:
        return int(determine_local_world_size(text))
    except ValueError as error:  # gpu / xpu asked for, none available
        parser.error(f"--nproc-per-node {text}: {error}")


def _rendezvous_timeout(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    """`--rdzv-conf`'s `timeout`, checked (None when not given)."""
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config

    try:
        conf = _parse_rendezvous_config(args.rdzv_conf)
    except ValueError as error:
        parser.error(f"--rdzv-conf {args.rdzv_conf!r}: {error}")
    if "timeout" not in conf:
        return None
    text = conf["timeout"]
    if not text.isdigit() or int(text) < 1:
        parser.error(f"--rdzv-conf timeout must be whole seconds >= 1, got {text!r}")
    return int(text)
