"""Train Ultralytics YOLO with SIM through Ultralytics' own trainer: ``YOLO(...).train(trainer=SimDetectionTrainer)``.

The trainer is Ultralytics' ``DetectionTrainer`` with one change: the model it
trains is transformed by :func:`simfx.transform`, and every training step
minimises the detection loss plus ``sim_loss``. Everything else is
Ultralytics': data, augmentation, optimizer, warmup, EMA, validation, logging
and checkpoints.

* **The loss.** Ultralytics' criterion returns its components (box, cls, dfl)
  multiplied by the batch size; SIM joins them as one more component, so what
  is minimised is ``batch size * (detection components + sim_loss)``. The
  progress bar and ``results.csv`` show it as the column ``sim_loss``
  (``train/sim_loss``); validation runs the model itself, so there is no
  ``val/sim_loss``.
* **The model.** The trainer's model stays Ultralytics' ``DetectionModel``: the
  reconstructors are its child ``simfx`` while it trains (so the optimizer, the
  device move and EMA see them under the same ``simfx.`` names as
  ``sim.state_dict()``), and its ``loss`` runs the SIM graph.
* **Checkpoints.** ``last.pt``/``best.pt`` hold the plain model: the EMA copy is
  saved without the reconstructors and without the SIM loss, so ``YOLO("best.pt")``
  loads and predicts without simfx installed.

SIM options go in the class attribute ``sim_options`` (any keyword of
:func:`simfx.transform`); subclass to change them::

    class MyTrainer(SimDetectionTrainer):
        sim_options = {"beta": 1e-2, "blocks": "model.[2-8].*"}

    YOLO("yolo11n.yaml").train(data="data.yaml", trainer=MyTrainer)

Ultralytics models are captured with ``torch.export`` for analysis
(``frontend="export"`` by default here: fx keeps most of a YOLO opaque, and
``frontend="auto"`` would try it first), and train by running their own forward,
so ``multi_scale`` and ``rect`` training work at every image size. Refused:
``compile=True`` (Ultralytics then computes the loss outside the model's forward)
and ``resume`` (the checkpoints do not keep the reconstructors).
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType, MethodType
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..api import transform
from ..runtime.module import NAMESPACE, SimGraphModule
from ..runtime.taps import taps_removed
from . import _lazy_classes

__all__ = ["SimDetectionTrainer", "SIM_LOSS"]

SIM_LOSS = "sim_loss"
"""The loss column SIM adds to Ultralytics' (``train/sim_loss`` in ``results.csv``)."""

_SIM = "_simfx_sim"


class _SimOf:
    """The transformed module of the model holding this; copies of that model hold none.

    Ultralytics deep-copies the model it trains (EMA, checkpoints): a copy must
    compute its own plain loss, not run the original's SIM graph.
    """

    def __init__(self, sim: SimGraphModule | None):
        self.sim = sim

    def __deepcopy__(self, memo: dict) -> "_SimOf":
        return _SimOf(None)


def _loss_with_sim(model: nn.Module, batch: dict, preds: Any = None):
    """``model.loss`` while training with SIM: the model's own loss on the SIM graph's predictions, plus SIM.

    Called with ``preds`` (Ultralytics' validator, on the EMA copy), in eval mode or
    on a copy of the model, it is the model's own loss.
    """
    sim = model.__dict__[_SIM].sim
    plain_loss = type(model).loss
    if sim is None or preds is not None or not model.training:
        return plain_loss(model, batch, preds)
    preds, sim_loss = sim(batch["img"])
    loss, items = plain_loss(model, batch, preds)
    # Ultralytics' criteria return per-component losses times the batch size; SIM is one more component.
    batch_size = batch["img"].shape[0]
    loss = torch.cat([loss.reshape(-1), (sim_loss * batch_size).reshape(1).to(loss.dtype)])
    return loss, {**items, SIM_LOSS: sim_loss.detach()}


def _attach(model: nn.Module, sim: SimGraphModule) -> None:
    model.add_module(NAMESPACE, sim.get_submodule(NAMESPACE))
    model.__dict__[_SIM] = _SimOf(sim)
    model.__dict__["loss"] = MethodType(_loss_with_sim, model)


@contextlib.contextmanager
def _without_sim(model: nn.Module) -> Iterator[None]:
    """``model`` as Ultralytics built it (no reconstructors, no taps, its own ``loss``) inside the block."""
    reconstructors = model._modules.pop(NAMESPACE, None)
    attributes = {name: model.__dict__.pop(name) for name in ("loss", _SIM) if name in model.__dict__}
    try:
        with taps_removed(model):
            yield
    finally:
        if reconstructors is not None:
            model._modules[NAMESPACE] = reconstructors
        model.__dict__.update(attributes)


# Ultralytics options the SIM graph cannot follow, and why.
_UNSUPPORTED = {
    "compile": "Ultralytics then computes the loss outside the model's forward, where SIM is not",
    "resume": "its checkpoints hold the plain model, without the reconstructors",
}


# The first Ultralytics whose criteria return their loss items as a dict (named columns);
# before it they were a tensor with names kept elsewhere, which SIM's column cannot join.
_FIRST_VERSION = "8.4.104"


def _refuse_unsupported(trainer: str, args: Any) -> None:
    import ultralytics
    from ultralytics.utils.checks import check_version

    if not check_version(ultralytics.__version__, f">={_FIRST_VERSION}"):
        raise ImportError(
            f"{trainer} needs ultralytics>={_FIRST_VERSION} (loss items as a dict, so the SIM loss can join them "
            f"as a column); found {ultralytics.__version__}. Upgrade: pip install -U ultralytics"
        )
    for option, why in _UNSUPPORTED.items():
        value = getattr(args, option, None)
        if value:
            raise ValueError(
                f"{trainer} does not support {option}={value!r}: {why}. Train without it (its default), "
                f"or train without SIM."
            )


class _SimTrainerMixin:
    """What SIM changes in an Ultralytics trainer; mixed into its trainer classes."""

    sim_options: Mapping[str, Any] = MappingProxyType({"frontend": "export"})

    def __init__(self, cfg: Any = None, overrides: dict | None = None, _callbacks: Any = None) -> None:
        from ultralytics.cfg import get_cfg
        from ultralytics.utils import DEFAULT_CFG

        cfg = DEFAULT_CFG if cfg is None else cfg
        _refuse_unsupported(type(self).__name__, get_cfg(cfg, overrides))
        super().__init__(cfg, overrides, _callbacks)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """The task's model, transformed at the training image size, with SIM in its training loss."""
        from ultralytics.utils.checks import check_imgsz

        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        stride = max(int(model.stride.max()), 32)
        size = check_imgsz(self.args.imgsz, stride=stride, floor=stride, max_dim=1)
        channels = self.data.get("channels", 3)
        # A generator of its own, so the transform leaves the training RNG where Ultralytics set it.
        example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
        sim = transform(model, example, **{**_SimTrainerMixin.sim_options, **self.sim_options})
        _attach(model, sim)
        return model

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        """Ultralytics' loss columns; validation runs the model itself, so it has no SIM loss column."""
        items = super().label_loss_items(loss_items, prefix)
        if prefix == "train":
            return items
        column = f"{prefix}/{SIM_LOSS}"
        if isinstance(items, dict):
            return {k: v for k, v in items.items() if k != column}
        return [k for k in items if k != column]

    def save_model(self) -> bool:
        """Ultralytics' checkpoints, of the plain model (the EMA copy without reconstructors or SIM loss)."""
        with _without_sim(self.ema.ema):
            return super().save_model()

    def _handle_nan_recovery(self, epoch: int) -> bool:
        # The recovery checkpoint holds the plain model: restore the model's own weights from it
        # (and rebuild EMA without reconstructors); the reconstructors keep theirs.
        from ultralytics.utils.torch_utils import unwrap_model

        with _without_sim(unwrap_model(self.model)), _without_sim(self.ema.ema):
            return super()._handle_nan_recovery(epoch)


def _sim_detection_trainer() -> type:
    from ultralytics.models.yolo.detect import DetectionTrainer

    class SimDetectionTrainer(_SimTrainerMixin, DetectionTrainer):
        """Ultralytics' ``DetectionTrainer``, training the model with SIM (see :mod:`simfx.integrations.ultralytics`).

        >>> from simfx.integrations.ultralytics import SimDetectionTrainer
        >>> dict(SimDetectionTrainer.sim_options)
        {'frontend': 'export'}
        """

    SimDetectionTrainer.__module__ = __name__
    SimDetectionTrainer.__qualname__ = "SimDetectionTrainer"
    return SimDetectionTrainer


__getattr__ = _lazy_classes(globals(), {"SimDetectionTrainer": _sim_detection_trainer})
