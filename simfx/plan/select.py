"""Plan — select: candidates + selectors + overrides become the plan.

``blocks="auto"`` picks, in order:

1. residual blocks — module scopes that own a residual add (the innermost such
   scope when they nest), and residual regions that no chosen module wraps;
   together with modules kept opaque (fx could not see inside them) that own a
   weight and either keep their input's shape or repeat among their siblings;
2. where a model has none, the children of ``nn.Sequential``/``nn.ModuleList``
   containers that own a weight of 2+ dims (a child that is itself a container of
   two or more such children is descended into);
3. where a model has neither, the innermost modules that apply two or more
   weight layers (multi-branch blocks such as Inception's);

never the block that produces the model's output, and never a block whose output
has fewer tokens than its objective needs at the example input size.

Selectors (for ``blocks=``, ``exclude=`` and the keys of ``overrides=``):

* a module class — matches instances of it (and of subclasses);
* a string — a glob over boundary names where ``*`` stays within one dotted
  component and ``**`` crosses dots (``"layer*.*"`` is every block of every layer;
  ``"blk"`` also matches the repeated calls ``"blk@1"``, ...);
* a compiled regex — ``fullmatch`` against the name;
* a callable — a predicate over the :class:`~simfx.Boundary` record;
* ``"auto"`` — the auto policy, combinable with others in a list.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

from ..analysis.boundaries import Boundary
from ..analysis.layout import is_channel_axis
from ..errors import NoEligibleBlockError, SelectorError
from ..options import SimOptions, merge_options
from ..runtime.objectives import OBJECTIVES, ObjectiveRegistry, ObjectiveSpec, sampling_problem

__all__ = ["Selector", "PlannedBlock", "Plan", "select_blocks", "matches"]

Selector = Union[type, str, "re.Pattern[str]", Callable[[Boundary], bool]]


@dataclass(frozen=True)
class PlannedBlock:
    """A chosen boundary with everything the rewrite needs, settled and checked.

    ``options`` are the block's SIM options (their objective checked against the
    registry), ``key`` the submodule name of its reconstructor (under ``simfx.``),
    ``in_channel_dim``/``out_channel_dim`` the channel axes SIM reads (inferred,
    or the ``channel_dim`` option) and ``in_width``/``out_width`` the channel
    counts there.
    """

    boundary: Boundary
    options: SimOptions
    key: str
    in_channel_dim: int
    out_channel_dim: int
    in_width: int
    out_width: int

    @property
    def name(self) -> str:
        return self.boundary.name


@dataclass(frozen=True)
class Plan:
    """The select stage's output: chosen blocks in graph order, and a decision for every candidate."""

    blocks: tuple[PlannedBlock, ...]
    decisions: Mapping[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]


def select_blocks(
    candidates: Sequence[Boundary],
    blocks: Any = "auto",
    *,
    exclude: Any = (),
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
    defaults: SimOptions = SimOptions(),
    allow_empty: bool = False,
    objectives: ObjectiveRegistry = OBJECTIVES,
) -> Plan:
    """Choose the boundaries that get SIM and settle everything about them; the plan the rewrite follows.

    Raises with reasons when no block can take SIM (unless ``allow_empty``), and on
    any option that does not fit its block (an unknown objective, a ``channel_dim``
    naming the batch axis, ``topk_mean`` with an objective that never reads the
    input). ``objectives`` is the registry objective names are looked up in.
    """
    choice = _Choice()
    for selector in _as_list(blocks, "blocks"):
        choice.include(selector, candidates)
    for selector in _as_list(exclude, "exclude"):
        choice.exclude(selector, candidates)
    planned = _with_options(candidates, choice, overrides, defaults, objectives)
    if not planned and not allow_empty:
        raise NoEligibleBlockError(_nothing_selected(candidates, choice.decisions, blocks))
    keys = _unique_keys([b.name for b, _, _ in planned])
    final = tuple(_planned_block(b, options, spec, key) for (b, options, spec), key in zip(planned, keys))
    for b in final:
        choice.decisions.setdefault(b.name, "selected")
    return Plan(final, choice.decisions)


@dataclass
class _Choice:
    """The blocks chosen so far, a decision for every candidate looked at, and which were named explicitly."""

    chosen: dict[str, Boundary] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)
    explicit: set[str] = field(default_factory=set)

    def include(self, selector: Any, candidates: Sequence[Boundary]) -> None:
        if isinstance(selector, str) and selector == "auto":
            picked, why = _auto(candidates)
            self.decisions.update(why)
            self.chosen.update((b.name, b) for b in picked)
            return
        hits = [b for b in candidates if matches(selector, b)]
        usable = [b for b in hits if b.eligible]
        if not hits:
            raise SelectorError(_no_match("blocks", selector, candidates))
        if not usable:
            details = "; ".join(f"'{b.name}': {b.reason}" for b in hits[:8])
            raise SelectorError(
                f"blocks selector {_show(selector)} matched only blocks that cannot take SIM: {details}. "
                f"Select blocks with one tensor in and one out (see simfx.find_boundaries)."
            )
        for b in usable:
            self.chosen[b.name] = b
            self.explicit.add(b.name)
            self.decisions[b.name] = f"selected by {_show(selector)}"
        for b in hits:
            if not b.eligible:
                self.decisions.setdefault(b.name, f"matched {_show(selector)} but {b.reason}")

    def exclude(self, selector: Any, candidates: Sequence[Boundary]) -> None:
        hits = [b for b in candidates if matches(selector, b)]
        if not hits:
            raise SelectorError(_no_match("exclude", selector, candidates))
        for b in hits:
            if self.chosen.pop(b.name, None) is not None:
                self.decisions[b.name] = f"excluded by {_show(selector)}"


def _with_options(
    candidates: Sequence[Boundary],
    choice: _Choice,
    overrides: Mapping[Any, Mapping[str, Any]] | None,
    defaults: SimOptions,
    objectives: ObjectiveRegistry,
) -> list[tuple[Boundary, SimOptions, ObjectiveSpec]]:
    """Each chosen block in graph order with its options (defaults, then every matching override)."""
    planned: list[tuple[Boundary, SimOptions, ObjectiveSpec]] = []
    override_items = list((overrides or {}).items())
    used_overrides: set[int] = set()
    for b in candidates:
        if b.name not in choice.chosen:
            continue
        options = defaults
        for index, (selector, changes) in enumerate(override_items):
            if matches(selector, b):
                options = merge_options(options, _check_changes(selector, changes))
                used_overrides.add(index)
        b = _with_primaries(b, options)
        spec = objectives.get(options.objective)
        problem = _too_few_tokens(b, options, spec)
        if problem and b.name not in choice.explicit:
            choice.decisions[b.name] = problem
            continue
        if problem:
            warnings.warn(
                f"simfx: block '{b.name}' has {problem}; its loss is skipped (NaN) whenever a batch "
                f"gives it fewer tokens. Use a larger example input or exclude it.",
                stacklevel=4,
            )
        planned.append((b, options, spec))
    for index, (selector, _) in enumerate(override_items):
        if index not in used_overrides:
            raise SelectorError(
                f"overrides selector {_show(selector)} matched none of the selected blocks "
                f"({', '.join(b.name for b, _, _ in planned) or 'none'})."
            )
    return planned


def _too_few_tokens(b: Boundary, options: SimOptions, spec: ObjectiveSpec) -> str:
    need = spec.min_tokens(options)
    tokens = b.out_tokens
    if tokens is not None and tokens < need:
        return f"{tokens} output token(s) at the example input; {options.objective} needs {need}"
    return ""


def _planned_block(b: Boundary, options: SimOptions, spec: ObjectiveSpec, key: str) -> PlannedBlock:
    """The block with its channel axes and widths settled; every option checked against the block."""
    problem = sampling_problem(options, spec)
    if problem:
        raise ValueError(
            f"block '{b.name}': {problem} for this block (overrides={{{b.name!r}: {{'token_sampling': 'shared'}}}})."
        )
    forced = options.channel_dims()
    axes = []
    sides = (("input", b.in_meta, b.in_channel_dim, forced[0], b.in_batch_dim),
             ("output", b.out_meta, b.out_channel_dim, forced[1], b.out_batch_dim))
    for side, meta, inferred, axis, batch_dim in sides:
        if axis is not None and not is_channel_axis(axis, meta.rank, batch_dim):
            raise ValueError(
                f"channel_dim={axis} for the {side} of block '{b.name}' (shape {meta.shape}) "
                f"must name a non-batch axis in 1..{meta.rank - 1}."
            )
        axes.append(inferred if axis is None else axis % meta.rank)
    return PlannedBlock(b, options, key, axes[0], axes[1], b.in_meta.shape[axes[0]], b.out_meta.shape[axes[1]])


def _with_primaries(b: Boundary, options: SimOptions) -> Boundary:
    """``b`` reading the input and output the ``primary_input``/``primary_output`` options name."""
    for option, ports, fields in (
        ("primary_input", b.inputs, ("entry", "in_meta", "in_channel_dim")),
        ("primary_output", b.outputs, ("exit", "out_meta", "out_channel_dim")),
    ):
        position = getattr(options, option)
        if position is None:
            continue
        if position >= len(ports):
            shown = ", ".join(f"{i}: {p.node} {tuple(p.meta.shape)}" for i, p in enumerate(ports)) or "none"
            raise SelectorError(
                f"block '{b.name}': {option}={position}, but it has {len(ports)} tensor "
                f"{option.split('_')[1]}(s): {shown}."
            )
        port = ports[position]
        if not (port.meta.rank >= 2 and port.meta.dtype.is_floating_point and port.channel_dim is not None):
            raise SelectorError(
                f"block '{b.name}': {option}={position} names {port.node} {tuple(port.meta.shape)} "
                f"{port.meta.dtype}; SIM needs a floating-point tensor with a batch and a channel axis."
            )
        b = dataclasses.replace(b, **dict(zip(fields, (port.node, port.meta, port.channel_dim))))
    return b


# --- the auto policy --------------------------------------------------------


def _auto(candidates: Sequence[Boundary]) -> tuple[list[Boundary], dict[str, str]]:
    """The first policy that picks a block (see the module docstring), and a reason for every candidate."""
    why: dict[str, str] = {}
    for b in candidates:
        if not b.eligible:
            why[b.name] = b.reason
        elif b.produces_output:
            why[b.name] = "produces the model's output"
    # Output producers never take SIM, so they take no part in choosing among nested blocks.
    eligible = [b for b in candidates if b.eligible and not b.produces_output]
    order = {b.name: i for i, b in enumerate(candidates)}

    def residual_blocks(scratch):
        residual = [b for b in eligible if b.residual and b.has_weight and b.weight_layers >= 1]
        picked = _innermost_residual(residual, scratch)
        covered = set().union(*(set(b.nodes) for b in picked))
        for b in _opaque_blocks(eligible, candidates):
            if set(b.nodes) & covered:
                scratch[b.name] = f"an opaque block inside a picked residual block"
                continue
            scratch[b.name] = "an opaque block that looks residual or repeats among its siblings"
            picked.append(b)
        return sorted(picked, key=lambda b: order[b.name])

    policies = (
        ("a residual block", residual_blocks),
        ("a weighted child of an nn.Sequential/nn.ModuleList", lambda scratch: _container_children(eligible, scratch)),
        ("a block of 2+ weight layers", lambda scratch: _composite_blocks(eligible, scratch)),
        ("a weighted child of the model", lambda scratch: _root_children(eligible)),
    )
    tried = []
    for mode, policy in policies:
        scratch: dict[str, str] = {}
        final = policy(scratch)
        tried.append(mode)
        if final:
            break
    why.update(scratch)
    for b in final:
        why[b.name] = "selected by auto"
    for b in eligible:
        why.setdefault(b.name, f"not {mode}")
    return final, why


def _root_children(eligible: list[Boundary]) -> list[Boundary]:
    """Weighted direct children of the model: PointNet's layers, a GNN's or an RNN stack's layers."""
    return [b for b in eligible if b.kind == "module" and b.module_name and "." not in b.module_name and b.has_weight]


def _innermost_residual(residual: list[Boundary], why: dict[str, str]) -> list[Boundary]:
    """Innermost residual modules, then residual regions that no picked module covers."""
    node_sets = {b.name: set(b.nodes) for b in residual}
    modules = [b for b in residual if b.kind == "module"]
    regions = [b for b in residual if b.kind == "residual"]
    picked = []
    def nested(inner: Boundary, outer: Boundary) -> bool:
        # A container of one block covers the same nodes: the deeper module wins.
        same = node_sets[inner.name] == node_sets[outer.name] and len(inner.name) > len(outer.name)
        return same or node_sets[inner.name] < node_sets[outer.name]

    def holds_most(inner: list[Boundary], outer: Boundary) -> bool:
        # A small residual inside a block (ConvNeXt-V2's GRN norm, a gate) does not stand
        # for the block: the inner ones must apply at least half of its weight layers.
        return 2 * sum(m.weight_layers for m in inner) >= outer.weight_layers

    outermost_inner = {}
    for b in modules:
        inner = [m for m in modules if m is not b and nested(m, b)]
        direct = [m for m in inner if not any(o is not m and nested(m, o) for o in inner)]
        outermost_inner[b.name] = direct
    for b in modules:
        inner = outermost_inner[b.name]
        if inner and holds_most(inner, b):
            why[b.name] = f"contains residual block '{inner[0].name}' (auto picks the innermost)"
            continue
        outer = [o for o in modules if o is not b and nested(b, o) and not holds_most(outermost_inner[o.name], o)]
        if outer:
            why[b.name] = f"inside residual block '{outer[0].name}', which holds most of its weight layers"
            continue
        picked.append(b)
    for b in regions:
        outer = [m for m in picked if node_sets[b.name] <= node_sets[m.name]]
        if outer:
            why[b.name] = f"inside residual block '{outer[-1].name}'"
            continue
        overlapping = [m for m in picked if node_sets[b.name] & node_sets[m.name]]
        if overlapping:
            why[b.name] = f"overlaps residual block '{overlapping[0].name}'"
            continue
        inner = [c for c in picked + regions if c is not b and node_sets[c.name] < node_sets[b.name]]
        if inner:
            why[b.name] = f"contains residual block '{inner[0].name}' (auto picks the innermost)"
            continue
        picked.append(b)
    order = {b.name: i for i, b in enumerate(residual)}
    return sorted(picked, key=lambda b: order[b.name])


def _opaque_blocks(eligible: list[Boundary], candidates: Sequence[Boundary]) -> list[Boundary]:
    """Opaque weighted modules whose output has the input's shape, or that repeat among siblings.

    fx cannot see inside them, so they stand in for the residual blocks they usually
    are (an untraceable block whose shape is kept, or a stage of repeated blocks).
    """
    siblings: dict[tuple[str, type], int] = {}
    for b in candidates:
        if b.kind == "module" and b.module_name:
            key = (b.module_name.rpartition(".")[0], b.module_type)
            siblings[key] = siblings.get(key, 0) + 1
    return [
        b for b in eligible
        if b.opaque and b.has_weight and (
            b.in_shape == b.out_shape or siblings.get((b.module_name.rpartition(".")[0], b.module_type), 0) >= 2
        )
    ]


def _composite_blocks(eligible: list[Boundary], why: dict[str, str]) -> list[Boundary]:
    """Innermost modules applying two or more weight layers (Inception-style multi-branch blocks)."""
    composite = [b for b in eligible if b.kind == "module" and b.weight_layers >= 2]
    node_sets = {b.name: set(b.nodes) for b in composite}
    picked = []
    for b in composite:
        inner = next((c for c in composite if c is not b and node_sets[c.name] < node_sets[b.name]), None)
        if inner is not None:
            why[b.name] = f"contains block '{inner.name}' (auto picks the innermost)"
        else:
            picked.append(b)
    return picked


def _container_children(eligible: list[Boundary], why: dict[str, str]) -> list[Boundary]:
    qualifying = [b for b in eligible if b.kind == "module" and b.container_child and b.has_weight]
    by_module = {b.module_name: b for b in qualifying}
    kept = []
    for b in qualifying:
        prefix = f"{b.module_name}."
        children = [c for c in qualifying if c.module_name.startswith(prefix) and "." not in c.module_name[len(prefix):]]
        if len(children) >= 2:
            why[b.name] = f"a container of {len(children)} blocks (auto picks its children)"
            continue
        kept.append(b)
    picked = []
    for b in kept:
        parts = b.module_name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
        outer = next((a for a in ancestors if a in by_module and by_module[a] in kept), None)
        if outer is not None:
            why[b.name] = f"inside block '{outer}'"
            continue
        picked.append(b)
    return picked


# --- selectors ----------------------------------------------------------------


def matches(selector: Selector, boundary: Boundary) -> bool:
    """Does ``selector`` pick ``boundary``? (See the module docstring for selector kinds.)"""
    if isinstance(selector, type):
        return boundary.module_type is not None and issubclass(boundary.module_type, selector)
    names = [boundary.name]
    if boundary.kind == "module" and boundary.module_name and boundary.module_name != boundary.name:
        names.append(boundary.module_name)
    if isinstance(selector, str):
        pattern = _glob(selector)
        return any(pattern.fullmatch(n) for n in names)
    if isinstance(selector, re.Pattern):
        return any(selector.fullmatch(n) for n in names)
    if callable(selector):
        return bool(selector(boundary))
    raise TypeError(
        f"a selector must be a module class, a name glob, a compiled regex or a predicate; got {selector!r}."
    )


def _glob(pattern: str) -> "re.Pattern[str]":
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, type, re.Pattern)) or (callable(value) and not isinstance(value, (list, tuple, set))):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{what}= takes a selector or a list of selectors, got {type(value).__name__}.")


def _check_changes(selector, changes) -> Mapping[str, Any]:
    if not isinstance(changes, Mapping):
        raise TypeError(
            f"overrides[{_show(selector)}] must be a dict of SIM options, e.g. {{'token_ratio': 0.5}}; got {changes!r}."
        )
    return changes


def _show(selector: Any) -> str:
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if isinstance(selector, str):
        return repr(selector)
    return getattr(selector, "__name__", repr(selector))


def _no_match(what: str, selector: Any, candidates: Sequence[Boundary]) -> str:
    names = [b.name for b in candidates if b.eligible] or [b.name for b in candidates]
    shown = ", ".join(names[:24]) + (f", ... ({len(names)} in all)" if len(names) > 24 else "")
    types = sorted({b.type_name for b in candidates if b.eligible})
    return (
        f"{what} selector {_show(selector)} matched no block. Eligible block names: {shown}. "
        f"Module types: {', '.join(types[:16])}. "
        f"Globs use '*' within one dotted name part and '**' across parts; "
        f"simfx.find_boundaries(model, example_inputs) lists every candidate."
    )


def _nothing_selected(candidates: Sequence[Boundary], decisions: Mapping[str, str], blocks: Any) -> str:
    rows = [f"  {b.name} ({b.type_name}): {decisions.get(b.name, b.reason) or 'not selected'}" for b in candidates]
    shown = "\n".join(rows[:20]) + (f"\n  ... {len(rows) - 20} more" if len(rows) > 20 else "")
    if blocks == "auto":
        head = (
            "no eligible block: auto found no residual block, no weighted child of an "
            "nn.Sequential/nn.ModuleList, no block of 2+ weight layers and no weighted child of the model "
            "that can take SIM."
        )
    else:
        head = "no eligible block: the selection left no block that can take SIM."
    # An opaque module holding layers is why its layers are not candidates: say why it is opaque.
    hiding = [b for b in candidates if b.opaque and b.weight_layers >= 2]
    hidden = "".join(
        f"  {b.name} ({b.type_name}, {b.weight_layers} weight layers): {b.opaque_reason or 'kept opaque'}\n"
        for b in hiding[:4]
    )
    fixes = []
    if hiding:
        hidden = f"These run as one call, so no layer inside them can take SIM:\n{hidden}"
        fixes.append(
            "change the code named there so it traces (or keep it out of the training forward), or try "
            "frontend='export', which traces into modules fx keeps opaque"
        )
    usable = [b.name for b in candidates if b.eligible and not b.produces_output and b.has_weight]
    if usable:
        fixes.append(f"name blocks yourself, e.g. blocks={usable[:3]!r}")
    fixes.append("pass blocks=[...] with module classes or names of blocks that have one tensor in and one out")
    return f"{head} Candidates and why each was rejected:\n{shown}\n{hidden}Fix: " + "; or ".join(fixes) + "."


def _unique_keys(names: Iterable[str]) -> list[str]:
    keys, seen = [], set()
    for name in names:
        base = re.sub(r"\W", "_", name) or "block"
        if base[0].isdigit():
            base = f"b{base}"
        key, n = base, 1
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        keys.append(key)
    return keys
