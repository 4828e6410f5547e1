"""Stage 5 — rewrite: the plan becomes a new GraphModule returning ``(output, sim_loss)`` in training.

The training graph is the traced graph with three changes:

1. every chosen block that is one whole module call becomes a call of that
   module again (:mod:`simfx.collapse`);
2. for each planned block one ``call_module`` node ``simfx.<key>(x, y)`` is
   inserted right after the block's output ``y`` (so the sampled tokens are
   taken while ``y`` is fresh, before any later in-place op); one
   ``aggregate_losses`` node before the output combines them
   (:func:`simfx.monitor.aggregate_losses`, which in eager mode also warns about
   blocks whose loss was not finite and was skipped), and the output becomes
   ``(output, sim_loss)`` — or ``(output, sim_loss, {name: loss})`` with
   ``per_block=True``;
3. where the model's traced code switched grad mode (``torch.no_grad()``,
   ``set_grad_enabled``), explicit ``torch._C._set_grad_enabled`` nodes switch it
   at the same places (restoring the caller's mode after each region).

Eval mode runs the model itself (:mod:`simfx.graph_module`). Inserted nodes carry
``node.meta["simfx_inserted"] = True`` and the boundary name, which is how the
inspection tools and :func:`plain_graph` find them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..runtime import monitor
from ..analysis.boundaries import Boundary
from .collapse import collapse_calls
from ..runtime.module import SimGraphModule
from ..capture.inputs import CallTemplate
from ..runtime.objectives import BoundaryObjective, build_objective, get_objective
from ..plan.select import Plan, PlannedBlock
from ..capture.fx_trace import GRAD_KEY, SCOPE_KEY, ScopeFrame, TracedModel, copy_graph

__all__ = ["SimInfo", "NAMESPACE", "rewrite", "strip", "original_state_dict", "plain_graph", "collapsible_frames"]

NAMESPACE = "simfx"
INSERTED = "simfx_inserted"
BOUNDARY = "simfx_boundary"


@dataclass(frozen=True)
class SimInfo:
    """Plain-data record of a transform, kept on the module as ``simfx_info``.

    ``calls`` names the blocks that run as calls of their module in the training
    graph; ``traced`` the modules whose code was traced into it. ``nodes`` maps each
    block to the names of its input, output and loss nodes in ``sim.graph``.
    ``notes`` say what simfx passes to the forward in training beyond the example
    (``use_cache=False``). ``check`` says what the transform-time check found
    (``"passed"``, or why it was skipped).
    """

    plan: Plan
    candidates: tuple[Boundary, ...]
    opaque: Mapping[str, str] = field(default_factory=dict)
    example_shapes: tuple[tuple[int, ...] | None, ...] = ()
    per_block: bool = False
    loss_in_output: bool = False
    frontend: str = "fx"
    calls: tuple[str, ...] = ()
    traced: tuple[str, ...] = ()
    nodes: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    check: str = "not run"


def rewrite(
    traced: TracedModel,
    plan: Plan,
    *,
    candidates: Sequence[Boundary] = (),
    per_block: bool = False,
    loss_in_output: bool = False,
    eval_call: CallTemplate | None = None,
    notes: tuple[str, ...] = (),
) -> SimGraphModule:
    """The training graph for ``plan`` over ``traced``, wrapped in a :class:`SimGraphModule`.

    ``eval_call`` is how eval mode calls the model (default: as the training graph was traced).
    """
    if NAMESPACE in traced.root._modules:
        raise ValueError(
            f"the model already has a submodule named '{NAMESPACE}' (is it a simfx-transformed module?); "
            f"call simfx.strip(module) first, or rename that submodule."
        )
    graph = copy_graph(traced.graph)
    renamed, collapsed = collapse_calls(graph, traced.calls, collapsible_frames(traced, plan))
    nodes = {n.name: n for n in graph.nodes}
    standing_for = {frame.key: names for frame, names in collapsed.items()}
    block_nodes: dict[str, tuple[str, str, str]] = {}
    heads = nn.ModuleDict()
    losses: list[fx.Node] = []
    weights: list[float] = []
    # Reconstructors live with the model's parameters: example inputs may sit
    # elsewhere (on the meta device, or on the CPU for a model already on the GPU).
    device = next((p.device for p in traced.root.parameters()), None)
    for block in plan.blocks:
        heads[block.key] = _build_head(block, device)
        boundary = block.boundary
        x = nodes[renamed.get(boundary.entry, boundary.entry)]
        y = nodes[renamed.get(boundary.exit, boundary.exit)]
        with graph.inserting_after(y):
            loss = graph.call_module(f"{NAMESPACE}.{block.key}", (x, y))
        _mark(loss, boundary.name, y)
        losses.append(loss)
        weights.append(float(block.options.beta))
        block_nodes[boundary.name] = (x.name, y.name, loss.name)
        for name in (*boundary.nodes, *standing_for.get(boundary.name, ())):
            node = nodes.get(renamed.get(name, name))
            if node is not None:
                node.meta.setdefault(BOUNDARY, boundary.name)

    output = _output_node(graph)
    result = output.args[0]
    with graph.inserting_before(output):
        # The monitor's aggregate: same maths, plus (eager only) a warning naming skipped blocks.
        names = tuple(b.name for b in plan.blocks)
        total = graph.call_function(monitor.aggregate_losses, (tuple(losses), tuple(weights), names))
    total.meta[INSERTED] = True
    total.meta[GRAD_KEY] = True
    per_block_losses = {b.name: n for b, n in zip(plan.blocks, losses)}
    output.args = ((result, total, per_block_losses) if per_block else (result, total),)
    _switch_grad_mode_as_traced(graph)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)  # read only by code that now runs inside a module call
    graph.lint()

    holder = _module_tree(traced)
    holder._modules[NAMESPACE] = heads
    traced_frames = _traced_frames(graph)
    model_modules = dict(traced.model.named_modules())
    sim = SimGraphModule(
        holder,
        graph,
        model=traced.model,
        call=traced.call,
        eval_call=eval_call,
        traced_modules=[(name, model_modules[name]) for name in traced_frames if name in model_modules and name],
        flag_readers=[
            (name, model_modules[name], where, value)
            for name, (where, reader, value) in traced.flag_readers.items()
            if name in model_modules and name and reader in traced_frames
        ],
        block_names=[b.name for b in plan.blocks],
        per_block=per_block,
        loss_in_output=loss_in_output,
    )
    sim.simfx_info = SimInfo(
        plan=plan,
        candidates=tuple(candidates),
        opaque=dict(traced.opaque),
        example_shapes=tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in traced.inputs),
        per_block=per_block,
        loss_in_output=loss_in_output,
        frontend=traced.frontend,
        calls=tuple(sorted(frame.key for frame in collapsed)),
        traced=tuple(sorted(traced_frames)),
        nodes=block_nodes,
        notes=tuple(notes),
    )
    return sim


def collapsible_frames(traced: TracedModel, plan: Plan) -> list[ScopeFrame]:
    """Frames of planned module blocks that can run as one call of their module.

    Not when another planned block lies inside, or reads a value computed inside
    that the call would not return (its input or output is an inner node).
    """
    by_key = {frame.key: frame for frame in traced.calls}
    planned_nodes = [set(b.boundary.nodes) for b in plan.blocks]
    members: dict[ScopeFrame, set[str]] = {}
    for node in traced.graph.nodes:
        for frame in node.meta.get(SCOPE_KEY, ()):
            if frame in traced.calls:
                members.setdefault(frame, set()).add(node.name)
    frames = []
    for block, nodes in zip(plan.blocks, planned_nodes):
        frame = by_key.get(block.name) if block.boundary.kind == "module" else None
        if frame is None:
            continue
        if any(other is not nodes and other <= nodes for other in planned_nodes):
            continue  # another planned block lies inside: keep this one traced
        inner = members.get(frame, set()) - set(traced.calls[frame].outputs)
        if any(
            other is not block and {other.boundary.entry, other.boundary.exit} & inner for other in plan.blocks
        ):
            continue
        frames.append(frame)
    return frames


def _mark(node: fx.Node, boundary: str, anchor: fx.Node) -> None:
    node.meta[INSERTED] = True
    node.meta[BOUNDARY] = boundary
    node.meta[SCOPE_KEY] = anchor.meta.get(SCOPE_KEY, ())
    node.meta[GRAD_KEY] = anchor.meta.get(GRAD_KEY, True)


def _switch_grad_mode_as_traced(graph: fx.Graph) -> None:
    """Insert grad-mode switches where the traced code ran under another grad mode than its caller.

    The trace ran with gradients enabled, so a node stamped ``False`` was recorded
    inside ``torch.no_grad()`` (or ``set_grad_enabled(False)``). Each such region
    switches gradients off on entry and back to the caller's mode (read once, at
    the start of the forward) on exit.
    """
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    if all(n.meta.get(GRAD_KEY, True) for n in nodes):
        return
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        caller_mode = graph.call_function(torch.is_grad_enabled, ())
    enabled = True
    for node in [*nodes, _output_node(graph)]:
        wanted = node.meta.get(GRAD_KEY, True) if node.op != "output" else True
        if wanted == enabled:
            continue
        with graph.inserting_before(node):
            graph.call_function(torch._C._set_grad_enabled, (False if not wanted else caller_mode,))
        enabled = wanted


def _traced_frames(graph: fx.Graph) -> set[str]:
    """Modules whose own code the graph runs (not as a call): the root and every traced-through scope."""
    names = {""}
    for node in graph.nodes:
        if node.meta.get(INSERTED):
            continue
        scope = node.meta.get(SCOPE_KEY, ())
        if node.op == "call_module":
            scope = scope[:-1]  # the called module itself runs its own code
        names.update(frame.name for frame in scope)
    return names


def _build_head(block: PlannedBlock, device: torch.device | None) -> BoundaryObjective:
    b, options = block.boundary, block.options
    if options.token_sampling == "topk_mean" and not get_objective(options.objective).uses_input:
        raise ValueError(
            f"block '{b.name}': token_sampling='topk_mean' ranks tokens by the block's input, which objective "
            f"{options.objective!r} does not read (uses_input=False); use token_sampling='shared' or "
            f"'per_sample' for this block (overrides={{{b.name!r}: {{'token_sampling': 'shared'}}}})."
        )
    in_cd, out_cd = _channel_dims(b, options.channel_dims())
    module = build_objective(
        options,
        in_channel_dim=in_cd,
        out_channel_dim=out_cd,
        in_width=b.in_meta.shape[in_cd],
        out_width=b.out_meta.shape[out_cd],
    )
    dtype = b.out_meta.dtype if b.out_meta.dtype.is_floating_point else None
    return module.to(device=device or torch.device(b.out_meta.device), dtype=dtype)


def _channel_dims(b: Boundary, override: tuple[int | None, int | None]) -> tuple[int, int]:
    dims = []
    for side, meta, inferred, forced in (
        ("input", b.in_meta, b.in_channel_dim, override[0]),
        ("output", b.out_meta, b.out_channel_dim, override[1]),
    ):
        if forced is None:
            dims.append(inferred)
            continue
        if not -meta.rank <= forced < meta.rank or forced % meta.rank == 0:
            raise ValueError(
                f"channel_dim={forced} for the {side} of block '{b.name}' (shape {meta.shape}) "
                f"must name a non-batch axis in 1..{meta.rank - 1}."
            )
        dims.append(forced % meta.rank)
    return dims[0], dims[1]


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _module_tree(traced: TracedModel) -> nn.Module:
    """A holder with the user's children, parameters and buffers, plus the tracer's tensor constants."""
    root = traced.root
    holder = nn.Module()
    holder._modules = dict(root._modules)
    holder._parameters = dict(root._parameters)
    holder._buffers = dict(root._buffers)
    holder._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for name in traced.constants:
        value = getattr(root, name)
        if isinstance(value, torch.Tensor):
            # Constants the tracer had to store are not model state: keep them out of state_dict().
            holder.register_buffer(name, value, persistent=False)
        else:
            setattr(holder, name, value)
    return holder


# --- the model without SIM ------------------------------------------------------


def plain_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of a training graph without the nodes simfx inserted: the model's own training computation."""
    graph = copy_graph(graph)
    output = _output_node(graph)
    output.args = (output.args[0][0],)
    for node in reversed(list(graph.nodes)):
        if node.meta.get(INSERTED):
            graph.erase_node(node)
    graph.lint()
    return graph


def strip(sim: nn.Module) -> nn.Module:
    """The model without SIM: the user's model itself (the copy, with ``transform(copy=True)``).

    Its parameters are the ones ``sim`` trained, its forward is its own, and its
    ``state_dict()`` loads into the original architecture with ``strict=True``.

    >>> import torch, torchvision, simfx
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> sim = simfx.transform(model, torch.randn(2, 3, 64, 64))
    >>> simfx.strip(sim) is model
    True
    """
    if not isinstance(sim, SimGraphModule):
        raise TypeError(
            f"simfx.strip expects a module returned by simfx.transform, got {type(sim).__name__}."
        )
    return sim.simfx_model()


def original_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The original model's entries of a transformed module's ``state_dict`` (reconstructors dropped).

    Wrapper prefixes are removed first: ``_orig_mod.`` (a ``torch.compile``-d
    module's ``state_dict``) and ``module.`` (DDP's), in any nesting, when every
    key carries them, so a checkpoint of ``DDP(torch.compile(sim))`` loads into
    the plain original model with ``strict=True``.

    >>> sd = {"conv.weight": 1, "simfx.layer1_0.objective.predictor.weight": 2}
    >>> original_state_dict(sd)
    {'conv.weight': 1}
    >>> original_state_dict({"module._orig_mod.conv.weight": 1, "module._orig_mod.simfx.a.weight": 2})
    {'conv.weight': 1}
    """
    state_dict = dict(state_dict)
    while state_dict:
        wrapper = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if wrapper is None:
            break
        state_dict = {k[len(wrapper):]: v for k, v in state_dict.items()}
    prefix = f"{NAMESPACE}."
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}


# Prefixes torch.compile (OptimizedModule) and DistributedDataParallel put before every key.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
