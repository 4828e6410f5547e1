"""What a tracer would silently lose, seen while it runs the model's Python code.

torch.fx (and export) run a model's forward once and record tensor operations.
Python that runs only at trace time is lost from the recording: random draws
that take no tensor input are made once and frozen, ``self.training`` reads are
baked in, a custom ``autograd.Function``'s backward and
``torch.utils.checkpoint``'s recomputation vanish, ``autocast`` regions and
``x += y`` on a proxy leave no trace. :class:`TraceRecorder` watches for each of
these while a trace runs, by patching the few entry points they all go through,
and restores everything on exit:

* ``nn.Module.training`` reads: which modules branch on their mode
  (:attr:`TraceRecorder.flag_readers`);
* Python state a forward changes: attributes it sets on a module (a step counter
  ``self.steps += 1``, a cached mask) and the lists, dicts and sets a module holds
  that it appends to or updates (a memory bank, a running statistic);
* random draws with no traced input: torch's random functions (a
  ``TorchFunctionMode``); Python's ``random`` (a profile hook sees every call of a
  ``random.Random``, whatever the spelling) and NumPy's module functions
  (``np.random.uniform``), where they ran; and, without the line, any other change
  of the state of NumPy's global generator (a name imported from ``numpy.random``)
  or of a generator a module keeps (``self.rng = np.random.default_rng()``);
* ``autograd.Function.apply`` and saved-tensor hooks (activation checkpointing,
  offloading) inside traced code;
* ``torch.autocast`` regions entered by the model: fx gets explicit
  ``_enter_autocast``/``_exit_autocast`` nodes, so the region runs as written;
* in-place operators on fx proxies (``x += y``) are recorded as the in-place
  operator (``operator.iadd``), which is what eager PyTorch runs.

The recorder decides nothing: the capture and select stages turn its
:class:`Finding` records into opaque modules or errors.
"""

from __future__ import annotations

import linecache
import operator
import os
import random as python_random
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["Finding", "TraceRecorder", "user_location", "user_frame"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_SIMFX_DIR = os.path.dirname(__file__)
_RANDOM_FILE = os.path.abspath(python_random.__file__)


@dataclass(frozen=True)
class Finding:
    """Something the trace cannot keep, where it happened.

    ``kind`` is ``"random"`` (a draw made once at trace time),
    ``"autograd_function"`` (a custom backward the trace drops),
    ``"saved_tensor_hooks"`` (activation checkpointing or offloading the trace
    inlines), ``"attribute"`` (an attribute the forward sets on a module) or
    ``"container"`` (a list, dict or set of a module the forward changes). ``module``
    is the qualified name of the innermost module call it ran in (``""`` for the
    model's own forward); ``where`` is the user's source line.
    """

    kind: str
    module: str
    where: str
    detail: str

    def describe(self) -> str:
        what = {
            "random": f"draws a random number with no tensor input ({self.detail}), which a trace makes once and freezes",
            "autograd_function": f"applies the custom autograd Function {self.detail}, whose backward a trace drops",
            "saved_tensor_hooks": f"uses {self.detail}, which a trace inlines (it would keep every activation)",
            "attribute": f"sets {self.detail} in its forward, which a trace does once: every later step would "
                         f"compute with the value it had then",
            "container": f"changes {self.detail} in its forward, which a trace does once: every later step would "
                         f"see it as it was then",
        }[self.kind]
        place = f"module '{self.module}'" if self.module else "the model's own forward"
        return f"{place} {what}{f' at {self.where}' if self.where else ''}"


def user_location(skip_random: bool = False) -> str:
    """``file.py:12 `code``` of the innermost frame outside torch and simfx (and ``random``), or ""."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        inside = path.startswith(_TORCH_DIR) or path.startswith(_SIMFX_DIR) or path.startswith("<simfx")
        if skip_random:
            inside = inside or path == _RANDOM_FILE or f"{os.sep}numpy{os.sep}" in path
        if not inside and not frame.f_code.co_filename.startswith("<"):
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            code = f" `{line}`" if line else ""
            return f"{os.path.basename(path)}:{frame.f_lineno}{code}"
        frame = frame.f_back
    return ""


def user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame of ``error`` outside torch and simfx (the user's failing line)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_SIMFX_DIR) or frame.filename.startswith("<")):
            return frame
    return None


def frame_location(frame: traceback.FrameSummary | None) -> str:
    """`` at file.py:12 `code``` for a frame, or ""."""
    if frame is None:
        return ""
    code = f" `{frame.line.strip()}`" if frame.line else ""
    return f" at {os.path.basename(frame.filename)}:{frame.lineno}{code}"


_TORCH_RANDOM = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
    "multinomial", "normal", "poisson", "uniform_", "normal_", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "rrelu",
})
_INPLACE_OPERATORS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}


class _RandomDraws(TorchFunctionMode):
    """Sees torch's random functions called on no traced value (fx: no Proxy argument)."""

    def __init__(self, recorder: "TraceRecorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _TORCH_RANDOM and not _has_proxy((args, kwargs)) and _draws(name, kwargs):
            self.recorder.record("random", f"torch.{name}")
        return func(*args, **kwargs)


def _draws(name: str, kwargs: dict) -> bool:
    """dropout-like functions draw only in training (``training=False`` is a plain copy)."""
    return not ("dropout" in name and kwargs.get("training") is False) and kwargs.get("p") != 0


def _has_proxy(value: Any) -> bool:
    return any(isinstance(leaf, fx.Proxy) for leaf in pytree.tree_leaves(value))


class TraceRecorder:
    """Patches the entry points above for the duration of one trace (a context manager).

    Args:
        scope: returns the qualified name of the innermost module call being traced.
        names: maps ``id(module)`` to its qualified name, for flag reads.
        tracer: the fx tracer: autocast regions and in-place operators become graph
            nodes through it.
        modules: the modules whose lists, dicts and sets are watched for changes (the
            traced root and the model's submodules).
    """

    def __init__(self, scope: Callable[[], str], names: dict[int, str], tracer: fx.Tracer | None = None,
                 modules: Iterable[nn.Module] = ()):
        self._scope = scope
        self._names = names
        self._tracer = tracer
        self._modules = list(modules)
        # flag owner -> (where it was read, the module whose code read it, the value read)
        self.flag_readers: dict[str, tuple[str, str, bool]] = {}
        self.findings: list[Finding] = []
        self._undo: list[Callable[[], None]] = []
        self._autocast_nodes: dict[int, list[fx.Node]] = {}

    def record(self, kind: str, detail: str) -> None:
        finding = Finding(kind, self._scope(), user_location(skip_random=kind == "random"), detail)
        if finding not in self.findings:
            self.findings.append(finding)

    # --- context manager -------------------------------------------------------

    def __enter__(self) -> "TraceRecorder":
        try:
            self._watch_training_flags()
            self._watch_autograd_functions()
            self._watch_saved_tensor_hooks()
            self._watch_random_draws()
            self._watch_attribute_writes()
            self._watch_containers()
            if self._tracer is not None:
                self._record_autocast_regions()
                self._record_inplace_operators()
                mode = _RandomDraws(self)
                mode.__enter__()
                self._undo.append(lambda: mode.__exit__(None, None, None))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        missing = object()
        old = owner.__dict__.get(name, missing) if isinstance(owner, type) else getattr(owner, name, missing)

        def undo():
            if old is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

        setattr(owner, name, value)
        self._undo.append(undo)

    # --- the watchers ----------------------------------------------------------

    def _watch_training_flags(self) -> None:
        recorder = self

        def read(module: nn.Module) -> bool:
            value = module.__dict__.get("training", True)
            name = recorder._names.get(id(module))
            if name is not None and name not in recorder.flag_readers:
                recorder.flag_readers[name] = (user_location(), recorder._scope(), value)
            return value

        def write(module: nn.Module, value: bool) -> None:
            module.__dict__["training"] = value

        # A data descriptor on the class wins over the instance's own 'training'.
        self._patch(nn.Module, "training", property(read, write))

    def _watch_autograd_functions(self) -> None:
        recorder = self
        function = torch.autograd.Function
        descriptor = function.__dict__["apply"]  # a classmethod (or its C descriptor, torch >= 2.10)

        def apply(cls, *args, **kwargs):
            if recorder._tracer is None or _has_proxy((args, kwargs)):
                checkpointed = cls.__name__ == "CheckpointFunction"
                if checkpointed:
                    recorder.record("saved_tensor_hooks", "torch.utils.checkpoint (reentrant)")
                else:
                    recorder.record("autograd_function", f"{cls.__module__}.{cls.__qualname__}")
            return descriptor.__get__(None, cls)(*args, **kwargs)

        self._patch(function, "apply", classmethod(apply))

    def _watch_saved_tensor_hooks(self) -> None:
        recorder = self
        autograd = torch._C._autograd
        original = autograd._push_saved_tensors_default_hooks

        def push(pack_hook, unpack_hook):
            recorder.record("saved_tensor_hooks", _saved_tensor_hooks_name(pack_hook))
            return original(pack_hook, unpack_hook)

        self._patch(autograd, "_push_saved_tensors_default_hooks", push)

    def _watch_random_draws(self) -> None:
        previous = sys.getprofile()

        def profile(frame, event, arg):
            # C calls of a Python random.Random (NumPy's methods are Cython and make no such event).
            if event == "c_call" and isinstance(getattr(arg, "__self__", None), python_random.Random):
                self.record("random", _draw_name(arg))
            if previous is not None:
                previous(frame, event, arg)

        sys.setprofile(profile)
        self._undo.append(lambda: sys.setprofile(previous))
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is None:
            return
        for name in _NUMPY_RANDOM:
            function = getattr(numpy_random, name, None)
            if callable(function):
                self._patch(numpy_random, name, self._recording_draws(function, f"numpy.random.{name}"))
        states = [(owner, name, generator, _generator_state(generator))
                  for owner, name, generator in _numpy_generators(numpy_random, self._modules)]
        self._undo.append(lambda: self._record_changed_generators(states))

    def _recording_draws(self, function: Callable, label: str) -> Callable:
        def draw(*args, **kwargs):
            self.record("random", label)
            return function(*args, **kwargs)

        return draw

    def _record_changed_generators(self, states) -> None:
        """A NumPy generator whose state moved while tracing drew numbers the recording could not see."""
        for owner, name, generator, before in states:
            if _generator_state(generator) != before and not any(f.kind == "random" for f in self.findings):
                module = self._names.get(id(owner), "") if owner is not None else ""
                what = f"self.{name} ({type(generator).__name__})" if owner is not None else "NumPy's global generator"
                self.findings.append(Finding("random", module, "", f"a draw from {what}"))

    def _watch_attribute_writes(self) -> None:
        recorder = self
        original = nn.Module.__setattr__

        def setattr_(module: nn.Module, name: str, value: Any) -> None:
            if _in_user_code(sys._getframe(1)) and _changes(module.__dict__.get(name, _MISSING), value):
                recorder.record("attribute", f"self.{name}")
            original(module, name, value)

        self._patch(nn.Module, "__setattr__", setattr_)

    def _watch_containers(self) -> None:
        """Each list, dict and set a module holds, swapped for a copy that records changes while tracing."""
        for module in self._modules:
            for name, value in list(vars(module).items()):
                if type(value) in _RECORDING and name not in _MODULE_INTERNALS:
                    watched = _RECORDING[type(value)](value)
                    watched.simfx_changed = lambda method, name=name: self.record("container", f"self.{name} ({method})")
                    module.__dict__[name] = watched
                    self._undo.append(lambda module=module, name=name, value=value: module.__dict__.__setitem__(name, value))

    def _record_autocast_regions(self) -> None:
        recorder, tracer = self, self._tracer
        autocast = torch.amp.autocast_mode.autocast
        enter, leave = autocast.__enter__, autocast.__exit__

        def record_enter(ctx):
            result = enter(ctx)
            values = (ctx.device, ctx.fast_dtype, ctx._enabled, ctx._cache_enabled)
            node = tracer.create_node("call_function", torch.amp.autocast_mode._enter_autocast, values, {})
            recorder._autocast_nodes.setdefault(id(ctx), []).append(node)
            return result

        def record_exit(ctx, *exc):
            stack = recorder._autocast_nodes.get(id(ctx))
            if stack:
                tracer.create_node("call_function", torch.amp.autocast_mode._exit_autocast, (stack.pop(),), {})
            return leave(ctx, *exc)

        self._patch(autocast, "__enter__", record_enter)
        self._patch(autocast, "__exit__", record_exit)

    def _record_inplace_operators(self) -> None:
        for dunder, function in _INPLACE_OPERATORS.items():
            self._patch(fx.Proxy, dunder, _inplace_method(function))


def _inplace_method(function: Callable) -> Callable:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", function, (self, other), {})

    method.__name__ = f"__i{function.__name__[1:]}__"
    return method


def _saved_tensor_hooks_name(pack_hook: Callable) -> str:
    module = getattr(pack_hook, "__module__", "") or ""
    qualname = getattr(pack_hook, "__qualname__", "") or ""
    if "checkpoint" in module or "checkpoint" in qualname:
        return "torch.utils.checkpoint"
    return f"saved-tensor hooks ({qualname or 'activation offloading'})"



_NUMPY_RANDOM = ("random", "rand", "randn", "uniform", "randint", "choice", "normal", "permutation",
                 "shuffle", "random_sample", "binomial")


def _draw_name(method: Any) -> str:
    """``random.random`` for Python's global generator, else ``Random.random``."""
    owner, name = method.__self__, method.__name__
    return f"random.{name}" if owner is getattr(python_random, "_inst", None) else f"{type(owner).__name__}.{name}"


def _numpy_generators(numpy_random, modules: Iterable[nn.Module]):
    """(owner module or None, attribute name, generator) of NumPy's global generator and those modules keep."""
    yield None, "", numpy_random.mtrand._rand
    kinds = (numpy_random.RandomState, numpy_random.Generator)
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, kinds):
                yield module, name, value


def _generator_state(generator) -> Any:
    state = generator.bit_generator.state if hasattr(generator, "bit_generator") else generator.get_state()
    return repr(state)


_MISSING = object()


def _in_user_code(frame) -> bool:
    """The frame runs code outside torch and simfx (the model's)."""
    path = os.path.abspath(frame.f_code.co_filename)
    return not (path.startswith(_TORCH_DIR) or path.startswith(_SIMFX_DIR) or frame.f_code.co_filename.startswith("<"))


def _changes(old: Any, new: Any) -> bool:
    """Setting ``new`` where ``old`` was changes the attribute (an equal Python value does not)."""
    if old is new:
        return False
    if any(isinstance(v, (torch.Tensor, fx.Proxy)) for v in (old, new)):
        return True
    try:
        return not bool(old == new)
    except Exception:  # noqa: BLE001 - values without a plain equality: a change
        return True


def _recording_class(base: type, methods: tuple[str, ...]) -> type:
    """A subclass of ``base`` whose mutating ``methods`` call ``self.simfx_changed(name)`` first."""

    def wrapped(name: str):
        function = getattr(base, name)

        def method(self, *args, **kwargs):
            self.simfx_changed(name)
            return function(self, *args, **kwargs)

        method.__name__ = name
        return method

    return type(f"Recording{base.__name__.capitalize()}", (base,), {name: wrapped(name) for name in methods})


_RECORDING: dict[type, type] = {
    list: _recording_class(list, ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
                                  "__setitem__", "__delitem__", "__iadd__", "__imul__")),
    dict: _recording_class(dict, ("__setitem__", "__delitem__", "update", "pop", "popitem", "setdefault", "clear",
                                  "__ior__")),
    set: _recording_class(set, ("add", "discard", "remove", "pop", "clear", "update", "difference_update",
                                "intersection_update", "symmetric_difference_update", "__ior__", "__iand__",
                                "__isub__", "__ixor__")),
}
# nn.Module's own registries (parameters, submodules, hooks) are torch's to change, not the forward's.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
