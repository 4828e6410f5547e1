"""Stage 1 — trace: a model becomes a train graph and an eval graph.

torch.fx bakes ``self.training`` into the graph (``F.dropout(x, p, self.training)``
records a constant), so the model is traced once in each mode. Every node is
stamped with the module calls it was recorded inside (``node.meta["simfx_scope"]``),
which is how the boundaries stage finds module scopes, including repeated calls
of one module.

Library code fx cannot trace is kept opaque through two small registries, in the
manner of timm's ``layers/_fx.py``::

    simfx.register_leaf_module(MyUntraceableBlock)     # one call_module node
    simfx.register_autowrap_function(my_helper)        # one call_function node

or per call with ``transform(..., leaf_modules=[...], autowrap_functions=[...])``.
The user's model is never modified: tracing runs on a shallow copy of the root
(fx stores tensor constants on the traced root) and module train/eval flags are
restored afterwards.
"""

from __future__ import annotations

import copy
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

__all__ = [
    "ScopeFrame",
    "TracedModel",
    "register_leaf_module",
    "register_autowrap_function",
    "trace_model",
]

SCOPE_KEY = "simfx_scope"

_LEAF_MODULES: set[type] = set()
_AUTOWRAP_FUNCTIONS: set[Callable[..., Any]] = set()
# Callables run before each trace; library integrations use them to add their
# own registrations only when that library has been imported.
_REGISTRATION_HOOKS: list[Callable[[], None]] = []


def register_leaf_module(module_class: type) -> type:
    """Keep every instance of ``module_class`` opaque when tracing (usable as a decorator).

    >>> import torch, simfx
    >>> @simfx.register_leaf_module
    ... class Untraceable(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(
            f"register_leaf_module expects an nn.Module subclass, got {module_class!r}."
        )
    _LEAF_MODULES.add(module_class)
    return module_class


def register_autowrap_function(function: Callable[..., Any]) -> Callable[..., Any]:
    """Record calls to ``function`` as single graph nodes instead of tracing into them.

    The function must be a module-level function called by name from a forward.
    Usable as a decorator.
    """
    if not callable(function):
        raise TypeError(f"register_autowrap_function expects a function, got {function!r}.")
    _AUTOWRAP_FUNCTIONS.add(function)
    return function


def add_registration_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` before each trace (for optional-library registrations)."""
    _REGISTRATION_HOOKS.append(hook)


class ScopeFrame(NamedTuple):
    """One module call a node was recorded inside: qualified name, class, call number."""

    name: str
    type: type
    call: int

    @property
    def key(self) -> str:
        """``name`` for the first call of a module, ``name@k`` for its k-th repeat."""
        return self.name if self.call == 0 else f"{self.name}@{self.call}"


@dataclass
class TracedModel:
    """What tracing produced: two graphs over one root module.

    ``root`` holds every attribute the graphs reference (the user's submodules,
    plus any tensor constants fx had to store). ``opaque`` maps the qualified
    names of modules kept opaque by a leaf registration to the reason.
    """

    root: nn.Module
    train_graph: fx.Graph
    eval_graph: fx.Graph
    opaque: dict[str, str] = field(default_factory=dict)
    constants: tuple[str, ...] = ()


class _ScopeTracer(fx.Tracer):
    """fx.Tracer that stamps nodes with their module-call scope and honours leaf registries."""

    def __init__(
        self,
        leaf_types: Iterable[type] = (),
        leaf_names: Iterable[str] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
    ):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(leaf_types)
        self._leaf_names = frozenset(leaf_names)
        self._scope: list[ScopeFrame] = []
        self._calls: dict[str, int] = {}
        self.opaque: dict[str, str] = {}
        self.failure_scope: tuple[ScopeFrame, ...] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            self.opaque[module_qualified_name] = "listed in leaf_modules"
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            self.opaque[module_qualified_name] = f"{type(m).__name__} is a registered leaf module"
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        self._scope.append(ScopeFrame(name, type(m), call))
        try:
            return super().call_module(m, forward, args, kwargs)
        except BaseException:
            if self.failure_scope is None:
                self.failure_scope = tuple(self._scope)
            raise
        finally:
            self._scope.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta[SCOPE_KEY] = tuple(self._scope)
        return node


def trace_model(
    model: nn.Module,
    *,
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
) -> TracedModel:
    """Trace ``model`` in train and in eval mode.

    A ``torch.fx.GraphModule`` is accepted as is: its graph serves both modes and
    its scopes come from ``nn_module_stack`` metadata when present. A simfx module
    with two graphs (a stripped SIM module) keeps both.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"simfx expects a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, fx.GraphModule):
        return _from_graph_module(model)

    for hook in _REGISTRATION_HOOKS:
        hook()
    leaf_types = [m for m in leaf_modules if isinstance(m, type)]
    leaf_names = [m for m in leaf_modules if isinstance(m, str)]
    bad = [m for m in leaf_modules if not isinstance(m, (type, str))]
    if bad:
        raise TypeError(
            f"leaf_modules takes module classes or qualified names, got {bad!r}."
        )
    known = {name for name, _ in model.named_modules()}
    missing = [n for n in leaf_names if n not in known]
    if missing:
        raise ValueError(
            f"leaf_modules names {missing} are not submodules of {type(model).__name__}; "
            f"use qualified names from model.named_modules(), e.g. {sorted(known - {''})[:5]}."
        )
    leaf_types = tuple(_LEAF_MODULES) + tuple(leaf_types)
    functions = tuple(_AUTOWRAP_FUNCTIONS) + tuple(autowrap_functions)

    # fx stores tensor constants on the traced root with setattr; a shallow copy
    # keeps them off the user's model while sharing every submodule.
    root = copy.copy(model)
    flags = [(m, m.training) for m in model.modules()]
    opaque: dict[str, str] = {}
    try:
        graphs = []
        for training in (True, False):
            root.train(training)
            tracer = _ScopeTracer(leaf_types, leaf_names, functions)
            graphs.append(_run_tracer(tracer, root, model))
            opaque.update(tracer.opaque)
    finally:
        for m, was_training in flags:
            m.training = was_training
    root.training = model.training
    constants = tuple(k for k in vars(root) if k not in vars(model))
    return TracedModel(root, graphs[0], graphs[1], opaque, constants)


def _run_tracer(tracer: _ScopeTracer, root: nn.Module, model: nn.Module) -> fx.Graph:
    try:
        return tracer.trace(root)
    except Exception as error:  # fx raises many exception types; all mean "cannot trace"
        raise _trace_error(error, tracer.failure_scope or (), model) from error


def _trace_error(error: Exception, scope: tuple[ScopeFrame, ...], model: nn.Module) -> TraceError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    frame = _user_frame(error)
    where = f" at {frame.filename.rsplit(os.sep, 1)[-1]}:{frame.lineno}" if frame else ""
    code = f" `{frame.line.strip()}`" if frame and frame.line else ""
    # A failure inside a free function (not a forward) is best fixed by wrapping it.
    helper = frame.name if frame and frame.name not in ("forward", "<module>", "<lambda>") else None
    wrap_hint = (
        f"autowrap_functions=[{helper}] records each call to {helper}() as one graph node"
        if helper
        else "if the failing code is a call to a free function, pass autowrap_functions=[that_function]"
    )
    if scope:
        failing = scope[-1]
        cls = failing.type
        message = (
            f"simfx could not trace {type(model).__name__}: inside module '{failing.name}' "
            f"({cls.__module__}.{cls.__qualname__}){where}{code}: {first_line}\n"
            f"Fix: keep that module opaque with transform(..., leaf_modules=[{cls.__name__}]) "
            f"or simfx.register_leaf_module({cls.__name__}); it then runs as one graph node and can "
            f"still take SIM as a whole. Alternatively, {wrap_hint}."
        )
        return TraceError(message, failing.name, cls)
    message = (
        f"simfx could not trace {type(model).__name__}.forward{where}{code}: {first_line}\n"
        f"Fix: {wrap_hint}. Code in the model's own forward cannot be a leaf module; move it into "
        f"a submodule and pass leaf_modules=[ThatModule] if wrapping is not possible."
    )
    return TraceError(message, "", type(model))


_TORCH_DIR = os.path.dirname(torch.__file__)
_SIMFX_DIR = os.path.dirname(__file__)


def _user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and simfx (the user's failing line)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_SIMFX_DIR)):
            return frame
    return None


def _from_graph_module(gm: fx.GraphModule) -> TracedModel:
    eval_graph = getattr(gm, "eval_graph", None)
    train_graph = _copy_graph(gm.graph)
    eval_graph = _copy_graph(eval_graph if isinstance(eval_graph, fx.Graph) else gm.graph)
    for graph in (train_graph, eval_graph):
        for node in graph.nodes:
            if SCOPE_KEY not in node.meta:
                node.meta[SCOPE_KEY] = _scope_from_module_stack(gm, node)
    return TracedModel(gm, train_graph, eval_graph)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    value_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, value_map)
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def _scope_from_module_stack(gm: nn.Module, node: fx.Node) -> tuple[ScopeFrame, ...]:
    """Scopes from fx's ``nn_module_stack`` (keys ``name`` or ``name@k`` for repeats)."""
    stack = node.meta.get("nn_module_stack") or {}
    frames = []
    for key, value in stack.items():
        name, module_type = value[0], value[1]
        call = int(key.rsplit("@", 1)[1]) if "@" in key and key.rsplit("@", 1)[1].isdigit() else 0
        if not isinstance(module_type, type):
            try:
                module_type = type(gm.get_submodule(name))
            except AttributeError:
                module_type = nn.Module
        frames.append(ScopeFrame(name, module_type, call))
    return tuple(frames)
