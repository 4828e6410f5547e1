"""Log SIM losses from a LightningModule through ``self.log``, to whatever logger the Trainer has.

A LightningModule holding a transformed model needs nothing special to train:
its ``training_step`` adds ``sim_loss`` to the task loss. :func:`log_sim_losses`
logs the SIM loss and, with ``per_block=True``, each block's loss, through
Lightning's own ``LightningModule.log``, so they go to the Trainer's logger
(TensorBoard, CSV, W&B, ...) with Lightning's step and aggregation rules::

    out, sim_loss, per_block = self.sim(images)
    loss = F.cross_entropy(out, labels) + sim_loss
    log_sim_losses(self, sim_loss, per_block)

Nothing here imports Lightning: the function only calls the module's ``log``.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

__all__ = ["log_sim_losses"]


def log_sim_losses(
    module: Any,
    sim_loss: Tensor,
    per_block: Mapping[str, Tensor] | None = None,
    *,
    name: str = "sim_loss",
    **log_options: Any,
) -> None:
    """Log ``sim_loss`` as ``name`` and each block's loss as ``name/<block>`` through ``module.log``.

    Args:
        module: the LightningModule (``self`` in ``training_step``).
        sim_loss: the transformed module's second output.
        per_block: its third output with ``per_block=True`` (``{block: loss}``), or None.
        name: the key of the SIM loss; blocks get ``name + "/" + block``.
        log_options: passed to every ``module.log`` call (``on_step``, ``on_epoch``,
            ``prog_bar``, ``sync_dist``, ...).

    The values stay tensors: Lightning reads them back when its logger writes.

    >>> import torch
    >>> class Module:                                   # stands in for a LightningModule
    ...     def __init__(self): self.logged = {}
    ...     def log(self, key, value, **options): self.logged[key] = float(value)
    >>> module = Module()
    >>> log_sim_losses(module, torch.tensor(0.5), {"layer1.0": torch.tensor(2.0)})
    >>> module.logged
    {'sim_loss': 0.5, 'sim_loss/layer1.0': 2.0}
    """
    module.log(name, sim_loss.detach(), **log_options)
    for block, loss in (per_block or {}).items():
        module.log(f"{name}/{block}", loss.detach(), **log_options)
