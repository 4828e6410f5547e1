"""Analysis — boundaries: the regions of a traced graph where SIM can attach.

A boundary has exactly one activation tensor flowing in (``x``) and one flowing
out (``y``), both batch-major. Candidates come from two sources:

* **module scopes** — the nodes recorded inside one call of a submodule (the
  capture record's ``scopes``); a leaf ``call_module`` node is a scope of one node;
* **residual regions** — ``y = F(x) + x`` or ``F(x) + shortcut(x)`` found on the
  graph itself: for an ``add`` node ``a`` with entry ``u = idom(a)``, the region
  is every node ``u`` dominates and ``a`` post-dominates (networkx dominators on
  the activation graph), so inline residuals written in a forward count too.

A module scope is *residual* when it owns such an add: the scope is the
innermost one containing the region, and its exit is the add or follows it
through shape-preserving, parameter-free or normalisation ops (``relu(x + F(x))``,
post-norm transformers). Every candidate is returned, eligible or not, with the
reason; choosing among them is the select stage's job.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .layout import (
    axis_before, batch_axis, declared_batch_axis, default_channel_dim, is_layout_op, layout_name, op_name,
    token_count, weight_layer_layout,
)
from .shapes import GraphShapes, TensorMeta
from .taps import untappable_reason
from ..capture.module_facts import weight_layers
from ..capture.record import ScopeFrame, TracedModel
from ..fx_utils import fetch_attr

__all__ = ["Boundary", "Port", "find_candidates"]


@dataclass(frozen=True)
class Port:
    """One tensor crossing a boundary: its node, its shape and dtype, and its channel axis."""

    node: str
    meta: TensorMeta
    channel_dim: int | None = None


@dataclass(frozen=True)
class Boundary:
    """One candidate region of the traced train graph.

    Attributes:
        name: module path (``"layer1.0"``; ``"blk@1"`` for a module's second call)
            or, for a residual region no module wraps, ``"<scope>.<add node>"``.
        kind: ``"module"`` or ``"residual"`` (a region found on the graph).
        module_type: the module's class (None for a residual region).
        nodes: fx node names in the region, in graph order.
        entry, exit: fx node names of ``x`` and ``y``, the primary input and output
            SIM reads (None when not a boundary).
        in_meta, out_meta: shapes and dtypes at the example inputs.
        in_channel_dim, out_channel_dim: inferred channel axes of ``x`` and ``y``.
        in_batch_dim, out_batch_dim: their batch axes: 0, or 1 for a sequence-first value ``(N, B, C)``.
        inputs, outputs: every tensor flowing in and out (:class:`Port`), the primary
            ones among them; the other inputs are context (a mask, a timestep), the
            other outputs side outputs (an RNN's state). Choose another primary with
            the ``primary_input``/``primary_output`` options (a position in these).
        residual: the region ends in a residual add of its own.
        opaque: a leaf module kept opaque by a registration (one graph node).
        opaque_reason: why the capture kept it opaque (``find_boundaries``' list of opaque modules).
        produces_output: ``y`` is (part of) the model's output.
        has_weight: owns a parameter with 2+ dims (conv, linear, attention).
        weight_layers: how many conv/linear-like layers the region applies.
        container_child: a direct child of an ``nn.Sequential``/``nn.ModuleList``.
        eligible: can take SIM; if not, ``reason`` says why.
    """

    name: str
    kind: str
    module_type: type | None
    nodes: tuple[str, ...]
    entry: str | None
    exit: str | None
    in_meta: TensorMeta | None
    out_meta: TensorMeta | None
    in_channel_dim: int | None = None
    out_channel_dim: int | None = None
    in_batch_dim: int = 0
    out_batch_dim: int = 0
    residual: bool = False
    opaque: bool = False
    produces_output: bool = False
    has_weight: bool = False
    weight_layers: int = 0
    container_child: bool = False
    eligible: bool = True
    reason: str = ""
    module_name: str | None = field(default=None, compare=False)
    opaque_reason: str = field(default="", compare=False)
    inputs: tuple[Port, ...] = ()
    outputs: tuple[Port, ...] = ()

    @property
    def context(self) -> tuple[str, ...]:
        """Names of the inputs SIM does not read (masks, embeddings, timesteps)."""
        return tuple(p.node for p in self.inputs if p.node != self.entry)

    @property
    def side_outputs(self) -> tuple[str, ...]:
        """Names of the outputs SIM does not read."""
        return tuple(p.node for p in self.outputs if p.node != self.exit)

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return self.in_meta.shape if self.in_meta else None

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return self.out_meta.shape if self.out_meta else None

    @property
    def type_name(self) -> str:
        return self.module_type.__name__ if self.module_type is not None else "residual"

    @property
    def in_layout(self) -> str:
        return layout_name(self.in_meta, self.in_channel_dim, self.in_batch_dim)

    @property
    def out_layout(self) -> str:
        return layout_name(self.out_meta, self.out_channel_dim, self.out_batch_dim)

    @property
    def out_tokens(self) -> int | None:
        return token_count(self.out_meta, self.out_channel_dim, self.out_batch_dim)


# --- graph facts ------------------------------------------------------------


_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
_ADD_METHODS = ("add", "add_")
_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)
_SHAPE_QUERIES = frozenset({"size", "dim", "numel", "getattr", "sym_size", "sym_numel", "sym_stride", "len"})


class _GraphFacts:
    """Indexes a traced graph once: order, activations, shapes, dominator trees."""

    def __init__(self, traced: TracedModel, shapes: GraphShapes):
        graph = traced.graph
        self.traced = traced
        self.graph = graph
        self.root = traced.root
        self.shapes = shapes
        self.metas = shapes.metas
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.output = next(n for n in reversed(self.nodes) if n.op == "output")
        self.output_values = _returned_values(self.output, traced.output_containers)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        # Nodes the output depends on. The rest are side effects (an exported graph's
        # BatchNorm running-statistic updates) and never count as a value leaving a region.
        self.live: set[fx.Node] = {self.output}
        for n in reversed(self.nodes):
            if n in self.live:
                self.live.update(n.all_input_nodes)
        # Activations: values computed from the inputs' data. Shape queries (and the
        # integer maths and masks built from them) carry no data, so a causal mask made
        # from x.size(1) is not a second tensor flowing into every attention block.
        self.activation: set[fx.Node] = set()
        for n in self.nodes:
            if n not in self.live or self._is_shape_query(n):
                continue
            if n.op == "placeholder" or any(a in self.activation for a in n.all_input_nodes):
                self.activation.add(n)
        first_tensor = next(
            (self.tensor_meta(p) for p in placeholders if self.tensor_meta(p) is not None), None
        )
        self.batch = traced.batch if traced.batch is not None else (
            first_tensor.shape[0] if first_tensor and first_tensor.rank else None)
        self._dom = _DominatorTree(self._activation_graph(placeholders), _SOURCE)
        self._pdom = _DominatorTree(self._activation_graph(placeholders).reverse(copy=False), self.output)

    def _is_shape_query(self, node: fx.Node) -> bool:
        return node.name not in self.metas and op_name(node.target) in _SHAPE_QUERIES

    def scope(self, node: fx.Node) -> tuple[ScopeFrame, ...]:
        """The module calls ``node`` was recorded inside (outermost first)."""
        return self.traced.scope(node)

    def tensor_meta(self, node: fx.Node) -> TensorMeta | None:
        meta = self.metas.get(node.name)
        return meta if isinstance(meta, TensorMeta) else None

    def _activation_graph(self, placeholders) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_node(_SOURCE)
        for p in placeholders:
            g.add_edge(_SOURCE, p)
        for n in self.nodes:
            if n in self.activation:
                for a in n.all_input_nodes:
                    if a in self.activation:
                        g.add_edge(a, n)
        return g

    def dominates(self, a, b) -> bool:
        return self._dom.is_ancestor(a, b)

    def post_dominates(self, a, b) -> bool:
        return self._pdom.is_ancestor(a, b)

    def idom(self, node):
        return self._dom.parent.get(node)

    def module(self, name: str) -> nn.Module | None:
        try:
            return self.root.get_submodule(name)
        except AttributeError:
            return None

    def owns_weight(self, node: fx.Node) -> bool:
        """Node applies a parameter of 2+ dims (a conv/linear/attention weight)."""
        if node.op == "call_module":
            module = self.module(node.target)
            return module is not None and any(p.dim() >= 2 for p in module.parameters())
        if node.op == "get_attr":
            value = fetch_attr(self.root, node.target)
            return isinstance(value, torch.Tensor) and value.dim() >= 2 and isinstance(value, nn.Parameter)
        return False

    def applies_weight(self, node: fx.Node) -> bool:
        """Node owns or reads a parameter of 2+ dims (export graphs read them through get_attr inputs)."""
        return self.owns_weight(node) or any(a.op == "get_attr" and self.owns_weight(a) for a in node.all_input_nodes)

    def is_matrix_layer(self, node: fx.Node) -> bool:
        """Conv/linear-like: changes features through a weight (norm layers excepted)."""
        if node.op == "call_module":
            module = self.module(node.target)
            if module is None or _is_norm(module):
                return False
            return any(p.dim() >= 2 for p in module.parameters())
        return weight_layer_layout(node, self.root) is not None and not _is_norm_function(node)


_SOURCE = "__simfx_source__"


def _returned_values(output: fx.Node, containers: frozenset[str]) -> set[fx.Node]:
    """The values the model returns, looking through output containers rebuilt in the graph.

    A dict subclass (``ModelOutput``) or export's output rebuilder is a node of its
    own; the tensors it holds are what the model returns.
    """
    returned: set[fx.Node] = set()
    pending = list(output.all_input_nodes)
    while pending:
        node = pending.pop()
        returned.add(node)
        if node.name in containers:
            pending.extend(a for a in node.all_input_nodes if a not in returned)
    return returned


class _DominatorTree:
    """Immediate dominators from networkx, with O(1) ancestor queries via DFS intervals."""

    def __init__(self, graph: nx.DiGraph, start):
        self.parent = {n: d for n, d in nx.immediate_dominators(graph, start).items() if n != d}
        children: dict[object, list] = {}
        for n, d in self.parent.items():
            children.setdefault(d, []).append(n)
        self.enter: dict[object, int] = {}
        self.leave: dict[object, int] = {}
        clock = 0
        stack = [(start, False)]
        while stack:
            node, done = stack.pop()
            if done:
                self.leave[node] = clock
                clock += 1
                continue
            self.enter[node] = clock
            clock += 1
            stack.append((node, True))
            stack.extend((c, False) for c in children.get(node, ()))

    def is_ancestor(self, a, b) -> bool:
        """a dominates b (reflexive)."""
        if a not in self.enter or b not in self.enter:
            return False
        return self.enter[a] <= self.enter[b] and self.leave[b] <= self.leave[a]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(
        module,
        (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
        + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
    )


def _is_norm_function(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "")
    return "norm" in name


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_inplace(node: fx.Node, facts: _GraphFacts) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return op_name(node.target).endswith("_")
        return node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    if node.op == "call_module":
        return getattr(facts.module(node.target), "inplace", False) is True
    return False


# --- candidates -------------------------------------------------------------


@dataclass
class _Region:
    nodes: list[fx.Node]
    entry: fx.Node | None = None
    exit: fx.Node | None = None
    reason: str = ""
    inputs: list[fx.Node] = field(default_factory=list)  # every tensor flowing in, the entry among them
    outputs: list[fx.Node] = field(default_factory=list)  # every tensor leaving, the exit among them


def find_candidates(traced: TracedModel, shapes: GraphShapes) -> list[Boundary]:
    """Every module-scope and residual-region candidate of the captured graph, in graph order."""
    facts = _GraphFacts(traced, shapes)
    frames: dict[ScopeFrame, list[fx.Node]] = {}
    for node in facts.nodes:
        for frame in facts.scope(node):
            frames.setdefault(frame, []).append(node)
    frame_regions = {frame: _analyse_region(nodes, facts) for frame, nodes in frames.items() if frame.name}
    owned, standalone = _residuals(frames, frame_regions, facts)
    candidates = [_module_boundary(frame, region, frame in owned, traced.opaque, facts)
                  for frame, region in frame_regions.items()]
    candidates += [_region_boundary(name, region, facts) for name, region in standalone]
    candidates.sort(key=lambda b: (facts.order[facts.by_name[b.nodes[0]]], -len(b.nodes)))
    if traced.runtime == "model":
        candidates = [_readable_when_the_model_runs(b, traced) for b in candidates]
    return candidates


def _readable_when_the_model_runs(boundary: Boundary, traced: TracedModel) -> Boundary:
    """``boundary``, ineligible where the model's own forward offers no module call to read it at."""
    if not boundary.eligible:
        return boundary
    reason = untappable_reason(traced, boundary)
    return dataclasses.replace(boundary, eligible=False, reason=reason) if reason else boundary


def _residuals(frames, frame_regions, facts: _GraphFacts) -> tuple[set[ScopeFrame], list[tuple[str, _Region]]]:
    """Module scopes that own a residual add, and residual regions that stand as candidates of their own."""
    owned: set[ScopeFrame] = set()
    standalone: list[tuple[str, _Region]] = []
    for add in (n for n in facts.nodes if is_add(n)):
        found = _residual_region(add, facts)
        if found is None:
            continue
        add, region = found
        owner, enclosing = _owner(add, region, frames, frame_regions, facts)
        if owner is not None:
            owned.add(owner)
            if frame_regions[owner].entry is region.entry:
                continue  # the module is this residual (up to a norm or activation after the add)
        # A residual of some inner value (the second residual of a transformer layer)
        # stays a candidate: when auto prefers a residual module nested deeper (HF
        # BertLayer's BertAttention), the layer's feed-forward residual still gets SIM.
        standalone.append((_residual_name(region, enclosing, facts, standalone), region))
    return owned, standalone


def _module_boundary(frame: ScopeFrame, region: _Region, owns_residual: bool, opaque: Mapping[str, str],
                     facts: _GraphFacts) -> Boundary:
    module = facts.module(frame.name)
    is_opaque = frame.name in opaque and region.nodes[0].op == "call_module"
    return _make_boundary(
        name=frame.key,
        kind="module",
        module_type=frame.type,
        region=region,
        facts=facts,
        residual=owns_residual or _sums_branches_of_entry(region, facts, frame),
        opaque=is_opaque,
        has_weight=module is not None and any(p.dim() >= 2 for p in module.parameters()),
        container_child=_parent_is_container(frame.name, facts),
        module_name=frame.name,
        opaque_reason=opaque[frame.name] if is_opaque else "",
        declared_batch=declared_batch_axis(module) if module is not None else None,
    )


def _region_boundary(name: str, region: _Region, facts: _GraphFacts) -> Boundary:
    return _make_boundary(
        name=name,
        kind="residual",
        module_type=None,
        region=region,
        facts=facts,
        residual=True,
        opaque=False,
        has_weight=any(facts.applies_weight(n) for n in region.nodes),
        container_child=False,
        module_name=None,
    )


def _residual_name(region: _Region, enclosing: ScopeFrame | None, facts: _GraphFacts, named: list) -> str:
    """``<scope>.<branch module>.residual`` for ``x + branch(x)``, else ``<scope>.residual<k>``.

    Named by modules, not graph nodes, so the name is the same under fx and
    export and across torch versions (``layers.0.mlp.residual`` for
    ``x = x + self.mlp(self.norm(x))`` in ``layers.0``).
    """
    enclosing_stack = _stack_to(facts.scope(region.exit), enclosing)
    depth = len(enclosing_stack)
    weights: dict[ScopeFrame, int] = {}
    for node in region.nodes:
        stack = facts.scope(node)
        if len(stack) > depth and stack[:depth] == enclosing_stack and facts.is_matrix_layer(node):
            weights[stack[depth]] = weights.get(stack[depth], 0) + 1
    prefix = f"{enclosing.key}." if enclosing is not None else ""
    taken = {name for name, _ in named}
    if weights:
        branch = max(weights, key=lambda f: (weights[f], -facts.order[_first_node(f, region, facts)]))
        stem, k, name = f"{branch.key}.residual", 1, f"{branch.key}.residual"
    else:
        stem, k, name = f"{prefix}residual", 1, f"{prefix}residual1"
    while name in taken:
        k += 1
        name = f"{stem}{k}"
    return name


def _stack_to(stack: tuple[ScopeFrame, ...], frame: ScopeFrame | None) -> tuple:
    if frame is None:
        return ()
    return stack[: stack.index(frame) + 1] if frame in stack else ()


def _first_node(frame: ScopeFrame, region: _Region, facts: _GraphFacts) -> fx.Node:
    return next(n for n in region.nodes if frame in facts.scope(n))


def _analyse_region(nodes: list[fx.Node], facts: _GraphFacts) -> _Region:
    """Primary entry and exit, the other tensors crossing the region, and why it cannot take SIM.

    A region may take several tensors in and give several out. The *primary*
    input and output are the ones SIM reads: the output is the batch-major float
    tensor that keeps an input's layout (else the first one the block returns),
    and the input is the one in the output's layout (same shape, else same rank;
    ties go to the first used). The other inputs are context the reconstructor
    ignores (a mask, position embeddings, a timestep), the other outputs side
    outputs (an RNN's ``(h, c)``); both flow on unchanged.
    """
    inside = set(nodes)
    region = _Region(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a in facts.activation and a not in inputs:
                inputs.append(a)
    region.inputs = [a for a in inputs if facts.tensor_meta(a) is not None]
    # Values leaving the region: activations only (a batch size or shape computed
    # inside and reused later, as export graphs do, is not a second output).
    leaving = [
        n for n in nodes
        if n in facts.activation and any(u not in inside and u in facts.live for u in n.users)
    ]
    region.outputs = [o for n in leaving for o in _leaving_tensors(n, inside, facts)]

    if not inputs:
        region.reason = "no activation tensor flows in"
    elif not region.inputs:
        region.reason = "no single tensor flows in"
    elif not leaving:
        region.reason = "its result is never used"
    elif not region.outputs:
        region.reason = "its result is not a tensor"
    else:
        region.exit = _primary_output(region.outputs, region.inputs, facts)
        region.entry = _primary_input(region.inputs, region.exit, facts)
        if region.exit not in inside:
            region.nodes = [*nodes, region.exit]  # element i of a tuple the block returned
    return region


def _leaving_tensors(node: fx.Node, inside: set, facts: _GraphFacts) -> list[fx.Node]:
    """``node`` if it is a tensor; for a tuple, the elements read outside (their ``getitem`` nodes).

    What an opaque module returns in a container (a dict, Hugging Face's
    ``ModelOutput``: ``out[0]``, ``out["last_hidden_state"]``, ``out.last_hidden_state``)
    counts by the tensors read from it, in graph order.
    """
    if facts.tensor_meta(node) is not None:
        return [node]
    read = [
        u for u in node.users
        if u not in inside and u in facts.live and u.op == "call_function" and u.args and u.args[0] is node
        and facts.tensor_meta(u) is not None
    ]
    if isinstance(facts.metas.get(node.name), tuple):
        items = [u for u in read if u.target is operator.getitem and isinstance(u.args[1], int)]
        return sorted(items, key=lambda u: u.args[1])
    if node.op == "call_module":
        return sorted((u for u in read if u.target in (operator.getitem, getattr)), key=facts.order.__getitem__)
    return []


def _usable(meta: TensorMeta | None, facts: _GraphFacts) -> bool:
    return (
        meta is not None and meta.rank >= 2 and meta.dtype.is_floating_point
        and batch_axis(meta, facts.batch) is not None
    )


def _primary_output(outputs: list[fx.Node], inputs: list[fx.Node], facts: _GraphFacts) -> fx.Node:
    in_metas = [facts.tensor_meta(a) for a in inputs]

    def score(index_and_node):
        index, node = index_and_node
        meta = facts.tensor_meta(node)
        keeps_layout = any(m is not None and m.shape == meta.shape for m in in_metas)
        same_rank = any(m is not None and m.rank == meta.rank for m in in_metas)
        return (_usable(meta, facts), keeps_layout, same_rank, -index)

    return max(enumerate(outputs), key=score)[1]


def _primary_input(inputs: list[fx.Node], output: fx.Node, facts: _GraphFacts) -> fx.Node:
    out = facts.tensor_meta(output)

    def score(index_and_node):
        index, node = index_and_node
        meta = facts.tensor_meta(node)
        return (_usable(meta, facts), meta.shape == out.shape, meta.rank == out.rank, -index)

    return max(enumerate(inputs), key=score)[1]


def _residual_region(add: fx.Node, facts: _GraphFacts):
    """(add, region) when ``add`` closes a residual region, else None."""
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or not all(a in facts.activation and facts.tensor_meta(a) for a in operands):
        return None
    out = facts.tensor_meta(add)
    if out is None or any(facts.tensor_meta(a).shape != out.shape for a in operands):
        return None
    entry = facts.idom(add)
    if entry is None or entry == _SOURCE or facts.tensor_meta(entry) is None:
        return None
    if not facts.post_dominates(add, entry):
        return None
    lo, hi = facts.order[entry], facts.order[add]
    members = [
        n
        for n in facts.nodes[lo + 1 : hi + 1]
        if n in facts.activation and facts.dominates(entry, n) and facts.post_dominates(add, n)
    ]
    inside = set(members)
    # Parameters and constants read only by the region belong to it.
    for n in reversed(facts.nodes[lo + 1 : hi + 1]):
        if n not in facts.activation and n.users and all(u in inside for u in n.users):
            inside.add(n)
    nodes = [n for n in facts.nodes[lo + 1 : hi + 1] if n in inside]
    region = _analyse_region(nodes, facts)
    if region.reason or region.entry is not entry or region.exit is not add:
        return None
    return add, region


def _owner(add, region, frames, frame_regions, facts):
    """(innermost scope owning the residual add, innermost scope enclosing it)."""
    stack = facts.scope(add)
    members = [n for n in region.nodes if n in facts.activation]
    for frame in reversed(stack):
        if not frame.name:
            continue
        if all(frame in facts.scope(n) for n in members):
            scope = frame_regions[frame]
            if not scope.reason and _exit_follows(scope.exit, add, facts):
                return frame, frame
            return None, frame
    return None, None


def _exit_follows(exit_node: fx.Node, add: fx.Node, facts: _GraphFacts) -> bool:
    """``exit_node`` is ``add`` or follows it through a short chain of shape-keeping ops."""
    return _trailing_add(exit_node, facts) is add


def _trailing_add(exit_node: fx.Node, facts: _GraphFacts, limit: int = 4) -> fx.Node | None:
    """The add ``exit_node`` is, or follows through a short chain of shape-keeping, weight-free ops."""
    node = exit_node
    for _ in range(limit + 1):
        if is_add(node):
            return node
        inputs = [a for a in node.all_input_nodes if a in facts.activation]
        meta, prev = facts.tensor_meta(node), facts.tensor_meta(inputs[0]) if len(inputs) == 1 else None
        if len(inputs) != 1 or meta is None or prev is None or meta.shape != prev.shape:
            return None
        if facts.is_matrix_layer(node):
            return None
        node = inputs[0]
    return None


def _sums_branches_of_entry(region: _Region, facts: _GraphFacts, frame: ScopeFrame | None = None) -> bool:
    """A single-input scope ending in ``F(x) + x`` or ``F(x) + shortcut(x)``, judged inside the scope.

    The graph-wide dominator test misses a block whose input is also used
    elsewhere (Ultralytics' C2f concatenates each bottleneck's input too).
    """
    if region.reason or region.exit is None:
        return False
    add = _trailing_add(region.exit, facts)
    if add is None:
        return False
    inside = set(region.nodes) | {region.entry}
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    shapes = {facts.tensor_meta(a).shape if facts.tensor_meta(a) else None for a in operands}
    if len(operands) != 2 or not all(a in inside for a in operands) or len(shapes) != 1 or None in shapes:
        return False
    # The two branches split at the entry itself, not at a value computed inside
    # (an nn.Sequential whose last block is residual is not residual itself).
    if facts.idom(add) is region.entry:
        return True
    # With context inputs (DiT's conditioning, a mask) the graph-wide dominator of the
    # add lies before them all: judge on what flows from the entry alone.
    return frame is not None and len(region.inputs) > 1 and _residual_from_entry(region, add, frame, facts)


def _residual_from_entry(region: _Region, add: fx.Node, frame: ScopeFrame, facts: _GraphFacts) -> bool:
    """``add`` closes a residual of this scope's own code, in the nodes that flow from its entry alone.

    The residual's split point is ``add``'s immediate dominator there; the branch
    between them must not lie inside one child module (then the child is the
    residual block, as the last block of an nn.Sequential is, not the Sequential).
    """
    reachable = [region.entry]
    seen = {region.entry}
    for node in region.nodes:
        if node in facts.activation and any(a in seen for a in node.all_input_nodes):
            reachable.append(node)
            seen.add(node)
    if add not in seen:
        return False
    graph = nx.DiGraph()
    graph.add_node(region.entry)
    graph.add_edges_from((a, n) for n in reachable for a in n.all_input_nodes if a in seen)
    idom = nx.immediate_dominators(graph, region.entry)
    split = idom.get(add)
    if split is None or split is add:
        return False
    ancestors = nx.ancestors(graph, add)
    branch = [n for n in ancestors if n is not split and _dominated(n, split, idom)]
    stacks = [facts.scope(n) for n in (*branch, add)]
    if not all(frame in stack for stack in stacks):
        return False
    depth = stacks[0].index(frame)
    children = {stack[depth + 1] if len(stack) > depth + 1 else None for stack in stacks}
    return None in children or len(children) > 1


def _dominated(node, by, idom) -> bool:
    while node is not None:
        if node is by:
            return True
        parent = idom.get(node)
        node = None if parent is node else parent
    return False


def _parent_is_container(name: str, facts: _GraphFacts) -> bool:
    parent = facts.module(name.rsplit(".", 1)[0] if "." in name else "")
    return isinstance(parent, (nn.Sequential, nn.ModuleList))


def _make_boundary(*, name, kind, module_type, region: _Region, facts: _GraphFacts, residual, opaque,
                   has_weight, container_child, module_name, opaque_reason: str = "",
                   declared_batch: int | None = None) -> Boundary:
    entry, exit_ = region.entry, region.exit
    in_meta = facts.tensor_meta(entry) if entry is not None else None
    out_meta = facts.tensor_meta(exit_) if exit_ is not None else None
    reason = region.reason
    in_cd = out_cd = None
    if not reason and (in_meta is None or out_meta is None):
        reason = f"its {'input' if in_meta is None else 'output'} is not a single tensor"
    if not reason:
        reason = _shape_problem(in_meta, out_meta, facts.batch)
    ports_in = ports_out = ()
    if not reason:
        in_cd = _input_channel_dim(region, entry, in_meta, facts)
        out_cd = _output_channel_dim(out_meta, in_meta, in_cd)
        if in_meta.rank == 2 and out_meta.rank > 2:
            reason = f"output {out_meta.shape} has spatial axes its (B, C) input lacks"
        ports_in = tuple(
            Port(a.name, facts.tensor_meta(a), in_cd if a is entry else _port_channel_dim(region, a, facts))
            for a in region.inputs
        )
        ports_out = tuple(
            Port(o.name, facts.tensor_meta(o), out_cd if o is exit_ else _output_channel_dim(
                facts.tensor_meta(o), in_meta, in_cd))
            for o in region.outputs
        )
    if not reason:
        reason = _input_changed_in_place(region, facts)
    if not reason and exit_.name in facts.traced.no_grad:
        reason = "runs under torch.no_grad() in the model's forward, so SIM could not train it"
    return Boundary(
        name=name,
        kind=kind,
        module_type=module_type,
        nodes=tuple(n.name for n in region.nodes),
        entry=entry.name if entry is not None else None,
        exit=exit_.name if exit_ is not None else None,
        in_meta=in_meta,
        out_meta=out_meta,
        in_channel_dim=in_cd,
        out_channel_dim=out_cd,
        in_batch_dim=_batch_dim(in_meta, facts, declared_batch),
        out_batch_dim=_batch_dim(out_meta, facts, declared_batch),
        residual=residual,
        opaque=opaque,
        produces_output=exit_ is not None and exit_ in facts.output_values,
        has_weight=has_weight,
        weight_layers=sum(_weight_layers_applied(n, facts) for n in region.nodes),
        container_child=container_child,
        eligible=not reason,
        reason=reason,
        module_name=module_name,
        opaque_reason=opaque_reason,
        inputs=ports_in,
        outputs=ports_out,
    )


def _batch_dim(meta: TensorMeta | None, facts: _GraphFacts, declared: int | None) -> int:
    """The batch axis of a block's value: what its torch.nn layers declare for a sequence, else by the batch size."""
    if meta is None:
        return 0
    if declared is not None and meta.rank == 3:
        return declared
    return batch_axis(meta, facts.batch) or 0


def _port_channel_dim(region: _Region, node: fx.Node, facts: _GraphFacts) -> int | None:
    meta = facts.tensor_meta(node)
    if meta is None or meta.rank < 2:
        return None
    return _input_channel_dim(region, node, meta, facts)


def _input_changed_in_place(region: _Region, facts: _GraphFacts) -> str:
    """Why SIM would read the block's input after the block changed it, or ""."""
    entry, exit_ = region.entry, region.exit
    lo, hi = facts.order[entry], facts.order[exit_]
    for node in facts.nodes[lo + 1 : hi + 1]:
        if facts.shapes.mutates(node.name, entry.name) or (
            node in region.nodes and _is_inplace(node, facts) and node.args and node.args[0] is entry
        ):
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
            return f"modifies its input '{entry.name}' in place ({what}), so SIM would read the changed value"
    return ""


def _weight_layers_applied(node: fx.Node, facts: _GraphFacts) -> int:
    """1 for a conv/linear-like node; an opaque module call counts the weight layers inside it."""
    if node.op == "call_module":
        module = facts.module(node.target)
        if module is not None and not _is_norm(module):
            return weight_layers(module)
    return int(facts.is_matrix_layer(node))


def _shape_problem(in_meta: TensorMeta, out_meta: TensorMeta, batch: int | None) -> str:
    for side, meta in (("input", in_meta), ("output", out_meta)):
        if meta.rank < 2:
            return f"{side} has shape {meta.shape}; SIM needs a batch axis and a feature axis"
        if batch_axis(meta, batch) is None:
            return f"{side} {meta.shape} keeps no batch axis (batch size {batch} first, or second after a sequence)"
        if not meta.dtype.is_floating_point:
            return f"{side} is {meta.dtype}, not floating point"
    return ""


def _input_channel_dim(region: _Region, entry: fx.Node, in_meta: TensorMeta, facts: _GraphFacts) -> int:
    """From the first weight layer of the block, checked against its expected width."""
    for node in region.nodes:
        layout = weight_layer_layout(node, facts.root)
        if layout is None:
            continue
        axis = _entry_axis_of_layer(node, layout, entry, facts)
        if axis is None:
            axis = layout.axis(in_meta.rank)
        width = _expected_width(node, facts)
        if width is None or in_meta.shape[axis] == width:
            return axis
        break
    if in_meta.channel_dim is not None:
        return in_meta.channel_dim
    return default_channel_dim(in_meta.rank)


def _entry_axis_of_layer(layer: fx.Node, layout, entry: fx.Node, facts: _GraphFacts) -> int | None:
    """The entry's axis that reaches ``layer`` as its channel axis, through the layout ops between them.

    A block that permutes its input before the first weight layer (Swin-style
    NHWC <-> NCHW) has its channels where the permute takes them from, not where
    the layer reads them. None when the path from the entry is not a chain of
    permutes, transposes and same-shape ops.
    """
    inputs = [a for a in layer.args[:1] if isinstance(a, fx.Node)]
    meta = facts.tensor_meta(inputs[0]) if inputs else None
    if meta is None:
        return None
    node, axis = inputs[0], layout.axis(meta.rank)
    for _ in range(8):
        if node is entry:
            return axis
        sources = [a for a in node.all_input_nodes if a in facts.activation]
        before = facts.tensor_meta(sources[0]) if len(sources) == 1 else None
        after = facts.tensor_meta(node)
        if before is None or after is None:
            return None
        if is_layout_op(node):
            axis = axis_before(node, axis, before.rank)
        elif before.shape != after.shape:
            return None  # a reshape or a reduction: the axis is not traced further
        if axis is None:
            return None
        node = sources[0]
    return None


def _expected_width(node: fx.Node, facts: _GraphFacts) -> int | None:
    if node.op != "call_module":
        return None
    m = facts.module(node.target)
    for attr in ("in_channels", "in_features", "num_features", "num_channels", "embed_dim"):
        value = getattr(m, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(m, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return None


def _output_channel_dim(out_meta: TensorMeta, in_meta: TensorMeta, in_cd: int) -> int:
    if out_meta.channel_dim is not None:
        return out_meta.channel_dim
    if out_meta.rank == in_meta.rank:
        return in_cd
    return default_channel_dim(out_meta.rank)


def region_contains(outer: Boundary, inner: Boundary) -> bool:
    """``inner``'s nodes all lie inside ``outer`` (and the two differ)."""
    return outer is not inner and set(inner.nodes) <= set(outer.nodes) and outer.nodes != inner.nodes


def names(boundaries: Iterable[Boundary]) -> list[str]:
    return [b.name for b in boundaries]
