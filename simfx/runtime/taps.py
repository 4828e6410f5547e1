"""The model runtime: the model's own forward trains, and SIM reads the chosen blocks at their module calls.

For a model captured for analysis only, :class:`~simfx.SimGraphModule` calls the
model itself in training, exactly as the user calls it, inside a
:func:`training_step`. Each block's ``x`` and ``y`` are read by a :class:`Tap`, a
forward pre-hook (arguments, before the module runs) or forward hook (result)
on the module call the analysis found (:mod:`simfx.analysis.taps`). When the
``y`` of a block is read, its reconstructor runs on the ``x`` read before it, and
the loss joins the step's. Everything else is the model's own Python: hooks,
checkpointing, adapters, custom operators, Python state, any input shape.

The taps stay registered on the user's modules for the life of the transformed
module (removed when it is garbage-collected) and do nothing outside its
training steps: eval mode, the stripped model and other models sharing the
modules run exactly as without them. They return None, so they never change a
value. Under ``torch.compile`` they are traced like any hook.

Invariants:

* a tap fires for the ``call``-th call of its module in a step only; a block
  whose ``y`` tap fires before its ``x`` tap (the model skipped it, as LayerDrop
  does) adds no loss that step;
* ``x`` is detached by the reconstructor; gradients reach the block only through
  ``y``, the very tensor the model goes on with;
* inside ``torch.utils.checkpoint`` (non-reentrant) the reconstructor's saved
  tensors are kept as plain references, so the recomputation in backward, which
  runs the module's hooks again outside any step, finds what it expects;
* a block read with gradients off during a step that has them on (a reentrant
  checkpoint runs its forward so) is an error naming the block and the fix.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import FaithfulnessError

__all__ = [
    "Tap", "TapOwner", "TapSpec", "install_taps", "remove_taps_when_collected", "taps_removed", "training_step",
]

# The training steps in progress, innermost last: (owner, heads, names, xs, counts, losses, grad mode).
_STEPS: list = []


class TapOwner:
    """The identity tying taps to one transformed module's steps (a deep copy of the module gets a copy of it).

    It counts the live transformed modules using the taps (a shallow copy shares them);
    the count is not copied.
    """

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class TapSpec:
    """Plain data of one tap: block ``index`` (in plan order), ``role`` ("x" or "y"), and where it reads."""

    index: int
    role: str
    module: str
    call: int
    side: str
    path: tuple


class Tap:
    """A forward hook (``side="output"``) or pre-hook (``"input"``) reading one value for one block.

    Picklable and copyable plain data; ``owner`` ties it to its transformed module's
    training steps. Hook checks leave taps out (``simfx_tap``): they never change a value.
    """

    simfx_tap = True

    def __init__(self, owner: TapOwner, number: int, spec: TapSpec):
        self.owner = owner
        self.number = number  # this tap's slot in the step's call counts
        self.spec = spec

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, *output: Any) -> None:
        if not _STEPS:
            return None
        owner, heads, names, xs, counts, losses, grad_enabled = _STEPS[-1]
        if owner is not self.owner:
            return None
        seen = counts.get(self.number, 0)
        counts[self.number] = seen + 1
        spec = self.spec
        if seen != spec.call:
            return None
        value = _read(output[0], spec.path) if spec.side == "output" else _read_argument(args, kwargs, spec.path)
        if spec.role == "x":
            xs[spec.index] = value
            return None
        x = xs.get(spec.index)
        if x is None:
            return None  # the model did not run this block's input side this step
        if grad_enabled and not torch.is_grad_enabled():
            raise FaithfulnessError(
                f"block '{names[spec.index]}' ran with gradients off in a training step (inside torch.no_grad() or a "
                f"reentrant torch.utils.checkpoint), so SIM cannot train it. Checkpoint with use_reentrant=False "
                f"(Hugging Face: gradient_checkpointing_kwargs={{'use_reentrant': False}}), or exclude the block: "
                f"transform(..., exclude=['{names[spec.index]}'])."
            )
        losses[spec.index] = _block_loss(heads[spec.index], x, value)
        return None


def _block_loss(head: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    if not torch.compiler.is_compiling() and _inside_checkpoint():
        # Kept out of the checkpoint's recomputation: its backward replay runs no step.
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            return head(x, y)
    return head(x, y)


def _same(tensor: Tensor) -> Tensor:
    return tensor


def _inside_checkpoint() -> bool:
    """Saved-tensor hooks of ``torch.utils.checkpoint`` may be in effect.

    torch < 2.6 cannot say which hooks are in effect: there, any could be.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    hooks = top(False)
    pack = hooks[0] if hooks else None
    return pack is not None and "checkpoint" in (getattr(pack, "__module__", "") or "")


def _read(value: Any, path: Sequence[tuple]) -> Any:
    for kind, key in path:
        value = value[key] if kind == "item" else getattr(value, key)
    return value


def _read_argument(args: tuple, kwargs: dict, path: Sequence[tuple]) -> Any:
    head, rest = path[0], path[1:]
    if head[0] == "arg":
        _, position, name = head
        value = args[position] if position < len(args) else kwargs[name]
    else:
        value = kwargs[head[1]] if head[1] in kwargs else None
    return _read(value, rest)


def install_taps(model: nn.Module, specs: Sequence[TapSpec]) -> tuple[TapOwner, list[Tap]]:
    """Register a tap per spec on ``model``'s modules; the owner the training steps use, and the taps."""
    owner = TapOwner()
    taps = [Tap(owner, number, spec) for number, spec in enumerate(specs)]
    for tap in taps:
        module = model.get_submodule(tap.spec.module)
        if tap.spec.side == "input":
            module.register_forward_pre_hook(tap, with_kwargs=True)
        else:
            module.register_forward_hook(tap, with_kwargs=True)
    return owner, taps


def remove_taps_when_collected(holder: Any, model: nn.Module, taps: Sequence[Tap]) -> None:
    """Take ``taps`` off ``model``'s modules once ``holder``, and every other module using them, is collected."""
    owner = taps[0].owner
    owner.__dict__["holders"] = owner.__dict__.get("holders", 0) + 1
    weakref.finalize(holder, _release, owner, model, frozenset(map(id, taps)))


def _release(owner: TapOwner, model: nn.Module, ids: frozenset[int]) -> None:
    owner.__dict__["holders"] -= 1
    if owner.__dict__["holders"]:
        return
    for module in model.modules():
        for hooks, with_kwargs in ((module._forward_hooks, module._forward_hooks_with_kwargs),
                                   (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs)):
            for key in [k for k, hook in hooks.items() if id(hook) in ids]:
                del hooks[key]
                with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


@contextlib.contextmanager
def taps_removed(model: nn.Module) -> Iterator[None]:
    """``model`` without simfx's taps inside (a pickled checkpoint then needs no simfx to load), then with them."""
    taken = []
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(module, name)
            for key in [k for k, hook in hooks.items() if isinstance(hook, Tap)]:
                taken.append((hooks, key, hooks.pop(key)))
    try:
        yield
    finally:
        for hooks, key, hook in taken:
            hooks[key] = hook


def training_step(owner: TapOwner, heads: Sequence[nn.Module], names: Sequence[str], run) -> tuple[Any, list]:
    """``run()`` (the model's forward) with this owner's taps reading; its result and each block's loss or None."""
    losses: dict[int, Tensor] = {}
    _STEPS.append((owner, heads, names, {}, {}, losses, torch.is_grad_enabled()))
    try:
        output = run()
    finally:
        _STEPS.pop()
    return output, [losses.get(i) for i in range(len(heads))]
