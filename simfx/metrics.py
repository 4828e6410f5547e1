"""Measures for training with SIM: weight spread, and per-block losses for logging.

:func:`weight_std` is the complexity measure of the self-modeling paper
(Premakumar et al., arXiv 2407.10188): the standard deviation of a network's
weights, per layer and pooled, where a narrower distribution reads as a simpler
network.

:func:`log_block_losses` and :class:`BlockLossMeter` report the per-block losses
a transform built with ``per_block=True`` returns. They keep values on the
device and read them back to the host only when asked to log, so a training
loop pays no synchronisation per step. Given a TensorBoard ``SummaryWriter``
they write one scalar per block; :func:`add_block_loss_chart` adds a chart that
draws every block's curve together.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .runtime.module import NAMESPACE

__all__ = ["WeightStd", "weight_std", "log_block_losses", "BlockLossMeter", "add_block_loss_chart"]


# --- weight spread --------------------------------------------------------------


@dataclass(frozen=True)
class WeightStd:
    """What :func:`weight_std` returns.

    Attributes:
        per_layer: ``{layer name: std}`` in ``named_parameters()`` order; the name is
            the parameter's qualified name without a trailing ``.weight``
            (``"layer1.0.conv1"``, ``"attn.in_proj_weight"``).
        overall: the std of all those weights pooled into one population (not the
            mean of the per-layer values: wide layers count more).
        numel: how many weights ``overall`` pools.
    """

    per_layer: dict[str, float] = field(default_factory=dict)
    overall: float = float("nan")
    numel: int = 0

    def __str__(self) -> str:
        width = max([len(n) for n in self.per_layer] + [len("overall")])
        lines = [f"{name.ljust(width)}  {std:.4g}" for name, std in self.per_layer.items()]
        lines.append(f"{'overall'.ljust(width)}  {self.overall:.4g}  ({self.numel} weights)")
        return "\n".join(lines)


def _is_layer_weight(name: str, param: Tensor) -> bool:
    # Weights of conv/linear/attention layers: 2+ dims and named as a weight.
    # Norm scales (1-D), biases, class tokens and position embeddings are not.
    return param.dim() >= 2 and name.rsplit(".", 1)[-1].endswith("weight")


def weight_std(model: nn.Module, *, include_sim: bool = False) -> WeightStd:
    """Standard deviation of the layer weights of ``model``, per layer and pooled.

    A layer weight is a parameter with 2 or more dims whose name ends in ``weight``
    (convolutions, linear layers, attention projections); biases, norm scales and
    embeddings such as class tokens are left out. Stds are unbiased (``N - 1``) and
    computed in float64. Parameters shared between modules count once.

    For a module from :func:`simfx.transform`, the reconstructors under ``simfx.``
    are *not* counted: they are training scaffolding, not the model's weights, and
    :func:`simfx.strip` drops them. Pass ``include_sim=True`` to count them too.

    >>> import torch, simfx
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(1.0); _ = model[2].weight.fill_(-1.0)
    >>> stats = simfx.metrics.weight_std(model)
    >>> stats.per_layer
    {'0': 0.0, '2': 0.0}
    >>> round(stats.overall, 3), stats.numel   # 32 ones and 16 minus ones pooled
    (0.953, 48)
    """
    per_layer: dict[str, float] = {}
    count, total_mean, total_m2 = 0, 0.0, 0.0
    prefix = f"{NAMESPACE}."
    for name, param in model.named_parameters():
        if not _is_layer_weight(name, param) or (not include_sim and name.startswith(prefix)):
            continue
        values = param.detach().to(torch.float64).flatten()
        n = values.numel()
        mean = values.mean().item()
        m2 = (values - mean).square().sum().item()
        per_layer[name.removesuffix(".weight")] = math.sqrt(m2 / (n - 1)) if n > 1 else float("nan")
        # Pool layer by layer (Chan et al.'s parallel update) instead of concatenating
        # every weight: exact, stable, and no copy of the whole model.
        delta = mean - total_mean
        combined = count + n
        total_mean += delta * n / combined
        total_m2 += m2 + delta * delta * count * n / combined
        count = combined
    if not per_layer:
        raise ValueError(
            f"{type(model).__name__} has no layer weight (a parameter of 2+ dims named '*weight')"
            + ("" if include_sim else " outside 'simfx.'")
            + "; weight_std measures conv, linear and attention weights."
        )
    overall = math.sqrt(total_m2 / (count - 1)) if count > 1 else float("nan")
    return WeightStd(per_layer, overall, count)


# --- per-block losses --------------------------------------------------------------


def _block_values(per_block: Mapping[str, Any]) -> dict[str, float]:
    """One host read for every block (a single ``tolist`` instead of an ``item`` each)."""
    if not per_block:
        return {}
    names = list(per_block)
    tensors = [torch.as_tensor(per_block[n]).detach().float().reshape(()) for n in names]
    # Stack on the losses' device, then copy back once.
    values = torch.stack([t.to(tensors[0].device) for t in tensors])
    return dict(zip(names, values.tolist()))


def log_block_losses(
    per_block: Mapping[str, Any],
    step: int | None = None,
    *,
    logger: Any = None,
    writer: Any = None,
    prefix: str = "sim/",
) -> dict[str, float]:
    """Read per-block losses to the host once and send them to a logger and/or a writer.

    Args:
        per_block: ``{block name: loss}``, the third output of a module transformed
            with ``per_block=True`` (or :meth:`BlockLossMeter.compute`'s result).
        step: the global step, passed to ``writer`` and shown in the log line.
        logger: anything with ``.info(str)`` (a :class:`logging.Logger`); gets one line.
        writer: anything with ``.add_scalar(tag, value, global_step)`` (TensorBoard's
            ``SummaryWriter``); gets one scalar per block, tagged ``prefix + name``.
        prefix: tag prefix for ``writer``.

    Returns:
        ``{block name: float}``. A non-finite value (a block skipped this step) is
        reported as ``nan``.

    >>> import torch, simfx
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    >>> sim = simfx.transform(model, torch.randn(8, 4), per_block=True)
    >>> out, sim_loss, per_block = sim(torch.randn(8, 4))
    >>> values = simfx.metrics.log_block_losses(per_block, step=0)
    >>> sorted(values)
    ['0', '1']
    """
    values = _block_values(per_block)
    if logger is not None:
        where = "" if step is None else f"step {step}: "
        logger.info(where + " ".join(f"{name}={value:.4g}" for name, value in values.items()))
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(f"{prefix}{name}", value, step)
    return values


class BlockLossMeter:
    """Running per-block means of SIM losses, accumulated on the device.

    :meth:`update` adds one step's ``per_block`` dict with tensor ops only (no host
    sync); non-finite values (blocks skipped that step) are left out of that
    block's mean. :meth:`compute` reads the means back once; :meth:`log` also sends
    them to a logger/writer and starts a new window.

    >>> import torch, simfx
    >>> meter = simfx.metrics.BlockLossMeter()
    >>> meter.update({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
    >>> meter.update({"a": torch.tensor(3.0), "b": torch.tensor(4.0)})
    >>> meter.compute()
    {'a': 2.0, 'b': 4.0}
    >>> meter.log(step=2)            # returns the means, then resets
    {'a': 2.0, 'b': 4.0}
    >>> meter.steps
    0
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self, per_block: Mapping[str, Tensor]) -> None:
        for name, value in per_block.items():
            value = torch.as_tensor(value).detach().float().reshape(())
            finite = torch.isfinite(value)
            add = torch.where(finite, value, 0.0)
            if name in self._sums:
                self._sums[name] = self._sums[name] + add
                self._counts[name] = self._counts[name] + finite
            else:
                self._sums[name] = add
                self._counts[name] = finite.long()
        self.steps += 1

    def compute(self) -> dict[str, float]:
        """Per-block means since the last reset (``nan`` for a block with no finite value)."""
        means = {
            # 0/0 gives nan for a block that never had a finite value.
            name: self._sums[name] / self._counts[name].float()
            for name in self._sums
        }
        return _block_values(means)

    def log(
        self, step: int | None = None, *, logger: Any = None, writer: Any = None, prefix: str = "sim/"
    ) -> dict[str, float]:
        """:func:`log_block_losses` of the current means, then :meth:`reset`."""
        values = log_block_losses(self.compute(), step, logger=logger, writer=writer, prefix=prefix)
        self.reset()
        return values


def add_block_loss_chart(writer: Any, prefix: str = "sim/", *, title: str = "SIM loss per block") -> None:
    """Add a TensorBoard chart drawing the curve of every block logged under ``prefix``.

    :func:`log_block_losses` and :meth:`BlockLossMeter.log` write one scalar per
    block (``sim/layer1.0``, ``sim/layer1.1``, ...), which TensorBoard's Scalars tab
    shows as one chart each. This writes a layout for its Custom Scalars tab: one
    multi-line chart, in the category ``simfx``, matching every tag that starts
    with ``prefix``, so blocks whose names are not known yet appear too. Call it
    once per writer (TensorBoard keeps one layout per run).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_custom_scalars(layout)``).
        prefix: the tag prefix the losses are logged with.
        title: the chart's title.

    >>> class Writer:                                   # stands in for a SummaryWriter
    ...     def add_custom_scalars(self, layout): self.layout = layout
    >>> writer = Writer()
    >>> add_block_loss_chart(writer)
    >>> writer.layout
    {'simfx': {'SIM loss per block': ['Multiline', ['^sim/.*']]}}
    """
    # TensorBoard reads a multi-line chart's tags as regular expressions.
    writer.add_custom_scalars({"simfx": {title: ["Multiline", [f"^{re.escape(prefix)}.*"]]}})
