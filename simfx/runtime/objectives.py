"""Objectives: what is computed at each boundary, and how block losses are combined.

Every boundary gets one :class:`BoundaryObjective`. It turns the block's input
``x`` and output ``y`` into sampled ``(B, k, C)`` tokens (DESIGN steps 1-4, via
:mod:`simfx.tokens`) and hands them to an *objective* module from the registry:

``rho_sim`` (default)
    The paper's reconstructor. ``pre_proj`` (``C_out -> C_in``, no bias, only if the
    widths differ), one shared projector ``C_in -> 2d -> d -> d`` with ReLUs and a
    ``d -> d`` predictor. Target ``zx = proj(x)`` without gradient; prediction
    ``zy = predictor(proj(pre_proj(y)))``; loss ``norm_mse`` unless set otherwise.
``self_model``
    A linear self-model predicts the block's own output tokens: ``mean ||W a + b - a||^2``
    with the target detached (Premakumar et al., arXiv 2407.10188).
``activation_l2``
    ``mean ||a||^2``, the plain activation penalty.

Add your own with :func:`register_objective`: any ``nn.Module`` built from
``(in_channels, out_channels, options)`` whose ``forward(x_tokens, y_tokens)``
returns a scalar.

Loss maths runs in float32. A block whose sampled activations are not finite
computes on zeros and reports NaN; :func:`aggregate_losses` averages only the
finite block losses, with tensor ops, so no host sync and no NaN gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..options import SimOptions
from .tokens import input_tokens_on_output_grid, sample_count, sample_pair, to_tokens

__all__ = [
    "BoundaryObjective",
    "ObjectiveSpec",
    "RhoSim",
    "SelfModel",
    "ActivationL2",
    "register_objective",
    "get_objective",
    "objective_names",
    "sim_loss_value",
    "aggregate_losses",
]

_EPS = 1e-6


# --- loss functions (float32 in, scalar out) --------------------------------


def _standardise(z: Tensor) -> Tensor:
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + _EPS)


def norm_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Standardise over tokens (per sample and feature, unbiased std), L2 over features, mean."""
    if prediction.shape[1] < 2:
        # The standardisation is undefined for one token (a (B, C) block at batch 1):
        # the block contributes 0, through a graph that still reaches every
        # reconstructor parameter (zero gradients), so DDP sees all of them used.
        return prediction.sum() * 0.0
    if _use_fast_norm_mse(prediction, target):
        return _NormMSE.apply(prediction, target)
    return norm_mse_reference(prediction, target)


def norm_mse_reference(prediction: Tensor, target: Tensor) -> Tensor:
    """``norm_mse`` as the plain autograd expression: the definition, and the path under torch.compile.

    The eager path of :func:`norm_mse` equals it up to float rounding, value and gradient.
    """
    return torch.linalg.vector_norm(_standardise(prediction) - _standardise(target), dim=-1).mean()


def _use_fast_norm_mse(prediction: Tensor, target: Tensor) -> bool:
    # Eager autograd records a dozen small nodes for the expression; one Function
    # with the analytic gradient is cheaper (and its sums beat Tensor.std without
    # gradients too). Under torch.compile the plain expression is better: the
    # compiler fuses it and differentiates it itself. The Function differentiates
    # w.r.t. the prediction only, so a target that needs a gradient takes the
    # expression.
    return not (target.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


def _centred_and_std(z: Tensor) -> tuple[Tensor, Tensor]:
    """``z - mean`` and the unbiased std over tokens, as sums (what ``Tensor.std`` computes).

    On CPU, ``Tensor.std`` and ``vector_norm`` over these small ``(B, k, d)`` tensors
    ran 10-40x slower than the sums of squares written out (about 1 ms against
    30 us), which made them the largest part of the eager loss.
    """
    centred = z - z.mean(dim=1, keepdim=True)
    return centred, (centred * centred).sum(dim=1, keepdim=True).div(z.shape[1] - 1).sqrt()


class _NormMSE(torch.autograd.Function):
    """norm_mse with a hand-derived backward (prediction side; the target is a constant).

    Forward: the maths of :func:`norm_mse_reference` with the std and the L2 norm
    written as sums of squares (equal up to float rounding). With
    ``c = p - mean_k p``, ``s = std_k(p)`` (unbiased), ``a = c / (s + eps)``,
    ``r = a - standardise(t)`` and ``n = ||r||`` over features, the loss is
    ``mean(n)`` over B*k rows. Backward:
    ``g_a = g r / (B k n)`` (0 where ``n = 0``, like torch's norm),
    ``g_c = g_a / (s + eps) - c * sum_k(g_a c) / ((s + eps)^2 (k - 1) s)``
    (the second term 0 where ``s = 0``, like torch's std), and
    ``g_p = g_c - mean_k g_c``.
    """

    @staticmethod
    def forward(ctx, prediction: Tensor, target: Tensor) -> Tensor:
        centred, std = _centred_and_std(prediction)
        scale = std + _EPS
        target_centred, target_std = _centred_and_std(target)
        residual = centred / scale - target_centred / (target_std + _EPS)
        norms = (residual * residual).sum(dim=-1).sqrt()
        ctx.save_for_backward(centred, std, scale, residual, norms)
        return norms.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        centred, std, scale, residual, norms = ctx.saved_tensors
        rows = norms.numel()
        inverse_norms = torch.where(norms == 0, 0.0, 1.0 / norms).unsqueeze(-1)
        grad_a = residual * inverse_norms * (grad / rows)
        tokens = centred.shape[1]
        std_term = (grad_a * centred).sum(dim=1, keepdim=True) / (scale * scale * (tokens - 1) * std)
        std_term = torch.where(std == 0, 0.0, std_term)
        grad_c = grad_a / scale - centred * std_term
        return grad_c - grad_c.mean(dim=1, keepdim=True), None


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(prediction, target)


def _cos(prediction: Tensor, target: Tensor) -> Tensor:
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=-1)).mean()


def _smooth_l1(prediction: Tensor, target: Tensor) -> Tensor:
    return F.smooth_l1_loss(prediction, target)


def _kl(prediction: Tensor, target: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(prediction, dim=-1), F.softmax(target, dim=-1), reduction="batchmean")


LOSS_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "norm_mse": norm_mse,
    "mse": _mse,
    "cos": _cos,
    "smooth_l1": _smooth_l1,
    "kl": _kl,
}


def sim_loss_value(prediction: Tensor, target: Tensor, loss: str = "norm_mse") -> Tensor:
    """One rho_sim loss between latent tokens ``(B, k, d)``, computed in float32."""
    return LOSS_FUNCTIONS[loss](prediction.float(), target.float())


# --- built-in objectives ----------------------------------------------------


class RhoSim(nn.Module):
    """The rho_sim reconstructor: predict the latent of the block's input from its output."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 128, loss: str = "norm_mse"):
        super().__init__()
        self.loss = loss
        self.pre_proj = nn.Linear(out_channels, in_channels, bias=False) if in_channels != out_channels else nn.Identity()
        self.proj = nn.Sequential(
            nn.Linear(in_channels, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim)
        )
        self.predictor = nn.Linear(dim, dim)

    def forward(self, x_tokens: Tensor, y_tokens: Tensor) -> Tensor:
        weight = self.predictor.weight
        # Prediction first: autocast caches its casts of the shared projector's weights
        # for the rest of the region, and on torch 2.5 a cast made under no_grad first
        # was reused here without a grad_fn, so `proj` got no gradient under AMP.
        prediction = self.predictor(self.proj(self.pre_proj(y_tokens.to(weight.dtype))))
        with torch.no_grad():
            target = self.proj(x_tokens.to(weight.dtype))
        return sim_loss_value(prediction, target, self.loss)

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}"


class SelfModel(nn.Module):
    """Linear self-model ``W a + b`` of the block's output tokens; target detached."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear = nn.Linear(channels, channels)

    def forward(self, x_tokens: Tensor | None, y_tokens: Tensor) -> Tensor:
        a = y_tokens.to(self.linear.weight.dtype)
        error = self.linear(a).float() - a.detach().float()
        return error.pow(2).sum(dim=-1).mean()


class ActivationL2(nn.Module):
    """``mean ||a||^2`` over sampled output tokens (no parameters)."""

    def forward(self, x_tokens: Tensor | None, y_tokens: Tensor) -> Tensor:
        return y_tokens.float().pow(2).sum(dim=-1).mean()


# --- registry ---------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective.

    ``factory(in_channels, out_channels, options)`` builds the module; ``uses_input``
    says whether it reads the block's input tokens (if not, they are never
    computed); ``min_tokens(options)`` is the fewest sampled tokens its loss is
    defined for.
    """

    name: str
    factory: Callable[[int, int, SimOptions], nn.Module]
    uses_input: bool = True
    min_tokens: Callable[[SimOptions], int] = lambda options: 1


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    factory: Callable[[int, int, SimOptions], nn.Module] | None = None,
    *,
    uses_input: bool = True,
    min_tokens: int | Callable[[SimOptions], int] = 1,
    overwrite: bool = False,
):
    """Register an objective under ``name`` (usable as a decorator on a factory or class).

    Once registered, ``name`` works wherever an objective is chosen:
    ``simfx.transform(model, x, objective=name)`` or per block with
    ``overrides={"layer4.*": {"objective": name, "beta": 0.1}}``.

    Args:
        name: the name to select it by.
        factory: ``factory(in_channels, out_channels, options) -> nn.Module``; a
            module class with that ``__init__`` signature works. It is called once
            per chosen block with the block's channel counts (after
            ``channel_ratio``) and its :class:`~simfx.SimOptions`. The module is
            moved to the block's device and dtype and lives under ``simfx.<block>``.
            Its ``forward(x_tokens, y_tokens)`` gets the block's sampled input and
            output tokens, ``(B, k, in_channels)`` and ``(B, k, out_channels)``
            (same k positions, same dtype as the activations), and returns a scalar
            loss. ``x_tokens`` is detached (gradients reach the block only through
            ``y_tokens``) and is ``None`` when ``uses_input=False``. The loss is cast
            to float32, weighted by the block's ``beta`` and averaged with the other
            blocks' (non-finite ones skipped). For ``torch.compile(fullgraph=True)``
            keep ``forward`` free of ``.item()`` and value-dependent Python ``if``.
        uses_input: whether ``forward`` reads ``x_tokens``; if not, they are never
            computed.
        min_tokens: fewest sampled tokens the loss is defined for (an int, or a
            function of the options); blocks with fewer output tokens are not
            auto-selected.
        overwrite: replace an objective already registered under ``name``.

    >>> import torch, simfx
    >>> @simfx.register_objective("feature_variance", uses_input=False, overwrite=True)
    ... class FeatureVariance(torch.nn.Module):  # reward features that vary over tokens
    ...     def __init__(self, in_channels, out_channels, options):
    ...         super().__init__()
    ...     def forward(self, x_tokens, y_tokens):
    ...         return -y_tokens.float().var(dim=1).mean()
    >>> "feature_variance" in simfx.objective_names()
    True
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    >>> sim = simfx.transform(model, torch.randn(8, 4), objective="feature_variance", beta=0.1)
    >>> out, sim_loss = sim(torch.randn(8, 4))
    >>> bool(sim_loss < 0)
    True
    """

    def add(make):
        if not callable(make):
            raise TypeError(f"objective factory for {name!r} must be callable, got {make!r}.")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"objective {name!r} is already registered; pass overwrite=True to replace it.")
        floor = min_tokens if callable(min_tokens) else (lambda options, n=int(min_tokens): n)
        _REGISTRY[name] = ObjectiveSpec(name, make, uses_input, floor)
        return make

    if not isinstance(name, str) or not name:
        raise TypeError(f"objective name must be a non-empty string, got {name!r}.")
    return add(factory) if factory is not None else add


def get_objective(name: str) -> ObjectiveSpec:
    """The registered :class:`ObjectiveSpec` for ``name``; a ValueError lists the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}; registered objectives are {objective_names()}. "
            f"Add one with simfx.register_objective({name!r}, factory)."
        ) from None


def objective_names() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(_REGISTRY)


register_objective(
    "rho_sim",
    lambda cin, cout, o: RhoSim(cin, cout, dim=o.dim, loss=o.loss),
    min_tokens=lambda o: 2 if o.loss == "norm_mse" else 1,
)
register_objective("self_model", lambda cin, cout, o: SelfModel(cout), uses_input=False)
register_objective("activation_l2", lambda cin, cout, o: ActivationL2(), uses_input=False)


# --- the per-boundary module -----------------------------------------------


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
    ):
        super().__init__()
        self.objective = objective
        self.in_channel_dim = in_channel_dim
        self.out_channel_dim = out_channel_dim
        self.in_channels = in_channels
        self.out_channels = out_channels
        fraction = options.token_fraction
        self.ratio = (fraction.numerator, fraction.denominator)
        self.min_tokens = max(2, min_tokens)
        self.token_sampling = options.token_sampling
        self.uses_input = uses_input

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        y_tokens = to_tokens(y, self.out_channel_dim)[..., : self.out_channels]
        x_tokens = None
        if self.uses_input:
            x = x.detach()
            x_tokens = input_tokens_on_output_grid(x, self.in_channel_dim, y, self.out_channel_dim)
            x_tokens = x_tokens[..., : self.in_channels]
        k = sample_count(y_tokens.shape[1], self.ratio[0], self.ratio[1], self.min_tokens)
        x_tokens, y_tokens = sample_pair(x_tokens, y_tokens, k, self.token_sampling)

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

    def extra_repr(self) -> str:
        return (
            f"channel_dims=({self.in_channel_dim}, {self.out_channel_dim}), "
            f"channels=({self.in_channels}, {self.out_channels}), "
            f"token_ratio={self.ratio[0]}/{self.ratio[1]}, token_sampling={self.token_sampling!r}"
        )


def build_objective(
    options: SimOptions,
    *,
    in_channel_dim: int,
    out_channel_dim: int,
    in_width: int,
    out_width: int,
) -> BoundaryObjective:
    """The module for one boundary from its widths and options (channel sampling applied)."""
    spec = get_objective(options.objective)
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
    )


# --- aggregation -------------------------------------------------------------


def aggregate_losses(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``mean_i(w_i * loss_i)`` over the finite block losses (0 when none is finite)."""
    stacked = torch.stack(list(losses))
    finite = torch.isfinite(stacked)
    if len(set(weights)) == 1:
        total = torch.where(finite, stacked, 0).sum() * weights[0]
    else:
        weighted = torch.stack([loss * w for loss, w in zip(losses, weights)])
        total = torch.where(finite, weighted, 0).sum()
    return total / finite.sum().clamp(min=1)
