"""Per-block SIM options: one frozen record, validated once, shared by every stage.

`transform` builds the defaults from its keyword arguments; `overrides=` replaces
fields for the blocks a selector matches. Nothing here touches a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

TOKEN_SAMPLING = ("shared", "per_sample", "topk_mean")
LOSS_TYPES = ("norm_mse", "mse", "cos", "smooth_l1", "kl")


@dataclass(frozen=True)
class SimOptions:
    """What SIM does at one boundary.

    Attributes:
        objective: name of a registered objective (``"rho_sim"``, ``"self_model"``,
            ``"activation_l2"`` or one added with :func:`simfx.register_objective`).
        beta: weight of this block's loss in ``sim_loss = mean(beta_i * loss_i)``.
        token_ratio: share of token positions sampled per step, in ``(0, 1]``;
            ``k = max(2, floor(token_ratio * N))``.
        channel_ratio: share of leading channels kept on each side, in ``(0, 1]``.
        token_sampling: ``"shared"`` (one draw per batch), ``"per_sample"``, or
            ``"topk_mean"`` (3k candidates per sample, keep the k with the largest
            mean input activation).
        loss: ``"norm_mse"``, ``"mse"``, ``"cos"``, ``"smooth_l1"`` or ``"kl"``.
        dim: latent width ``d`` of the rho_sim reconstructor (projector is
            ``C_in -> 2d -> d -> d``).
        channel_dim: channel axis override. ``None`` infers it from the block's
            first weight layer; an int applies to input and output; a pair gives
            ``(input_axis, output_axis)``.
        primary_input, primary_output: which of a block's tensors SIM reads, as a
            position in ``Boundary.inputs``/``.outputs`` (``find_boundaries`` lists
            them); ``None`` keeps simfx's choice (the input in the output's layout).

    >>> SimOptions().replace(token_ratio=0.5).token_ratio
    0.5
    """

    objective: str = "rho_sim"
    beta: float = 5e-3
    token_ratio: float = 0.2
    channel_ratio: float = 1.0
    token_sampling: str = "shared"
    loss: str = "norm_mse"
    dim: int = 128
    channel_dim: int | tuple[int, int] | None = None
    primary_input: int | None = None
    primary_output: int | None = None

    def __post_init__(self) -> None:
        # NumPy scalars and 0-d tensors (a config loaded from an array, a schedule) are numbers too.
        for name in ("beta", "token_ratio", "channel_ratio", "dim", "primary_input", "primary_output"):
            object.__setattr__(self, name, _plain_number(name, getattr(self, name)))
        _check_ratio("token_ratio", self.token_ratio)
        _check_ratio("channel_ratio", self.channel_ratio)
        if self.token_sampling not in TOKEN_SAMPLING:
            raise ValueError(
                f"token_sampling={self.token_sampling!r} is not one of {TOKEN_SAMPLING}."
            )
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSS_TYPES}.")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}.")
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool):
            raise TypeError(f"beta must be a number, got {type(self.beta).__name__}.")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(
                f"beta must be a finite number >= 0 (the weight of the block's SIM loss), got {self.beta!r}; "
                f"use beta=0 to log a block's loss without training on it."
            )
        for name in ("primary_input", "primary_output"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be None or a position >= 0 among the block's tensors, got {value!r}.")
        cd = self.channel_dim
        if cd is not None:
            pair = cd if isinstance(cd, tuple) else (cd, cd)
            if len(pair) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in pair):
                raise ValueError(
                    f"channel_dim must be None, an int, or an (input, output) pair of ints; got {cd!r}."
                )

    def replace(self, **changes: Any) -> "SimOptions":
        """A copy with some fields changed; unknown names raise a TypeError listing the valid ones."""
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"unknown SIM option(s) {unknown}; valid options are {list(OPTION_NAMES)}."
            )
        return dataclasses.replace(self, **changes)

    @property
    def token_fraction(self) -> Fraction:
        """token_ratio as an exact fraction, so sample counts use integer maths on runtime shapes."""
        return Fraction(self.token_ratio).limit_denominator(1 << 16)

    def channel_count(self, channels: int) -> int:
        """Leading channels kept out of ``channels``: ``max(1, floor(channel_ratio * C))``."""
        frac = Fraction(self.channel_ratio).limit_denominator(1 << 16)
        return max(1, channels * frac.numerator // frac.denominator)

    def channel_dims(self) -> tuple[int | None, int | None]:
        cd = self.channel_dim
        if cd is None or isinstance(cd, tuple):
            return cd if cd is not None else (None, None)
        return cd, cd


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SimOptions))


def merge_options(base: SimOptions, changes: Mapping[str, Any] | None) -> SimOptions:
    return base.replace(**dict(changes)) if changes else base


def _plain_number(name: str, value: Any) -> Any:
    """A NumPy scalar or a one-element 0-d tensor as the Python number it holds; anything else unchanged."""
    if isinstance(value, bool):
        return value
    item = getattr(value, "item", None)
    is_array_scalar = type(value).__module__ == "numpy" and getattr(value, "shape", None) == ()
    is_scalar_tensor = type(value).__name__ in ("Tensor", "Parameter") and getattr(value, "shape", None) == ()
    if callable(item) and (is_array_scalar or is_scalar_tensor):
        value = item()
        if isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got a boolean {type(value).__name__}.")
    return value


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}.")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
