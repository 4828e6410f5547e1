"""Objectives: what SIM computes at a block from its sampled tokens, and the registry of them.

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
returns a scalar. The registry (:data:`OBJECTIVES`) is an object with process
defaults: ``OBJECTIVES.unregister(name)`` undoes a registration and
``with OBJECTIVES.registered(name, factory): ...`` scopes one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..options import SimOptions
from .losses import sim_loss_value

__all__ = [
    "ObjectiveSpec", "ObjectiveRegistry", "OBJECTIVES", "RhoSim", "SelfModel", "ActivationL2",
    "register_objective", "get_objective", "objective_names", "sampling_problem",
]


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


class ObjectiveRegistry:
    """Objectives by name: process defaults, plus registrations that can be undone or scoped."""

    def __init__(self):
        self._specs: dict[str, ObjectiveSpec] = {}

    def add(self, spec: ObjectiveSpec, *, overwrite: bool = False) -> None:
        if spec.name in self._specs and not overwrite:
            raise ValueError(f"objective {spec.name!r} is already registered; pass overwrite=True to replace it.")
        self._specs[spec.name] = spec

    def unregister(self, name: str) -> None:
        """Remove the objective registered under ``name``."""
        if name not in self._specs:
            raise ValueError(f"no objective {name!r} is registered; registered objectives are {self.names()}.")
        del self._specs[name]

    @contextlib.contextmanager
    def registered(self, name: str, factory: Callable[[int, int, SimOptions], nn.Module], **options) -> Iterator[None]:
        """Register ``factory`` under ``name`` for the block of code inside, then restore what was there."""
        before = self._specs.get(name)
        register_objective(name, factory, overwrite=True, registry=self, **options)
        try:
            yield
        finally:
            if before is None:
                self._specs.pop(name, None)
            else:
                self._specs[name] = before

    def get(self, name: str) -> ObjectiveSpec:
        """The :class:`ObjectiveSpec` for ``name``; a ValueError lists the registered names."""
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(
                f"unknown objective {name!r}; registered objectives are {self.names()}. "
                f"Add one with simfx.register_objective({name!r}, factory)."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._specs)


OBJECTIVES = ObjectiveRegistry()
"""The process-wide objectives: ``rho_sim``, ``self_model``, ``activation_l2`` and yours."""


def register_objective(
    name: str,
    factory: Callable[[int, int, SimOptions], nn.Module] | None = None,
    *,
    uses_input: bool = True,
    min_tokens: int | Callable[[SimOptions], int] = 1,
    overwrite: bool = False,
    registry: ObjectiveRegistry | None = None,
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
        registry: where to register (default: the process-wide :data:`OBJECTIVES`;
            ``simfx.OBJECTIVES.unregister(name)`` undoes it).

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
        floor = min_tokens if callable(min_tokens) else (lambda options, n=int(min_tokens): n)
        (registry or OBJECTIVES).add(ObjectiveSpec(name, make, uses_input, floor), overwrite=overwrite)
        return make

    if not isinstance(name, str) or not name:
        raise TypeError(f"objective name must be a non-empty string, got {name!r}.")
    return add(factory) if factory is not None else add


def get_objective(name: str) -> ObjectiveSpec:
    """The registered :class:`ObjectiveSpec` for ``name``; a ValueError lists the registered names."""
    return OBJECTIVES.get(name)


def objective_names() -> list[str]:
    """Names of the registered objectives, sorted."""
    return OBJECTIVES.names()


def sampling_problem(options: SimOptions, spec: ObjectiveSpec) -> str:
    """Why these options cannot drive this objective's token sampling, or "".

    ``topk_mean`` ranks tokens by the block's input, which an objective with
    ``uses_input=False`` never computes.
    """
    if options.token_sampling == "topk_mean" and not spec.uses_input:
        return (
            f"token_sampling='topk_mean' ranks tokens by the block's input, which objective {spec.name!r} "
            f"does not read (uses_input=False); use token_sampling='shared' or 'per_sample'"
        )
    return ""


register_objective(
    "rho_sim",
    lambda cin, cout, o: RhoSim(cin, cout, dim=o.dim, loss=o.loss),
    min_tokens=lambda o: 2 if o.loss == "norm_mse" else 1,
)
register_objective("self_model", lambda cin, cout, o: SelfModel(cout), uses_input=False)
register_objective("activation_l2", lambda cin, cout, o: ActivationL2(), uses_input=False)
