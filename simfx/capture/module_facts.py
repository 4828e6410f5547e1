"""Facts about a model's modules that capture, analysis and the check rely on, and three guards.

* :func:`has_hooks`, :func:`weight_layers`, :func:`hidden_blocks`: read-only facts.
* :func:`preserved_module_state`: tracers and simfx's own runs execute a model's
  Python code, which may cache values on modules or flip ``training``; the
  guard undoes that.
* :func:`hooks_suppressed`: simfx's own runs (the shape pass, the check) are not
  the user's steps, so the user's hooks must not see them.
* :func:`seeded`: those runs draw from fixed seeds (torch's, Python's and
  NumPy's generators) and leave the user's generators where they were.
* :func:`model_restored`: all of the above that a run of the real model needs,
  and its buffers' contents (BatchNorm statistics) back as they were.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import random
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "has_hooks", "weight_layers", "hidden_blocks", "preserved_module_state", "hooks_suppressed", "seeded",
    "model_restored",
]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """The module has forward, forward-pre or backward hooks of its own (which a trace would not run).

    simfx's own taps (hooks marked ``simfx_tap``, which never change a value) do not count.
    """
    return any(
        not getattr(hook, "simfx_tap", False)
        for name in _HOOK_DICTS for hook in (getattr(module, name, None) or {}).values()
    )


def weight_layers(module: nn.Module) -> int:
    """Submodules applying a weight of 2+ dims of their own (conv, linear, attention projections)."""
    return sum(any(p.dim() >= 2 for p in m.parameters(recurse=False)) for m in module.modules())


def hidden_blocks(module: nn.Module) -> int:
    """The most weighted members of one nn.Sequential/nn.ModuleList inside ``module`` (its hidden blocks)."""
    counts = [
        sum(weight_layers(child) > 0 for child in m.children())
        for m in module.modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList))
    ]
    return max(counts, default=0)


@contextlib.contextmanager
def preserved_module_state(model: nn.Module) -> Iterator[None]:
    """Undo what running the model's Python code did to its modules' attributes.

    Tracers (fx proxies, export's and the shape pass's fake tensors) and simfx's own
    runs of the model execute forwards that may cache values on modules (Ultralytics'
    Detect keeps its anchors), count their calls, flip ``training``, append to a
    list or update a dict they keep, set attributes of a config they hold, or
    register hooks on their first call and mark that they did (Hugging Face's
    output-capturing hooks); none of it may outlive simfx's run. Attributes are
    restored by binding, the lists, dicts and sets a module holds (its hook
    registries, parameters and submodules among them) by content, and so are the
    attributes of the plain objects it holds and the state of the random generators
    it keeps. State outside the model's modules (a global, a closure) is not restored. Parameter and buffer *contents* are not
    touched by tracing and are not copied.
    """
    saved = [(m, dict(m.__dict__), _containers(m)) for m in model.modules()]
    held = {id(obj): (obj, dict(vars(obj))) for m in model.modules() for obj in _plain_objects(m)}
    generators = [(g, _state(g)) for m in model.modules() for g in vars(m).values() if _state(g) is not None]
    try:
        yield
    finally:
        for generator, state in generators:
            _restore_state(generator, state)
        for obj, attributes in held.values():
            now = obj.__dict__
            for name in [k for k in now if k not in attributes]:
                del now[name]
            for name, value in attributes.items():
                if now.get(name, _ABSENT) is not value:
                    now[name] = value
        for m, attributes, containers in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for container, contents in containers:
                if _same_contents(container, contents):
                    continue
                container.clear()
                if isinstance(container, dict):
                    container.update(contents)
                elif isinstance(container, list):
                    container.extend(contents)
                else:
                    container.update(contents)


def _state(generator: Any) -> Any:
    """The state of a random generator a module holds (torch's, Python's, NumPy's), or None for anything else."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, random.Random):
        return generator.getstate()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None and isinstance(generator, numpy_random.Generator):
        return generator.bit_generator.state
    if numpy_random is not None and isinstance(generator, numpy_random.RandomState):
        return generator.get_state()
    return None


def _restore_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    elif hasattr(generator, "bit_generator"):
        generator.bit_generator.state = state
    else:
        generator.set_state(state)


def _same_contents(container: Any, contents: Any) -> bool:
    if len(container) != len(contents):
        return False
    if isinstance(container, dict):
        return all(k in contents and contents[k] is v for k, v in container.items())
    if isinstance(container, list):
        return all(a is b for a, b in zip(container, contents))
    return container == contents


def _plain_objects(module: nn.Module) -> Iterator[Any]:
    """The plain Python objects a module holds (a config, a schedule), whose attributes a forward may set."""
    for value in vars(module).values():
        if (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type))
                and not callable(value) and not inspect.ismodule(value)):
            yield value


def _containers(module: nn.Module) -> list[tuple[Any, Any]]:
    """(container, a copy of its contents) for each plain list, dict and set a module holds.

    Plain ones only: a library's own dict types (diffusers' ``FrozenDict``) may refuse changes.
    """
    return [
        (value, dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else set(value))
        for value in vars(module).values() if type(value) in _PLAIN_CONTAINERS
    ]


_PLAIN_CONTAINERS = (dict, list, set, collections.OrderedDict, collections.defaultdict)
_ABSENT = object()


@contextlib.contextmanager
def hooks_suppressed(model: nn.Module) -> Iterator[None]:
    """Module hooks do not fire inside: simfx's own runs (shapes, the check) are not the user's steps.

    A feature-capture hook would otherwise receive fake tensors, or store the
    example batch's features.
    """
    saved = []
    for m in model.modules():
        for name in _HOOK_DICTS:
            hooks = m.__dict__.get(name)
            if hooks and not all(getattr(hook, "simfx_tap", False) for hook in hooks.values()):
                saved.append((m, name, hooks))
                # simfx's taps stay: they act only inside its own training steps.
                m.__dict__[name] = type(hooks)((k, h) for k, h in hooks.items() if getattr(h, "simfx_tap", False))
    try:
        yield
    finally:
        for m, name, hooks in saved:
            m.__dict__[name] = hooks


@contextlib.contextmanager
def seeded(seed: int, cuda_devices: Sequence[int] = ()) -> Iterator[None]:
    """torch's (CPU and ``cuda_devices``), Python's and NumPy's generators seeded inside, restored after.

    NumPy counts too: Hugging Face's SpecAugment masks draw with it.
    """
    state = random.getstate()
    numpy_random = sys.modules.get("numpy.random")
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    with torch.random.fork_rng(devices=list(cuda_devices)):
        torch.manual_seed(seed)
        random.seed(seed)
        if numpy_random is not None:
            numpy_random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)
            if numpy_random is not None:
                numpy_random.set_state(numpy_state)


@contextlib.contextmanager
def model_restored(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Buffers (BatchNorm statistics), module attributes and train/eval flags come back; no hook fires.

    Yields a function that resets the buffers, for a second run from the same state.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def reset() -> None:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)

    with preserved_module_state(model), hooks_suppressed(model):
        try:
            yield reset
        finally:
            reset()
