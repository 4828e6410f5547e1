"""Stage 1, second frontend — capture a model with ``torch.export`` for analysis.

``torch.export`` traces through code ``symbolic_trace`` cannot (data-structure
manipulation, ``*args`` forwards, iterating tensors, mask and cache code of
Hugging Face transformers) and records ATen operations with
``node.meta["nn_module_stack"]``, so the same boundaries stage finds module
scopes and residual adds on its graph.

The exported graph is what simfx *analyses*, never what trains: a model
captured this way trains by running its own forward, with SIM reading the
chosen blocks' inputs and outputs at their module calls
(:mod:`simfx.runtime.taps`). So the capture keeps, besides the graph, every
module call: which graph values each call of each submodule took as arguments
and returned, and where in its ``(args, kwargs)`` and its result
(:class:`~simfx.capture.record.ModuleCall`). Forward hooks record them while
export traces, tagging the node of each tensor a call passes (export's own
``preserve_module_call_signature`` does the same job at twice the cost of the
export, and fails on calls passing objects it cannot flatten).
Nothing the graph would lose (hooks, checkpointing, Python state, random draws,
sizes export specialises) matters for training, so nothing is refused here:

* the model is exported once, in training mode, with static shapes (the graph
  never runs, so no axis needs to be symbolic), its hooks switched off and
  the randomness its config switches on for training (LayerDrop, SpecAugment)
  switched off, from fixed seeds, so the analysis sees every layer and is the
  same on every run;
* the graph is re-rooted on a shallow copy of the user's model: every parameter
  and buffer it reads resolves by its original qualified name to the user's own
  tensor, so ``state_dict`` names are the model's;
* outputs are rebuilt from export's flattened outputs with its recorded pytree
  spec (tensors, tuples, lists, dicts and registered containers such as
  transformers' ``ModelOutput``).

What still fails: code export cannot run at all (data-dependent control flow on
the example, unsupported operations); the error says what torch reported.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import logging
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental import proxy_tensor
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .inputs import CallTemplate, ExampleInputs, bound_forward_class, training_randomness_off
from .recorders import frame_location, user_frame
from ..fx_utils import fetch_attr
from .module_facts import hooks_suppressed, preserved_module_state, seeded
from .record import ModuleCall, ScopeFrame, TracedModel, frames_from_module_stack

__all__ = ["export_model", "analysis_root", "exported"]

_PREFIX = "_simfx_export"
_SEED = 20250918


class OutputStructure(nn.Module):
    """Rebuilds a model's output structure (dicts, ``ModelOutput``...) from export's flat outputs."""

    def __init__(self, spec: pytree.TreeSpec):
        super().__init__()
        self.spec = spec

    def forward(self, *flat):
        return pytree.tree_unflatten(list(flat), self.spec)


def export_model(model: nn.Module, inputs: ExampleInputs) -> TracedModel:
    """Export ``model`` in training mode; one :class:`TracedModel` over the user's modules, with its module calls."""
    root = analysis_root(model)
    bound, template = bound_forward_class(model, inputs)
    if bound is not None:
        root.__class__ = bound
    args = inputs.tensors if bound is not None else tuple(inputs.args)
    return exported(model, root, args, template, "export")


def analysis_root(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` to capture: the user's modules, with containers of its own.

    Attributes export needs (lifted constants, the output rebuilder) must not land in the user's model.
    """
    root = copy.copy(model)
    root._modules, root._buffers = dict(root._modules), dict(root._buffers)
    return root


def exported(model: nn.Module, root: nn.Module, args: tuple, template: CallTemplate | None,
             frontend: str, batch: int | None = None) -> TracedModel:
    """``root`` (over ``model``'s modules) exported on ``args``, as a :class:`TracedModel` of the model runtime.

    ``batch``: the example's batch size, where ``args[0]`` does not start with it.
    """
    # export warns about tensors a forward caches on modules; preserved_module_state undoes them.
    with preserved_module_state(model), hooks_suppressed(model), training_randomness_off(model), \
            seeded(_SEED), _torch_logs_off(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        # A tensor attribute requiring gradients that is no parameter (weight_norm's weight) is a
        # constant of the graph: it only describes the computation; training runs the model itself.
        warnings.filterwarnings("ignore", message="A model attribute .* requires gradient")
        root.train(True)
        with torch.enable_grad(), _ModuleCallRecorder(model) as recorder:  # grad modes are relative to this
            program = _export(root, args, model)
        unlifted = program.module()
    root.training = model.training
    constants: list[str] = []
    graph, container = _rooted_graph(unlifted, root, model, "train", constants)
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    no_grad = _grad_modes_of_the_caller(graph)
    return TracedModel(
        root=root,
        model=model,
        graph=graph,
        call=template or CallTemplate.plain(placeholders),
        scopes={node.name: frames_from_module_stack(root, node) for node in graph.nodes},
        no_grad=no_grad,
        output_containers=frozenset({container} - {None}),
        constants=tuple(constants),
        inputs=tuple(args),
        frontend=frontend,
        calls=recorder.module_calls(graph, model),
        runtime="model",
        batch=batch,
    )


@contextlib.contextmanager
def _torch_logs_off() -> Iterator[None]:
    """torch's loggers and its writes to stderr silent inside: a capture that fails is reported by simfx's
    own error, once.

    (torch logs its fake-tensor and symbolic-shape failures at WARNING and ERROR, and
    export prints the partial graph of a failed capture, often dozens of lines, before raising.)
    """
    loggers = [
        logger for name, logger in logging.root.manager.loggerDict.items()
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, disabled in saved:
            logger.disabled = disabled


def _export_function():
    # torch 2.5 exports the training IR through export_for_training; later versions through export.
    return getattr(torch.export, "export_for_training", None) or torch.export.export


def _export(root: nn.Module, args: tuple, model: nn.Module):
    """The exported program (no stack traces on its nodes where torch can leave them out: nothing reads them)."""
    export = _export_function()
    config = torch.fx.config
    emitting = getattr(config, "do_not_emit_stack_traces", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # export_for_training's deprecation notice
            if emitting is not None:
                config.do_not_emit_stack_traces = True
            return export(root, args, strict=False)
    except Exception as error:  # torch.export raises many types; all mean "cannot capture"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} (train mode)"
            f"{frame_location(user_frame(error))}: {type(error).__name__}: {first}\nFix: {_export_fix(error)}",
            "", type(model), first,
        ) from error
    finally:
        if emitting is not None:
            config.do_not_emit_stack_traces = emitting


_TAG = "simfx_value"  # node.meta key: the tag of a graph value some module call passed


class _ModuleCallRecorder:
    """Forward hooks on every submodule while export traces: each call's arguments and result.

    A tensor a call passes is recorded by its graph node, tagged in ``node.meta``
    (the tag survives export's passes and graph copies); anything else is kept as the
    constant it was. :meth:`module_calls` turns the records into :class:`ModuleCall`\ s
    over the final graph.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: list[tuple] = []
        self._calls: dict[str, int] = {}
        self._open: dict[str, list] = {}
        self._tags = itertools.count()
        self._handles: list = []

    def __enter__(self) -> "_ModuleCallRecorder":
        for name, module in self.model.named_modules():
            if name:
                self._handles.append(module.register_forward_pre_hook(
                    functools.partial(self._enter, name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(
                    functools.partial(self._leave, name), with_kwargs=True, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _enter(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self._open.setdefault(name, []).append((call, torch.is_grad_enabled(), [self._tag(v) for v in leaves], spec))

    def _leave(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, grad_enabled, leaves, spec = self._open[name].pop()
        paths, _ = pytree.tree_flatten_with_path(output)
        results = [(tuple(_step(key) for key in path), self._tag(value)) for path, value in paths]
        self.records.append((name, call, grad_enabled, leaves, spec, results))

    def _tag(self, value: Any) -> Any:
        """A tensor's tag (its graph node's), or the value itself when it is not a tensor."""
        if not isinstance(value, torch.Tensor):
            return value
        mode = proxy_tensor.get_proxy_mode()
        slot = proxy_tensor.get_proxy_slot(value, mode.tracer, None) if mode is not None else None
        node = getattr(getattr(slot, "proxy", slot), "node", None)
        if node is None:
            return _Unknown()
        if _TAG not in node.meta:
            node.meta[_TAG] = next(self._tags)
        return _Tag(node.meta[_TAG])

    def module_calls(self, graph: fx.Graph, model: nn.Module) -> dict[ScopeFrame, ModuleCall]:
        """Each recorded call as a :class:`ModuleCall` over ``graph``'s nodes."""
        nodes = {n.meta[_TAG]: n for n in graph.nodes if _TAG in n.meta}
        modules = dict(model.named_modules())

        def value(leaf: Any) -> Any:
            return nodes.get(leaf.tag, _Unknown()) if isinstance(leaf, _Tag) else leaf

        calls: dict[ScopeFrame, ModuleCall] = {}
        for name, call, grad_enabled, leaves, spec, results in self.records:
            call_args, call_kwargs = pytree.tree_unflatten([value(v) for v in leaves], spec)
            outputs = {}
            for path, leaf in results:
                node = value(leaf)
                if isinstance(node, fx.Node):
                    outputs.setdefault(node.name, path)
            frame = ScopeFrame(name, type(modules[name]), call)
            calls[frame] = ModuleCall(frame, tuple(call_args), dict(call_kwargs), outputs, grad_enabled)
        return calls


@dataclass(frozen=True)
class _Tag:
    tag: int


class _Unknown:
    """A tensor a call passed that is no graph value (export kept no node for it)."""

    def __repr__(self) -> str:
        return "<not observable>"


def _step(key: Any) -> tuple[str, Any]:
    """A pytree key as a :class:`ModuleCall` output step."""
    if hasattr(key, "idx"):
        return ("item", key.idx)
    if hasattr(key, "key"):
        return ("item", key.key)
    return ("attr", key.name)


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
