"""Example inputs and the call template: how the transformed module's inputs become the model's call.

``transform(model, example_inputs)`` takes a tensor, a tuple of the forward's
positional arguments, or a dict of its keyword arguments. Tensors become the
transformed module's inputs, in that order; every other value (``augment=False``,
``None``) is bound as a constant. The :class:`CallTemplate` records that binding
so the transformed module can call the model's own forward (eval mode, the
transform-time check) with exactly the arguments the user's code would pass.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ExampleInputsError

__all__ = [
    "ExampleInputs", "CallTemplate", "example_inputs", "bound_forward_class", "training_inputs", "randomness_note",
    "training_randomness_off",
]


@dataclass(frozen=True)
class ExampleInputs:
    """The example call: positional and keyword arguments of the model's forward."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The graph's inputs in placeholder order: the tensors of the arguments, then of the keywords.

        Tensors inside tuples, lists and dicts (an RNN's ``(h, c)`` state) count too.
        """
        values = (*self.args, *self.kwargs.values())
        return tuple(t for v in values for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor))


def example_inputs(value: Any, model: nn.Module, caller: str) -> ExampleInputs:
    """``value`` as :class:`ExampleInputs`, or an :class:`~simfx.ExampleInputsError` saying what to pass."""
    if value is None:
        raise ExampleInputsError(
            f"simfx.{caller} needs example_inputs for {type(model).__name__}: a batch shaped like "
            f"your training inputs, e.g. simfx.{caller}(model, torch.randn(2, 3, 224, 224)). "
            f"They fix block shapes and reconstructor sizes, and simfx checks its graph against the "
            f"model on them once."
        )
    if isinstance(value, torch.Tensor):
        inputs = ExampleInputs((value,))
    elif isinstance(value, (tuple, list)):
        inputs = ExampleInputs(tuple(value))
    elif isinstance(value, Mapping):
        inputs = ExampleInputs((), dict(value))
    else:
        raise ExampleInputsError(
            f"example_inputs must be a tensor, a tuple of the forward's positional arguments or a dict "
            f"of its keyword arguments; got {type(value).__name__}."
        )
    if not inputs.tensors:
        raise ExampleInputsError(
            f"example_inputs for {type(model).__name__} holds no tensor; pass the forward's "
            f"positional arguments, e.g. (torch.randn(2, 3, 224, 224),), or keyword arguments as a dict."
        )
    return inputs


_INPUT = "input"
_TREE = "tree"  # a tuple/list/dict holding tensors: (pytree spec, a slot per leaf)


@dataclass(frozen=True)
class CallTemplate:
    """The model's call with the transformed module's inputs in the tensor slots.

    ``positional`` and ``keywords`` hold, per argument, ``("input", i)`` (the i-th
    input of the transformed module) or ``("constant", value)``. ``names`` are the
    transformed module's input names, in order.

    >>> t = CallTemplate(((_INPUT, 0), ("constant", False)), (("mask", (_INPUT, 1)),), ("x", "mask"))
    >>> t.model_call((1, 2))
    ((1, False), {'mask': 2})
    """

    positional: tuple[tuple[str, Any], ...]
    keywords: tuple[tuple[str, tuple[str, Any]], ...]
    names: tuple[str, ...]

    @classmethod
    def plain(cls, names: tuple[str, ...]) -> "CallTemplate":
        """Every input passed positionally, in order."""
        return cls(tuple((_INPUT, i) for i in range(len(names))), (), names)

    def model_call(self, inputs: tuple) -> tuple[tuple, dict[str, Any]]:
        """The positional and keyword arguments of the model's forward for these inputs."""
        def fill(slot):
            kind, value = slot
            if kind == _INPUT:
                return inputs[value]
            if kind == _TREE:
                spec, leaves = value
                return pytree.tree_unflatten([fill(leaf) for leaf in leaves], spec)
            return value

        return tuple(fill(s) for s in self.positional), {k: fill(s) for k, s in self.keywords}

    def without(self, keywords: tuple[str, ...]) -> "CallTemplate":
        """The same call without some keyword constants (the flags simfx adds for training)."""
        kept = tuple((k, slot) for k, slot in self.keywords if not (k in keywords and slot[0] != _INPUT))
        return CallTemplate(self.positional, kept, self.names)

    def inputs_of(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple | None:
        """The inverse: this template's inputs from a model call, or None if the call does not fit it."""
        if len(args) != len(self.positional) or set(kwargs) != {k for k, _ in self.keywords}:
            return None
        found: dict[int, Any] = {}
        slots = [*zip(self.positional, args), *((s, kwargs[k]) for k, s in self.keywords)]
        while slots:
            (kind, value), given = slots.pop()
            if kind == _INPUT:
                found[value] = given
            elif kind == _TREE:
                leaves, spec = pytree.tree_flatten(given)
                if spec != value[0]:
                    return None
                slots.extend(zip(value[1], leaves))
            elif given is not value and not _same_constant(given, value):
                return None
        return tuple(found[i] for i in range(len(self.names)))


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality are not the same constant
        return False


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def bound_forward_class(model: nn.Module, inputs: ExampleInputs) -> tuple[type | None, CallTemplate | None]:
    """A subclass of the model's class whose forward takes exactly the example's tensors, and its template.

    fx makes one placeholder per parameter of ``forward``; ``*args`` becomes a single
    proxy (iterating it fails) and optional flags become proxies that ``if`` cannot
    test. The generated forward has one parameter per example tensor and calls the
    real forward with the tensors and the bound constants. ``(None, None)`` when
    fx's own signature handling already fits (every argument a tensor, one per
    positional parameter).
    """
    cls = type(model)
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None, None
    params = list(signature.parameters.values())[1:]  # drop self
    plain = (
        not inputs.kwargs
        and all(isinstance(a, torch.Tensor) for a in inputs.args)
        and len(params) == len(inputs.args)
        and all(p.kind in _POSITIONAL for p in params)
    )
    if plain:
        return None, None
    _check_binding(cls, signature, inputs)

    positional = [p.name for p in params if p.kind in _POSITIONAL]
    star = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), "args")
    binder = _Binder()
    slots, keyword_slots, call_args = [], [], []
    for i, value in enumerate(inputs.args):
        name = positional[i] if i < len(positional) else f"{star}_{i - len(positional)}"
        slot, source = binder.bind(value, name, f"_c{i}")
        slots.append(slot)
        call_args.append(source)
    for key, value in inputs.kwargs.items():
        slot, source = binder.bind(value, key, f"_k_{key}")
        keyword_slots.append((key, slot))
        call_args.append(f"**{{{key!r}: {source}}}")
    forward = binder.forward(cls, call_args)
    bound = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return bound, CallTemplate(tuple(slots), tuple(keyword_slots), tuple(binder.placeholders))


def _check_binding(cls: type, signature: inspect.Signature, inputs: ExampleInputs) -> None:
    """An :class:`ExampleInputsError` when the example cannot be passed to ``cls.forward``."""
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [k for k in inputs.kwargs if k not in signature.parameters and not takes_any_keyword]
    problem = f"it has no parameter {unknown[0]!r}" if unknown else _binding_problem(signature, inputs)
    if problem:
        raise ExampleInputsError(
            f"example_inputs do not fit {cls.__name__}.forward{_show_signature(signature)}: {problem}. "
            f"Pass the forward's positional arguments as a tuple, or its keyword arguments as a dict."
        )


class _Binder:
    """Writes the generated forward's parameters (one per example tensor) and its bound constants."""

    def __init__(self) -> None:
        self.placeholders: list[str] = []
        self.constants: dict[str, Any] = {}

    def bind(self, value: Any, name: str, key: str) -> tuple[tuple[str, Any], str]:
        """(slot, source expression) of one argument value in the generated forward."""
        if isinstance(value, torch.Tensor):
            name = name if name.isidentifier() and name not in self.placeholders else f"input_{len(self.placeholders)}"
            self.placeholders.append(name)
            return (_INPUT, len(self.placeholders) - 1), name
        leaves, spec = pytree.tree_flatten(value)
        if any(isinstance(leaf, torch.Tensor) for leaf in leaves) and not spec.is_leaf():
            # Tensors inside a structure are inputs too: the forward rebuilds the structure.
            bound = [self.bind(leaf, f"{name}_{j}", f"{key}_{j}") for j, leaf in enumerate(leaves)]
            self.constants[f"_spec_{key}"] = spec
            expressions = ", ".join(source for _, source in bound)
            return (_TREE, (spec, tuple(slot for slot, _ in bound))), (
                f"_unflatten([{expressions}], _constants['_spec_{key}'])")
        self.constants[key] = value
        return ("constant", value), f"_constants[{key!r}]"

    def forward(self, cls: type, call_args: list[str]):
        """``forward(self, <placeholders>)`` calling ``cls.forward`` with ``call_args``."""
        source = (
            f"def forward(self, {', '.join(self.placeholders)}):\n"
            f"    return _forward(self, {', '.join(call_args)})\n"
        )
        namespace = {"_forward": cls.forward, "_constants": self.constants, "_unflatten": pytree.tree_unflatten}
        exec(compile(source, f"<simfx bound {cls.__name__}.forward>", "exec"), namespace)
        forward = namespace["forward"]
        forward.__qualname__ = f"{cls.__qualname__}.forward"
        return forward


def _binding_problem(signature: inspect.Signature, inputs: ExampleInputs) -> str:
    try:
        signature.bind(None, *inputs.args, **inputs.kwargs)
    except TypeError as error:
        return str(error)
    return ""


def _show_signature(signature: inspect.Signature) -> str:
    return str(signature).replace("(self, ", "(", 1).replace("(self)", "()", 1)


# Forward parameters training never needs switched on, and the value simfx passes
# when the example leaves them to the model's default: a generation cache
# (Hugging Face's use_cache) only costs memory in training, and its cache objects
# are outputs torch.export cannot capture.
TRAINING_FLAGS: Mapping[str, Any] = {"use_cache": False}


def training_inputs(model: nn.Module, inputs: ExampleInputs) -> tuple[ExampleInputs, dict[str, Any]]:
    """``inputs`` with :data:`TRAINING_FLAGS` the forward takes but the example does not set; and those flags."""
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return inputs, {}
    names = list(parameters)[1:]  # drop self
    set_positionally = set(names[: len(inputs.args)])
    # A forward taking **kwargs (PEFT's PeftModel, wrappers) passes a flag on when the model's config has it.
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    config = getattr(model, "config", None)
    added = {
        name: value for name, value in TRAINING_FLAGS.items()
        if (name in parameters or (passes_on and getattr(config, name, None) is not None))
        and name not in inputs.kwargs and name not in set_positionally
    }
    if not added:
        return inputs, {}
    return ExampleInputs(inputs.args, {**inputs.kwargs, **added}), added


# Training-time randomness Hugging Face configs switch on and forwards draw in Python:
# SpecAugment masks (NumPy draws on shapes) and LayerDrop (``if torch.rand([]) < p:
# skip the layer``). No trace keeps a Python branch on a fresh draw, so fx runs the
# modules doing it as one call and torch.export refuses it.
TRAINING_RANDOMNESS: Mapping[str, str] = {
    "mask_time_prob": "SpecAugment time masks",
    "mask_feature_prob": "SpecAugment feature masks",
    "layerdrop": "LayerDrop",
    "encoder_layerdrop": "LayerDrop",
    "decoder_layerdrop": "LayerDrop",
}


@contextlib.contextmanager
def training_randomness_off(model: nn.Module) -> Iterator[None]:
    """The config options of :data:`TRAINING_RANDOMNESS` at 0.0 inside (simfx's own runs see every layer)."""
    config = getattr(model, "config", None)
    saved = {name: value for name, value in _randomness_switched_on(config).items() if isinstance(value, float)}
    for name in saved:
        setattr(config, name, 0.0)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def _randomness_switched_on(config: Any) -> dict[str, float]:
    return {
        name: value for name in TRAINING_RANDOMNESS
        if isinstance(value := getattr(config, name, None), (int, float)) and not isinstance(value, bool) and value > 0
    }


def randomness_note(model: nn.Module) -> str:
    """A note naming the config options of ``model`` that switch on :data:`TRAINING_RANDOMNESS`, or "".

    >>> import types
    >>> model = nn.Linear(2, 2)
    >>> model.config = types.SimpleNamespace(layerdrop=0.1, mask_time_prob=0.0)
    >>> note = randomness_note(model)
    >>> "layerdrop=0.1 (LayerDrop)" in note, "mask_time_prob" in note
    (True, False)
    """
    found = _randomness_switched_on(getattr(model, "config", None))
    if not found:
        return ""
    shown = ", ".join(f"{name}={value!r} ({TRAINING_RANDOMNESS[name]})" for name, value in found.items())
    first = next(iter(found))
    return (
        f"Note: {type(model).__name__}'s config switches on randomness its forward draws in Python in training: "
        f"{shown}. No trace keeps that, so fx runs the modules drawing it as one call (their layers cannot take "
        f"SIM); frontend='export' lets the model draw it itself. Setting them to 0.0 before transforming "
        f"(model.config.{first} = 0.0) lets fx trace into those modules; it changes your training recipe."
    )
