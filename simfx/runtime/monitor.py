"""Say which blocks' SIM losses were skipped for being non-finite, without stalling the device.

``sim_loss`` leaves out block losses that are NaN or infinite with tensor ops
(:func:`weighted_mean_of_finite`), so one overflowing block does not
poison training. Silently, though, that would hide a broken block for weeks:
in eager mode the aggregate node of a transformed module calls
:func:`aggregate_losses` here, which also warns with
:class:`NonFiniteLossWarning` naming the blocks that were skipped.

How the check stays cheap:

* CPU tensors are checked at once (reading a CPU flag costs nothing);
* CUDA flags are copied ``non_blocking`` to pinned host memory behind an
  event; a later call reports them once the event has completed, so no step
  waits for the device (the warning arrives a step or two late); other
  accelerators, without CUDA events, are read back at once;
* under ``torch.compile``, ``torch.export``, fx tracing or a CUDA graph
  capture nothing is checked and the function is exactly the plain aggregate:
  compiled graphs and CUDA graphs stay free of host syncs and side effects.

Python's warning filters apply: by default each call site warns once per
process; ``warnings.simplefilter("always", simfx.NonFiniteLossWarning)``
reports every step, ``"error"`` stops training at the first one.
"""

from __future__ import annotations

import collections
import warnings
from typing import List, Sequence  # typing's List: torch 2.5's schema inference knows only it

import torch
from torch import Tensor

from .fused import compiled_on_cpu


__all__ = ["NonFiniteLossWarning", "aggregate_losses", "weighted_mean_of_finite", "flush"]

# Deferred device checks still waiting for their event; beyond this many the
# oldest is waited for, so a device far behind the host cannot grow the queue.
_MAX_PENDING = 16
_pending: collections.deque = collections.deque()


class NonFiniteLossWarning(UserWarning):
    """Some blocks' SIM losses were NaN or infinite and were left out of ``sim_loss``.

    ``blocks`` holds their names.
    """

    def __init__(self, message: str, blocks: Sequence[str] = ()):
        super().__init__(message)
        self.blocks = tuple(blocks)


def aggregate_losses(losses: Sequence[Tensor], weights: Sequence[float], names: Sequence[str] = ()) -> Tensor:
    """:func:`weighted_mean_of_finite`, warning (eager mode only) about skipped blocks.

    ``names`` are the blocks' names, in the order of ``losses``.
    """
    total, finite = _weighted_mean_and_flags(losses, weights)
    if names and _eager(losses):
        _check(finite, tuple(names))
    return total


def weighted_mean_of_finite(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``mean_i(w_i * loss_i)`` over the finite block losses (0 when none is finite), with tensor ops only."""
    return _weighted_mean_and_flags(losses, weights)[0]


def _weighted_mean_and_flags(losses: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """The weighted mean of the finite losses, and which losses were finite (the monitor reads those)."""
    if torch.compiler.is_compiling():
        if losses and compiled_on_cpu(losses[0]):
            return torch.ops.simfx.weighted_mean_of_finite(list(losses), [float(w) for w in weights])[0], None
        return _weighted_mean_unstacked(losses, weights), None
    stacked = torch.stack(list(losses))
    finite = torch.isfinite(stacked)
    if len(set(weights)) == 1:
        total = torch.where(finite, stacked, 0).sum() * weights[0]
    else:
        weighted = torch.stack([loss * w for loss, w in zip(losses, weights)])
        total = torch.where(finite, weighted, 0).sum()
    return total / finite.sum().clamp(min=1), finite


def _weighted_mean_unstacked(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """The same mean, one scalar at a time: nothing for a monitor to read, but no ``stack``.

    Compiled on a GPU, the losses are the outputs of separate kernels, and inductor would
    copy them into the stack with a kernel per few of them; these scalar ops fuse into a
    kernel or two. On a CPU the aggregate is one operator instead (below).
    """
    flags = [torch.isfinite(loss) for loss in losses]
    same = len(set(weights)) == 1
    total = sum(torch.where(ok, loss if same else loss * w, 0) for ok, loss, w in zip(flags, losses, weights))
    if same:
        total = total * weights[0]
    return total / sum(ok.int() for ok in flags).clamp(min=1)


# --- under torch.compile (CPU): the aggregate as one operator ---------------------------
#
# Unstacked, the aggregate still cost inductor three C++ kernels on a CPU (one in the
# forward, two in the backward), each a compiler run in the first compiled step, for a
# few scalar additions. As an opaque operator it runs the eager aggregate instead; its
# backward is the gradient autograd gives the eager expression, in the same order of
# operations, so compiled and eager agree to the bit: ``(grad / count) * w_i`` for a
# finite loss, 0 for the others.


@torch.library.custom_op("simfx::weighted_mean_of_finite", mutates_args=())
def _aggregate_op(losses: List[Tensor], weights: List[float]) -> tuple[Tensor, Tensor]:
    """``(weighted mean of the finite losses, which were finite)``: the eager aggregate."""
    return _weighted_mean_and_flags(losses, weights)


@_aggregate_op.register_fake
def _(losses, weights):
    total = losses[0].new_empty((), dtype=torch.result_type(losses[0], 1.0))
    return total, losses[0].new_empty((len(losses),), dtype=torch.bool)


def _setup_aggregate(ctx, inputs, output):
    ctx.weights = inputs[1]
    ctx.save_for_backward(output[1])


def _aggregate_backward(ctx, grad, _):
    (finite,) = ctx.saved_tensors
    return torch.ops.simfx.weighted_mean_of_finite_backward(grad, finite, ctx.weights), None


_aggregate_op.register_autograd(_aggregate_backward, setup_context=_setup_aggregate)


@torch.library.custom_op("simfx::weighted_mean_of_finite_backward", mutates_args=())
def _aggregate_backward_op(grad: Tensor, finite: Tensor, weights: List[float]) -> List[Tensor]:
    """Each loss's gradient: ``(grad / count) * w_i`` where finite, 0 elsewhere."""
    scaled = grad / finite.sum().clamp(min=1)
    return [torch.where(ok, scaled * w, 0) for ok, w in zip(finite.unbind(), weights)]


@_aggregate_backward_op.register_fake
def _(grad, finite, weights):
    return [grad.new_empty(()) for _ in weights]


def flush() -> None:
    """Wait for and report every deferred device check (for tests, or at the end of training)."""
    while _pending:
        flags, names, event = _pending.popleft()
        event.synchronize()
        _report(flags, names)


def _eager(losses: Sequence[Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return False
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return False
    first = losses[0] if losses else None
    if not isinstance(first, Tensor) or isinstance(first, torch.fx.Proxy):
        return False
    if first.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # a CUDA graph being captured by hand: no host copies or events in it
    # Fake and functional tensors (export, AOT tracing) have no values to read.
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(first, FakeTensor) and not torch._is_functional_tensor(first)


def _check(finite: Tensor, names: tuple[str, ...]) -> None:
    _drain_completed()
    if finite.device.type != "cuda":
        _report(finite.cpu(), names)
        return
    host = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
    host.copy_(finite, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(finite.device))  # the copy's stream, on the loss's GPU
    _pending.append((host, names, event))
    if len(_pending) > _MAX_PENDING:
        flags, old_names, old_event = _pending.popleft()
        old_event.synchronize()
        _report(flags, old_names)


def _drain_completed() -> None:
    while _pending and _pending[0][2].query():
        flags, names, _ = _pending.popleft()
        _report(flags, names)


def _report(finite: Tensor, names: tuple[str, ...]) -> None:
    if bool(finite.all()):
        return
    skipped = [name for name, ok in zip(names, finite.tolist()) if not ok]
    counted = len(names) - len(skipped)
    warnings.warn(
        NonFiniteLossWarning(
            f"simfx: the SIM loss of block(s) {', '.join(repr(n) for n in skipped)} was NaN or infinite and "
            f"was left out of sim_loss ({counted} of {len(names)} blocks counted). Its activations are not "
            f"finite: look for an overflow in that block (float16: train with bf16 or a GradScaler), or leave "
            f"it out with simfx.transform(..., exclude=[{skipped[0]!r}]).",
            skipped,
        ),
        stacklevel=3,
    )
