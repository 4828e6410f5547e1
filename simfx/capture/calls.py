"""Stage 1, third frontend — capture a model whose own forward no trace can take, one module call at a time.

Some forwards run Python on tensor values that neither fx nor torch.export can
record (``if not padding_mask.any():``, ``int(lengths.max().item())``,
``np.array(x.shape)``), while every block they call is a plain module call. SIM
needs only the blocks, so this capture leaves the model's own forward alone:

1. **Probe.** The model runs once on the example (training mode, seeded, its
   state, hooks and buffers restored afterwards), and every module call made
   directly by its forward's own code is recorded with its arguments and result.
2. **Replay.** A forward is generated that makes exactly those calls, in that
   order, on the same modules: a tensor one call returned and a later call took
   is passed on; every other argument (what the model's own Python computed)
   becomes an input of the replay, with the recorded value as its example.
3. **Export.** The replay is captured with torch.export (:func:`~simfx.capture.
   export_trace.exported`): its graph holds each call's code, with the call
   signatures the taps need. The model's output among the calls' results is the
   replay's output; what the model's own code went on to use is kept alive
   there without counting as output.

The result trains with the model runtime, like any export capture: the model's
own forward runs as written, and SIM reads the chosen blocks at their calls. A
call whose own code export cannot capture fails this capture, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .export_trace import analysis_root, exported
from .inputs import CallTemplate, ExampleInputs, training_randomness_off
from .module_facts import model_restored, seeded
from .record import TracedModel

__all__ = ["capture_calls"]

_SEED = 20250918


@dataclass
class _Call:
    """One module call made on the example: the module, its name, the call as recorded, and its caller.

    ``parent`` is the index of the call whose code made it (None: the model's own forward).
    """

    module: nn.Module
    name: str
    args: tuple
    kwargs: dict
    output: Any
    parent: int | None


def capture_calls(model: nn.Module, inputs: ExampleInputs) -> TracedModel:
    """The model's module calls, replayed and exported; a :class:`TracedModel` of the model runtime.

    The calls replayed are those the model's own forward makes; one whose own code
    export cannot capture is replaced by the calls its code makes, and so on down.
    """
    calls, output = _probe(model, inputs)
    batch = inputs.tensors[0].shape[0] if inputs.tensors[0].dim() else None  # the replay's inputs may not show it
    units = [i for i, call in enumerate(calls) if call.parent is None]
    if not units:
        raise TraceError(
            f"{type(model).__name__}'s forward calls no submodule on the example inputs, so there is no block for "
            f"SIM to read at a module call.", "", type(model), "no module call",
        )
    while True:
        plan = _Plan([calls[i] for i in units], output)
        root = analysis_root(model)
        replay = _replay_forward(plan)
        root.__class__ = type(type(model).__name__, (type(model),),
                              {"forward": replay, "__module__": type(model).__module__})
        try:
            return exported(model, root, tuple(plan.placeholders), CallTemplate.plain(()), "calls",
                            batch=batch)
        except TraceError as error:
            failing = _failing_unit(error, calls, units)
            inner = [i for i, call in enumerate(calls) if failing is not None and call.parent == failing]
            if not inner:
                raise
            at = units.index(failing)
            units[at:at + 1] = inner  # the calls the failing module's code makes, in its place


def _failing_unit(error: BaseException, calls: list[_Call], units: list[int]) -> int | None:
    """The replayed call whose module's code export failed in (the innermost), from the error's traceback."""
    by_name = {calls[i].name: i for i in units}
    pending, seen = [error], set()
    while pending:  # export may raise its own error from the one raised in the model's code
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        found, tb = None, current.__traceback__
        while tb is not None:
            name = _module_called_in(tb.tb_frame)
            if name in by_name:
                found = by_name[name]
            tb = tb.tb_next
        if found is not None:
            return found
        pending += [current.__cause__, current.__context__]
    return None


def _module_called_in(frame) -> str | None:
    """The qualified name of the module a tracer's ``call_module`` frame is calling, if it is one."""
    tracer, module = frame.f_locals.get("self"), frame.f_locals.get("m")
    if frame.f_code.co_name != "call_module" or not isinstance(module, nn.Module):
        return None
    try:
        path = tracer.path_of_module(module)
    except Exception:  # noqa: BLE001 - a module the tracer does not know: not one of ours
        return None
    return path.removeprefix("_export_root.") if isinstance(path, str) else None


def _probe(model: nn.Module, inputs: ExampleInputs) -> tuple[list[_Call], Any]:
    """Every module call the model makes on the example, in the order they return, and its output."""
    stack: list[int] = []
    calls: list[_Call] = []
    handles = []

    def enter(module, args):
        calls.append(None)  # this call's place, in the order calls begin
        stack.append(len(calls) - 1)

    def leave(name):
        def hook(module, args, kwargs, output):
            index = stack.pop()
            calls[index] = _Call(module, name, tuple(args), dict(kwargs), output, stack[-1] if stack else None)
        return hook

    with model_restored(model), seeded(_SEED), training_randomness_off(model), torch.enable_grad():
        model.train(True)
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave(name), with_kwargs=True, always_call=True))
        try:
            output = model(*inputs.args, **inputs.kwargs)
        except Exception as error:  # the model itself cannot run on the example: nothing to replay
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise TraceError(
                f"{type(model).__name__} raised on the example inputs in training mode ({type(error).__name__}: "
                f"{first}); pass example inputs a training step runs on.", "", type(model), first,
            ) from error
        finally:
            for handle in handles:
                handle.remove()
    return calls, output


class _Plan:
    """How the replay wires the recorded calls: by the identity of the tensors they passed on.

    Values are numbered slots: the replay's inputs (``placeholders``, each with its
    example value) and the tensors each call returned. ``steps`` holds per call the
    module's name, its argument leaves (a :class:`_Slot` where a tensor was), their
    pytree spec and the slots of its result's tensor leaves (None for other leaves).
    """

    def __init__(self, calls: list[_Call], output: Any):
        self.placeholders: list[torch.Tensor] = []
        self.input_slots: list[int] = []
        self.steps: list[tuple[str, list, Any, list[int | None]]] = []
        slot_of: dict[int, int] = {}  # id(tensor) -> slot (the probe keeps every tensor alive)
        consumed: set[int] = set()
        results: list[int] = []
        count = 0
        for call in calls:
            leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
            filled = []
            for leaf in leaves:
                if not isinstance(leaf, torch.Tensor):
                    filled.append(leaf)
                    continue
                if id(leaf) not in slot_of:
                    slot_of[id(leaf)] = count
                    self.placeholders.append(leaf.detach())
                    self.input_slots.append(count)
                    count += 1
                consumed.add(slot_of[id(leaf)])
                filled.append(_Slot(slot_of[id(leaf)]))
            result_slots: list[int | None] = []
            for leaf in pytree.tree_leaves(call.output):
                if isinstance(leaf, torch.Tensor):
                    slot_of[id(leaf)] = count
                    results.append(count)
                    count += 1
                    result_slots.append(slot_of[id(leaf)])
                else:
                    result_slots.append(None)
            self.steps.append((call.name, filled, spec, result_slots))
        returned = {slot_of[id(t)] for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and id(t) in slot_of}
        self.returned = sorted(returned & set(results))
        # Results no later call takes: the model's own code used them (or nothing did).
        self.passed_on = [slot for slot in results if slot not in consumed and slot not in returned]


@dataclass(frozen=True)
class _Slot:
    """Where a replayed argument comes from: a value the replay holds."""

    index: int


def _replay_forward(plan: _Plan):
    """A forward making the recorded calls; its inputs are the values the model's own code computed."""
    steps, input_slots, returned, passed_on = plan.steps, plan.input_slots, plan.returned, plan.passed_on

    def forward(self, *inputs):
        values: dict[int, Any] = dict(zip(input_slots, inputs))
        for name, filled, spec, result_slots in steps:
            leaves = [values[leaf.index] if isinstance(leaf, _Slot) else leaf for leaf in filled]
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            result = self.get_submodule(name)(*args, **kwargs)
            for slot, leaf in zip(result_slots, pytree.tree_leaves(result)):
                if slot is not None:
                    values[slot] = leaf
        kept = [values[slot] for slot in passed_on if values[slot].is_floating_point()]
        # What the model's own code went on to use: alive in the graph, not part of its output.
        used = torch.stack([t.float().sum() for t in kept]).sum() if kept else None
        return tuple(values[slot] for slot in returned), used

    forward.__qualname__ = "replay.forward"
    return forward
