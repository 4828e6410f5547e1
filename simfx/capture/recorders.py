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
* random draws with no traced input: torch's random functions (a
  ``TorchFunctionMode``, fx only) and Python's and NumPy's ``random`` modules;
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
from typing import Any, Callable

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
    ``"autograd_function"`` (a custom backward the trace drops), or
    ``"saved_tensor_hooks"`` (activation checkpointing or offloading the trace
    inlines). ``module`` is the qualified name of the innermost module call it ran
    in (``""`` for the model's own forward); ``where`` is the user's source line.
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
_PYTHON_RANDOM = ("random", "uniform", "randint", "randrange", "choice", "choices", "sample", "shuffle",
                  "gauss", "normalvariate", "betavariate", "expovariate", "triangular")
_NUMPY_RANDOM = ("random", "rand", "randn", "uniform", "randint", "choice", "normal", "permutation",
                 "shuffle", "random_sample", "binomial")
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
        tracer: the fx tracer, when tracing with fx: autocast regions and in-place
            operators become graph nodes through it, and torch random draws are
            watched (under export they are recorded as graph operations already).
    """

    def __init__(self, scope: Callable[[], str], names: dict[int, str], tracer: fx.Tracer | None = None):
        self._scope = scope
        self._names = names
        self._tracer = tracer
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
            self._watch_python_random()
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

    def _watch_python_random(self) -> None:
        modules = [(python_random, _PYTHON_RANDOM, "random")]
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:
            modules.append((numpy_random, _NUMPY_RANDOM, "numpy.random"))
        for module, names, prefix in modules:
            for name in names:
                function = getattr(module, name, None)
                if callable(function):
                    self._patch(module, name, self._recording(function, f"{prefix}.{name}"))

    def _recording(self, function: Callable, label: str) -> Callable:
        def draw(*args, **kwargs):
            self.record("random", label)
            return function(*args, **kwargs)

        return draw

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

