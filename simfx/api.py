"""The public entry points: :func:`transform` and :func:`find_boundaries`.

Each runs the stages in order — trace, shapes, boundaries, select, rewrite —
passing plain data between them.
"""

from __future__ import annotations

import copy as copy_module
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .boundaries import Boundary, find_candidates
from .errors import ExampleInputsError
from .graph_module import SimGraphModule
from .options import SimOptions
from .rewrite import rewrite
from .select import select_blocks
from .shapes import propagate_shapes
from .frontend import capture
from .trace import ExampleInputs

__all__ = ["transform", "find_boundaries", "BoundaryRow", "BoundaryTable"]


def transform(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    blocks: Any = "auto",
    exclude: Any = (),
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
    objective: str = "rho_sim",
    beta: float = 5e-3,
    token_ratio: float = 0.2,
    channel_ratio: float = 1.0,
    token_sampling: str = "shared",
    loss: str = "norm_mse",
    dim: int = 128,
    channel_dim: int | tuple[int, int] | None = None,
    per_block: bool = False,
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = True,
    copy: bool = False,
) -> SimGraphModule:
    """Add SIM to ``model``: a new GraphModule returning ``(output, sim_loss)`` in training.

    Args:
        model: any ``nn.Module`` torch.fx can trace (or a ``GraphModule``).
        example_inputs: a tensor, a tuple of the forward's positional arguments, or a
            dict of its keyword arguments, shaped like a training batch. Tensors become
            the transformed module's inputs, in that order; other values (flags,
            ``None``) are bound as constants. Used only for shapes (fake tensors).
        blocks: ``"auto"`` or selectors — module classes, name globs (``"layer*.*"``),
            compiled regexes, predicates over a :class:`~simfx.Boundary` — or a list.
        exclude: selectors of blocks to leave out.
        overrides: ``{selector: {option: value}}`` per-block option changes.
        objective, beta, token_ratio, channel_ratio, token_sampling, loss, dim,
            channel_dim: default SIM options (see :class:`~simfx.SimOptions`).
        per_block: also return ``{block name: loss}`` as a third output.
        frontend: ``"auto"`` (fx first; ``torch.export`` when fx fails in the model's own
            forward or hides most parameters in opaque modules), ``"fx"`` or ``"export"``.
        leaf_modules: module classes or qualified names to keep opaque when tracing.
        autowrap_functions: free functions to record as single graph nodes.
        auto_opaque: with fx, keep a submodule fx cannot trace opaque (one graph node)
            and retry, instead of raising; ``find_boundaries`` reports which and why.
        copy: transform a deep copy instead of sharing the model's submodules.

    Returns:
        A :class:`~simfx.SimGraphModule`. It shares the model's submodules (unless
        ``copy=True``): training it trains ``model``, and ``.train()``/``.eval()``
        on it switch the model's submodules too.

    Example::

        >>> import torch, torchvision, simfx
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> sim = simfx.transform(model, torch.randn(2, 3, 64, 64))
        >>> len(sim.sim_blocks)
        8
        >>> out, sim_loss = sim(torch.randn(4, 3, 64, 64))
        >>> bool(sim_loss > 0)
        True
        >>> _ = sim.eval()
        >>> out, zero = sim(torch.randn(4, 3, 64, 64))
        >>> float(zero)
        0.0
    """
    if isinstance(model, SimGraphModule):
        raise TypeError(
            "this module was already transformed by simfx; call simfx.strip(module) to get the "
            "plain model back, then transform that."
        )
    inputs = _example_inputs(example_inputs, model, "transform")
    defaults = SimOptions(
        objective=objective, beta=beta, token_ratio=token_ratio, channel_ratio=channel_ratio,
        token_sampling=token_sampling, loss=loss, dim=dim, channel_dim=channel_dim,
    )
    if copy:
        model = copy_module.deepcopy(model)
    traced, metas, candidates = _analyse(model, inputs, frontend, leaf_modules, autowrap_functions, auto_opaque)
    plan = select_blocks(candidates, blocks, exclude=exclude, overrides=overrides, defaults=defaults)
    return rewrite(traced, plan, metas, candidates=candidates, example_inputs=traced.inputs, per_block=per_block)


def _analyse(model, inputs, frontend, leaf_modules, autowrap_functions, auto_opaque):
    traced = capture(
        model, inputs, frontend=frontend, leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions, auto_opaque=auto_opaque,
    )
    metas = propagate_shapes(traced.train_graph, traced.root, traced.inputs)
    candidates = find_candidates(traced.train_graph, traced.root, metas, traced.opaque)
    return traced, metas, candidates


def _example_inputs(example_inputs: Any, model: nn.Module, caller: str) -> ExampleInputs:
    if example_inputs is None:
        raise ExampleInputsError(
            f"simfx.{caller} needs example_inputs for {type(model).__name__}: a batch shaped like "
            f"your training inputs, e.g. simfx.{caller}(model, torch.randn(2, 3, 224, 224)). "
            f"They fix block shapes and reconstructor sizes; only fake tensors run on them."
        )
    if isinstance(example_inputs, torch.Tensor):
        inputs = ExampleInputs((example_inputs,))
    elif isinstance(example_inputs, (tuple, list)):
        inputs = ExampleInputs(tuple(example_inputs))
    elif isinstance(example_inputs, Mapping):
        inputs = ExampleInputs((), dict(example_inputs))
    else:
        raise ExampleInputsError(
            f"example_inputs must be a tensor, a tuple of the forward's positional arguments or a dict "
            f"of its keyword arguments; got {type(example_inputs).__name__}."
        )
    if not inputs.tensors:
        raise ExampleInputsError(
            f"example_inputs for {type(model).__name__} holds no tensor; pass the forward's "
            f"positional arguments, e.g. (torch.randn(2, 3, 224, 224),), or keyword arguments as a dict."
        )
    return inputs


# --- find_boundaries ------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryRow:
    """One candidate with the selection decision (what :func:`find_boundaries` returns)."""

    boundary: Boundary
    selected: bool
    decision: str

    @property
    def name(self) -> str:
        return self.boundary.name


class BoundaryTable(list):
    """A list of :class:`BoundaryRow` that prints as a table.

    ``opaque`` maps modules kept opaque to the reason; ``frontend`` is the tracer used.
    """

    def __init__(self, rows: Iterable[BoundaryRow] = (), *, opaque: Mapping[str, str] | None = None,
                 frontend: str = "fx"):
        super().__init__(rows)
        self.opaque = dict(opaque or {})
        self.frontend = frontend

    def selected(self) -> list[BoundaryRow]:
        return [r for r in self if r.selected]

    def __str__(self) -> str:
        header = ("name", "type", "in", "out", "layout", "residual", "selected", "why")
        rows = [header]
        for r in self:
            b = r.boundary
            rows.append((
                b.name,
                b.type_name,
                _shape(b.in_shape),
                _shape(b.out_shape),
                f"{b.in_layout}->{b.out_layout}" if b.eligible else "",
                "yes" if b.residual else "",
                "yes" if r.selected else "",
                r.decision,
            ))
        widths = [min(max(len(row[i]) for row in rows), 48) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell[:48].ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
            for row in rows
        ]
        chosen = sum(r.selected for r in self)
        lines.append(f"{chosen} of {len(self)} candidates selected (frontend: {self.frontend})")
        if self.opaque:
            lines.append(f"{len(self.opaque)} module(s) kept opaque:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.opaque.items())
        return "\n".join(lines)

    __repr__ = __str__


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def find_boundaries(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    blocks: Any = "auto",
    exclude: Any = (),
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = True,
    **options: Any,
) -> BoundaryTable:
    """Preview every candidate boundary and what the selection would do with it.

    Takes the same selection and tracing arguments as :func:`transform` and changes
    nothing. The table also lists the modules kept opaque and why
    (``table.opaque``), and which frontend captured the model (``table.frontend``).

    >>> import torch, torchvision, simfx
    >>> table = simfx.find_boundaries(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    >>> [r.name for r in table.selected()][:3]
    ['layer1.0', 'layer1.1', 'layer2.0']
    """
    inputs = _example_inputs(example_inputs, model, "find_boundaries")
    defaults = SimOptions().replace(**options)
    traced, metas, candidates = _analyse(model, inputs, frontend, leaf_modules, autowrap_functions, auto_opaque)
    plan = select_blocks(candidates, blocks, exclude=exclude, defaults=defaults, allow_empty=True)
    chosen = set(plan.names)
    return BoundaryTable(
        (BoundaryRow(b, b.name in chosen, plan.decisions.get(b.name, b.reason)) for b in candidates),
        opaque=traced.opaque,
        frontend=traced.frontend,
    )
