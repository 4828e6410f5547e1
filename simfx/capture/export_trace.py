"""Stage 1, second frontend — capture a model with ``torch.export`` instead of fx.

``torch.export`` traces through code ``symbolic_trace`` cannot (data-structure
manipulation, ``*args`` forwards, iterating tensors, mask and cache code of
Hugging Face transformers) and records ATen operations with
``node.meta["nn_module_stack"]``, so the same boundaries stage finds module
scopes and residual adds on its graph.

The model is exported once, in training mode, as export's training IR: the
ATen operations eager PyTorch runs (in-place ones included, so BatchNorm updates
the user's running statistics as in eager mode), with ``torch.no_grad()`` and
``autocast`` regions kept as ``wrap_with_set_grad_enabled``/``wrap_with_autocast``
calls. Nothing is decomposed further. The graph is re-rooted on a shallow copy
of the user's model: every parameter and buffer the graph reads resolves by its
original qualified name to the user's own tensor, so ``state_dict`` names,
shared parameters and gradients are the model's.

What the export path cannot do (documented in the README):

* data-dependent control flow (``if x.sum() > 0``) still fails; use
  ``torch.cond`` or keep such code out of the forward;
* the graph is specialised to the example's non-batch shapes; the batch axis is
  dynamic where the model allows (``Dim.AUTO``, torch >= 2.6), else fixed too;
* submodules are inlined, so every block is traced (none is a module call):
  hooks on submodules, custom ``autograd.Function`` backwards and activation
  checkpointing cannot be kept and are refused, with the fx frontend as the fix;
* outputs are rebuilt from export's flattened outputs with its recorded pytree
  spec (tensors, tuples, lists, dicts and registered containers such as
  transformers' ``ModelOutput``).
"""

from __future__ import annotations

import copy
import operator
import re
import sys
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import FaithfulnessError, TraceError
from .inputs import CallTemplate, ExampleInputs, bound_forward_class
from .recorders import TraceRecorder, frame_location, user_frame
from ..fx_utils import fetch_attr
from .module_facts import has_hooks, hooks_suppressed, preserved_module_state
from .record import TracedModel, frames_from_module_stack

__all__ = ["export_model"]

_PREFIX = "_simfx_export"


class OutputStructure(nn.Module):
    """Rebuilds a model's output structure (dicts, ``ModelOutput``...) from export's flat outputs."""

    def __init__(self, spec: pytree.TreeSpec):
        super().__init__()
        self.spec = spec

    def forward(self, *flat):
        return pytree.tree_unflatten(list(flat), self.spec)


def export_model(model: nn.Module, inputs: ExampleInputs) -> TracedModel:
    """Export ``model`` in training mode; one :class:`TracedModel` over the user's modules."""
    hooked = [name or type(model).__name__ for name, m in model.named_modules() if name and has_hooks(m)]
    if hooked:
        raise FaithfulnessError(
            f"the export frontend inlines every submodule, so the hooks of {', '.join(map(repr, hooked[:4]))} "
            f"would never run in training. Use frontend='fx' (modules with hooks run as calls there), or remove "
            f"the hooks before transforming."
        )
    root = copy.copy(model)
    # The copy gets its own containers: attributes export needs (lifted constants,
    # the output rebuilder) must not land in the user's model.
    root._modules, root._buffers = dict(root._modules), dict(root._buffers)
    bound, template = bound_forward_class(model, inputs)
    if bound is not None:
        root.__class__ = bound
    args = inputs.tensors if bound is not None else tuple(inputs.args)
    names = {id(m): name for name, m in model.named_modules()}
    names[id(root)] = ""
    recorder = TraceRecorder(lambda: _module_on_stack(names), names)
    # export warns about tensors a forward caches on modules; preserved_module_state undoes them.
    with preserved_module_state(model), hooks_suppressed(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        root.train(True)
        with recorder, torch.enable_grad():  # grad-mode switches in the graph are relative to this
            program, args = _export(root, args, model)
    findings = [f for f in recorder.findings]
    if findings:
        details = "; ".join(f.describe() for f in findings[:3])
        raise FaithfulnessError(
            f"torch.export would not keep what {type(model).__name__} does in training: {details}. Use "
            f"frontend='fx', where the modules doing this run as calls of their own code."
        )
    root.training = model.training
    constants: list[str] = []
    graph, container = _rooted_graph(program, root, model, "train", constants)
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    return TracedModel(
        root=root,
        model=model,
        graph=graph,
        call=template or CallTemplate.plain(placeholders),
        scopes={node.name: frames_from_module_stack(root, node) for node in graph.nodes},
        no_grad=_grad_modes_of_the_caller(graph),
        output_containers=frozenset({container} - {None}),
        constants=tuple(constants),
        inputs=tuple(args),
        frontend="export",
        fixed_sizes=tuple(_fixed_sizes(n) for n in graph.nodes if n.op == "placeholder"),
        flag_readers={name: (where, "", value) for name, (where, _, value) in recorder.flag_readers.items()},
    )


def _fixed_sizes(placeholder: fx.Node) -> tuple[int | None, ...] | None:
    """The sizes export specialised an input to: ints, None where it kept the axis symbolic."""
    value = placeholder.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(size if isinstance(size, int) else None for size in value.shape)


def _module_on_stack(names: dict[int, str]) -> str:
    """The qualified name of the innermost module whose method is running (export keeps no scope of its own)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_argcount else None
        if isinstance(owner, nn.Module) and id(owner) in names:
            return names[id(owner)]
        frame = frame.f_back
    return ""


def _export_function():
    # torch 2.5 exports the training IR through export_for_training; later versions through export.
    return getattr(torch.export, "export_for_training", None) or torch.export.export


def _export(root: nn.Module, args: tuple, model: nn.Module) -> tuple[fx.GraphModule, tuple]:
    """The exported module and the example arguments it was captured with."""
    dynamic = _batch_dynamic_shapes(args)
    # export specialises a size-1 axis to 1 (0/1 specialisation), so a batch-1
    # example would give a graph that only runs at batch 1: capture a batch of two.
    wide = _batch_of_two(args) if dynamic is not None else None
    export = _export_function()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # export_for_training's deprecation notice
            try:
                captured = wide if wide is not None else args
                program = export(root, captured, dynamic_shapes=dynamic, strict=False)
            except Exception:  # noqa: BLE001 - a model that fixes its batch size exports statically
                if dynamic is None:
                    raise
                captured = args
                program = export(root, args, strict=False)
    except Exception as error:  # torch.export raises many types; all mean "cannot capture"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} (train mode)"
            f"{frame_location(user_frame(error))}: {type(error).__name__}: {first}\nFix: {_export_fix(error)}",
            "", type(model), first,
        ) from error
    return program.module(), captured


def _export_fix(error: BaseException) -> str:
    """What to do about an export failure, by what torch reported."""
    text = str(error)
    output_type = re.search(r"Found <class '([\w.]+)'> in output", text)
    if output_type:
        name = output_type.group(1)
        if "cache" in name.lower():
            return (
                f"the forward returns a {name.rsplit('.', 1)[-1]} object, which export cannot capture; training "
                f"needs no cache: pass use_cache=False (or your model's flag for it) in example_inputs."
            )
        return (
            f"the forward returns a {name} object; register it as a pytree node "
            f"(torch.utils._pytree.register_pytree_node), or return tensors, tuples or dicts."
        )
    if "sparse" in text.lower():
        return (
            "torch.export cannot capture sparse tensor operations; use frontend='fx', which records them as "
            "calls (with leaf_modules=[...] for a submodule fx cannot trace)."
        )
    if re.search(r"data.dependent|GuardOnDataDependent|Could not guard on", text):
        return (
            "Python control flow on a tensor's value cannot be exported; rewrite it with torch.cond or tensor "
            "ops, or use frontend='fx' with leaf_modules=[...] for the submodule doing it."
        )
    return "use frontend='fx' (with leaf_modules=[...] for submodules fx cannot trace), or change the code export fails on."


def _batch_of_two(args: tuple) -> tuple | None:
    """``args`` with each batched tensor repeated to batch 2, if the example has batch 1; else None."""
    batched = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not batched or any(a.shape[0] != 1 for a in batched):
        return None
    return tuple(a.expand(2, *a.shape[1:]).clone() if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


def _batch_dynamic_shapes(args: tuple):
    auto = getattr(getattr(torch.export, "Dim", None), "AUTO", None)
    if auto is None:
        return None
    return tuple({0: auto} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def _rooted_graph(gm: fx.GraphModule, root: nn.Module, model: nn.Module, mode: str,
                  constants: list[str]) -> tuple[fx.Graph, str | None]:
    """``gm``'s graph with plain codegen, reading attributes from ``root`` (the user's modules).

    Also returns the name of the node that rebuilds the output container, if any.
    """
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    flat_outputs = graph.graph_copy(gm.graph, values)
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)

    for node in list(graph.nodes):
        if node.op not in ("get_attr", "call_module"):
            continue
        if node.op == "call_module" and not node.users and not _resolves(model, node.target):
            graph.erase_node(node)  # export's input guards: shape checks the plain graph does without
            continue
        if _resolves(model, node.target):
            head = node.target.split(".", 1)[0]
            if "." not in node.target and head not in model._parameters and head not in model._buffers:
                constants.append(node.target)  # a plain tensor attribute of the model itself (YOLO's stride)
            continue
        name = f"{_PREFIX}_{mode}_{node.target.replace('.', '_')}"
        setattr(root, name, fetch_attr(gm, node.target))
        constants.append(name)
        node.target = name

    outputs = list(flat_outputs) if isinstance(flat_outputs, (tuple, list)) else [flat_outputs]
    container = None
    if spec is None or spec.is_leaf():
        result = outputs[0] if spec is not None else flat_outputs
    elif spec.type in (tuple, list) and all(child.is_leaf() for child in _children(spec)):
        result = spec.type(outputs)
    else:
        name = f"{_PREFIX}_{mode}_outputs"
        setattr(root, name, OutputStructure(spec))
        constants.append(name)
        result = graph.call_module(name, tuple(outputs))
        container = result.name
    graph.output(result)
    graph.lint()
    return graph, container


def _grad_modes_of_the_caller(graph: fx.Graph) -> frozenset[str]:
    """Grad-mode switches restore the caller's mode (in place); the names of the nodes run without gradients.

    Export records ``no_grad`` regions either as ``_set_grad_enabled`` calls in line
    (torch 2.5), whose closing call hard-codes the mode export ran under (enabled),
    or as one ``wrap_with_set_grad_enabled`` call per region. The closing calls
    here switch back to the mode the caller had on entry instead; the nodes that
    run without gradients are returned, as the fx frontend records them (the
    boundaries stage keeps blocks there out of SIM).
    """
    wrap = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    switches = [n for n in graph.nodes if n.op == "call_function" and n.target is torch._C._set_grad_enabled]
    if any(n.args and n.args[0] is True for n in switches):
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            caller_mode = graph.call_function(torch.is_grad_enabled, ())
        for node in switches:
            if node.args and node.args[0] is True:
                node.args = (caller_mode,)
    enabled, no_grad = True, set()
    for node in graph.nodes:
        if node in switches and node.args:
            enabled = node.args[0] is not False
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if wrap is not None and node.target is wrap and isinstance(node.args[0], bool):
            off = node.args[0] is False
        elif isinstance(source, fx.Node) and wrap is not None and source.target is wrap:
            off = source.name in no_grad
        else:
            off = not enabled
        if off:
            no_grad.add(node.name)
    return frozenset(no_grad)


def _children(spec):
    if hasattr(spec, "children"):  # torch >= 2.10; children_specs is deprecated there
        return list(spec.children())
    return list(spec.children_specs)


def _resolves(model: nn.Module, target: str) -> bool:
    return fetch_attr(model, target) is not None
