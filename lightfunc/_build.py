"""`build`: turn a pure step function into a fast, checked one.

    step = lightfunc.build(train_step)            # compiled
    state, metrics = step(state, batch)

A built train step, on every call:
1. seeds torch's generators from the state's `RngKey` (restoring them after),
2. calls the compiled (or eager) user function on the state without its key,
3. returns the new state with the key advanced, and the metrics.

The first call also validates: the step returned `(state, metrics)`, the new
state has the structure, shapes and dtypes of the old one, metrics are a dict
of 0-d tensors, and no input tensor was written in place. Later calls do no
checking, so they cost one dict lookup and a function call over the compiled
graph.

Transforms of a step (precision, accumulation; sharding to come) wrap
the user function *before* it reaches `compile_fn`, so that all of them land
in one graph; `build` applies them in one fixed order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar

import torch

from ._accumulate import mean_metrics, micro_step, split_batch
from ._compile import CompileOptions, as_compile_options, compile_fn
from ._precision import Policy, policy
from ._precision_step import apply_policy, check_state, describe
from ._rng import RngKey, seeded
from ._tree import PyTree, describe_leaf, tree_flatten_with_paths, tree_structure

S = TypeVar("S")
Strategy = Literal["ddp", "fsdp"] | None
Metrics = dict[str, torch.Tensor]
TrainStepFn = Callable[[Any, Any], tuple[Any, Metrics]]
EvalStepFn = Callable[[Any, Any], Any]


class Step(Generic[S]):
    """A built step: callable like the function it wraps.

    Attributes:
        fn: the user's function, unchanged.
        kind: "train" (returns `(state, metrics)`, advances the RNG key) or
            "eval" (returns anything; no RNG advance).
        compile_options: how `fn` is compiled, or None for eager.
        precision: the `Policy` the step runs under, or None (as written).
        skip_nonfinite: whether updates with non-finite gradients are skipped.
        accumulate_grad_batches: micro-batches per optimizer update (1: none).
        strategy: "ddp" or "fsdp" over `mesh`, or None (one process).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        kind: Literal["train", "eval"],
        compile_options: CompileOptions | None,
        validate: bool,
        precision: Policy | None = None,
        skip_nonfinite: bool = False,
        accumulate_grad_batches: int = 1,
        strategy: Strategy = None,
        mesh: Any = None,
    ) -> None:
        self.fn = fn
        self.kind = kind
        self.compile_options = compile_options
        self.precision = precision
        self.skip_nonfinite = skip_nonfinite
        self.accumulate_grad_batches = accumulate_grad_batches
        self.strategy = strategy
        self.mesh = mesh
        # Transforms wrap the user's function before compilation, so that
        # they land in the same graph; sharding is outermost, so that its
        # collectives do too.
        precise = (
            fn
            if precision is None
            else apply_policy(fn, precision, skip_nonfinite=skip_nonfinite, kind=kind)
        )
        self._fn = precise if strategy is None else _shard(precise, strategy, mesh, kind)
        if accumulate_grad_batches == 1:
            self._run = (
                self._fn if compile_options is None else compile_fn(self._fn, compile_options)
            )
        else:
            # Two graphs: the first n-1 micro-batches (no update, so no gradient
            # communication; no buffer averaging) and the last.
            first = (
                self._fn if strategy is None else _shard(precise, strategy, mesh, kind, sync=False)
            )
            self._micro, self._final = (
                f if compile_options is None else compile_fn(f, compile_options)
                for f in (micro_step(first, final=False), micro_step(self._fn, final=True))
            )
            self._run = self._accumulated
            self._weights: dict[tuple[float, ...], list[torch.Tensor]] = {}
        self._pending_validation = validate
        self.__name__ = getattr(fn, "__name__", "step")
        self.__doc__ = getattr(fn, "__doc__", None)

    @property
    def compiled(self) -> bool:
        """Whether the step runs through `torch.compile`."""
        return self.compile_options is not None

    def __call__(self, state: S, batch: Any) -> Any:
        key = getattr(state, "rng", None)
        if not isinstance(key, RngKey):
            return self._call(state, batch)
        # The key holds Python ints; keeping it out of the compiled call means
        # dynamo never guards on (and recompiles for) a changing counter.
        if self.kind == "eval":
            return self._call(_with_key(state, None), batch)
        with seeded(key, _device_of(state)):
            new_state, metrics = self._call(_with_key(state, None), batch)
        return _with_key(new_state, key.next()), metrics

    def _call(self, state: Any, batch: Any) -> Any:
        if self._pending_validation:
            return self._first_call(state, batch)
        return self._run(state, batch)

    def _accumulated(self, state: Any, batch: Any) -> Any:
        chunks, shares = split_batch(batch, self.accumulate_grad_batches)
        weights = self._weights.get(tuple(shares))
        if weights is None:
            device = _device_of(state)
            weights = [torch.tensor(s, dtype=torch.float32, device=device) for s in shares]
            self._weights[tuple(shares)] = weights
        acc, per_chunk = None, []
        for chunk, weight in zip(chunks[:-1], weights[:-1], strict=True):
            state, acc, metrics = self._micro(state, acc, chunk, weight)
            per_chunk.append(metrics)
        state, metrics = self._final(state, acc, chunks[-1], weights[-1])
        return state, mean_metrics([*per_chunk, metrics], weights)

    def _first_call(self, state: Any, batch: Any) -> Any:
        if self.precision is not None:
            check_state(
                state, self.precision, self.kind == "train" and self.skip_nonfinite, self.__name__
            )
        versions = _versions({"state": state, "batch": batch})
        try:
            out = self._run(state, batch)
        except Exception as compile_error:
            if self.compile_options is None:
                raise
            # A user bug raised inside a compiled region comes back wrapped in
            # dynamo's exception types; rerun eagerly so the user sees the
            # original, readable error. If eager succeeds, the failure is torch.compile's.
            self._fn(state, batch)
            raise RuntimeError(
                f"torch.compile failed on `{self.__name__}`, which runs fine eagerly: "
                f"{type(compile_error).__name__}: {compile_error}\n"
                f"Build it with compile=False to run eagerly, or try "
                f"compile=lightfunc.CompileOptions(fullgraph=False)."
            ) from compile_error
        _check_not_mutated(versions, {"state": state, "batch": batch}, self.__name__)
        if self.kind == "train":
            _check_train_output(out, state, self.__name__)
        self._pending_validation = False
        return out

    def __repr__(self) -> str:
        how = "eager" if self.compile_options is None else f"compiled({self.compile_options.mode})"
        if self.precision is not None:
            how += f", precision={describe(self.precision)}"
        if self.accumulate_grad_batches > 1:
            how += f", accumulate_grad_batches={self.accumulate_grad_batches}"
        if self.strategy is not None:
            how += f", strategy={self.strategy!r} over {self.mesh.world_size} ranks"
        return f"Step({self.__name__}, kind={self.kind}, {how})"


def build(
    train_step: TrainStepFn,
    *,
    compile: bool | str | CompileOptions = True,
    validate: bool = True,
    precision: str | int | Policy | None = None,
    skip_nonfinite: bool | None = None,
    accumulate_grad_batches: int = 1,
    strategy: Strategy = None,
    mesh: Any = None,
) -> Step[Any]:
    """Build a train step: `train_step(state, batch) -> (new_state, metrics)`.

    Args:
        train_step: a pure function. It must not modify `state` or `batch` in
            place, call `.item()`, or do I/O; it returns a new state of the
            same structure and a dict of 0-d metric tensors.
        compile: True (default) compiles with `torch.compile(fullgraph=True,
            dynamic=False)`; False runs eagerly; a mode string
            ("max-autotune", ...) or a `CompileOptions` selects options.
        validate: check the first call's output and inputs (see module doc).
        precision: run the step under a precision policy: a Lightning string
            ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "32-true",
            "64-true") or a `Policy`. The state must be stored for it:
            `TrainState.create(..., precision=...)`. See "Precision" in the README.
        skip_nonfinite: skip (and count in the `skipped_steps` metric) updates
            whose gradients are not finite. Always on for float16 policies,
            which need it for loss scaling; optional for the others, whose
            state then needs `TrainState.create(..., skip_nonfinite=True)`.
        accumulate_grad_batches: split each batch into this many micro-batches
            along dim 0 and make one optimizer update from their weighted mean
            gradient (see `lightfunc/_accumulate.py`). The step must update
            through `state.apply_gradients`. Peak memory is one micro-batch's.
        strategy: "ddp" (data parallel: `lightfunc.distributed.data_parallel`)
            or "fsdp" (fully sharded: `lightfunc.distributed.fully_sharded`;
            shard the state with `lightfunc.distributed.shard_state`), over
            `mesh`; None runs on one process. Launch the script with
            `lightfunc run --nproc-per-node N`; on one process both are no-ops.
        mesh: the `lightfunc.distributed.Mesh`; default `init_mesh()` (the
            launched processes, or this one).

    Returns:
        A `Step`, called as `new_state, metrics = step(state, batch)`.

    Raises:
        TypeError / ValueError: at the first call, when the step returns the
            wrong structure or non-scalar metrics; RuntimeError when it wrote
            into its inputs.

    Example:
        >>> import torch, lightfunc as lf
        >>> model = torch.nn.Linear(3, 1)
        >>> def train_step(state, batch):
        ...     x, y = batch
        ...     def loss_fn(params):
        ...         out, _ = lf.apply(model, params, state.buffers, x, train=True)
        ...         return torch.nn.functional.mse_loss(out, y)
        ...     loss, grads = lf.value_and_grad(loss_fn)(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> step = lf.build(train_step, compile=False)
        >>> state = lf.TrainState.create(model, lf.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.ones(4, 3), torch.zeros(4, 1)))
        >>> int(state.step)
        1
    """
    _check_callable(train_step, "train_step")
    pol = None if precision is None else policy(precision)
    if skip_nonfinite is False and pol is not None and pol.needs_loss_scaling:
        raise ValueError(
            f"precision={describe(pol)} trains through float16, whose loss scaling skips the "
            f"steps that overflow; skip_nonfinite=False cannot be honoured. Leave it unset."
        )
    skip = bool(skip_nonfinite) or (pol is not None and pol.needs_loss_scaling)
    if skip and pol is None:
        pol = policy("32-true")
    if isinstance(accumulate_grad_batches, bool) or not (
        isinstance(accumulate_grad_batches, int) and accumulate_grad_batches >= 1
    ):
        raise ValueError(
            f"`accumulate_grad_batches` must be a positive int, got {accumulate_grad_batches!r}."
        )
    if skip and accumulate_grad_batches > 1:
        raise ValueError(
            f"accumulate_grad_batches={accumulate_grad_batches} cannot yet be combined with loss "
            f"scaling or skip_nonfinite (precision={describe(pol) if pol else None}): skipping "
            f"is decided per micro-batch, not per update. Use bf16-mixed, or no accumulation."
        )
    if skip and strategy == "fsdp":
        raise ValueError(
            f"strategy='fsdp' cannot yet be combined with loss scaling or skip_nonfinite "
            f"(precision={describe(pol) if pol else None}); use bf16-mixed, or strategy='ddp'."
        )
    return Step(
        train_step,
        kind="train",
        compile_options=as_compile_options(compile),
        validate=validate,
        precision=pol,
        skip_nonfinite=skip,
        accumulate_grad_batches=accumulate_grad_batches,
        strategy=_check_strategy(strategy),
        mesh=_default_mesh(strategy, mesh),
    )


def build_eval(
    eval_step: EvalStepFn,
    *,
    compile: bool | str | CompileOptions = True,
    validate: bool = True,
    precision: str | int | Policy | None = None,
    strategy: Strategy = None,
    mesh: Any = None,
) -> Step[Any]:
    """Build an eval or predict step: `eval_step(state, batch) -> metrics or outputs`.

    Same compile, precision and strategy options as `build`; the returned
    floating tensors are cast to the policy's output dtype, and under a
    strategy the metrics are averaged over the ranks (each evaluating its
    own batches). The RNG key is neither used nor advanced: eval steps should
    run the model with `train=False`.
    """
    _check_callable(eval_step, "eval_step")
    return Step(
        eval_step,
        kind="eval",
        compile_options=as_compile_options(compile),
        validate=validate,
        precision=None if precision is None else policy(precision),
        strategy=_check_strategy(strategy),
        mesh=_default_mesh(strategy, mesh),
    )


def _check_callable(fn: Any, name: str) -> None:
    if isinstance(fn, Step):
        raise TypeError(
            f"`{name}` is already a built Step ({fn!r}); pass it directly instead of building it again."
        )
    if not callable(fn):
        raise TypeError(
            f"`{name}` must be a function `(state, batch) -> ...`, got {type(fn).__name__}."
        )


def _check_strategy(strategy: Any) -> Strategy:
    if strategy not in (None, "ddp", "fsdp"):
        raise ValueError(
            f"`strategy` must be 'ddp' (data parallel), 'fsdp' (fully sharded) or None, "
            f"got {strategy!r}."
        )
    return strategy


def _default_mesh(strategy: Strategy, mesh: Any) -> Any:
    if strategy is None:
        if mesh is not None:
            raise ValueError("`mesh` is only used with a `strategy` ('ddp' or 'fsdp').")
        return None
    from .distributed import Mesh, init_mesh  # lazy: torch.distributed only when sharding

    if mesh is None:
        return init_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a lightfunc.distributed.Mesh (from init_mesh()), got "
            f"{type(mesh).__name__}."
        )
    return mesh


def _shard(
    fn: Callable[..., Any], strategy: str, mesh: Any, kind: str, *, sync: bool = True
) -> Callable[..., Any]:
    """`fn` under a sharding strategy; `sync=False` for a non-final micro-batch."""
    from . import distributed as lfd

    if kind == "eval":
        wrap_eval = lfd.data_parallel_eval if strategy == "ddp" else lfd.fully_sharded_eval
        return wrap_eval(fn, mesh)
    # Both reduce gradients inside the optimizer call, which accumulation defers
    # to the last micro-batch; the others hold back only the buffer averaging,
    # and still reduce their metrics (a few scalars), so every rank's metrics agree.
    wrap = lfd.data_parallel if strategy == "ddp" else lfd.fully_sharded
    return wrap(fn, mesh, sync_buffers=sync)


def _with_key(state: Any, key: RngKey | None) -> Any:
    """`state` with its `rng` field set to `key`.

    Deliberately `dataclasses.replace`, not the faster `replace_fields`: this
    object goes into the compiled call, and dynamo's guards ran the whole MLP
    step ~10% slower on instances built without `__init__` (measured here).
    """
    return dataclasses.replace(state, rng=key)


def _device_of(state: Any) -> torch.device | None:
    step = getattr(state, "step", None)
    return step.device if isinstance(step, torch.Tensor) else None


def _versions(tree: PyTree) -> list[int | None]:
    _, leaves, _ = tree_flatten_with_paths(tree)
    return [x._version if isinstance(x, torch.Tensor) else None for x in leaves]


def _check_not_mutated(before: list[int | None], tree: PyTree, name: str) -> None:
    paths, leaves, _ = tree_flatten_with_paths(tree)
    for path, leaf, version in zip(paths, leaves, before, strict=True):
        if isinstance(leaf, torch.Tensor) and leaf._version != version:
            raise RuntimeError(
                f"`{name}` modified its input in place at `{path}`. Steps must be pure: "
                f"return new tensors (`x = x + y`, not `x.add_(y)`; clone buffers before "
                f"updating them, as lightfunc.apply does)."
            )


def _check_train_output(out: Any, state: Any, name: str) -> None:
    if not (isinstance(out, tuple) and len(out) == 2):
        got = f"a tuple of length {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(
            f"`{name}` must return `(new_state, metrics)`, got {got}. "
            f"Eval and predict steps, which return only metrics, are built with lightfunc.build_eval."
        )
    new_state, metrics = out
    _check_same_tree(state, new_state, name)
    _check_metrics(metrics, name)


def _check_same_tree(old: Any, new: Any, name: str) -> None:
    if tree_structure(old) != tree_structure(new):
        old_paths, _, _ = tree_flatten_with_paths(old)
        new_paths, _, _ = tree_flatten_with_paths(new)
        missing = sorted(set(old_paths) - set(new_paths))
        extra = sorted(set(new_paths) - set(old_paths))
        detail = ""
        if missing:
            detail += f" Missing in the returned state: {', '.join(missing[:8])}."
        if extra:
            detail += f" Not in the input state: {', '.join(extra[:8])}."
        raise ValueError(
            f"`{name}` returned a state whose structure differs from its input "
            f"(given {type(new).__name__}, expected {type(old).__name__} of the same structure).{detail} "
            f"Build the new state with state.replace(...) or state.apply_gradients(...)."
        )
    paths, old_leaves, _ = tree_flatten_with_paths(old)
    _, new_leaves, _ = tree_flatten_with_paths(new)
    for path, a, b in zip(paths, old_leaves, new_leaves, strict=True):
        if isinstance(a, torch.Tensor) and (
            not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype
        ):
            raise ValueError(
                f"`{name}` changed the state leaf `{path}`: given {describe_leaf(b)}, "
                f"expected {describe_leaf(a)}. A step must keep every leaf's shape and dtype "
                f"(a changing shape or dtype would recompile every step)."
            )


def _check_metrics(metrics: Any, name: str) -> None:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"`{name}` must return metrics as a dict of 0-d tensors, got {type(metrics).__name__}. "
            f"Return {{}} if there is nothing to report."
        )
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(
                f"`{name}` returned a metric key {key!r} of type {type(key).__name__}; keys must be str."
            )
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise ValueError(
                f"`{name}` returned metric {key!r} as {describe_leaf(value)}; expected a 0-d tensor. "
                f"Reduce it (e.g. .mean()) and keep it a tensor: calling .item() inside a step syncs "
                f"with the device every step."
            )
