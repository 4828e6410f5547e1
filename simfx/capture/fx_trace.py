"""Capture with torch.fx: a model becomes a training-mode graph, plus what the trace saw.

The graph is traced once, with the model in training mode (eval mode runs the
model's own forward, so it needs no graph). For every node the record keeps the
module calls it was recorded inside and whether gradients were off, and every
traced-through module call is recorded as a :class:`~simfx.capture.record.ModuleCall`
(its arguments and where each value it returned went), so the rewrite can turn
a chosen block back into one call of the real module.

Modules fx must not trace through are kept opaque, as one ``call_module`` node
that runs the real module: torch.nn's own layers, classes and names registered
as leaves (:mod:`simfx.capture.registry`, or ``transform(..., leaf_modules=[...],
autowrap_functions=[...])``), and every module that has hooks, so its hooks run
as they do in eager PyTorch. A leaf whose output is a tuple or list is traced as
that structure (its element proxies), so ``isinstance(out, tuple)`` and
unpacking behave as in eager code.

The user's model is never modified: tracing runs on a shallow copy of the root
(fx stores tensor constants on the traced root) and module attributes and
train/eval flags are restored afterwards.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict

from ..errors import TraceError
from ..fx_utils import copy_graph
from .inputs import CallTemplate, ExampleInputs, bound_forward_class
from .module_facts import has_hooks, hidden_blocks, preserved_module_state
from .record import LeafStructure, ModuleCall, ScopeFrame, TracedModel, frames_from_module_stack, value_paths
from .recorders import TraceRecorder, frame_location, user_frame
from .registry import AUTOWRAP_FUNCTIONS, LEAF_MODULES

__all__ = ["trace_model"]


class _ScopeTracer(fx.Tracer):
    """fx.Tracer that records scopes, grad modes and module calls, and honours leaf registries."""

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
        self.scopes: dict[str, tuple[ScopeFrame, ...]] = {}
        self.no_grad: set[str] = set()
        self.output_containers: set[str] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            reason = self._leaf_reasons.get(module_qualified_name, "listed in leaf_modules")
            self.opaque.setdefault(module_qualified_name, reason)
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            self.opaque[module_qualified_name] = f"{type(m).__name__} is a registered leaf module"
            return True
        if super().is_leaf_module(m, module_qualified_name):
            blocks = hidden_blocks(m)
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
        outputs = dict(value_paths(result, _proxy_name))
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
            self.output_containers.add(node.name)
            return node
        return super().create_arg(a)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.scopes[node.name] = tuple(self._scope)
        source = node.args[0] if node.target is getattr and node.args else None
        if isinstance(source, fx.Node) and source.op == "call_module":
            # fx makes the node of an attribute read (``out.last_hidden_state`` on what an
            # opaque module returned) when the value is first used, often inside the next
            # module call: it belongs to a scope both the read and the module's result share.
            shared = self.scopes.get(source.name, ())
            common = 0
            while common < min(len(shared), len(self._scope)) and shared[common] == self._scope[common]:
                common += 1
            self.scopes[node.name] = tuple(self._scope[:common])
        if not torch.is_grad_enabled():
            self.no_grad.add(node.name)
        return node

    def innermost_module(self) -> str:
        return self._scope[-1].name if self._scope else ""


def _proxy_name(value: Any) -> str | None:
    return value.node.name if isinstance(value, fx.Proxy) else None


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
    leaf_types, leaf_names = _leaf_options(model, leaf_modules)
    functions = (*AUTOWRAP_FUNCTIONS.items(), *autowrap_functions)

    # fx stores tensor constants on the traced root with setattr; a shallow copy
    # keeps them off the user's model while sharing every submodule.
    root = copy.copy(model)
    bound, template = bound_forward_class(model, inputs) if inputs is not None else (None, None)
    if bound is not None:
        root.__class__ = bound
    names = {id(m): name for name, m in model.named_modules()}
    names[id(root)] = ""

    def make_tracer(made_opaque: Mapping[str, str]) -> _ScopeTracer:
        return _ScopeTracer(
            leaf_types, [*leaf_names, *made_opaque], functions, leaf_structures,
            {**(opaque_reasons or {}), **made_opaque},
        )

    with preserved_module_state(model):
        tracer, recorder, graph, made_opaque = _trace_with_opaque_retries(
            make_tracer, root, model, names, auto_opaque, max_opaque,
        )
    root.training = model.training
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
        scopes=tracer.scopes,
        no_grad=frozenset(tracer.no_grad),
        output_containers=frozenset(tracer.output_containers),
        opaque=dict(tracer.opaque),
        constants=tuple(k for k in vars(root) if k not in vars(model) and k != "__class__"),
        inputs=flat,
        calls=tracer.module_calls,
        flag_readers=recorder.flag_readers,
        findings=tuple(recorder.findings),
        automatic=tuple(made_opaque) + tuple(sorted(tracer.hiding - set(made_opaque))),
    )


def _leaf_options(model: nn.Module, leaf_modules: Sequence[type | str]) -> tuple[tuple[type, ...], list[str]]:
    """The leaf classes (registered ones first) and qualified names, checked against the model."""
    bad = [m for m in leaf_modules if not isinstance(m, (type, str))]
    if bad:
        raise TypeError(
            f"leaf_modules takes module classes or qualified names, got {bad!r}."
        )
    leaf_names = [m for m in leaf_modules if isinstance(m, str)]
    known = {name for name, _ in model.named_modules()}
    missing = [n for n in leaf_names if n not in known]
    if missing:
        raise ValueError(
            f"leaf_modules names {missing} are not submodules of {type(model).__name__}; "
            f"use qualified names from model.named_modules(), e.g. {sorted(known - {''})[:5]}."
        )
    leaf_types = (*LEAF_MODULES.items(), *(m for m in leaf_modules if isinstance(m, type)))
    return tuple(leaf_types), leaf_names


def _trace_with_opaque_retries(make_tracer, root, model, names, auto_opaque: bool, max_opaque: int):
    """Trace; with ``auto_opaque``, each failing submodule is kept opaque and the trace run again."""
    made_opaque: dict[str, str] = {}
    while True:
        tracer = make_tracer(made_opaque)
        try:
            recorder, graph = _trace(tracer, root, model, names)
            return tracer, recorder, graph, made_opaque
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
            # The user's line fx failed on (the TraceError is raised from fx's own error).
            where = frame_location(user_frame(error.__cause__)) if error.__cause__ is not None else ""
            made_opaque[error.module_name] = f"made opaque: {_first_sentence(error.cause)}{where}"


def _first_sentence(text: str, limit: int = 120) -> str:
    sentence = text.split(". ", 1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _trace(tracer: _ScopeTracer, root: nn.Module, model: nn.Module, names: dict[int, str]):
    root.train(True)
    submodules = (m for name, m in model.named_modules() if name)
    recorder = TraceRecorder(tracer.innermost_module, names, tracer, modules=[root, *submodules])
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
    where = frame_location(frame)
    wrap_hint = _wrap_hint(error, frame)
    if scope:
        failing = scope[-1]
        cls = failing.type
        message = (
            f"simfx could not trace {type(model).__name__}: inside module '{failing.name}' "
            f"({cls.__module__}.{cls.__qualname__}){where}: {first_line}\n"
            f"Fix: keep that module opaque with transform(..., leaf_modules=[{cls.__name__}]) "
            f"or simfx.register_leaf_module({cls.__name__}); it then runs as one graph node and can "
            f"still take SIM as a whole. Alternatively, {wrap_hint}."
        )
        return TraceError(message, failing.name, cls, first_line)
    message = (
        f"simfx could not trace {type(model).__name__}.forward{where}: {first_line}\n"
        f"Fix: {wrap_hint}. Code in the model's own forward cannot be a leaf module; move it into "
        f"a submodule and pass leaf_modules=[ThatModule] if wrapping is not possible, or use frontend='export'."
    )
    return TraceError(message, "", type(model), first_line)


def _wrap_hint(error: Exception, frame) -> str:
    """How autowrap_functions can help with a failure on the user's line ``frame``.

    A failure inside a free function is best fixed by recording each call to it as
    one node. fx's autowrap only patches module-level functions, and skips names
    starting with an underscore, so a private helper needs a public name first.
    """
    generic = "if the failing code is a call to a public module-level function, pass autowrap_functions=[that_function]"
    if frame is None or frame.name.startswith("<") or frame.name == "forward" or _is_method(error, frame):
        return generic
    if frame.name.startswith("_"):
        return (
            f"{frame.name}() cannot go in autowrap_functions, because torch.fx skips functions whose name starts "
            f"with '_': call it through a public module-level function (def helper(*args): return "
            f"{frame.name}(*args), called by that name) and pass autowrap_functions=[helper]"
        )
    return f"autowrap_functions=[{frame.name}] records each call to {frame.name}() as one graph node"


def _is_method(error: Exception, frame) -> bool:
    """The failing function is a method (its first parameter is ``self``): autowrap cannot record methods."""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == frame.filename and code.co_name == frame.name:
            return code.co_argcount > 0 and code.co_varnames[0] == "self"
        tb = tb.tb_next
    return False


def _from_graph_module(gm: fx.GraphModule, inputs: ExampleInputs | None) -> TracedModel:
    graph = copy_graph(gm.graph)
    scopes = {node.name: frames_from_module_stack(gm, node) for node in graph.nodes}
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    flat = (*inputs.args, *inputs.kwargs.values()) if inputs is not None else ()
    return TracedModel(gm, gm, graph, CallTemplate.plain(placeholders), scopes=scopes, inputs=flat)
