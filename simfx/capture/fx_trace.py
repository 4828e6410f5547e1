"""Stage 1 — trace: a model becomes a training-mode graph, plus what the trace saw.

The graph is traced once, with the model in training mode (eval mode runs the
model's own forward, so it needs no graph). Every node is stamped with the
module calls it was recorded inside (``node.meta["simfx_scope"]``) and with the
grad mode it ran under (``node.meta["simfx_grad_enabled"]``), and every
traced-through module call is recorded as a :class:`ModuleCall` (its arguments
and where each value it returned went), so the rewrite can turn a chosen block
back into one call of the real module.

Modules fx must not trace through are kept opaque, as one ``call_module`` node
that runs the real module: torch.nn's own layers, classes and names registered
as leaves (in the manner of timm's ``layers/_fx.py``)::

    simfx.register_leaf_module(MyUntraceableBlock)     # one call_module node
    simfx.register_autowrap_function(my_helper)        # one call_function node

or per call with ``transform(..., leaf_modules=[...], autowrap_functions=[...])``,
and every module that has hooks, so its hooks run as they do in eager PyTorch.
A leaf whose output is a tuple or list is traced as that structure (its element
proxies), so ``isinstance(out, tuple)`` and unpacking behave as in eager code.

The user's model is never modified: tracing runs on a shallow copy of the root
(fx stores tensor constants on the traced root) and module attributes and
train/eval flags are restored afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict

from ..errors import TraceError
from .inputs import CallTemplate, ExampleInputs, bound_forward_class
from .recorders import Finding, TraceRecorder, frame_location, user_frame

__all__ = [
    "weight_layers",
    "ScopeFrame",
    "ModuleCall",
    "TracedModel",
    "register_leaf_module",
    "register_autowrap_function",
    "trace_model",
    "has_hooks",
]

SCOPE_KEY = "simfx_scope"
GRAD_KEY = "simfx_grad_enabled"
# Marks a node that only rebuilds the model's output container (a ModelOutput, export's pytree).
OUTPUT_CONTAINER_KEY = "simfx_output_container"

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


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute a dotted ``get_attr``/``call_module`` target names, or None."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def add_registration_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` before each trace (for optional-library registrations)."""
    _REGISTRATION_HOOKS.append(hook)


def has_hooks(module: nn.Module) -> bool:
    """The module has forward, forward-pre or backward hooks of its own (which a trace would not run)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


class ScopeFrame(NamedTuple):
    """One module call a node was recorded inside: qualified name, class, call number."""

    name: str
    type: type
    call: int

    @property
    def key(self) -> str:
        """``name`` for the first call of a module, ``name@k`` for its k-th repeat."""
        return self.name if self.call == 0 else f"{self.name}@{self.call}"


@dataclass(frozen=True)
class ModuleCall:
    """One traced-through module call, as graph arguments: enough to call the module again as one node.

    ``args``/``kwargs`` are fx arguments (nodes and constants). ``outputs`` maps the
    name of each node the call returned to its access path in the result: a tuple
    of ``("item", key)``/``("attr", name)`` steps (empty: the result itself).
    ``grad_enabled`` is the grad mode the call ran under.
    """

    frame: ScopeFrame
    args: tuple
    kwargs: Mapping[str, Any]
    outputs: Mapping[str, tuple]
    grad_enabled: bool


@dataclass
class TracedModel:
    """What capture produced: the training graph over one root module, and what the trace saw.

    ``root`` holds every attribute the graph references (the user's submodules,
    plus any tensor constants the tracer had to store); ``model`` is the user's
    own module (what eval mode runs). ``opaque`` maps the qualified names of
    modules kept opaque to the reason. ``inputs`` are the example values in the
    graph's placeholder order and ``call`` turns them back into the model's call.
    ``automatic`` names the modules kept opaque without being asked to: fx failed
    inside them, or they are torch.nn containers of several weight layers.
    ``calls`` are the traced-through module calls; ``flag_readers`` maps each module
    whose ``training`` flag traced code read to (where, the module whose code read
    it, the value it read); ``findings`` what the trace could
    not keep (see :mod:`simfx.recorders`). ``frontend`` is ``"fx"`` or ``"export"``.
    """

    root: nn.Module
    model: nn.Module
    graph: fx.Graph
    call: CallTemplate
    opaque: dict[str, str] = field(default_factory=dict)
    constants: tuple[str, ...] = ()
    inputs: tuple = ()
    frontend: str = "fx"
    calls: dict[ScopeFrame, ModuleCall] = field(default_factory=dict)
    flag_readers: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()
    automatic: tuple[str, ...] = ()


# How an opaque module's output is traced: None for one proxy, else the structure
# of its tuple/list result (element i: None for a proxy[i], or ("constant", value)).
LeafStructure = Any


class _ScopeTracer(fx.Tracer):
    """fx.Tracer that stamps scopes and grad modes, records module calls and honours leaf registries."""

    # Buffers are graph values (get_attr nodes), as parameters are: nanoGPT's causal
    # mask buffer sliced to the sequence length (self.bias[:, :, :T, :T]) then traces.
    proxy_buffer_attributes = True

    def __init__(
        self,
        leaf_types: Iterable[type] = (),
        leaf_names: Iterable[str] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
        leaf_structures: Mapping[str, LeafStructure] | None = None,
        leaf_reasons: Mapping[str, str] | None = None,
    ):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(leaf_types)
        self._leaf_names = frozenset(leaf_names)
        self._leaf_reasons = dict(leaf_reasons or {})
        self._leaf_structures = dict(leaf_structures or {})
        self._scope: list[ScopeFrame] = []
        self._calls: dict[str, int] = {}
        self.opaque: dict[str, str] = {}
        self.module_calls: dict[ScopeFrame, ModuleCall] = {}
        self.hiding: set[str] = set()
        self.failure_scope: tuple[ScopeFrame, ...] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            reason = self._leaf_reasons.get(module_qualified_name, "listed in leaf_modules")
            self.opaque.setdefault(module_qualified_name, reason)
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            self.opaque[module_qualified_name] = f"{type(m).__name__} is a registered leaf module"
            return True
        if super().is_leaf_module(m, module_qualified_name):
            blocks = _hidden_blocks(m)
            if blocks >= 2 and module_qualified_name not in self.opaque:
                # torch.nn's own containers (TransformerEncoder) hide whole blocks from fx.
                self.opaque[module_qualified_name] = (
                    f"torch.nn's {type(m).__name__} runs as one call under fx (it holds {blocks} weighted "
                    f"layers; frontend='export' traces into it)"
                )
                self.hiding.add(module_qualified_name)
            return True
        if has_hooks(m):
            self.opaque[module_qualified_name] = "has hooks (kept as one call, so they run)"
            return True
        return False

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        frame = ScopeFrame(name, type(m), call)
        self._scope.append(frame)
        grad_enabled = torch.is_grad_enabled()
        try:
            result = super().call_module(m, forward, args, kwargs)
            if isinstance(result, fx.Proxy) and name in self._leaf_structures:
                return _structured(result, self._leaf_structures[name])
            if not self.is_leaf_module(m, name):
                self._record_call(frame, args, kwargs, result, grad_enabled)
            return result
        except BaseException:
            if self.failure_scope is None:
                self.failure_scope = tuple(self._scope)
            raise
        finally:
            self._scope.pop()

    def _record_call(self, frame, args, kwargs, result, grad_enabled) -> None:
        try:
            arguments = self.create_arg((tuple(args), dict(kwargs)))
        except (NotImplementedError, TypeError, ValueError, AttributeError):
            return  # an argument fx cannot represent: this call stays traced
        outputs = dict(_proxy_paths(result))
        if outputs:
            self.module_calls[frame] = ModuleCall(frame, arguments[0], arguments[1], outputs, grad_enabled)

    def create_arg(self, a: Any):
        # fx turns every dict into a plain one; a dict subclass (Hugging Face's
        # ModelOutput, an OrderedDict of feature maps) is rebuilt as its own type.
        if isinstance(a, dict) and type(a) not in (dict, immutable_dict):
            items = {k: self.create_arg(v) for k, v in a.items()}
            cls = type(a)
            if cls.__init__ in (dict.__init__, collections.OrderedDict.__init__):
                node = self.create_node("call_function", cls, (items,), {})  # OrderedDict(mapping)
            elif all(isinstance(k, str) and k.isidentifier() for k in a):
                node = self.create_node("call_function", cls, (), items)  # ModelOutput(**fields)
            else:
                return super().create_arg(a)
            node.meta[OUTPUT_CONTAINER_KEY] = True
            return node
        return super().create_arg(a)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta[SCOPE_KEY] = tuple(self._scope)
        node.meta[GRAD_KEY] = torch.is_grad_enabled()
        return node

    def innermost_module(self) -> str:
        return self._scope[-1].name if self._scope else ""


def weight_layers(module: nn.Module) -> int:
    """Submodules applying a weight of 2+ dims of their own (conv, linear, attention projections)."""
    return sum(
        any(p.dim() >= 2 for p in m.parameters(recurse=False)) for m in module.modules()
    )


def _hidden_blocks(module: nn.Module) -> int:
    """The most weighted members of one nn.Sequential/nn.ModuleList inside ``module`` (its hidden blocks)."""
    counts = [
        sum(weight_layers(child) > 0 for child in m.children())
        for m in module.modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList))
    ]
    return max(counts, default=0)


def _structured(proxy: fx.Proxy, structure: LeafStructure) -> Any:
    kind, elements = structure
    items = []
    for i, element in enumerate(elements):
        if element is None:
            items.append(proxy[i])
        elif element[0] == "constant":
            items.append(element[1])
        else:
            items.append(_structured(proxy[i], element))
    return tuple(items) if kind == "tuple" else list(items)


def _proxy_paths(value: Any, path: tuple = ()) -> Iterator[tuple[str, tuple]]:
    """(node name, access path) of every proxy in a module's result (tuples, lists, mappings)."""
    if isinstance(value, fx.Proxy):
        yield value.node.name, path
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _proxy_paths(item, (*path, ("item", i)))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _proxy_paths(item, (*path, ("item", key)))


def trace_model(
    model: nn.Module,
    inputs: ExampleInputs | None = None,
    *,
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = False,
    max_opaque: int = 64,
    leaf_structures: Mapping[str, LeafStructure] | None = None,
    opaque_reasons: Mapping[str, str] | None = None,
) -> TracedModel:
    """Trace ``model`` in training mode.

    With ``inputs`` whose call does not map one tensor to each parameter of
    ``forward`` (``*args``/``**kwargs`` forwards, optional arguments, keyword or
    non-tensor inputs), the forward is traced with those inputs bound: tensors
    become placeholders and everything else a constant.

    With ``auto_opaque``, a failure inside a submodule does not end the trace: the
    innermost failing submodule is kept opaque and the trace is retried, up to
    ``max_opaque`` modules; ``TracedModel.opaque`` says which and why.
    ``leaf_structures`` gives the tuple structure of opaque modules' results (from
    a shape pass), ``opaque_reasons`` the reason to show for named leaves.

    A ``torch.fx.GraphModule`` is accepted as is: its graph is the training graph
    and its scopes come from ``nn_module_stack`` metadata when present.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"simfx expects a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, fx.GraphModule):
        return _from_graph_module(model, inputs)

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
    bound, template = bound_forward_class(model, inputs) if inputs is not None else (None, None)
    if bound is not None:
        root.__class__ = bound
    made_opaque: dict[str, str] = {}
    names = {id(m): name for name, m in model.named_modules()}
    names[id(root)] = ""
    with preserved_module_state(model):
        while True:
            try:
                tracer = _ScopeTracer(
                    leaf_types, [*leaf_names, *made_opaque], functions, leaf_structures,
                    {**(opaque_reasons or {}), **made_opaque},
                )
                recorder, graph = _trace(tracer, root, model, names)
                break
            except TraceError as error:
                if not auto_opaque or not error.module_name or error.module_name in made_opaque:
                    raise
                if len(made_opaque) >= max_opaque:
                    raise TraceError(
                        f"{error}\nsimfx already made {len(made_opaque)} modules opaque automatically "
                        f"({', '.join(list(made_opaque)[:8])}, ...) and stopped; pass leaf_modules=[...] "
                        f"for the untraceable classes, or frontend='export'.",
                        error.module_name, error.module_type, error.cause,
                    ) from error
                made_opaque[error.module_name] = f"made opaque: {_first_sentence(error.cause)}"
    opaque = dict(tracer.opaque)
    root.training = model.training
    constants = tuple(k for k in vars(root) if k not in vars(model) and k != "__class__")
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    if inputs is None:
        flat: tuple = ()
    else:
        flat = inputs.tensors if bound is not None else tuple(inputs.args)
    return TracedModel(
        root=root,
        model=model,
        graph=graph,
        call=template or CallTemplate.plain(placeholders),
        opaque=opaque,
        constants=constants,
        inputs=flat,
        calls=tracer.module_calls,
        flag_readers=recorder.flag_readers,
        findings=tuple(recorder.findings),
        automatic=tuple(made_opaque) + tuple(sorted(tracer.hiding - set(made_opaque))),
    )


@contextlib.contextmanager
def preserved_module_state(model: nn.Module) -> Iterator[None]:
    """Undo what running the model's Python code did to its modules' attributes.

    Tracers (fx proxies, export's and the shape pass's fake tensors) run forwards
    that may cache values on modules (Ultralytics' Detect keeps its anchors) or
    flip ``training``; those values must not outlive the trace. Parameter and
    buffer *contents* are not touched by tracing and are not copied.
    """
    saved = [
        (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()
    ]
    try:
        yield
    finally:
        for m, attributes, parameters, buffers, modules in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for container, contents in ((m._parameters, parameters), (m._buffers, buffers), (m._modules, modules)):
                container.clear()
                container.update(contents)


@contextlib.contextmanager
def hooks_suppressed(model: nn.Module) -> Iterator[None]:
    """Module hooks do not fire inside: simfx's own runs (shapes, the check) are not the user's steps.

    A feature-capture hook would otherwise receive fake tensors, or store the
    example batch's features.
    """
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    saved = []
    for m in model.modules():
        for name in names:
            hooks = m.__dict__.get(name)
            if hooks:
                saved.append((m, name, hooks))
                m.__dict__[name] = type(hooks)()
    try:
        yield
    finally:
        for m, name, hooks in saved:
            m.__dict__[name] = hooks


def _first_sentence(text: str, limit: int = 120) -> str:
    sentence = text.split(". ", 1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _trace(tracer: "_ScopeTracer", root: nn.Module, model: nn.Module, names: dict[int, str]):
    root.train(True)
    recorder = TraceRecorder(tracer.innermost_module, names, tracer)
    with recorder, torch.enable_grad():
        graph = _run_tracer(tracer, root, model)
    return recorder, graph


def _run_tracer(tracer: _ScopeTracer, root: nn.Module, model: nn.Module) -> fx.Graph:
    try:
        return tracer.trace(root)
    except Exception as error:  # fx raises many exception types; all mean "cannot trace"
        raise _trace_error(error, tracer.failure_scope or (), model) from error


def _trace_error(error: Exception, scope: tuple[ScopeFrame, ...], model: nn.Module) -> TraceError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    frame = user_frame(error)
    where, code = frame_location(frame), ""
    # A failure inside a free function (not a forward) is best fixed by wrapping it;
    # fx's autowrap skips names starting with an underscore, so those cannot be wrapped.
    helper = frame.name if frame and frame.name not in ("forward", "<module>", "<lambda>") else None
    if helper and not helper.startswith("_"):
        wrap_hint = f"autowrap_functions=[{helper}] records each call to {helper}() as one graph node"
    else:
        wrap_hint = "if the failing code is a call to a public module-level function, pass autowrap_functions=[that_function]"
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
        return TraceError(message, failing.name, cls, first_line)
    message = (
        f"simfx could not trace {type(model).__name__}.forward{where}{code}: {first_line}\n"
        f"Fix: {wrap_hint}. Code in the model's own forward cannot be a leaf module; move it into "
        f"a submodule and pass leaf_modules=[ThatModule] if wrapping is not possible, or use frontend='export'."
    )
    return TraceError(message, "", type(model), first_line)


def _from_graph_module(gm: fx.GraphModule, inputs: ExampleInputs | None) -> TracedModel:
    graph = copy_graph(gm.graph)
    for node in graph.nodes:
        if SCOPE_KEY not in node.meta:
            node.meta[SCOPE_KEY] = scope_from_module_stack(gm, node)
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    flat = (*inputs.args, *inputs.kwargs.values()) if inputs is not None else ()
    return TracedModel(gm, gm, graph, CallTemplate.plain(placeholders), inputs=flat)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with the same node names, metadata and code generator."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    value_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, value_map)
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def scope_from_module_stack(gm: nn.Module, node: fx.Node) -> tuple[ScopeFrame, ...]:
    """Scopes from fx's ``nn_module_stack`` (keys ``name`` or ``name@k`` for repeats).

    Entries that name no submodule of ``gm`` (export's bookkeeping frames) are dropped.
    """
    stack = node.meta.get("nn_module_stack") or {}
    frames = []
    for key, value in stack.items():
        name, module_type = value[0], value[1]
        call = int(key.rsplit("@", 1)[1]) if "@" in key and key.rsplit("@", 1)[1].isdigit() else 0
        if not name:
            continue
        try:
            module = gm.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module_type, type):
            module_type = type(module)
        frames.append(ScopeFrame(name, module_type, call))
    return tuple(frames)
