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

import contextlib
import random
import sys
from typing import Callable, Iterator, Sequence

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

    Tracers (fx proxies, export's and the shape pass's fake tensors) run forwards
    that may cache values on modules (Ultralytics' Detect keeps its anchors) or
    flip ``training``; those values must not outlive the trace. Hook registries
    are restored by content, since a forward may register hooks on its first call
    and mark that it did (Hugging Face's output-capturing hooks): both the hooks
    and the mark go. Parameter and buffer *contents* are not touched by tracing
    and are not copied.
    """
    saved = [
        (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules), _hook_registries(m))
        for m in model.modules()
    ]
    try:
        yield
    finally:
        for m, attributes, parameters, buffers, modules, registries in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for container, contents in ((m._parameters, parameters), (m._buffers, buffers), (m._modules, modules),
                                        *registries):
                container.clear()
                container.update(contents)


def _hook_registries(module: nn.Module) -> list[tuple[dict, dict]]:
    """(registry, its contents now) for each of a module's hook dictionaries."""
    return [(value, dict(value)) for name, value in vars(module).items() if "hooks" in name and isinstance(value, dict)]


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
