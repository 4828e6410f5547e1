"""simfx inside the libraries people already train with, one small module per library.

Each module imports its library only when used, so ``import simfx`` never imports
transformers, Ultralytics, Lightning, Accelerate or TensorBoard:

* :mod:`simfx.integrations.timm`: timm's notrace marks, honoured automatically
  (registered here, read from timm only once the user has imported it);
* :mod:`simfx.integrations.transformers`: :class:`SimLossCallback` puts ``sim_loss``
  into ``transformers.Trainer``'s logs (the loss itself comes from
  ``simfx.transform(..., loss_in_output=True)``);
* :mod:`simfx.integrations.ultralytics`: :class:`SimDetectionTrainer`, passed as
  ``YOLO(...).train(trainer=...)``;
* :mod:`simfx.integrations.lightning`: :func:`log_sim_losses` logs the SIM loss and
  each block's through ``LightningModule.log``.

Accelerate needs no code: ``accelerator.prepare(sim, optimizer, loader)`` works as
for any module (see the README).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from . import timm  # noqa: F401  (registers timm's notrace marks as registry sources)

__all__: list[str] = []


def _lazy_classes(namespace: dict[str, Any], builders: Mapping[str, Callable[[], type]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` building each class on first access, then keeping it in the module.

    The classes subclass a library's own (``TrainerCallback``, ``DetectionTrainer``), so
    building them imports that library: importing the integration module does not.
    """

    def __getattr__(name: str) -> Any:
        if name in builders:
            namespace[name] = built = builders[name]()
            return built
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    return __getattr__
