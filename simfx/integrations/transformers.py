"""Train a transformed Hugging Face model in ``transformers.Trainer``, with ``sim_loss`` in its logs.

The loss needs no code here: transform with ``loss_in_output=True`` and the
module returns the model's own output type, whose ``loss`` is the task loss plus
``sim_loss`` in training (when labels were given), which is what ``Trainer``
minimises. :class:`SimLossCallback` adds the SIM loss to what ``Trainer`` logs::

    sim = simfx.transform(model, example_batch, loss_in_output=True)
    trainer = Trainer(model=sim, args=args, train_dataset=train, callbacks=[SimLossCallback()])

The callback reads ``sim_loss`` (and, with ``per_block=True``, each block's loss)
from the module's training outputs with a forward hook, keeps the running sums
on the device, and at each logging step adds their means since the last one to
the log: ``sim_loss`` and ``sim_loss/<block>``. They reach
``trainer.state.log_history``, the progress bar, and every callback after this
one; ``Trainer`` runs its ``report_to`` integrations first, so list those after
it (``report_to="none"``, ``callbacks=[SimLossCallback(), TensorBoardCallback()]``)
to have them record it too. The values are this process's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..metrics import BlockLossMeter
from ..runtime.module import SimGraphModule, model_accepts_loss_kwargs
from . import _lazy_classes

__all__ = ["SimLossCallback", "SIM_LOSS"]

SIM_LOSS = "sim_loss"
"""The log key of the SIM loss; blocks are logged as ``sim_loss/<block>``."""


def _transformed(model: Any) -> SimGraphModule:
    """The SimGraphModule behind ``model`` (through ``torch.compile`` and DDP-style wrappers)."""
    seen = model
    while not isinstance(seen, SimGraphModule):
        inner = next((getattr(seen, a) for a in ("_orig_mod", "module") if hasattr(seen, a)), None)
        if not isinstance(inner, nn.Module):
            raise TypeError(
                f"SimLossCallback needs the Trainer's model to be a module from simfx.transform(..., "
                f"loss_in_output=True); got {type(model).__name__}. Transform the model and pass the result "
                f"as Trainer(model=...)."
            )
        seen = inner
    if not seen.simfx_info.loss_in_output:
        raise ValueError(
            "SimLossCallback needs simfx.transform(..., loss_in_output=True): transformers.Trainer reads the "
            "loss from the model's output, so the transformed module must return the model's own output "
            "type with sim_loss added to its loss."
        )
    return seen


class _Recorder:
    """Running SIM losses of the training steps since the last log, kept on the device."""

    def __init__(self) -> None:
        self.meter = BlockLossMeter()
        self.handle: Any = None

    def attach(self, sim: SimGraphModule) -> None:
        self.detach()
        self.meter.reset()
        self.handle = sim.register_forward_hook(self._record)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training or SIM_LOSS not in output:
            return
        values = {SIM_LOSS: output[SIM_LOSS]}
        values.update({f"{SIM_LOSS}/{name}": loss for name, loss in output.get("sim_losses", {}).items()})
        self.meter.update(values)

    def read(self) -> dict[str, float]:
        """Means since the last read (``{}`` when no training step ran), then a new window."""
        if not self.meter.steps:
            return {}
        values = self.meter.compute()
        self.meter.reset()
        return values


def _check_loss_scaling(sim: SimGraphModule, args: Any) -> None:
    """Refuse gradient accumulation where the Trainer would scale the loss otherwise than for the model.

    ``Trainer`` passes ``num_items_in_batch`` to a model whose forward takes ``**kwargs``
    (every Hugging Face model), which divides its summed loss by it; a module that
    does not take it gets its loss divided by the accumulation steps instead. With
    one step per update both agree; with more, token losses of uneven batches weigh
    differently, so the transformed module must take ``num_items_in_batch`` too.
    """
    if getattr(args, "gradient_accumulation_steps", 1) <= 1 or sim.accepts_loss_kwargs:
        return
    model = sim.simfx_model()
    if model_accepts_loss_kwargs(model):
        raise ValueError(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}: transformers.Trainer passes "
            f"num_items_in_batch to {type(model).__name__}, which scales its loss by it, but the transformed module "
            f"was captured without it, so its loss would be scaled differently. Add it to the example: "
            f"simfx.transform(model, {{**batch, 'num_items_in_batch': torch.tensor(n)}}, loss_in_output=True)."
        )


def _callback_class() -> type:
    from transformers import TrainerCallback

    class SimLossCallback(TrainerCallback):
        """Adds ``sim_loss`` (and ``sim_loss/<block>``) to ``transformers.Trainer``'s training logs.

        See :mod:`simfx.integrations.transformers`. The Trainer's model must come from
        ``simfx.transform(..., loss_in_output=True)``; anything else is refused when
        training starts.
        """

        def __init__(self) -> None:
            self._recorder = _Recorder()

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            sim = _transformed(model)
            if getattr(args, "label_smoothing_factor", 0):
                raise ValueError(
                    f"label_smoothing_factor={args.label_smoothing_factor}: transformers.Trainer then computes "
                    f"the loss from the logits and ignores outputs.loss, so sim_loss would not be trained. Pass "
                    f"compute_loss_func= a function returning your smoothed loss plus outputs['sim_loss'] (and "
                    f"transform with an example without labels: the Trainer takes them out of the batch)."
                )
            _check_loss_scaling(sim, args)
            self._recorder.attach(sim)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            # Training logs carry "loss"; evaluation and the end-of-training summary do not.
            if logs is None or "loss" not in logs:
                return
            values = self._recorder.read()
            logs.update(values)
            # Trainer appended its copy of these logs to the history just before calling back.
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                last.update(values)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._recorder.detach()

    SimLossCallback.__module__ = __name__
    SimLossCallback.__qualname__ = "SimLossCallback"
    return SimLossCallback


__getattr__ = _lazy_classes(globals(), {"SimLossCallback": _callback_class})
