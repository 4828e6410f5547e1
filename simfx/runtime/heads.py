"""SIM at one block: :class:`BoundaryObjective` turns the block's input and output into sampled tokens
(DESIGN steps 1-4, via :mod:`simfx.runtime.tokens`) and hands them to the block's objective module.

Loss maths runs in float32. A block whose sampled activations are not finite
computes on zeros and reports NaN, so the aggregate (:mod:`simfx.runtime.monitor`)
can leave it out with tensor ops: no host sync and no NaN gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..options import SimOptions
from .fused import rho_sim_block_loss, rho_sim_norm_mse
from .objectives import RhoSim, get_objective, sampling_problem
from .tokens import sample_block_tokens

__all__ = ["BoundaryObjective", "build_objective"]


class BoundaryObjective(nn.Module):
    """SIM at one boundary: ``forward(x, y)`` returns this block's float32 loss.

    ``x`` is detached here; gradients reach the block only through ``y``. The
    static layout facts (channel axes, kept widths, sampling) are plain attributes
    fixed at transform time, so the traced train graph has no data-dependent control
    flow.
    """

    def __init__(
        self,
        objective: nn.Module,
        *,
        in_channel_dim: int,
        out_channel_dim: int,
        in_channels: int,
        out_channels: int,
        options: SimOptions,
        uses_input: bool = True,
        min_tokens: int = 1,
        in_batch_dim: int = 0,
        out_batch_dim: int = 0,
    ):
        super().__init__()
        self.objective = objective
        # A sequence-first value (N, B, C) is read batch-first: its channel axis as it is after the move.
        self.in_batch_dim, self.out_batch_dim = in_batch_dim, out_batch_dim
        self.in_channel_dim = _after_batch_move(in_channel_dim, in_batch_dim)
        self.out_channel_dim = _after_batch_move(out_channel_dim, out_batch_dim)
        self.in_channels = in_channels
        self.out_channels = out_channels
        fraction = options.token_fraction
        self.ratio = (fraction.numerator, fraction.denominator)
        self.min_tokens = max(2, min_tokens)
        self.token_sampling = options.token_sampling
        self.uses_input = uses_input

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.in_batch_dim:
            x = x.movedim(self.in_batch_dim, 0)
        if self.out_batch_dim:
            y = y.movedim(self.out_batch_dim, 0)
        sampling = self.sampling()
        if type(self.objective) is RhoSim and torch.compiler.is_compiling():
            loss = rho_sim_block_loss(self.objective, x, y, sampling)  # None where it does not apply
            if loss is not None:
                return loss
        x_tokens, y_tokens, _ = sample_block_tokens(x if self.uses_input else None, y, **sampling)
        if type(self.objective) is RhoSim:
            loss = rho_sim_norm_mse(self.objective, x_tokens, y_tokens)  # None where only the reference applies
            if loss is not None:
                return loss

        # One NaN-propagating reduction per side: as exact as isfinite(t).all() (a NaN
        # or an infinity makes the max non-finite) and several times cheaper on CPU.
        largest = y_tokens.detach().abs().amax()
        if x_tokens is not None:
            largest = torch.maximum(largest, x_tokens.abs().amax())
        finite = torch.isfinite(largest)
        if x_tokens is not None:
            x_tokens = torch.where(finite, x_tokens, 0)
        y_tokens = torch.where(finite, y_tokens, 0)
        loss = self.objective(x_tokens, y_tokens).float()
        return torch.where(finite, loss, float("nan"))

    def sampling(self) -> dict:
        """The keyword arguments of :func:`~simfx.runtime.tokens.sample_block_tokens` for this block."""
        return {"in_channel_dim": self.in_channel_dim, "out_channel_dim": self.out_channel_dim,
                "in_channels": self.in_channels, "out_channels": self.out_channels, "ratio": self.ratio,
                "min_tokens": self.min_tokens, "strategy": self.token_sampling}

    def extra_repr(self) -> str:
        return (
            f"channel_dims=({self.in_channel_dim}, {self.out_channel_dim}), "
            f"channels=({self.in_channels}, {self.out_channels}), "
            f"token_ratio={self.ratio[0]}/{self.ratio[1]}, token_sampling={self.token_sampling!r}"
        )


def _after_batch_move(channel_dim: int, batch_dim: int) -> int:
    """Where the channel axis is once the batch axis moved to the front."""
    if batch_dim == 0:
        return channel_dim
    return channel_dim + 1 if channel_dim < batch_dim else channel_dim


def build_objective(
    options: SimOptions,
    *,
    in_channel_dim: int,
    out_channel_dim: int,
    in_width: int,
    out_width: int,
    in_batch_dim: int = 0,
    out_batch_dim: int = 0,
) -> BoundaryObjective:
    """The module for one boundary from its widths and options (channel sampling applied)."""
    spec = get_objective(options.objective)
    problem = sampling_problem(options, spec)
    if problem:
        raise ValueError(f"{problem}.")
    cin, cout = options.channel_count(in_width), options.channel_count(out_width)
    module = spec.factory(cin, cout, options)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"objective {options.objective!r} factory returned {type(module).__name__}, not an nn.Module."
        )
    return BoundaryObjective(
        module,
        in_channel_dim=in_channel_dim,
        out_channel_dim=out_channel_dim,
        in_channels=cin,
        out_channels=cout,
        options=options,
        uses_input=spec.uses_input,
        min_tokens=spec.min_tokens(options),
        in_batch_dim=in_batch_dim,
        out_batch_dim=out_batch_dim,
    )
