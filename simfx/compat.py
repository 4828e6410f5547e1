"""Drop-in replacement for the published SIM-pytorch decorator API.

Code written against the reference implementation (``from sim_loss import ...``)
keeps working after one changed import line::

    from simfx.compat import init_proj, forward_with_sim_cache, compute_loss_sim, LossSimTracker

and gets simfx's maths (DESIGN.md) and its fixes: blocks that change resolution
work, a zero ``token_sampling_ratio`` switches SIM off for the block instead of
breaking its forward, ``sim_cfg`` is honoured, construction logs (``simfx.compat``
logger, DEBUG) instead of printing, non-finite block losses are skipped with
tensor ops (no host sync), and both a decorated forward and
:func:`compute_loss_sim` run under ``torch.compile(fullgraph=True)``.

>>> import torch
>>> from torch import nn
>>> from simfx.compat import init_proj, forward_with_sim_cache, compute_loss_sim
>>> class Block(nn.Module):
...     @init_proj(input_dim_name="in_channels", output_dim_name="out_channels")
...     def __init__(self, in_channels, out_channels, stride=1):
...         super().__init__()
...         self.f = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
...         self.in_channels, self.out_channels = in_channels, out_channels
...     @forward_with_sim_cache()
...     def forward(self, x):
...         return self.f(x)
>>> model = nn.Sequential(Block(3, 8), Block(8, 16, stride=2))   # the second one halves H and W
>>> y = model(torch.randn(2, 3, 16, 16))
>>> loss = compute_loss_sim(model)          # beta * mean of the block losses, then cleared
>>> bool(loss > 0), float(compute_loss_sim(model))   # a loss is never returned twice
(True, 0.0)

How it maps onto simfx
----------------------
Each decorated block owns one :class:`~simfx.runtime.heads.BoundaryObjective` as the
submodule ``simfx`` (built by :func:`~simfx.runtime.heads.build_objective` while the
block is constructed, so optimizers made afterwards include it, and saved with
the block: ``state_dict`` keys ``<block>.simfx.objective.proj.0.weight``, ...; the
same layout ``simfx.transform`` uses under ``simfx.<key>.objective``). The
reference's attributes ``pre_proj``/``proj_x``/``proj_y``/``predictor`` are
``block.simfx.objective.pre_proj``/``.proj``/``.proj``/``.predictor``;
:func:`reference_state_dict_to_simfx` renames a checkpoint saved by the
reference.

=========================  ==========================================================
SIM-pytorch                simfx
=========================  ==========================================================
``input_dim_name``         input width: an attribute name of the block, or an int
``output_dim_name``        output width (``None``: same as the input)
``proj_type='InvSS'``      ``objective='rho_sim'``; any registered objective name works
``token_sampling_ratio``   ``token_ratio`` in ``(0, 1]``; ``0`` switches SIM off for
                           the block (no reconstructor, contributes no loss)
``channel_sampling_ratio`` ``channel_ratio`` in ``(0, 1]``, applied to each side's width
``token_sampling_type``    ``'v0'`` → ``'shared'``, ``'v1'`` → ``'per_sample'``,
                           ``'v2'`` → ``'topk_mean'`` (simfx names also accepted)
``loss_type``              ``loss`` (same five names)
``sim_cfg['loss_beta']``   ``beta`` (default ``5e-3``)
``sim_cfg`` (others)       overrides the argument of the same name; simfx adds
                           ``dim`` (latent width, 128) and ``channel_dim``
=========================  ==========================================================

Where the maths differs from the reference, simfx follows DESIGN.md: at least two
tokens are sampled (``k = max(2, floor(r * N))``), channel sampling keeps each
side's own leading channels, a block that changes resolution has its input
average-pooled onto the output grid, and losses are computed in float32.

The channel axis of ``x`` and ``y`` is found from their shapes at each call: the
axis whose size is the declared width, preferring the axis the block's first
(for ``x``) or last (for ``y``) weight layer implies (convolutions and batch
norms: axis 1; linear and layer norms: the last axis), else the reference's
convention (``(B, C, H, W)``; ``(B, N, C)`` for 3-D). ``sim_cfg={'channel_dim': a}``
(or an ``(input, output)`` pair) fixes it.

Caching: in training mode the decorated forward stores this block's weighted
loss (``beta * loss``) in ``block.loss_sim``; in eval mode it computes nothing
and sets ``block.loss_sim = None``. :func:`compute_loss_sim` takes the stored
losses and resets them to ``None``, so a loss is never returned twice; a block
called several times in one forward contributes its last call (use
``simfx.transform``, which treats every call as its own block, for shared blocks).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx
from torch import Tensor, nn

from .runtime.heads import BoundaryObjective, build_objective
from .runtime.monitor import weighted_mean_of_finite
from .runtime.objectives import get_objective, objective_names, sampling_problem
from .options import LOSS_TYPES, TOKEN_SAMPLING, SimOptions
from .analysis.layout import Layout, default_channel_dim, is_channel_axis, module_layout

__all__ = [
    "init_proj",
    "forward_with_sim_cache",
    "compute_loss_sim",
    "LossSimTracker",
    "reference_state_dict_to_simfx",
    "SUBMODULE",
]

log = logging.getLogger("simfx.compat")

SUBMODULE = "simfx"
"""Name of the reconstructor submodule on each decorated block."""

_LOSS = "loss_sim"  # the reference's attribute name: user code may read it
_CONFIG = "_simfx_compat"

TOKEN_SAMPLING_TYPES = {"v0": "shared", "v1": "per_sample", "v2": "topk_mean"}
PROJ_TYPES = {"InvSS": "rho_sim"}
SIM_CFG_KEYS = (
    "proj_type", "loss_type", "loss_beta", "token_sampling_ratio", "channel_sampling_ratio",
    "token_sampling_type", "dim", "channel_dim",
)
_DEFAULT_BETA = 5e-3  # the reference's loss_beta
_DEFAULT_DIM = 128  # the reference's fixed latent width K

# True inside torch.fx.symbolic_trace. Newer torch has is_fx_symbolic_tracing because its
# is_fx_tracing also fires under torch.export and warns on every call; older torch has only the latter.
_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or (
    torch.fx._symbolic_trace.is_fx_tracing
)


@dataclass(frozen=True)
class _BlockConfig:
    """What init_proj fixed for one block instance (plain data, picklable).

    ``options`` is None when the block's token ratio is 0 (SIM off for it).
    ``hints`` are the channel positions its first and last weight layers imply.
    """

    owner: str
    options: SimOptions | None
    in_width: int
    out_width: int
    hints: tuple[Layout | None, Layout | None]


# --- decorators ------------------------------------------------------------------


def init_proj(
    input_dim_name: str | int,
    output_dim_name: str | int | None = None,
    proj_type: str = "InvSS",
    token_sampling_ratio: float = 0.2,
    channel_sampling_ratio: float = 1.0,
    token_sampling_type: str = "v0",
    loss_type: str = "norm_mse",
    sim_cfg: Mapping[str, Any] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorate a block's ``__init__``: after it runs, attach the SIM reconstructor as ``block.simfx``.

    ``input_dim_name``/``output_dim_name`` name attributes the ``__init__`` sets
    (or give the widths as ints). Settings are checked when the class is defined;
    ``sim_cfg`` overrides the keyword of the same name (keys: ``SIM_CFG_KEYS``).

    >>> import torch
    >>> class Mlp(torch.nn.Module):
    ...     @init_proj("width", token_sampling_type="v1", sim_cfg={"loss_beta": 1e-2, "dim": 32})
    ...     def __init__(self, width=16):
    ...         super().__init__()
    ...         self.width = width
    ...         self.fc = torch.nn.Linear(width, width)
    >>> Mlp().simfx.objective.predictor
    Linear(in_features=32, out_features=32, bias=True)
    """
    def decorator(init_fn: Callable) -> Callable:
        owner = init_fn.__qualname__.rsplit(".", 1)[0]
        options = _options(owner, sim_cfg, dict(
            proj_type=proj_type, token_sampling_ratio=token_sampling_ratio,
            channel_sampling_ratio=channel_sampling_ratio, token_sampling_type=token_sampling_type,
            loss_type=loss_type, loss_beta=_DEFAULT_BETA, dim=_DEFAULT_DIM, channel_dim=None,
        ))

        @functools.wraps(init_fn)
        def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            init_fn(self, *args, **kwargs)
            _attach(self, options, input_dim_name, output_dim_name)

        return wrapper

    return decorator


def forward_with_sim_cache(forward_fn: Callable | None = None) -> Callable:
    """Decorate a block's ``forward(x, ...)``: in training, cache ``beta * loss`` in ``block.loss_sim``.

    Use it as ``@forward_with_sim_cache()`` (as the reference) or bare. The block's
    ``__init__`` must carry :func:`init_proj`. Under ``torch.fx`` tracing (for
    example ``simfx.transform`` of a decorated model) the forward is the plain one.
    """
    if forward_fn is not None:
        return forward_with_sim_cache()(forward_fn)

    def decorator(forward: Callable) -> Callable:
        @functools.wraps(forward)
        def wrapper(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
            out = forward(self, x, *args, **kwargs)
            if _symbolic_tracing():
                return out  # a Proxy must never be stored on the module
            config = getattr(self, _CONFIG, None)
            if config is None:
                raise TypeError(
                    f"{type(self).__name__}.forward is decorated with forward_with_sim_cache but its "
                    f"__init__ is not decorated with init_proj; add @init_proj(input_dim_name=...) to "
                    f"{type(self).__name__}.__init__."
                )
            if self.training and config.options is not None:
                setattr(self, _LOSS, _block_loss(self, config, x, out) * config.options.beta)
            else:
                setattr(self, _LOSS, None)  # eval computes nothing, and keeps no older loss around
            return out

        return wrapper

    return decorator


# --- collecting the losses -----------------------------------------------------------


def compute_loss_sim(module: nn.Module) -> Tensor:
    """``mean_i(beta_i * loss_i)`` over the decorated blocks' finite cached losses; clears them.

    Scans ``module`` (itself included) at every call; :class:`LossSimTracker`
    scans once. Returns a float32 scalar: 0 when no loss is pending (eval mode, or
    already collected since the last forward). Blocks whose loss is NaN or
    infinite are left out of the mean with tensor ops, so nothing waits for the
    device and ``torch.compile(fullgraph=True)`` can trace a step that calls it.
    """
    return _collect(_decorated_blocks(module), module)


class LossSimTracker:
    """:func:`compute_loss_sim` that finds the decorated blocks once.

    The reference scans at the first ``compute_loss_sim()`` call; this one scans
    when constructed, so a compiled training step that calls it is traced once
    rather than once for the cold start and again afterwards. Build it after
    the model.

    >>> import torch
    >>> tracker = LossSimTracker(torch.nn.Linear(2, 2))   # no decorated block: a logged warning
    >>> float(tracker.compute_loss_sim())
    0.0
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.loss_sim_modules: list[nn.Module] = _decorated_blocks(module)

    def compute_loss_sim(self) -> Tensor:
        return _collect(self.loss_sim_modules, self.module)


def _decorated_blocks(module: nn.Module) -> list[nn.Module]:
    blocks = [m for m in module.modules() if getattr(m, _CONFIG, None) is not None]
    if not blocks:
        log.warning(
            "compute_loss_sim: no block of %s is decorated with simfx.compat.init_proj and "
            "forward_with_sim_cache, so the SIM loss is 0.", type(module).__name__,
        )
    return blocks


def _collect(blocks: list[nn.Module], module: nn.Module) -> Tensor:
    losses = []
    for block in blocks:
        loss = getattr(block, _LOSS, None)
        if loss is not None:
            losses.append(loss)
            setattr(block, _LOSS, None)
    if not losses:
        first = next(module.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    # Each cached loss already carries its block's beta (as the reference's loss_sim does).
    return weighted_mean_of_finite(losses, [1.0] * len(losses))


# --- building and running one block's objective -------------------------------------


def _options(owner: str, sim_cfg: Mapping[str, Any] | None, settings: dict[str, Any]) -> SimOptions | None:
    """The SimOptions for a decorated class; None if its token ratio is 0 (SIM off)."""
    if sim_cfg is not None and not isinstance(sim_cfg, Mapping):
        raise TypeError(f"{owner}: init_proj(sim_cfg=...) must be a dict, got {type(sim_cfg).__name__}.")
    unknown = sorted(set(sim_cfg or {}) - set(SIM_CFG_KEYS))
    if unknown:
        raise ValueError(f"{owner}: unknown init_proj sim_cfg key(s) {unknown}; valid keys are {list(SIM_CFG_KEYS)}.")
    s = {**settings, **(sim_cfg or {})}

    objective = PROJ_TYPES.get(s["proj_type"], s["proj_type"])
    if objective not in objective_names():
        raise ValueError(
            f"{owner}: proj_type={s['proj_type']!r} is not 'InvSS' nor a registered simfx objective "
            f"{objective_names()}; register custom ones with simfx.register_objective before defining {owner}."
        )
    sampling = TOKEN_SAMPLING_TYPES.get(s["token_sampling_type"], s["token_sampling_type"])
    if sampling not in TOKEN_SAMPLING:
        raise ValueError(
            f"{owner}: token_sampling_type={s['token_sampling_type']!r} is not one of "
            f"{list(TOKEN_SAMPLING_TYPES)} (or simfx's {list(TOKEN_SAMPLING)})."
        )
    if s["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"{owner}: loss_type={s['loss_type']!r} is not one of {list(LOSS_TYPES)}.")
    ratio = _ratio(owner, "token_sampling_ratio", s["token_sampling_ratio"], zero_ok=True)
    channel_ratio = _ratio(owner, "channel_sampling_ratio", s["channel_sampling_ratio"], zero_ok=False)
    try:
        options = SimOptions(
            objective=objective, beta=s["loss_beta"], token_ratio=ratio or 1.0, channel_ratio=channel_ratio,
            token_sampling=sampling, loss=s["loss_type"], dim=s["dim"], channel_dim=s["channel_dim"],
        )
    except (TypeError, ValueError) as error:
        raise type(error)(f"{owner}: init_proj sim_cfg: {error}") from None
    if sampling_problem(options, get_objective(objective)):
        raise ValueError(
            f"{owner}: token_sampling_type={s['token_sampling_type']!r} ranks tokens by the block's input, "
            f"which proj_type={s['proj_type']!r} does not read; use 'v0' (shared) or 'v1' (per_sample)."
        )
    return options if ratio else None


def _ratio(owner: str, name: str, value: Any, *, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}.")
    low = "[0, 1]" if zero_ok else "(0, 1]"
    if value > 1:
        raise ValueError(
            f"{owner}: {name}={value!r} is above 1. The reference reads values above 1 as a token "
            f"count; simfx takes a share in {low}: pass count / tokens-per-sample instead."
        )
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{owner}: {name} must be in {low}, got {value!r}.")
    return float(value)


def _attach(block: nn.Module, options: SimOptions | None, input_dim_name: Any, output_dim_name: Any) -> None:
    owner = type(block).__name__
    existing = block._modules.get(SUBMODULE, getattr(block, SUBMODULE, None))
    if existing is not None and getattr(block, _CONFIG, None) is None:
        raise ValueError(
            f"{owner} already has an attribute '{SUBMODULE}', where simfx.compat.init_proj puts the SIM "
            f"reconstructor; rename that attribute."
        )
    in_width = _width(block, input_dim_name, "input_dim_name")
    out_width = in_width if output_dim_name is None else _width(block, output_dim_name, "output_dim_name")
    # A subclass whose __init__ is decorated too runs this twice: the outer (last) call wins.
    block._modules.pop(SUBMODULE, None)
    # Reconstructors of decorated sub-blocks are Linear layers too, but not part of this block's layout.
    reconstructors = {id(m) for r in block.modules() if isinstance(r, BoundaryObjective) for m in r.modules()}
    layers = [m for m in block.modules() if id(m) not in reconstructors and module_layout(m)]
    hints = (module_layout(layers[0]), module_layout(layers[-1])) if layers else (None, None)
    setattr(block, _CONFIG, _BlockConfig(owner, options, in_width, out_width, hints))
    setattr(block, _LOSS, None)
    if options is None:
        log.debug("%s: token_sampling_ratio=0, SIM is off for this block (no reconstructor)", owner)
        return
    head = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=in_width, out_width=out_width)
    reference = next((p for p in block.parameters() if p.is_floating_point()), None)
    if reference is not None:  # follow a block built on another device or in another dtype
        head = head.to(device=reference.device, dtype=reference.dtype)
    block.add_module(SUBMODULE, head)
    log.debug("%s: SIM reconstructor %s, widths %d -> %d, %s", owner, options.objective, in_width, out_width, options)


def _width(block: nn.Module, name: Any, argument: str) -> int:
    owner = type(block).__name__
    if isinstance(name, str):
        if not hasattr(block, name):
            raise AttributeError(
                f"{owner}: init_proj({argument}={name!r}) reads self.{name} after {owner}.__init__ runs, "
                f"but {owner} has no attribute {name!r}. Set self.{name} = <channel count> in "
                f"{owner}.__init__, or pass the count itself, e.g. init_proj({argument}=64)."
            )
        value = getattr(block, name)
    elif isinstance(name, int) and not isinstance(name, bool):
        value = name
    else:
        raise TypeError(f"{owner}: init_proj {argument} must be an attribute name or an int, got {name!r}.")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: init_proj {argument}={name!r} gives {value!r}; it must be a positive int.")
    return value


def _block_loss(block: nn.Module, config: _BlockConfig, x: Any, y: Any) -> Tensor:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"{config.owner}.forward is decorated with forward_with_sim_cache, which needs a tensor as "
            f"its first argument and one tensor as its result; got {type(x).__name__} -> "
            f"{type(y).__name__}. Return the tensor to regularise, or use simfx.transform."
        )
    forced = config.options.channel_dims()
    cx = _channel_axis(config, x, config.in_width, config.hints[0], forced[0], "input", "input_dim_name")
    cy = _channel_axis(config, y, config.out_width, config.hints[1], forced[1], "output", "output_dim_name")
    # The objective was built for channel-first tensors; moving the axis is a view, not a copy.
    return getattr(block, SUBMODULE)(x.movedim(cx, 1), y.movedim(cy, 1))


def _channel_axis(
    config: _BlockConfig, t: Tensor, width: int, hint: Layout | None, forced: int | None, side: str, argument: str
) -> int:
    """The axis of ``t`` holding the declared width (branches on shapes only, so it compiles)."""
    rank = t.dim()
    if rank >= 2 and forced is None:
        expected = hint.axis(rank) if hint is not None else default_channel_dim(rank)
        if t.shape[expected] == width:
            return expected
        others = [a for a in range(1, rank) if a != expected and t.shape[a] == width]
        if len(others) == 1:
            return others[0]
    elif rank >= 2 and is_channel_axis(forced, rank) and t.shape[forced] == width:
        return forced % rank
    # Messages are built only here: formatting a shape under torch.compile would pin its sizes.
    where = f"{config.owner}: the block's {side} has shape {tuple(t.shape)}"
    if rank < 2:
        raise ValueError(f"{where}; SIM needs a batch axis and a channel axis.")
    if forced is not None and not is_channel_axis(forced, rank):
        raise ValueError(f"{where}; sim_cfg channel_dim={forced} must name a non-batch axis in 1..{rank - 1}.")
    fit = f"axis {forced} has another size" if forced is not None else "no single axis fits"
    raise ValueError(
        f"{where}, and {argument} says {width} channels: {fit}. Fix the width attribute, or say where "
        f"the channels are with init_proj(..., sim_cfg={{'channel_dim': axis}}) (or an (input, output) pair)."
    )


# --- checkpoints ------------------------------------------------------------------


_REFERENCE_KEYS = (("pre_proj.0.", "objective.pre_proj."), ("proj_x.", "objective.proj."), ("predictor.0.", "objective.predictor."))


def reference_state_dict_to_simfx(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the SIM entries of a SIM-pytorch checkpoint so ``model`` (decorated via simfx.compat) loads it.

    The reference keeps ``pre_proj.0``, ``proj_x`` (and the same weights again as
    ``proj_y``) and ``predictor.0`` on each block; simfx keeps them under
    ``<block>.simfx.objective``. Only keys of decorated blocks are renamed; the
    ``proj_y`` copies are dropped. Then ``model.load_state_dict(result)``.
    """
    # Longest prefix first: with nested decorated blocks, a key belongs to the innermost one.
    prefixes = sorted(
        (f"{name}." if name else "" for name, m in model.named_modules() if getattr(m, _CONFIG, None)),
        key=len, reverse=True,
    )
    renamed: dict[str, Any] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        rest = key[len(prefix):] if prefix is not None else ""
        if rest.startswith("proj_y."):
            continue  # the reference registers proj_x twice; simfx has one projector
        for old, new in _REFERENCE_KEYS:
            if prefix is not None and rest.startswith(old):
                key = f"{prefix}{SUBMODULE}.{new}{rest[len(old):]}"
                break
        renamed[key] = value
    return renamed
