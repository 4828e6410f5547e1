"""The public entry points: :func:`transform` and :func:`find_boundaries`.

Each runs the stages in order — capture (fx or export), shapes, boundaries,
select, rewrite, check — passing plain data between them. With fx, two things
the later stages learn send the capture round again: an opaque module that
returns a tuple is retraced as that tuple, and code tracing would lose (a
random draw, a custom backward, checkpointing) outside the blocks that run as
module calls makes its module opaque. ``frontend="auto"`` moves to
``torch.export`` when fx cannot capture the model, finds no block, or fails the
check.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch.fx as fx
from torch import nn

from .analysis.boundaries import Boundary, find_candidates
from .emit.check import check_training_graph
from .errors import ExampleInputsError, FaithfulnessError, NoEligibleBlockError, TraceError
from .runtime.module import SimGraphModule
from .capture.inputs import ExampleInputs, example_inputs as as_example_inputs, randomness_note, training_inputs
from .options import SimOptions
from .emit.rewrite import collapsible_frames, rewrite
from .plan.select import Plan, select_blocks
from .analysis.shapes import GraphShapes, propagate_shapes
from .capture.fx_trace import trace_model
from .capture.record import TracedModel
from .capture.wrapped import unwrapped_model
from .inspect.text import shape_text

__all__ = ["transform", "find_boundaries", "BoundaryRow", "BoundaryTable"]

log = logging.getLogger("simfx")

FRONTENDS = ("auto", "fx", "export", "calls")
# Above this share of parameters hidden in modules fx could not trace, auto tries export.
OPAQUE_LIMIT = 0.25


def transform(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    blocks: Any = "auto",
    exclude: Any = (),
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
    objective: str = "rho_sim",
    beta: float = 5e-3,
    token_ratio: float = 0.2,
    channel_ratio: float = 1.0,
    token_sampling: str = "shared",
    loss: str = "norm_mse",
    dim: int = 128,
    channel_dim: int | tuple[int, int] | None = None,
    per_block: bool = False,
    loss_in_output: bool = False,
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = True,
    copy: bool = False,
    check: bool = True,
) -> SimGraphModule:
    """Add SIM to ``model``: a new GraphModule returning ``(output, sim_loss)`` in training.

    Args:
        model: any ``nn.Module`` torch.fx or torch.export can capture (or a
            ``GraphModule``). Wrap it (DDP, FSDP, ``torch.compile``) after transforming.
        example_inputs: a tensor, a tuple of the forward's positional arguments, or a
            dict of its keyword arguments, shaped like a training batch. Tensors become
            the transformed module's inputs, in that order; other values (flags,
            ``None``) are bound as constants.
        blocks: ``"auto"`` or selectors — module classes, name globs (``"layer*.*"``),
            compiled regexes, predicates over a :class:`~simfx.Boundary` — or a list.
        exclude: selectors of blocks to leave out.
        overrides: ``{selector: {option: value}}`` per-block option changes.
        objective, beta, token_ratio, channel_ratio, token_sampling, loss, dim,
            channel_dim: default SIM options (see :class:`~simfx.SimOptions`).
        per_block: also return ``{block name: loss}`` as a third output.
        loss_in_output: return the model's own output type instead of a tuple, for
            training stacks that read the loss from it (Hugging Face's ``Trainer``): in
            training the output (a dict or ``ModelOutput``) gets a ``sim_loss`` entry
            (and ``sim_losses`` with ``per_block=True``) and its ``loss``, when the
            model computed one (labels given), becomes ``loss + sim_loss``; without
            labels ``loss`` stays as the model left it. Eval mode returns the model's
            output alone.
        frontend: ``"auto"`` (fx first; ``torch.export`` when fx cannot capture the
            model, finds no block, hides most parameters in opaque modules, or fails
            the check), ``"fx"`` or ``"export"``.
        leaf_modules: module classes or qualified names to keep opaque (run as one call).
        autowrap_functions: free functions to record as single graph nodes.
        auto_opaque: with fx, keep a submodule fx cannot trace opaque (one graph node)
            and retry, instead of raising; ``find_boundaries`` reports which and why.
        copy: transform a deep copy instead of sharing the model's submodules.
        check: run the training graph without SIM and the model on the example inputs
            once, and raise :class:`~simfx.FaithfulnessError` if outputs or gradients
            differ (two forward and backward passes; skipped for meta-device models).

    Returns:
        A :class:`~simfx.SimGraphModule`. It shares the model's submodules (unless
        ``copy=True``): training it trains ``model``, its ``training`` flag is the
        model's, and eval mode calls the model itself.

    Example::

        >>> import torch, torchvision, simfx
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> sim = simfx.transform(model, torch.randn(2, 3, 64, 64))
        >>> len(sim.sim_blocks)
        8
        >>> out, sim_loss = sim(torch.randn(4, 3, 64, 64))
        >>> bool(sim_loss > 0)
        True
        >>> _ = sim.eval()
        >>> out, zero = sim(torch.randn(4, 3, 64, 64))
        >>> float(zero)
        0.0
    """
    if isinstance(model, SimGraphModule):
        raise TypeError(
            "this module was already transformed by simfx; call simfx.strip(module) to get the "
            "plain model back, then transform that."
        )
    model = unwrapped_model(model)
    inputs = as_example_inputs(example_inputs, model, "transform")
    defaults = SimOptions(
        objective=objective, beta=beta, token_ratio=token_ratio, channel_ratio=channel_ratio,
        token_sampling=token_sampling, loss=loss, dim=dim, channel_dim=channel_dim,
    )
    if copy:
        model = copy_module.deepcopy(model)
    selection = _Selection(blocks, exclude, overrides, defaults, allow_empty=False)
    capture = _Capture(frontend, tuple(leaf_modules), tuple(autowrap_functions), auto_opaque)
    built = _build(model, inputs, capture, selection, per_block=per_block, check=check,
                   loss_in_output=loss_in_output)
    return built.sim


# --- the pipeline ---------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    blocks: Any
    exclude: Any
    overrides: Mapping[Any, Mapping[str, Any]] | None
    defaults: SimOptions
    allow_empty: bool

    def plan(self, candidates: Sequence[Boundary]) -> Plan:
        return select_blocks(
            candidates, self.blocks, exclude=self.exclude, overrides=self.overrides,
            defaults=self.defaults, allow_empty=self.allow_empty,
        )


@dataclass(frozen=True)
class _Capture:
    frontend: str
    leaf_modules: tuple
    autowrap_functions: tuple
    auto_opaque: bool


@dataclass
class _Built:
    traced: TracedModel
    shapes: GraphShapes
    candidates: list[Boundary]
    plan: Plan
    sim: SimGraphModule | None = None
    notes: tuple[str, ...] = ()


def _build(model, user_inputs, capture: _Capture, selection: _Selection, *, per_block: bool, check: bool,
           loss_in_output: bool = False) -> _Built:
    """Capture with the chosen frontend, select, rewrite and check; ``auto`` falls back to export.

    A failure on a model whose config switches on randomness drawn in Python
    (SpecAugment, LayerDrop) says so, with the options to turn it off.
    """
    try:
        return _build_with_fallbacks(model, user_inputs, capture, selection, per_block=per_block, check=check,
                                     loss_in_output=loss_in_output)
    except (NoEligibleBlockError, FaithfulnessError, TraceError) as error:
        note = randomness_note(model)
        if not note:
            raise
        raise _with_note(error, note) from error


def _with_note(error: Exception, note: str) -> Exception:
    if isinstance(error, TraceError):
        return TraceError(f"{error}\n{note}", error.module_name, error.module_type, error.cause)
    return type(error)(f"{error}\n{note}")


@dataclass(frozen=True)
class _Job:
    """One transform: what every capture attempt needs."""

    model: nn.Module
    inputs: ExampleInputs
    flags: Mapping[str, Any]
    capture: _Capture
    selection: _Selection
    per_block: bool
    check: bool
    loss_in_output: bool

    def attempt(self, frontend: str) -> _Built:
        """Capture with ``frontend``, select, and (when a block is chosen) rewrite and check."""
        built = _analyse(self.model, self.inputs, frontend, self.capture, self.selection)
        built.notes = _flag_notes(self.model, self.flags, built.traced.runtime)
        if built.plan.blocks:
            eval_call = built.traced.call.without(tuple(self.flags))
            example = ExampleInputs(self.inputs.args, {
                k: v for k, v in self.inputs.kwargs.items() if k not in self.flags})  # the call as the user makes it
            built.sim = rewrite(
                built.traced, built.plan, candidates=built.candidates, per_block=self.per_block,
                loss_in_output=self.loss_in_output, eval_call=eval_call, notes=built.notes,
                example_shapes=tuple(tuple(t.shape) for t in example.tensors),
            )
            status = check_training_graph(built.sim, built.traced, example) if self.check else "skipped: check=False"
            built.sim.simfx_info = _with_check(built.sim.simfx_info, status)
        return built


def _flag_notes(model: nn.Module, flags: Mapping[str, Any], runtime: str) -> tuple[str, ...]:
    """What simfx passes to the forward beyond the example, and when."""
    name = type(model).__name__
    if runtime == "model":
        return tuple(
            f"{flag}={value!r} is passed to {name}.forward when simfx captures it for analysis (the example leaves "
            f"it to the model's default); training and eval call the model as you do"
            for flag, value in flags.items()
        )
    return tuple(
        f"{flag}={value!r} is passed to {name}.forward in training (the example leaves it to the model's default; "
        f"training does not need it); eval mode calls the model as you do"
        for flag, value in flags.items()
    )


# What makes a capture attempt fail in a way the other frontend may not.
_CAPTURE_FAILURES = (TraceError, FaithfulnessError, NoEligibleBlockError, ExampleInputsError)


def _build_with_fallbacks(model, user_inputs, capture: _Capture, selection: _Selection, *, per_block: bool,
                          check: bool, loss_in_output: bool = False) -> _Built:
    if capture.frontend not in FRONTENDS:
        raise ValueError(f"frontend={capture.frontend!r} is not one of {FRONTENDS}.")
    inputs, flags = training_inputs(model, user_inputs)
    job = _Job(model, inputs, flags, capture, selection, per_block, check, loss_in_output)
    if capture.frontend != "auto":
        return job.attempt(capture.frontend)
    try:
        built = job.attempt("fx")
    except _CAPTURE_FAILURES as fx_error:
        return _export_after_fx_failed(job, fx_error)
    return _export_where_fx_sees_little(job, built)


def _export_after_fx_failed(job: _Job, fx_error: Exception) -> _Built:
    """``frontend="auto"`` after fx failed: export, then the module calls, or one error saying what each found."""
    if isinstance(fx_error, ExampleInputsError) and getattr(fx_error, "partial_shapes", None) is None:
        raise fx_error  # the inputs do not fit the forward's signature: no frontend can help
    if isinstance(fx_error, TraceError) and fx_error.module_name and not job.capture.auto_opaque:
        raise fx_error  # the user asked for an error inside submodules rather than opaque blocks
    try:
        built = job.attempt("export")
    except _CAPTURE_FAILURES as export_error:
        also = f"simfx also tried torch.export (frontend='auto'): {_cause(export_error)}"
        last = export_error
        if isinstance(export_error, TraceError):
            # Python no trace can take in the model's own forward: capture its module calls instead.
            try:
                built = job.attempt("calls")
            except _CAPTURE_FAILURES as calls_error:
                also += f"\nsimfx also tried capturing its module calls one by one (frontend='calls'): {_cause(calls_error)}"
                last = calls_error
            else:
                log.info("simfx: neither fx nor torch.export captures %s's forward; using its module calls",
                         type(job.model).__name__)
                return built
        if isinstance(fx_error, ExampleInputsError):
            # fx may have taken the wrong branch on a proxy (torch.is_tensor(proxy) is False):
            # the graph then fails on inputs the model accepts. Export runs the real code.
            also = also.replace("(frontend='auto')", "(frontend='auto'), in case fx mis-traced the model")
            raise ExampleInputsError(f"{fx_error}\n{also}") from last
        if isinstance(fx_error, TraceError):
            raise TraceError(f"{fx_error}\n{also}", fx_error.module_name, fx_error.module_type,
                             fx_error.cause) from last
        raise type(fx_error)(f"{fx_error}\n{also}") from last
    if isinstance(fx_error, (NoEligibleBlockError, FaithfulnessError)):
        log.info("simfx: fx gave no usable training graph (%s); using torch.export", _cause(fx_error))
    return built


def _export_where_fx_sees_little(job: _Job, built: _Built) -> _Built:
    """``frontend="auto"`` after fx succeeded: export instead when fx chose nothing or hid most parameters."""
    if not built.plan.blocks:  # find_boundaries' preview: fx found nothing to select
        try:
            exported = job.attempt("export")
        except _CAPTURE_FAILURES:
            return built
        return exported if exported.plan.blocks else built
    hidden = _hidden_share(job.model, built.traced)
    if hidden <= OPAQUE_LIMIT:
        return built
    try:
        exported = job.attempt("export")
    except _CAPTURE_FAILURES as error:
        # Modules made opaque in an earlier round may sit inside one made opaque later: list the ones left.
        shown = [name for name in built.traced.automatic if name in built.traced.opaque][:3]
        hidden_modules = ", ".join(f"'{name}' ({built.traced.opaque[name]})" for name in shown)
        warnings.warn(
            f"simfx: fx kept {100 * hidden:.0f}% of {type(job.model).__name__}'s parameters in opaque modules "
            f"({hidden_modules}), so SIM sees only {built.plan.names}; torch.export could not capture the model "
            f"either: {_cause(error)}",
            stacklevel=5,
        )
        return built
    log.info("simfx: fx left %.0f%% of the parameters in opaque modules; using torch.export", 100 * hidden)
    return exported


def _analyse(model, inputs: ExampleInputs, frontend: str, capture: _Capture, selection: _Selection) -> _Built:
    if frontend in ("export", "calls"):
        # torch.export loads lazily; fx users never pay for it
        if frontend == "export":
            from .capture.export_trace import export_model as capture_model
        else:
            from .capture.calls import capture_calls as capture_model

        traced = capture_model(model, inputs)
        shapes = propagate_shapes(traced.graph, traced.root, traced.inputs)
        candidates = find_candidates(traced, shapes)
        return _Built(traced, shapes, candidates, selection.plan(candidates))

    leaves = list(capture.leaf_modules)
    reasons: dict[str, str] = {}
    structures: dict[str, Any] = {}
    while True:
        traced = trace_model(
            model, inputs, leaf_modules=leaves, autowrap_functions=capture.autowrap_functions,
            auto_opaque=capture.auto_opaque, leaf_structures=structures, opaque_reasons=reasons,
        )
        try:
            shapes = propagate_shapes(traced.graph, traced.root, traced.inputs)
        except ExampleInputsError as error:
            shapes = getattr(error, "partial_shapes", None)
            if shapes is None or not _new_structures(shapes, structures, model):
                raise
        if _new_structures(shapes, structures, model):
            structures.update(shapes.leaf_structures)  # trace opaque modules' tuple results as tuples
            continue
        candidates = find_candidates(traced, shapes)
        # What tracing lost in the model's own forward no call can keep: that is the error to
        # give, whatever the selection would make of a graph recorded with a frozen draw.
        frozen = next((f for f in traced.findings if not f.module), None)
        plan = None if frozen else selection.plan(candidates)
        lost = [frozen] if frozen else _lost_outside_calls(traced, plan)
        if not lost:
            return _Built(traced, shapes, candidates, plan)
        already = set(leaves)
        for finding in lost:
            if not finding.module or finding.module in already:
                raise FaithfulnessError(
                    f"simfx cannot trace {type(model).__name__} faithfully: {finding.describe()}. Use "
                    f"frontend='export' (the model then trains itself, running that code every step; "
                    f"frontend='auto' does so), or move that code into a submodule (fx then runs it as one call)."
                )
            if finding.module not in reasons:
                leaves.append(finding.module)
                reasons[finding.module] = f"made opaque: {finding.describe()}"


def _new_structures(shapes: GraphShapes, known: Mapping[str, Any], model: nn.Module) -> bool:
    if isinstance(model, fx.GraphModule):
        return False  # a GraphModule's graph is taken as it is
    return any(known.get(name) != structure for name, structure in shapes.leaf_structures.items())


def _lost_outside_calls(traced: TracedModel, plan: Plan):
    """Findings in code that stays traced (not inside a block that runs as a call of its module)."""
    called = [frame.name for frame in collapsible_frames(traced, plan)]
    return [
        f for f in traced.findings
        if not any(f.module == name or f.module.startswith(f"{name}.") for name in called)
    ]


def _with_check(info, status: str):
    return dataclasses.replace(info, check=status)


def _cause(error: Exception) -> str:
    """The first two lines of a simfx error (what failed, and its fix)."""
    lines = str(error).strip().splitlines()
    return " ".join(lines[:2]) if lines else type(error).__name__


def _hidden_share(model: nn.Module, traced: TracedModel) -> float:
    """Share of the model's parameters inside modules fx kept opaque without being asked to."""
    if not traced.automatic:
        return 0.0
    total = {id(p): p.numel() for p in model.parameters()}
    hidden = {id(p): p.numel() for name in traced.automatic for p in model.get_submodule(name).parameters()}
    return sum(hidden.values()) / max(sum(total.values()), 1)


# --- find_boundaries ------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryRow:
    """One candidate with the selection decision (what :func:`find_boundaries` returns)."""

    boundary: Boundary
    selected: bool
    decision: str

    @property
    def name(self) -> str:
        return self.boundary.name


class BoundaryTable(list):
    """A list of :class:`BoundaryRow` that prints as a table.

    ``opaque`` maps modules kept opaque to the reason; ``frontend`` is the tracer used;
    ``notes`` say what simfx passes to the model's forward in training beyond the example.
    """

    def __init__(self, rows: Iterable[BoundaryRow] = (), *, opaque: Mapping[str, str] | None = None,
                 frontend: str = "fx", notes: Sequence[str] = ()):
        super().__init__(rows)
        self.opaque = dict(opaque or {})
        self.frontend = frontend
        self.notes = tuple(notes)

    def selected(self) -> list[BoundaryRow]:
        return [r for r in self if r.selected]

    def __str__(self) -> str:
        header = ("name", "type", "in", "out", "layout", "residual", "selected", "why")
        rows = [header]
        for r in self:
            b = r.boundary
            rows.append((
                b.name,
                b.type_name,
                shape_text(b.in_shape),
                shape_text(b.out_shape),
                f"{b.in_layout}->{b.out_layout}" if b.eligible else "",
                "yes" if b.residual else "",
                "yes" if r.selected else "",
                r.decision,
            ))
        widths = [min(max(len(row[i]) for row in rows), 48) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell[:48].ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
            for row in rows
        ]
        chosen = sum(r.selected for r in self)
        lines.append(f"{chosen} of {len(self)} candidates selected (frontend: {self.frontend})")
        if self.opaque:
            lines.append(f"{len(self.opaque)} module(s) kept opaque:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.opaque.items())
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    __repr__ = __str__


def find_boundaries(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    blocks: Any = "auto",
    exclude: Any = (),
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = True,
    check: bool = True,
    **options: Any,
) -> BoundaryTable:
    """Preview every candidate boundary and what the selection would do with it.

    Takes the same selection and tracing arguments as :func:`transform`, makes the
    same choices (the frontend included: with ``check`` it runs the same
    transform-time check) and changes nothing. The table also lists the modules
    kept opaque and why (``table.opaque``), and which frontend captured the model
    (``table.frontend``).

    >>> import torch, torchvision, simfx
    >>> table = simfx.find_boundaries(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    >>> [r.name for r in table.selected()][:3]
    ['layer1.0', 'layer1.1', 'layer2.0']
    """
    model = unwrapped_model(model)
    inputs = as_example_inputs(example_inputs, model, "find_boundaries")
    defaults = SimOptions().replace(**options)
    selection = _Selection(blocks, exclude, None, defaults, allow_empty=True)
    capture = _Capture(frontend, tuple(leaf_modules), tuple(autowrap_functions), auto_opaque)
    built = _build(model, inputs, capture, selection, per_block=False, check=check)
    plan, traced = built.plan, built.traced
    chosen = set(plan.names)
    return BoundaryTable(
        (BoundaryRow(b, b.name in chosen, plan.decisions.get(b.name, b.reason)) for b in built.candidates),
        opaque=traced.opaque,
        frontend=traced.frontend,
        notes=built.notes,
    )
