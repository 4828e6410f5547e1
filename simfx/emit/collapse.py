"""Emit, step 1 — chosen module blocks become calls of the real module again.

The analysis graph is traced through every module, so the boundaries stage can
see inside them. For the training graph, a chosen block that is one whole call of
a module is put back as a single ``call_module`` node with the arguments it was
called with: the module's own ``forward`` then runs, with its hooks,
checkpointing, grad-mode and autocast regions, children's train/eval flags and
in-place code, exactly as in eager PyTorch. Only what the block returned is read
from outside, through ``getitem`` nodes on the call.

A call stays traced when it cannot be rebuilt: an argument fx cannot represent,
or a value computed inside that is used outside without being returned.
"""

from __future__ import annotations

import operator
from typing import Iterable, Mapping

import torch.fx as fx

from ..capture.record import ModuleCall, ScopeFrame

__all__ = ["collapse_calls"]


def collapse_calls(
    graph: fx.Graph,
    calls: Mapping[ScopeFrame, ModuleCall],
    frames: Iterable[ScopeFrame],
    scopes: dict[str, tuple[ScopeFrame, ...]],
    no_grad: set[str],
) -> tuple[dict[str, str], dict[ScopeFrame, tuple[str, ...]]]:
    """Replace each frame's traced nodes in ``graph`` (in place) by one call of its module.

    ``scopes`` and ``no_grad`` (the capture record's facts about the nodes, by
    name) are updated for the nodes added. Returns the new names of the values the
    calls returned (old name -> new name; nodes outside the calls keep their
    names) and, per collapsed frame, the names of the nodes that now stand for it
    (the call, then its ``getitem`` nodes).
    """
    renamed: dict[str, str] = {}
    collapsed: dict[ScopeFrame, tuple[str, ...]] = {}
    for frame in frames:
        call = calls.get(frame)
        if call is None:
            continue
        result = _collapse(graph, call, renamed, scopes, no_grad)
        if result is not None:
            mapping, new_nodes = result
            renamed.update(mapping)
            collapsed[frame] = new_nodes
    return renamed, collapsed


def _collapse(graph: fx.Graph, call: ModuleCall, renamed: Mapping[str, str], scopes, no_grad):
    frame = call.frame
    nodes = [n for n in graph.nodes if frame in scopes.get(n.name, ())]
    if not nodes:
        return None
    inside = set(nodes)
    escaping = [n for n in nodes if any(u not in inside for u in n.users)]
    if any(n.name not in call.outputs for n in escaping):
        return None  # a value leaves the module without being returned (stored on self, say)
    by_name = {n.name: n for n in graph.nodes}
    try:
        # An argument may be what an earlier collapsed call returned: it has its new name.
        args = fx.node.map_arg(call.args, lambda n: by_name[renamed.get(n.name, n.name)])
        kwargs = fx.node.map_arg(dict(call.kwargs), lambda n: by_name[renamed.get(n.name, n.name)])
    except KeyError:
        return None
    if any(a in inside for a in _nodes_in((args, kwargs))):
        return None
    stack = scopes.get(nodes[0].name, ())
    scope = stack[: stack.index(frame) + 1]
    with graph.inserting_before(nodes[0]):
        module_call = graph.call_module(frame.name, args, kwargs)
        accessors: dict[tuple, fx.Node] = {(): module_call}
        for node in escaping:
            _accessor(graph, accessors, call.outputs[node.name])
    for node in accessors.values():
        scopes[node.name] = scope
        if not call.grad_enabled:
            no_grad.add(node.name)
    mapping = {}
    for node in escaping:
        replacement = accessors[call.outputs[node.name]]
        node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user not in inside)
        mapping[node.name] = replacement.name
    for node in reversed(nodes):
        graph.erase_node(node)
    return mapping, tuple(n.name for n in accessors.values())


def _accessor(graph: fx.Graph, accessors: dict[tuple, fx.Node], path: tuple) -> fx.Node:
    if path in accessors:
        return accessors[path]
    parent = _accessor(graph, accessors, path[:-1])
    kind, key = path[-1]
    target = operator.getitem if kind == "item" else getattr
    node = graph.call_function(target, (parent, key))
    accessors[path] = node
    return node


def _nodes_in(value) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found
