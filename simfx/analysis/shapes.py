"""Stage 2 — shapes: shape, dtype and channel axis of every node, without real kernels.

The graph runs once under ``FakeTensorMode`` with the model's parameters and
buffers swapped for fake copies (``torch.func.functional_call``), so no kernel
runs on real data and no BatchNorm statistic moves. If a model does something
fake tensors cannot (data-dependent output shapes), the pass falls back to one
real run on a deep copy of the model in ``no_grad`` mode.

Besides shapes, the pass infers where each activation keeps its channels:
weight layers fix it (convolutions and batch/group norms: axis 1; linear and
layer norms: the last axis), layout ops move it (``permute``, ``transpose``,
``flatten``) and shape-preserving ops pass it on. It also records which nodes
modify a value in place (by its version counter, so ``torch.relu_(x)``,
``x[:, :4] = 0`` and a module's in-place first layer all count) and the
tuple/list structure of what each opaque module returns.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.interpreter import Interpreter

from ..errors import ExampleInputsError
from ..capture.module_facts import hooks_suppressed, preserved_module_state
from .layout import UNKNOWN, axis_after, op_name, weight_layer_layout

__all__ = ["TensorMeta", "GraphShapes", "propagate_shapes"]

log = logging.getLogger("simfx")


@dataclass(frozen=True)
class TensorMeta:
    """Plain description of one tensor value in the traced graph."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    channel_dim: int | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class GraphShapes:
    """What the shape pass found, by node name.

    ``metas``: :class:`TensorMeta` for tensor values, tuples of them (None for a
    non-tensor element) for tuple and list values; nodes producing anything else
    (ints, shapes, None) are absent. ``storage``: an identity of each tensor
    value's storage (views share it). ``mutated``: the storages each node changed
    in place. ``leaf_structures``: for opaque modules (``call_module`` targets)
    returning a tuple or list, its structure (see ``simfx.capture.fx_trace.LeafStructure``).
    """

    metas: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, int] = field(default_factory=dict)
    mutated: dict[str, frozenset[int]] = field(default_factory=dict)
    leaf_structures: dict[str, Any] = field(default_factory=dict)

    def mutates(self, node_name: str, value_name: str) -> bool:
        """Node ``node_name`` changed the storage of value ``value_name`` (or of a view of it) in place."""
        key = self.storage.get(value_name)
        return key is not None and key in self.mutated.get(node_name, ())


def propagate_shapes(
    graph: fx.Graph,
    root: nn.Module,
    example_inputs: Sequence[Any],
) -> GraphShapes:
    """Run ``graph`` on fake tensors and describe every value (see :class:`GraphShapes`)."""
    partial = GraphShapes()
    try:
        with preserved_module_state(root), hooks_suppressed(root):
            return _fake_run(graph, root, example_inputs)
    except Exception as error:  # fake tensors refuse data-dependent ops, among others
        log.info("fake-tensor shape pass failed (%s); using one real run on a copy", error)
        partial = error.shapes if isinstance(error, _NodeFailed) else partial
    try:
        with hooks_suppressed(root):
            return _real_run(graph, root, example_inputs)
    except Exception as failure:  # the example does not fit the model: say so plainly
        error, where = (failure.error, f" at {failure.where}") if isinstance(failure, _NodeFailed) else (failure, "")
        if isinstance(failure, _NodeFailed):
            partial = failure.shapes  # the real run got at least as far as the fake one
        described = ", ".join(
            f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            for t in example_inputs
        )
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        failure = ExampleInputsError(
            f"{type(root).__name__} cannot run on the example inputs ({described}){where}: {first}\n"
            f"Pass example_inputs shaped like a training batch, with the dtype and on the device of the "
            f"model's parameters."
        )
        # What ran before the failing node: the pipeline may retrace with it (an opaque
        # module returning a tuple the graph treated as one value).
        failure.partial_shapes = partial
        raise failure from error


class _NodeFailed(Exception):
    """A node raised while the shapes ran; carries which one, so the error can name it."""

    def __init__(self, node: fx.Node, error: Exception, shapes: "GraphShapes"):
        super().__init__(str(error))
        self.error = error
        self.shapes = shapes
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        self.where = f"node '{node.name}' ({node.op} {target})"


class _ShapeRecorder(Interpreter):
    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, garbage_collect_values=True, graph=graph)
        self.shapes = GraphShapes()
        # Storage identities are addresses: keep every storage alive so no later
        # tensor reuses one (values themselves are still freed after their last use).
        self._storages: list[Any] = []

    def run_node(self, node: fx.Node) -> Any:
        inputs = [t for n in node.all_input_nodes for t in _tensors(self.env.get(n))]
        versions = [(t, t._version) for t in inputs]
        try:
            result = super().run_node(node)
        except _NodeFailed:
            raise
        except Exception as error:
            raise _NodeFailed(node, error, self.shapes) from error
        changed = frozenset(_storage_key(t) for t, version in versions if t._version != version) - {None}
        if changed:
            self.shapes.mutated[node.name] = changed
        meta = _describe(result, node, self.shapes.metas, self.module)
        if meta is not None:
            self.shapes.metas[node.name] = meta
        if isinstance(result, torch.Tensor):
            key = _storage_key(result)
            if key is not None:
                self.shapes.storage[node.name] = key
                self._storages.append(result.untyped_storage())
        if node.op == "call_module" and isinstance(result, (tuple, list)):
            self.shapes.leaf_structures[node.target] = leaf_structure(result)
        return result

    def fetch_args_kwargs_from_env(self, node: fx.Node) -> tuple[tuple, dict]:
        # fx stores list/dict arguments as immutable containers; generated code builds
        # fresh literals on every call, so library functions may mutate them (torchvision's
        # Swin3d window-size helper does). Hand them mutable copies, as generated code does.
        args, kwargs = super().fetch_args_kwargs_from_env(node)
        return _mutable(args), _mutable(kwargs)


def _mutable(value: Any) -> Any:
    # Only fx's own immutable containers (and plain builtins holding them) are
    # rebuilt: a dict subclass (Hugging Face's ModelOutput) keeps its type.
    if type(value) in (list, immutable_list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    if type(value) in (dict, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _storage_key(t: torch.Tensor) -> int | None:
    """An identity of ``t``'s storage, shared by its views (None for tensors without one)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def leaf_structure(value: Any) -> Any:
    """The tuple/list structure of an opaque module's result: ``(kind, elements)``.

    Each element is None (a tensor, traced as ``proxy[i]``), ``("constant", v)`` for
    None, numbers and strings, or a nested structure.
    """
    elements = []
    for item in value:
        if isinstance(item, (tuple, list)) and type(item) in (tuple, list):
            elements.append(leaf_structure(item))
        elif item is None or isinstance(item, (bool, int, float, str)):
            elements.append(("constant", item))
        else:
            elements.append(None)
    return ("tuple" if isinstance(value, tuple) else "list", elements)


class _Runner(nn.Module):
    """Holds the root so functional_call can swap every parameter and buffer under it."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__()
        self.root = root
        self.graph_to_run = graph

    def forward(self, *inputs):
        recorder = _ShapeRecorder(self.root, self.graph_to_run)
        recorder.run(*inputs)
        return recorder.shapes


def _fake_run(graph, root, example_inputs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    runner = _Runner(root, graph)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    fakes: dict[int, torch.Tensor] = {}
    state = {
        name: _fake_like(tensor, mode, fakes)
        for name, tensor in (*runner.named_parameters(), *runner.named_buffers())
    }
    with mode:
        device = _single_device(root)
        if device is not None:
            # Examples may sit elsewhere than the model (on 'meta', or on the CPU for a
            # GPU model): only their shapes matter, so run them where the weights are.
            inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
        # Plain tensor attributes (fx constants, cached tensors) are not in the state
        # dict; fake mode must still be able to read them.
        mode.allow_non_fake_inputs = True
        # Shapes need no autograd graph (the real-run fallback uses no_grad too);
        # recording one costs time on every node.
        with torch.no_grad():
            return torch.func.functional_call(runner, state, tuple(inputs))


def _fake_like(tensor: torch.Tensor, mode, fakes: dict[int, torch.Tensor]) -> torch.Tensor:
    """A fake tensor of ``mode`` with ``tensor``'s shape, strides, dtype and device.

    ``mode.from_tensor`` records each tensor's full metadata (storage, views,
    autograd state) and took about half of the shape pass on big models; for
    parameters and buffers, a meta tensor of the same layout wrapped as a fake is
    all the pass needs (call this outside the mode: inside it, the wrapping itself
    is dispatched through the mode, which costs more than it saves). The same
    tensor object (tied weights) maps to the same fake, so ``functional_call``
    still sees it tied. Anything else (quantised, sparse, subclass tensors) goes
    through ``from_tensor``.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    known = fakes.get(id(tensor))
    if known is not None:
        return known
    fake = None
    if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.layout == torch.strided and not tensor.is_quantized:
        meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        try:
            fake = FakeTensor(mode, meta, tensor.device)
        except (TypeError, RuntimeError):  # the private constructor changed: the public way below
            fake = None
    if fake is None:
        fake = mode.from_tensor(tensor, static_shapes=True)
    fakes[id(tensor)] = fake
    return fake


def _single_device(root: nn.Module) -> torch.device | None:
    """The device of every parameter and buffer of ``root``, or None if they have none or several."""
    devices = {t.device for t in (*root.parameters(), *root.buffers())}
    return devices.pop() if len(devices) == 1 else None


def _real_run(graph, root, example_inputs):
    runner = _Runner(copy.deepcopy(root), graph)
    with torch.no_grad():
        return runner(*example_inputs)


# --- channel axis inference (the rules live in simfx.analysis.layout) --------------


def _describe(result: Any, node: fx.Node, metas: Mapping[str, Any], root: nn.Module):
    if isinstance(result, torch.Tensor):
        shape = tuple(int(s) for s in result.shape)
        channel_dim = _channel_dim(node, shape, metas, root)
        return TensorMeta(shape, result.dtype, str(result.device), channel_dim)
    if isinstance(result, (tuple, list)) and type(result) in (tuple, list) and _tensors(result):
        return tuple(_describe_element(r) for r in result)
    return None


def _describe_element(value: Any):
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(int(s) for s in value.shape), value.dtype, str(value.device))
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return tuple(_describe_element(v) for v in value)
    return None


def _channel_dim(node: fx.Node, shape: tuple[int, ...], metas, root) -> int | None:
    rank = len(shape)
    if rank < 2:
        return None
    fixed = weight_layer_layout(node, root, element_zero=True)
    if fixed is not None:
        return fixed.axis(rank)
    args = [a for a in node.args if isinstance(a, fx.Node)]
    first = metas.get(args[0].name) if args else None
    if not isinstance(first, TensorMeta) or first.channel_dim is None:
        return _inherit_same_shape(node, shape, metas)
    moved = axis_after(node, first.channel_dim, first.shape, shape)
    if moved is not UNKNOWN:
        return moved
    return _inherit_same_shape(node, shape, metas)


def _inherit_same_shape(node: fx.Node, shape: tuple[int, ...], metas) -> int | None:
    """Elementwise and shape-preserving ops keep the channel axis of an input of the same shape."""
    for arg in _tensor_args(node):
        meta = metas.get(arg.name)
        if isinstance(meta, TensorMeta) and meta.channel_dim is not None and meta.rank == len(shape):
            if meta.shape == shape or op_name(node.target) in ("cat", "getitem", "narrow", "slice"):
                return meta.channel_dim
    return None


def _tensor_args(node: fx.Node):
    for arg in node.args:
        if isinstance(arg, fx.Node):
            yield arg
        elif isinstance(arg, (tuple, list)):
            yield from (a for a in arg if isinstance(a, fx.Node))
