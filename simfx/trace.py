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

import contextlib
import copy
import inspect
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

__all__ = [
    "ExampleInputs",
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
    names of modules kept opaque to the reason (a leaf registration, or
    ``"made opaque: <trace error>"``). ``inputs`` are the example values in the
    graphs' placeholder order; ``frontend`` is ``"fx"`` or ``"export"``.
    """

    root: nn.Module
    train_graph: fx.Graph
    eval_graph: fx.Graph
    opaque: dict[str, str] = field(default_factory=dict)
    constants: tuple[str, ...] = ()
    inputs: tuple = ()
    frontend: str = "fx"


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


@dataclass(frozen=True)
class ExampleInputs:
    """The example call: positional and keyword arguments of the model's forward.

    Tensors become graph inputs (placeholders); every other value is bound into
    the trace as a constant, like a default argument.
    """

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The graph's inputs in placeholder order: tensor arguments, then tensor keywords."""
        return tuple(a for a in self.args if isinstance(a, torch.Tensor)) + tuple(
            v for v in self.kwargs.values() if isinstance(v, torch.Tensor)
        )


def trace_model(
    model: nn.Module,
    inputs: ExampleInputs | None = None,
    *,
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = False,
    max_opaque: int = 64,
) -> TracedModel:
    """Trace ``model`` in train and in eval mode.

    With ``inputs`` whose call does not map one tensor to each parameter of
    ``forward`` (``*args``/``**kwargs`` forwards, optional arguments, keyword or
    non-tensor inputs), the forward is traced with those inputs bound: tensors
    become placeholders and everything else a constant.

    With ``auto_opaque``, a failure inside a submodule does not end the trace: the
    innermost failing submodule is kept opaque and the trace is retried, up to
    ``max_opaque`` modules; ``TracedModel.opaque`` says which and why.

    A ``torch.fx.GraphModule`` is accepted as is: its graph serves both modes and
    its scopes come from ``nn_module_stack`` metadata when present. A simfx module
    with two graphs (a stripped SIM module) keeps both.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"simfx expects a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, fx.GraphModule):
        traced = _from_graph_module(model)
        if inputs is not None:
            traced.inputs = (*inputs.args, *inputs.kwargs.values())
        return traced

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
    bound = _bound_forward_class(model, inputs) if inputs is not None else None
    if bound is not None:
        root.__class__ = bound
    made_opaque: dict[str, str] = {}
    with preserved_module_state(model):
        while True:
            try:
                graphs, opaque = _trace_both_modes(root, model, leaf_types, [*leaf_names, *made_opaque], functions)
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
    opaque.update((name, made_opaque[name]) for name in opaque.keys() & made_opaque.keys())
    root.training = model.training
    constants = tuple(k for k in vars(root) if k not in vars(model) and k != "__class__")
    if inputs is None:
        flat = ()
    else:
        flat = inputs.tensors if bound is not None else inputs.args
    return TracedModel(root, graphs[0], graphs[1], opaque, constants, flat)


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


def _first_sentence(text: str, limit: int = 120) -> str:
    sentence = text.split(". ", 1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _trace_both_modes(root, model, leaf_types, leaf_names, functions):
    graphs, opaque = [], {}
    for training in (True, False):
        root.train(training)
        tracer = _ScopeTracer(leaf_types, leaf_names, functions)
        graphs.append(_run_tracer(tracer, root, model))
        opaque.update(tracer.opaque)
    return graphs, opaque


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _bound_forward_class(model: nn.Module, inputs: ExampleInputs) -> type | None:
    """A subclass of the model's class whose forward takes exactly the example's tensors.

    fx makes one placeholder per parameter of ``forward``; ``*args`` becomes a single
    proxy (iterating it fails) and optional flags become proxies that ``if`` cannot
    test. The generated forward has one parameter per example tensor and calls the
    real forward with the tensors and the bound constants. None when fx's own
    signature handling already fits.
    """
    cls = type(model)
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())[1:]  # drop self
    plain = (
        not inputs.kwargs
        and all(isinstance(a, torch.Tensor) for a in inputs.args)
        and len(params) == len(inputs.args)
        and all(p.kind in _POSITIONAL for p in params)
    )
    if plain:
        return None
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = [k for k in inputs.kwargs if k not in signature.parameters and not takes_any_keyword]
    try:
        if unknown:
            raise TypeError(f"it has no parameter {unknown[0]!r}")
        signature.bind(None, *inputs.args, **inputs.kwargs)
    except TypeError as error:
        raise TypeError(
            f"example_inputs do not fit {cls.__name__}.forward{_show_signature(signature)}: {error}. "
            f"Pass the forward's positional arguments as a tuple, or its keyword arguments as a dict."
        ) from None

    positional = [p.name for p in params if p.kind in _POSITIONAL]
    star = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), "args")
    placeholders, call_args, constants = [], [], {}
    for i, value in enumerate(inputs.args):
        name = positional[i] if i < len(positional) else f"{star}_{i - len(positional)}"
        if isinstance(value, torch.Tensor):
            placeholders.append(name)
            call_args.append(name)
        else:
            constants[f"_c{i}"] = value
            call_args.append(f"_constants['_c{i}']")
    for key, value in inputs.kwargs.items():
        if isinstance(value, torch.Tensor):
            name = key if key.isidentifier() and key not in placeholders else f"kw_{len(placeholders)}"
            placeholders.append(name)
            call_args.append(f"**{{{key!r}: {name}}}")
        else:
            constants[key] = value
            call_args.append(f"**{{{key!r}: _constants[{key!r}]}}")
    source = (
        f"def forward(self, {', '.join(placeholders)}):\n"
        f"    return _forward(self, {', '.join(call_args)})\n"
    )
    namespace = {"_forward": cls.forward, "_constants": constants}
    exec(compile(source, f"<simfx bound {cls.__name__}.forward>", "exec"), namespace)
    forward = namespace["forward"]
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _show_signature(signature: inspect.Signature) -> str:
    return str(signature).replace("(self, ", "(", 1).replace("(self)", "()", 1)


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
        return TraceError(message, failing.name, cls, first_line)
    message = (
        f"simfx could not trace {type(model).__name__}.forward{where}{code}: {first_line}\n"
        f"Fix: {wrap_hint}. Code in the model's own forward cannot be a leaf module; move it into "
        f"a submodule and pass leaf_modules=[ThatModule] if wrapping is not possible."
    )
    return TraceError(message, "", type(model), first_line)


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
