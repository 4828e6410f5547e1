"""Inspect stage — :func:`explain`: what the pass did, as a printable report.

One row per boundary that got SIM (name, module type, shapes, residual or not,
objective and options, sampled tokens, reconstructor parameters and training
FLOPs per sample), totals against the model, the candidates that were rejected
with the reason, and the modules kept opaque. The report is built from
``sim.simfx_info`` (plain data) and the reconstructor modules; it renders as plain
text (``str(report)``), as Markdown (``report.to_markdown()``) and as plain data
(``report.to_dict()``, what ``simfx inspect --json`` writes).

FLOPs are counted per sample at the example input shape, as multiply-adds x 2:

* reconstructor (``rho_sim``), analytically: ``k`` sampled tokens per sample, each
  Linear costs ``2 * in * out`` per token; the trainable branch
  (``pre_proj -> proj -> predictor`` on ``y``) counts forward + backward (3x), the
  no-grad target branch (``proj`` on ``x``) forward only (1x). Pooling and the
  loss are elementwise and left out. Other objectives are measured once with
  ``torch.utils.flop_counter.FlopCounterMode`` on a copy, forward + backward.
* model: forward FLOPs of the original graph counted with ``FlopCounterMode`` on
  fake tensors (no kernel runs, no BatchNorm statistic moves), times 3 for
  training, the same convention as the trainable branch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..analysis.layout import token_count
from ..runtime.module import SimGraphModule
from .graphs import example_inputs_for
from .text import count_text, format_table, shape_text
from ..runtime.heads import BoundaryObjective
from ..runtime.objectives import RhoSim
from ..options import SimOptions
from ..runtime.module import NAMESPACE, strip
from ..runtime.tokens import sample_count

__all__ = ["BlockRow", "RejectedRow", "Report", "explain"]

# Options shown per block; ``objective`` has its own column and ``channel_dim``
# is shown only when set.
_SHOWN_OPTIONS = ("loss", "dim", "token_ratio", "token_sampling", "channel_ratio", "beta", "channel_dim")


@dataclass(frozen=True)
class BlockRow:
    """One boundary that got SIM. FLOPs are per sample, training (forward + backward)."""

    name: str
    module_type: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    residual: bool
    objective: str
    options: dict[str, Any]
    tokens: int | None
    sampled_tokens: int | None
    params: int
    flops: int | None
    key: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (shapes as lists)."""
        row = dataclasses.asdict(self)
        row["in_shape"], row["out_shape"] = list(self.in_shape), list(self.out_shape)
        return row


@dataclass(frozen=True)
class RejectedRow:
    """A candidate boundary that did not get SIM, and why."""

    name: str
    module_type: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Report:
    """What :func:`explain` returns: print it, or read its fields.

    ``model_params`` counts the original model only; ``model_flops`` is its training
    FLOPs per sample at the example input (None if they could not be counted).
    """

    model_name: str
    blocks: tuple[BlockRow, ...]
    rejected: tuple[RejectedRow, ...]
    opaque: dict[str, str]
    example_shapes: tuple[tuple[int, ...] | None, ...]
    model_params: int
    model_flops: int | None
    notes: tuple[str, ...] = field(default=())

    @property
    def added_params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def added_flops(self) -> int | None:
        if any(b.flops is None for b in self.blocks):
            return None
        return sum(b.flops for b in self.blocks)

    @property
    def param_share(self) -> float | None:
        """Added parameters as a fraction of the model's."""
        return self.added_params / self.model_params if self.model_params else None

    @property
    def flop_share(self) -> float | None:
        """Added training FLOPs as a fraction of the model's training FLOPs."""
        added = self.added_flops
        if added is None or not self.model_flops:
            return None
        return added / self.model_flops

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per boundary with SIM (the table's rows)."""
        return [b.to_dict() for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready plain data."""
        return {
            "model": self.model_name,
            "example_shapes": [list(s) if s is not None else None for s in self.example_shapes],
            "blocks": self.rows(),
            "totals": {
                "boundaries": len(self.blocks),
                "model_params": self.model_params,
                "added_params": self.added_params,
                "param_share": self.param_share,
                "model_train_flops_per_sample": self.model_flops,
                "added_train_flops_per_sample": self.added_flops,
                "flop_share": self.flop_share,
            },
            "rejected": [r.to_dict() for r in self.rejected],
            "opaque": dict(self.opaque),
            "notes": list(self.notes),
        }

    # --- rendering -------------------------------------------------------------

    def _common_options(self) -> dict[str, Any]:
        """The options most blocks share; rows then show only where they differ."""
        if not self.blocks:
            return {}
        counts = Counter(tuple(b.options.items()) for b in self.blocks)
        common = dict(counts.most_common(1)[0][0])
        objectives = Counter(b.objective for b in self.blocks)
        return {"objective": objectives.most_common(1)[0][0], **common}

    def _table_rows(self) -> tuple[list[str], list[list[str]]]:
        common = self._common_options()
        header = ["block", "type", "in", "out", "residual", "objective", "tokens k/N", "params", "train FLOPs", "options"]
        rows = []
        for b in self.blocks:
            differing = {k: v for k, v in b.options.items() if common.get(k, object()) != v}
            rows.append([
                b.name,
                b.module_type,
                shape_text(b.in_shape),
                shape_text(b.out_shape),
                "yes" if b.residual else "",
                b.objective,
                f"{b.sampled_tokens}/{b.tokens}" if b.tokens is not None else "?",
                count_text(b.params),
                count_text(b.flops) if b.flops is not None else "?",
                _options_text(differing) if differing else "",
            ])
        return header, rows

    def _summary_lines(self) -> list[str]:
        common = self._common_options()
        shapes = ", ".join(shape_text(s) for s in self.example_shapes if s is not None) or "?"
        lines = [
            f"{len(self.blocks)} boundaries with SIM in {self.model_name} (example input {shapes}).",
        ]
        if common:
            shown = {"objective": common.pop("objective"), **common}
            lines.append(f"Options (every block unless its row says otherwise): {_options_text(shown)}")
        share = ""
        if self.param_share is not None:
            share = f" ({self.param_share:.2%} of the model's {count_text(self.model_params)})"
        lines.append(f"Added parameters: {count_text(self.added_params)}{share}.")
        added = self.added_flops
        if added is None:
            lines.append("Added training FLOPs per sample: unknown.")
        elif self.flop_share is None:
            lines.append(f"Added training FLOPs per sample: {count_text(added)} (the model's could not be counted).")
        else:
            lines.append(
                f"Added training FLOPs per sample: {count_text(added)} ({self.flop_share:.2%} of the model's "
                f"{count_text(self.model_flops)}; forward + backward, target branch forward only)."
            )
        return lines

    def _rejected_groups(self) -> list[tuple[str, str]]:
        """(reason, names): reasons that differ only in a quoted node name share a line, and
        names that differ only in their numbers fold into one pattern (exact data: to_dict())."""
        groups: dict[str, list[RejectedRow]] = {}
        for r in self.rejected:
            groups.setdefault(re.sub(r"'[^']*'", "'...'", r.reason), []).append(r)
        out = []
        for folded, rows in groups.items():
            exact = {r.reason for r in rows}
            out.append((exact.pop() if len(exact) == 1 else folded, _fold_names([r.name for r in rows])))
        return out

    def __str__(self) -> str:
        header, rows = self._table_rows()
        out = self._summary_lines() + [""] + format_table(header, rows).splitlines()
        if self.rejected:
            out += ["", f"Rejected candidates ({len(self.rejected)}), by reason:"]
            out += [f"  {reason}: {names}" for reason, names in self._rejected_groups()]
        if self.opaque:
            out += ["", "Opaque modules (kept as one graph node when tracing):"]
            out += [f"  {name}: {why}" for name, why in self.opaque.items()]
        out += [f"Note: {note}" for note in self.notes]
        return "\n".join(out)

    __repr__ = __str__

    def to_markdown(self) -> str:
        """The report as Markdown: summary paragraph, a table of blocks, then rejections."""
        header, rows = self._table_rows()
        rows = [[f"`{r[0]}`", *r[1:9], f"`{r[9]}`" if r[9] else ""] for r in rows]
        out = ["  \n".join(self._summary_lines()), "", format_table(header, rows, markdown=True)]
        if self.rejected:
            out += ["", f"**Rejected candidates** ({len(self.rejected)}), by reason:", ""]
            out += [f"- {reason}: `{names}`" for reason, names in self._rejected_groups()]
        if self.opaque:
            out += ["", "**Opaque modules** (kept as one graph node when tracing):", ""]
            out += [f"- `{name}`: {why}" for name, why in self.opaque.items()]
        out += [f"\n*Note:* {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def explain(sim: nn.Module, example_inputs: Any = None, *, name: str | None = None) -> Report:
    """Report what :func:`simfx.transform` did to a model.

    Args:
        sim: the module :func:`simfx.transform` returned.
        example_inputs: inputs to count the model's FLOPs on; by default float
            tensors of the shapes the transform saw (``simfx_info.example_shapes``).
            Pass them when the forward takes non-float inputs (token ids).
        name: what to call the model in the report (default "the model").

    >>> import torch, torchvision, simfx
    >>> sim = simfx.transform(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    >>> report = simfx.explain(sim)
    >>> [row["name"] for row in report.rows()][:3]
    ['layer1.0', 'layer1.1', 'layer2.0']
    >>> report.added_params == sum(p.numel() for p in sim.simfx.parameters())
    True
    """
    if not isinstance(sim, SimGraphModule) or not hasattr(sim, "simfx_info"):
        raise TypeError(
            f"simfx.explain expects the module simfx.transform returned, got {type(sim).__name__}; "
            f"to preview a model before transforming it use simfx.find_boundaries(model, example_inputs)."
        )
    info = sim.simfx_info
    heads = sim.get_submodule(NAMESPACE)
    blocks = tuple(_block_row(block, heads.get_submodule(block.key)) for block in info.plan.blocks)
    planned = set(info.plan.names)
    rejected = tuple(
        RejectedRow(b.name, b.type_name, info.plan.decisions.get(b.name, b.reason) or "not selected")
        for b in info.candidates
        if b.name not in planned
    )
    model_params = sum(p.numel() for name, p in sim.named_parameters() if not name.startswith(f"{NAMESPACE}."))
    notes = []
    model_flops, problem = _model_train_flops(sim, example_inputs_for(sim, example_inputs))
    if problem:
        notes.append(f"the model's FLOPs could not be counted ({problem}); pass example_inputs= to explain().")
    return Report(
        model_name=name or "the model",
        blocks=blocks,
        rejected=rejected,
        opaque=dict(info.opaque),
        example_shapes=tuple(info.example_shapes),
        model_params=model_params,
        model_flops=model_flops,
        notes=tuple(notes),
    )


def _block_row(block, head: nn.Module) -> BlockRow:
    b, options = block.boundary, block.options
    tokens = sampled = None
    if isinstance(head, BoundaryObjective):
        tokens = token_count(b.out_meta, head.out_channel_dim)
        if tokens is not None:
            sampled = sample_count(tokens, head.ratio[0], head.ratio[1], head.min_tokens)
    shown = {k: getattr(options, k) for k in _SHOWN_OPTIONS}
    if shown["channel_dim"] is None:
        del shown["channel_dim"]
    return BlockRow(
        name=b.name,
        module_type=b.type_name,
        kind=b.kind,
        in_shape=tuple(b.in_shape),
        out_shape=tuple(b.out_shape),
        residual=b.residual,
        objective=options.objective,
        options=shown,
        tokens=tokens,
        sampled_tokens=sampled,
        params=sum(p.numel() for p in head.parameters()),
        flops=_head_flops(b, head, sampled),
        key=block.key,
    )


# --- FLOPs --------------------------------------------------------------------


def _linear_flops(modules: Sequence[nn.Module]) -> int:
    """Forward FLOPs per token of the Linear layers among ``modules``."""
    return sum(2 * m.in_features * m.out_features for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


def _head_flops(b, head: nn.Module, sampled: int | None) -> int | None:
    if not isinstance(head, BoundaryObjective) or sampled is None:
        return None
    out_meta = b.out_meta
    batch = out_meta.shape[0]
    # A (B, C) output is one sequence of B tokens: the k samples are shared by the batch.
    tokens_per_batch = sampled if out_meta.rank == 2 else sampled * batch
    objective = head.objective
    if isinstance(objective, RhoSim):
        trainable = _linear_flops([objective.pre_proj, objective.proj, objective.predictor])
        target = _linear_flops([objective.proj])
        per_token = 3 * trainable + target
        return per_token * tokens_per_batch // batch
    measured = _measured_objective_flops(head, sampled)
    if measured is None:
        return None
    return measured * tokens_per_batch // (batch * sampled)


def _measured_objective_flops(head: BoundaryObjective, sampled: int) -> int | None:
    """Forward + backward FLOPs of a custom objective on one sequence of ``sampled`` tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        objective = copy.deepcopy(head.objective).float()
        x = torch.randn(1, sampled, head.in_channels)
        y = torch.randn(1, sampled, head.out_channels, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            loss = objective(x if head.uses_input else None, y)
            if loss.requires_grad:
                loss.backward()
        return int(counter.get_total_flops())
    except Exception:  # a custom objective we cannot run alone: report "?" rather than fail
        return None


def _model_train_flops(sim: SimGraphModule, inputs) -> tuple[int | None, str]:
    """Training FLOPs per sample of the original model (3 x forward), counted on fake tensors."""
    if not inputs:
        return None, "the transform kept no example input shapes"
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    plain = strip(sim)
    batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
            state = {k: mode.from_tensor(v, static_shapes=True) for k, v in plain.state_dict(keep_vars=True).items()}
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                torch.func.functional_call(plain, state, fake)
        return 3 * int(counter.get_total_flops()) // max(1, int(batch)), ""
    except Exception as error:  # fake tensors refuse some models; the report stays useful without
        return None, str(error).splitlines()[0][:120] if str(error) else type(error).__name__


# --- formatting ---------------------------------------------------------------


def _options_text(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


def _fold_names(names: list[str], limit: int = 12) -> str:
    """Names differing only in numbers fold into one pattern: ``layer1.0.conv1`` ... -> ``layer*.*.conv1 (8)``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"\d+", "*", name), []).append(name)
    parts = [f"{pattern} ({len(group)})" if len(group) > 1 else group[0] for pattern, group in groups.items()]
    if len(parts) > limit:
        parts = parts[:limit] + [f"... {len(parts) - limit} more"]
    return ", ".join(parts)
