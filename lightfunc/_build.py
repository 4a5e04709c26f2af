"""`build`: turn a pure step function into a fast, checked one.

    step = lightfunc.build(train_step)            # compiled
    state = step.prepare(state)                   # stored as the step needs it (loop / fit do this)
    state, metrics = step(state, batch)

A built train step, on every call:
1. seeds torch's generators from the state's `RngKey` (restoring them after),
2. splits the batch into micro-batches when accumulating gradients,
3. runs the transformed, compiled user function on each (the state without
   its key), and combines their metrics,
4. returns the new state with the key advanced, and the metrics.

The transforms a step runs under are one ordered list, built in
`Step._pipeline`: precision, strategy, accumulation, compile, each entry
wrapping the ones before it, each placed by a comment saying why it sits
there. Transforms that act on the optimizer update (skipping non-finite
updates, reducing gradients over ranks, accumulating) are optimizer
wrappers (`lightfunc.optim._wrappers`, `lightfunc.distributed`) whose state
lives in `opt_state`; `Step.prepare` installs the ones that last the whole
run. Nothing is kept in module-level state.

The first call also validates: the step returned `(state, metrics)`, the new
state has the structure, shapes and dtypes of the old one, metrics are a dict
of 0-d tensors, and no input tensor was written in place. For each
`TrainState` it also checks that the step learns what the module says: when
the update left every parameter exactly where it was, it re-runs the step
eagerly once to tell a zero learning rate from a loss that does not depend on
`state.params` (all gradients exactly zero: `model(x)` instead of
`lf.apply(model, params, ...)`); when a floating buffer kept its value, it
re-runs it once to see whether `lf.apply` updated buffers (BatchNorm's running
statistics) that the returned state dropped (the checks: `lightfunc._step_checks`).
Later calls do no checking, so
they cost a dict lookup and a function call over the compiled graph, unless
the step is built with `validate="always"` (a debug mode: the structure and
in-place checks on every call).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar

import torch

from ._accumulate import micro_step, split_batch
from ._compile import CompileOptions, as_compile_options, compile_fn
from ._contract import Metrics, Strategy
from ._donate import consume, donating, refuse_consumed, updating_in_place_during
from ._metrics import Reduction, check_reductions, combine
from ._precision import Policy, parse_precision
from ._precision_step import (
    apply_policy,
    check_loss_scaled,
    check_state,
    describe,
    prepare_for_policy,
)
from ._rng import RngKey, seeded
from ._step_checks import (
    check_learns,
    check_not_mutated,
    check_train_output,
    check_validate,
    explain_plain_state,
    input_versions,
)
from ._strategy import as_strategy
from ._tree import (
    tree_rebuild,
    tree_walk,
)
from ._validate import check_positive_int

S = TypeVar("S")
TrainStepFn = Callable[[Any, Any], tuple[Any, Metrics]]
EvalStepFn = Callable[[Any, Any], Any]
Transform = Callable[[Callable[..., Any]], Callable[..., Any]]

# Metrics the precision transform reports: state, not per-batch quantities.
_SCALE_REDUCTIONS: dict[str, Reduction] = {"loss_scale": "last", "skipped_steps": "last"}


class Step(Generic[S]):
    """A built step: callable like the function it wraps.

    Attributes:
        fn: the user's function, unchanged.
        kind: "train" (returns `(state, metrics)`, advances the RNG key) or
            "eval" (returns anything; no RNG advance).
        compile_options: how the step is compiled, or None for eager.
        precision: the `Policy` the step runs under, or None (as written).
        skip_nonfinite: whether updates with non-finite gradients are skipped.
        accumulate_grad_batches: micro-batches per optimizer update (1: none).
        strategy: the `Strategy` (`SingleProcess()`, `lightfunc.distributed.DDP(mesh)`, ...).
        metric_reductions: how metrics combine over batches, micro-batches
            and ranks, by name (the rest by dtype; see `lightfunc._metrics`).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        kind: Literal["train", "eval"],
        compile_options: CompileOptions | None,
        validate: bool | Literal["always"],
        strategy: Strategy,
        precision: Policy | None = None,
        skip_nonfinite: bool = False,
        accumulate_grad_batches: int = 1,
        metric_reductions: Mapping[str, Reduction] | None = None,
        donate: bool = False,
    ) -> None:
        self.fn = fn
        self.donate = donate
        self.kind = kind
        self.compile_options = compile_options
        self.precision = precision
        self.skip_nonfinite = skip_nonfinite
        self.accumulate_grad_batches = accumulate_grad_batches
        self.strategy = strategy
        reductions = dict(metric_reductions or {})
        if kind == "train" and skip_nonfinite:
            reductions = {**_SCALE_REDUCTIONS, **reductions}
        self.metric_reductions: dict[str, Reduction] = reductions
        self.__name__ = getattr(fn, "__name__", "step")
        self.__doc__ = getattr(fn, "__doc__", None)
        compiled = compile_options is not None
        # `_eager` is always pure (the first call's checks rerun it on the state); `_run` donates.
        if accumulate_grad_batches == 1:
            self._eager = self._pipeline(final=True, compiled=False, donate=False)
            self._run = self._pipeline(final=True, compiled=compiled, donate=donate)
        else:
            self._micro = self._pipeline(final=False, compiled=compiled, donate=donate)
            self._final = self._pipeline(final=True, compiled=compiled, donate=donate)
            self._eager = self._accumulated_with(
                self._pipeline(final=False, compiled=False, donate=False),
                self._pipeline(final=True, compiled=False, donate=False),
            )
            self._run = self._accumulated_with(self._micro, self._final)
            self._weights: dict[tuple[float, ...], list[torch.Tensor]] = {}
        check_validate(validate)
        self._pending_validation = bool(validate)
        # validate="always": the structure and in-place checks on every call (a debug mode).
        self._validate_always = validate == "always"

    def _pipeline(self, *, final: bool, compiled: bool, donate: bool) -> Callable[..., Any]:
        """The user's function under every transform, in their one fixed order.

        `final` is False for the micro-batches of an accumulated update that
        do not complete it. Each entry wraps everything listed before it.
        """
        accumulating = self.accumulate_grad_batches > 1
        pol, reductions = self.precision, self.metric_reductions
        wrap_strategy: Transform
        if self.kind == "train":

            def wrap_strategy(f: Callable[..., Any]) -> Callable[..., Any]:
                return self.strategy.wrap_train(f, sync=final, metric_reductions=reductions)
        else:

            def wrap_strategy(f: Callable[..., Any]) -> Callable[..., Any]:
                return self.strategy.wrap_eval(f, metric_reductions=reductions)

        pipeline: list[tuple[str, Transform | None]] = [
            # Innermost: autocast must cover exactly the user's forward and
            # backward, and metrics leave it in the output dtype before
            # anything combines them.
            (
                "precision",
                None
                if pol is None
                else lambda f: apply_policy(
                    f, pol, skip_nonfinite=self.skip_nonfinite, kind=self.kind
                ),
            ),
            # Around precision, so that buffer averaging and metric reduction
            # see stored dtypes; inside compile, so that its collectives land
            # in the step's graph. A deferring micro-batch (final=False)
            # averages no buffers: only the updating one does.
            ("strategy", wrap_strategy),
            # Around the strategy: the accumulation wrapper goes outside the
            # optimizer wrappers the strategy relies on, so gradients are
            # reduced once per update, on their sum.
            ("accumulate", (lambda f: micro_step(f, final=final)) if accumulating else None),
            # Last inside compile: the new state is copied into the old one's tensors in the
            # graph, where inductor writes it there directly (see lightfunc/_donate.py).
            # Eagerly the optimizers that can write their update into the old tensors
            # (`apply_gradients` on a state marked by `updating_in_place_during`);
            # `__call__` marks the old state consumed either way.
            (
                "donate",
                None
                if not donate
                else donating
                if compiled
                else lambda f: updating_in_place_during(f, self.__name__),
            ),
            # Outermost of what runs per micro-batch: one graph each for the
            # deferring and the updating micro-batches.
            (
                "compile",
                (lambda f: compile_fn(f, self.compile_options))  # type: ignore[arg-type]
                if compiled
                else None,
            ),
        ]
        fn = self.fn
        for _, transform in pipeline:
            if transform is not None:
                fn = transform(fn)
        return fn

    def undonated(self) -> Step[S]:
        """This step without `donate=True` (itself when it does not donate).

        For code that runs a step on a state it must leave intact, such as the
        tuners (`lightfunc.tune`), which step from the caller's own state.
        A new step: compiled, it compiles its own graphs.
        """
        if not self.donate:
            return self
        return Step(
            self.fn,
            kind=self.kind,
            compile_options=self.compile_options,
            validate="always" if self._validate_always else self._pending_validation,
            strategy=self.strategy,
            precision=self.precision,
            skip_nonfinite=self.skip_nonfinite,
            accumulate_grad_batches=self.accumulate_grad_batches,
            metric_reductions=self.metric_reductions,
        )

    @property
    def compiled(self) -> bool:
        """Whether the step runs through `torch.compile`."""
        return self.compile_options is not None

    def prepare(self, state: Any) -> Any:
        """`state` stored as this step needs it; what `loop` and `fit` call before the first step.

        Casts every `TrainState` for the step's precision and installs the
        optimizer wrappers that last the whole run (`apply_if_finite` for
        loss scaling or `skip_nonfinite`), then lets the strategy place the
        state (`FSDP` shards it; `DDP` wraps the optimizers to average
        gradients). Idempotent: a prepared state comes back as it is.
        """
        if self.precision is not None:
            state = prepare_for_policy(state, self.precision, self.skip_nonfinite)
        return self.strategy.prepare(state)

    def __call__(self, state: S, batch: Any) -> Any:
        if self.donate:
            refuse_consumed(state, self.__name__)
            out = self._call_keyed(state, batch)
            consume(state, self.__name__, keep=out[0])
            return out
        return self._call_keyed(state, batch)

    def _call_keyed(self, state: Any, batch: Any) -> Any:
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
        if self._pending_validation or self._validate_always:
            return self._first_call(state, batch)
        return self._run(state, batch)

    def _accumulated_with(
        self, micro: Callable[..., Any], final: Callable[..., Any]
    ) -> Callable[[Any, Any], Any]:
        """The accumulation driver: split the batch, run the micro-batches, combine metrics."""

        def accumulated(state: Any, batch: Any) -> Any:
            chunks, shares = split_batch(batch, self.accumulate_grad_batches)
            weights = self._weights.get(tuple(shares))
            if weights is None:
                device = _device_of(state)
                weights = [torch.tensor(s, dtype=torch.float32, device=device) for s in shares]
                self._weights[tuple(shares)] = weights
            accs, per_chunk = None, []
            for chunk, weight in zip(chunks[:-1], weights[:-1], strict=True):
                state, accs, metrics = micro(state, accs, chunk, weight)
                per_chunk.append(metrics)
            state, metrics = final(state, accs, chunks[-1], weights[-1])
            return state, combine([*per_chunk, metrics], weights, self.metric_reductions)

        return accumulated

    def _first_call(self, state: Any, batch: Any) -> Any:
        if self.precision is not None:
            check_state(
                state, self.precision, self.kind == "train" and self.skip_nonfinite, self.__name__
            )
            if self.kind == "train" and self.precision.needs_loss_scaling:
                check_loss_scaled(self._eager, state, batch, self.__name__)
        # A donating step overwrites `state`: the checks below read a copy taken first (the
        # first call only; validate=False skips it).
        overwrites = self.donate
        before = _clone_tensors(state) if overwrites else state
        inputs = {"batch": batch} if overwrites else {"state": state, "batch": batch}
        versions = input_versions(inputs)
        try:
            out = self._run(state, batch)
        except Exception as compile_error:
            if self.compile_options is None:
                explain_plain_state(compile_error, self.__name__)
                raise
            # A user bug raised inside a compiled region comes back wrapped in
            # dynamo's exception types; rerun eagerly so the user sees the
            # original, readable error. If eager succeeds, the failure is torch.compile's.
            try:
                self._eager(state, batch)
            except Exception as eager_error:
                explain_plain_state(eager_error, self.__name__)
                raise
            raise RuntimeError(
                f"torch.compile failed on `{self.__name__}`, which runs fine eagerly: "
                f"{type(compile_error).__name__}: {compile_error}\n"
                f"Build it with compile=False to run eagerly, or try "
                f"compile=lightfunc.CompileOptions(fullgraph=False)."
            ) from compile_error
        check_not_mutated(versions, inputs, self.__name__)
        if self.kind == "train":
            check_train_output(out, before, self.__name__)
            if self._pending_validation:
                check_learns(self._eager, before, batch, out[0], self.__name__)
        self._pending_validation = False
        return out

    def __repr__(self) -> str:
        how = "eager" if self.compile_options is None else f"compiled({self.compile_options.mode})"
        if self.precision is not None:
            how += f", precision={describe(self.precision)}"
        if self.accumulate_grad_batches > 1:
            how += f", accumulate_grad_batches={self.accumulate_grad_batches}"
        if self.donate:
            how += ", donate=True"
        if self.strategy.world_size > 1 or self.strategy.name != "single":
            how += f", strategy={self.strategy!r}"
        return f"Step({self.__name__}, kind={self.kind}, {how})"


def build(
    train_step: TrainStepFn,
    *,
    compile: bool | str | CompileOptions = True,
    validate: bool | Literal["always"] = True,
    precision: str | int | Policy | None = None,
    skip_nonfinite: bool | None = None,
    accumulate_grad_batches: int = 1,
    strategy: Strategy | str | None = None,
    mesh: Any = None,
    metric_reductions: Mapping[str, Reduction] | None = None,
    donate: bool = False,
) -> Step[Any]:
    """Build a train step: `train_step(state, batch) -> (new_state, metrics)`.

    Args:
        train_step: a pure function. It must not modify `state` or `batch` in
            place, call `.item()`, or do I/O; it returns a new state of the
            same structure and a dict of 0-d metric tensors.
        compile: True (default) compiles with `torch.compile(fullgraph=True,
            dynamic=False)`; False runs eagerly; a mode string
            ("max-autotune", ...) or a `CompileOptions` selects options.
        validate: check the first call's output and inputs (see module doc);
            "always" repeats the structure, shape, dtype and in-place checks
            on every call (a debug mode: it walks the state and batch twice
            and compares the output's structure, per call); False checks nothing.
        precision: run the step under a precision policy: a Lightning string
            ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "32-true",
            "64-true") or a `Policy`. `step.prepare(state)` (called by `loop`
            and `fit`) stores the state for it. A float16 step scales its
            loss: `lightfunc.value_and_grad(..., loss_scale=state.loss_scale)`.
        skip_nonfinite: skip (and count in the `skipped_steps` metric) updates
            whose gradients are not finite. Always on for float16 policies,
            which need it for loss scaling; optional for the others.
        accumulate_grad_batches: split each batch into this many micro-batches
            along dim 0 and make one optimizer update from their weighted sum
            of gradients (see `lightfunc/_accumulate.py`). The step must update
            through `state.apply_gradients`. Peak memory is one micro-batch's.
        strategy: how the step runs over processes: None (one process),
            `lightfunc.distributed.DDP(mesh)` (data parallel),
            `lightfunc.distributed.FSDP(mesh)` (fully sharded), or the
            shorthands "ddp" / "fsdp" over `mesh`. Launch the script with
            `lightfunc run --nproc-per-node N`; on one process both run the
            step as written.
        mesh: with a shorthand strategy, the `lightfunc.distributed.Mesh`
            (default `init_mesh()`: the launched processes, or this one).
        metric_reductions: how metrics combine over micro-batches and ranks
            (and in `evaluate`), by name: "mean" (weighted by examples),
            "sum", "max", "min", "any" or "last". Unnamed metrics: floats
            "mean", ints "sum", bools "any".
        donate: a compiled step writes the new state into the old state's
            tensors; eagerly, `sgd`, `adam` and `adamw` update the parameters and
            moments in place inside `apply_gradients` (see
            `lightfunc/_donate.py`). No second copy of the parameters and
            optimizer state is allocated, as with torch.optim's in-place
            update. The state passed in is consumed: using it afterwards
            raises `lightfunc.DonatedStateError`. With `FSDP`, eager only.

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
    pol = None if precision is None else parse_precision(precision)
    if skip_nonfinite is False and pol is not None and pol.needs_loss_scaling:
        raise ValueError(
            f"precision={describe(pol)} trains through float16, whose loss scaling skips the "
            f"steps that overflow; skip_nonfinite=False cannot be honoured. Leave it unset."
        )
    skip = bool(skip_nonfinite) or (pol is not None and pol.needs_loss_scaling)
    if skip and pol is None:
        pol = parse_precision("32-true")
    check_positive_int("accumulate_grad_batches", accumulate_grad_batches, optional=False)
    chosen = as_strategy(strategy, mesh)
    if not isinstance(donate, bool):
        raise TypeError(f"`donate` must be True or False, got {donate!r}.")
    compile_options = as_compile_options(compile)
    if donate and chosen.name == "fsdp" and compile_options is not None:
        raise ValueError(
            "`donate=True` was given with the FSDP strategy and compile on: a compiled step "
            "cannot write into DTensor shards, so donation would do nothing. Build it with "
            "compile=False (the eager FSDP step then updates the shards in place), or drop "
            "`donate=True`."
        )
    return Step(
        train_step,
        kind="train",
        compile_options=compile_options,
        validate=validate,
        precision=pol,
        skip_nonfinite=skip,
        accumulate_grad_batches=accumulate_grad_batches,
        strategy=chosen,
        metric_reductions=check_reductions(metric_reductions),
        donate=donate,
    )


def build_eval(
    eval_step: EvalStepFn,
    *,
    compile: bool | str | CompileOptions = True,
    validate: bool | Literal["always"] = True,
    precision: str | int | Policy | None = None,
    strategy: Strategy | str | None = None,
    mesh: Any = None,
    metric_reductions: Mapping[str, Reduction] | None = None,
) -> Step[Any]:
    """Build an eval or predict step: `eval_step(state, batch) -> metrics or outputs`.

    Same compile, precision, strategy and `metric_reductions` options as
    `build`; the returned floating tensors are cast to the policy's output
    dtype, and under a strategy the metrics are combined over the ranks
    (each evaluating its own batches). The RNG key is neither used nor
    advanced: eval steps should run the model with `train=False`.
    """
    _check_callable(eval_step, "eval_step")
    return Step(
        eval_step,
        kind="eval",
        compile_options=as_compile_options(compile),
        validate=validate,
        precision=None if precision is None else parse_precision(precision),
        strategy=as_strategy(strategy, mesh),
        metric_reductions=check_reductions(metric_reductions),
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


def _clone_tensors(tree: Any) -> Any:
    """`tree` with every tensor cloned (the first call of a donating step checks this copy)."""
    _, leaves = tree_walk(tree)
    return tree_rebuild(tree, iter([t.clone() for t in leaves]))


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
