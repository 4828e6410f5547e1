"""Stage 1, second frontend — capture a model with ``torch.export`` instead of fx.

``torch.export`` traces through code ``symbolic_trace`` cannot (data-structure
manipulation, ``*args`` forwards, iterating tensors, mask and cache code of
Hugging Face transformers) and records ATen operations with
``node.meta["nn_module_stack"]``, so the same boundaries stage finds module
scopes and residual adds on its graph.

The model is exported once per mode (``export`` records the mode's computation,
like fx), functionalised (``run_decompositions({})``: in-place ops become
out-of-place, nothing is decomposed further, so eval stays bit-exact), and the
graph is re-rooted on a shallow copy of the user's model: every parameter and
buffer the graph reads resolves by its original qualified name to the user's own
tensor, so ``state_dict`` names, shared parameters and gradients are the model's.

What the export path cannot do (documented in the README):

* data-dependent control flow (``if x.sum() > 0``) still fails; use
  ``torch.cond`` or keep such code out of the forward;
* the graph is specialised to the example's non-batch shapes; the batch axis is
  dynamic where the model allows (``Dim.AUTO``, torch >= 2.6), else fixed too;
* submodules are inlined, so no block is opaque and none is a ``call_module``;
* outputs are rebuilt from export's flattened outputs with its recorded pytree
  spec (tensors, tuples, lists, dicts and registered containers such as
  transformers' ``ModelOutput``).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import TraceError
from .trace import (
    SCOPE_KEY,
    ExampleInputs,
    TracedModel,
    _bound_forward_class,
    _scope_from_module_stack,
    fetch_attr,
    preserved_module_state,
)

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
    """Export ``model`` in train and in eval mode; one :class:`TracedModel` over the user's modules."""
    root = copy.copy(model)
    # The copy gets its own containers: attributes export needs (lifted constants,
    # the output rebuilder) must not land in the user's model.
    root._modules, root._buffers = dict(root._modules), dict(root._buffers)
    bound = _bound_forward_class(model, inputs)
    if bound is not None:
        root.__class__ = bound
    args = inputs.tensors if bound is not None else tuple(inputs.args)
    exported = []
    # export warns about tensors a forward caches on modules; preserved_module_state undoes them.
    with preserved_module_state(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        for training in (True, False):
            root.train(training)
            program, args = _export(root, args, model)
            exported.append(program)
    root.training = model.training
    constants: list[str] = []
    graphs = [_rooted_graph(gm, root, model, mode, constants) for gm, mode in zip(exported, ("train", "eval"))]
    return TracedModel(root, graphs[0], graphs[1], {}, tuple(constants), tuple(args), "export")


def _export(root: nn.Module, args: tuple, model: nn.Module) -> tuple[fx.GraphModule, tuple]:
    """The exported module and the example arguments it was captured with."""
    dynamic = _batch_dynamic_shapes(args)
    # export specialises a size-1 axis to 1 (0/1 specialisation), so a batch-1
    # example would give a graph that only runs at batch 1: capture a batch of two.
    wide = _batch_of_two(args) if dynamic is not None else None
    try:
        try:
            captured = wide if wide is not None else args
            program = torch.export.export(root, captured, dynamic_shapes=dynamic, strict=False)
        except Exception:  # noqa: BLE001 - a model that fixes its batch size exports statically
            if dynamic is None:
                raise
            captured = args
            program = torch.export.export(root, args, strict=False)
        program = program.run_decompositions({})
    except Exception as error:  # torch.export raises many types; all mean "cannot capture"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} "
            f"({'train' if root.training else 'eval'} mode): {type(error).__name__}: {first}\n"
            f"Fix: data-dependent Python control flow cannot be exported; rewrite it with torch.cond or "
            f"tensor ops, or use frontend='fx' with leaf_modules=[...] for the untraceable submodules.",
            "", type(model), first,
        ) from error
    return program.module(), captured


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


def _rooted_graph(gm: fx.GraphModule, root: nn.Module, model: nn.Module, mode: str, constants: list[str]) -> fx.Graph:
    """``gm``'s graph with plain codegen, reading attributes from ``root`` (the user's modules)."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    flat_outputs = graph.graph_copy(gm.graph, values)
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)

    for node in list(graph.nodes):
        node.meta[SCOPE_KEY] = _scope_from_module_stack(root, node)
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

    _read_mutated_buffers_through_copies(graph)
    outputs = list(flat_outputs) if isinstance(flat_outputs, (tuple, list)) else [flat_outputs]
    if spec is None or spec.is_leaf():
        result = outputs[0] if spec is not None else flat_outputs
    elif spec.type in (tuple, list) and all(child.is_leaf() for child in _children(spec)):
        result = spec.type(outputs)
    else:
        name = f"{_PREFIX}_{mode}_outputs"
        setattr(root, name, OutputStructure(spec))
        constants.append(name)
        result = graph.call_module(name, tuple(outputs))
    graph.output(result)
    graph.lint()
    return graph


def _read_mutated_buffers_through_copies(graph: fx.Graph) -> None:
    """Ops read a clone of each buffer the graph later overwrites with ``copy_``.

    Functionalised BatchNorm returns new running statistics that ``copy_`` writes
    back at the end of the graph; autograd has saved the old ones for backward
    (``native_batch_norm_backward`` takes them), so the write would fail the
    backward's version check. Reading a copy keeps the maths and frees the buffer.
    """
    copy_ = torch.ops.aten.copy_.default
    mutated = {n.args[0] for n in graph.nodes if n.op == "call_function" and n.target is copy_
               and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"}
    for buffer in mutated:
        readers = [u for u in buffer.users if not (u.target is copy_ and u.args[0] is buffer)]
        if not readers:
            continue
        with graph.inserting_after(buffer):
            clone = graph.call_function(torch.ops.aten.clone.default, (buffer,))
        for reader in readers:
            reader.replace_input_with(buffer, clone)


def _children(spec):
    if hasattr(spec, "children"):  # torch >= 2.10; children_specs is deprecated there
        return list(spec.children())
    return list(spec.children_specs)


def _resolves(model: nn.Module, target: str) -> bool:
    return fetch_attr(model, target) is not None
