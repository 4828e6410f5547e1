"""Emit, step 3 — check, once, that the training graph computes what the model computes.

What simfx still traces (the model's own forward, containers, blocks that are
regions inside a module) can lose Python behaviour a trace cannot see. So the
transform runs the training graph without SIM and the model's own forward, both
in training mode, on the example inputs, from the same RNG seed, and compares:

* the output structure (types and nesting) and values;
* which parameters get a gradient, and its value (gradients of a fixed random
  projection of the outputs, taken with ``torch.autograd.grad`` so no ``.grad``
  changes).

BatchNorm statistics and every module attribute are restored afterwards, hooks
do not fire during the check, and the RNG state is left as it was. The check
costs two forward and backward passes at the example's size; skip it with
``transform(..., check=False)`` for models that cannot run there (meta-device
models skip it automatically).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import FaithfulnessError
from ..runtime.module import NAMESPACE, SimGraphModule
from .rewrite import plain_graph
from ..capture.module_facts import model_restored, preserved_module_state, seeded
from ..capture.inputs import ExampleInputs, training_randomness_off
from ..capture.record import TracedModel

__all__ = ["check_training_graph"]

log = logging.getLogger("simfx")

_SEED = 20250918
# How many units of a dtype's precision (relative to each value and its tensor's scale) two
# computations of the same maths may differ by: float reassociation at any size, in any dtype.
_ROUNDING_UNITS = 32


def check_training_graph(sim: SimGraphModule, traced: TracedModel, example: ExampleInputs | None = None) -> str:
    """``"passed"``, or why the check was skipped; a :class:`~simfx.FaithfulnessError` on a difference.

    ``example`` is the model's call as the user makes it, which the model runtime's steps run
    (default: the call the graph was captured with).
    """
    model = traced.model
    tensors = [*model.parameters(), *model.buffers(), *(t for t in traced.inputs if isinstance(t, torch.Tensor))]
    if any(t.is_meta for t in tensors):
        return "skipped: the model or the example inputs are on the meta device"
    if traced.runtime == "model":
        if example is None:
            args, kwargs = traced.call.model_call(tuple(traced.inputs))
            example = ExampleInputs(args, kwargs)
        return _check_taps(sim, traced, example)
    graph_module = fx.GraphModule(sim, plain_graph(sim))
    args, kwargs = traced.call.model_call(tuple(traced.inputs))
    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    model_step = lambda: model(*args, **kwargs)  # noqa: E731
    graph_step = lambda: graph_module(*traced.inputs)  # noqa: E731
    with model_restored(model) as reset:
        try:
            with preserved_module_state(model):  # what the model's steps change, undone for the graph's
                expected = _run(model_step, parameters, model)
                expected_next = _next_step(model_step, parameters)
        except Exception as error:  # the model itself cannot train on these inputs: nothing to compare
            return _unchecked(model, error, "its training graph")
        reset()
        try:
            actual = _run(graph_step, parameters, model)
            actual_next = _next_step(graph_step, parameters)
        except Exception as error:  # the graph itself cannot train: a capture that does not train is no capture
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise FaithfulnessError(
                f"simfx's training graph for {type(model).__name__} ({traced.frontend} frontend) cannot take a "
                f"training step on the example inputs, though the model can: {type(error).__name__}: {first}\n"
                f"Fix: try frontend={'fx' if traced.frontend == 'export' else 'export'!r}."
            ) from error
    problems = _differences(expected, actual, parameters) or [
        f"{problem} on a second training step: state its forward changes between steps (a counter, a cache, "
        f"a statistic) was read once when traced"
        for problem in _differences(expected_next, actual_next, parameters)
    ]
    if problems:
        raise FaithfulnessError(_message(model, traced, problems))
    return "passed"


def _check_taps(sim: SimGraphModule, traced: TracedModel, example: ExampleInputs) -> str:
    """The model runtime: one training step on the example reads every block and trains every reconstructor."""
    model = traced.model
    args, kwargs = example.args, dict(example.kwargs)
    heads = [(name, p) for name, p in sim.get_submodule(NAMESPACE).named_parameters()]
    devices = sorted({p.device.index or 0 for _, p in heads if p.device.type == "cuda"})
    # LayerDrop would skip blocks at random: the check reads every block the capture saw.
    with model_restored(model), seeded(_SEED, devices), training_randomness_off(model), torch.enable_grad():
        model.train(True)
        try:
            _, losses = sim._simfx_block_losses(args, kwargs)
        except FaithfulnessError:
            raise
        except Exception as error:  # the model itself cannot train on these inputs: nothing to check
            return _unchecked(model, error, "where it reads the blocks")
        taps = sim.simfx_info.taps
        unread = [name for name, loss in zip(sim.simfx_info.plan.names, losses) if loss is None]
        if unread:
            shown = "; ".join(f"'{n}' (input at {taps[n][0]}, output at {taps[n][1]})" for n in unread[:4])
            raise FaithfulnessError(
                f"simfx could not read {len(unread)} chosen block(s) of {type(model).__name__} when the model ran on "
                f"the example inputs: {shown}. The model's forward did not make those module calls as it did when "
                f"torch.export captured it. Fix: exclude them (transform(..., exclude=[...])), or pass example "
                f"inputs that run them."
            )
        total = sum(loss.float() for loss in losses)
        wanted = [p for _, p in heads]
        grads = torch.autograd.grad(total, wanted, allow_unused=True) if wanted and total.requires_grad else None
    missing = [name for (name, _), g in zip(heads, grads or [None] * len(heads)) if g is None]
    if missing:
        raise FaithfulnessError(
            f"reconstructor parameters {', '.join(repr(n) for n in missing[:4])} get no gradient when "
            f"{type(model).__name__} trains on the example inputs, so SIM would not train them."
        )
    return "passed"


def _next_step(forward: Callable[[], Any], parameters):
    """The outputs of a second training-mode forward after :func:`_run`'s, from another fixed seed.

    Python state the forward changes (what a trace reads once) differs from the first
    step's here; gradients are not taken (the first step compared them).
    """
    devices = sorted({p.device.index or 0 for _, p in parameters if p.device.type == "cuda"})
    with seeded(_SEED + 1, devices), torch.enable_grad():
        leaves, spec = pytree.tree_flatten(forward())
    return spec, [_detached(leaf) for leaf in leaves], [None] * len(parameters)


def _unchecked(model: nn.Module, error: Exception, what: str) -> str:
    """The warning and the check's status when the model itself raises on the example inputs."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    warnings.warn(
        f"simfx could not check {what}: {type(model).__name__} raised on the example inputs in training mode "
        f"({type(error).__name__}: {first}). Pass example inputs a training step can run on (a batch of 2 or "
        f"more), or check=False to silence this.",
        stacklevel=5,
    )
    return f"skipped: the model raised on the example inputs ({type(error).__name__})"


def _run(forward: Callable[[], Any], parameters, model: nn.Module):
    """Outputs and parameter gradients of one training-mode forward from a fixed seed."""
    model.train(True)
    devices = sorted({p.device.index or 0 for _, p in parameters if p.device.type == "cuda"})
    with seeded(_SEED, devices), torch.enable_grad():
        output = forward()
        leaves, spec = pytree.tree_flatten(output)
        generator = torch.Generator().manual_seed(_SEED)
        score = None
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad:
                weight = torch.randn(leaf.shape, generator=generator).to(leaf.device)
                term = (leaf.float() * weight).sum()
                score = term if score is None else score + term
        grads = [None] * len(parameters)
        if score is not None and parameters:
            grads = torch.autograd.grad(score, [p for _, p in parameters], allow_unused=True)
    return spec, [_detached(leaf) for leaf in leaves], list(grads)


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _differences(expected, actual, parameters) -> list[str]:
    (spec_a, leaves_a, grads_a), (spec_b, leaves_b, grads_b) = expected, actual
    if spec_a != spec_b:
        return [f"the output structure differs: the model returns {_shown(spec_a)}, simfx's graph {_shown(spec_b)}"]
    problems = []
    for index, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        problem = _compare(a, b)
        if problem:
            problems.append(f"output {_leaf_name(spec_a, index)} differs: {problem}")
    extra = [name for (name, _), ga, gb in zip(parameters, grads_a, grads_b) if ga is None and gb is not None]
    missing = [name for (name, _), ga, gb in zip(parameters, grads_a, grads_b) if ga is not None and gb is None]
    if extra:
        problems.append(
            f"{_names(extra)} get gradients in simfx's training graph but not when the model runs "
            f"(a torch.no_grad() or set_grad_enabled(False) region, or a detach, that tracing lost)"
        )
    if missing:
        problems.append(f"{_names(missing)} get gradients when the model runs but not in simfx's training graph")
    wrong = [
        name for (name, _), ga, gb in zip(parameters, grads_a, grads_b)
        if ga is not None and gb is not None and _compare(ga, gb)
    ]
    if wrong:
        problems.append(f"the gradients of {_names(wrong)} differ")
    return problems


def _compare(a: Any, b: Any) -> str:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if not isinstance(a, torch.Tensor):
        try:
            return "" if a == b else f"{a!r} vs {b!r}"
        except Exception:  # noqa: BLE001 - values without equality are taken as equal
            return ""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if not a.is_floating_point():
        return "" if torch.equal(a, b) else "values differ"
    eps = torch.finfo(a.dtype).eps
    a, b = a.double(), b.double()
    same_nan = torch.isnan(a) == torch.isnan(b)
    diff = (a - b).abs().nan_to_num(0.0)
    finite = a.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    # Reassociated sums differ by a few units of the dtype's precision, relative to each element
    # and to the tensor's own scale (a near-zero gradient entry is a sum of large terms too).
    limit = _ROUNDING_UNITS * eps * (finite + finite.max())
    if bool(same_nan.all()) and bool((diff <= limit).all()):
        return ""
    return f"largest difference {diff.max().item():.3g}, more than float rounding allows"


def _shown(spec) -> str:
    text = str(spec).replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _leaf_name(spec, index: int) -> str:
    return f"#{index}" if not spec.is_leaf() else "tensor"


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"parameters {shown}{more}"


def _responsible_module(problems: list[str], traced: TracedModel) -> str:
    """The deepest module whose traced code holds every parameter named in the problems, if any."""
    names = [n for p in problems for n in _quoted(p)]
    modules = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
    if not modules:
        return ""
    common = modules[0].split(".")
    for name in modules[1:]:
        parts = name.split(".")
        while common and parts[: len(common)] != common:
            common = common[:-1]
    return ".".join(common)


def _quoted(text: str) -> list[str]:
    return text.split("'")[1::2]


def _message(model: nn.Module, traced: TracedModel, problems: list[str]) -> str:
    module = _responsible_module(problems, traced)
    shown = "\n".join(f"  - {p}" for p in problems[:6])
    if traced.frontend == "fx":
        where = f"module '{module}'" if module else "the model's own forward"
        fix = (
            f"Fix: keep the code that differs as one call of its module: leaf_modules=['{module}'] "
            if module else "Fix: move the code that differs into a submodule and pass leaf_modules=[ThatModule] "
        ) + "to transform, or try frontend='export'."
    else:
        where = f"module '{module}'" if module else "the model"
        fix = "Fix: try frontend='fx', where chosen blocks run as calls of their own module."
    return (
        f"simfx's training graph for {type(model).__name__} ({traced.frontend} frontend) does not compute what "
        f"the model computes on the example inputs, in {where}:\n{shown}\n{fix} "
        f"(check=False skips this check; the training graph would still differ.)"
    )
