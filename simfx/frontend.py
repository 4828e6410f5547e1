"""Which tracer captures the model: ``torch.fx`` symbolic tracing or ``torch.export``.

``frontend="auto"`` (the default) tries fx first, keeping submodules it cannot
trace opaque, and switches to ``torch.export`` when fx fails in the model's own
forward or when the opaque modules hold more than a quarter of the model's
parameters (SIM would then see too little of it, and export sees inside them).
``"fx"`` and ``"export"`` force one frontend.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from torch import nn

from .errors import TraceError
from .trace import ExampleInputs, TracedModel, trace_model

__all__ = ["FRONTENDS", "capture"]

FRONTENDS = ("auto", "fx", "export")
# Above this share of parameters hidden in automatically opaque modules, auto tries export.
OPAQUE_LIMIT = 0.25

log = logging.getLogger("simfx")


def capture(
    model: nn.Module,
    inputs: ExampleInputs,
    *,
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    auto_opaque: bool = True,
) -> TracedModel:
    """Trace ``model`` with the chosen frontend; ``TracedModel.frontend`` says which one ran."""
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend={frontend!r} is not one of {FRONTENDS}.")
    if frontend == "export":
        return _export(model, inputs)
    fx_options = dict(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, auto_opaque=auto_opaque)
    if frontend == "fx":
        return trace_model(model, inputs, **fx_options)

    try:
        traced = trace_model(model, inputs, **fx_options)
    except TraceError as fx_error:
        if fx_error.module_name and not auto_opaque:
            raise  # the user asked for an error inside submodules rather than opaque blocks
        try:
            return _export(model, inputs)
        except TraceError as export_error:
            raise TraceError(
                f"{fx_error}\nsimfx also tried torch.export (frontend='auto'): {export_error.cause}",
                fx_error.module_name, fx_error.module_type, fx_error.cause,
            ) from export_error
    hidden = _opaque_share(model, traced)
    if hidden > OPAQUE_LIMIT:
        try:
            exported = _export(model, inputs)
        except TraceError as error:
            log.info("simfx: torch.export failed (%s); keeping the fx trace with opaque modules", error.cause)
            return traced
        log.info("simfx: fx left %.0f%% of the parameters in opaque modules; using torch.export", 100 * hidden)
        return exported
    return traced


def _export(model: nn.Module, inputs: ExampleInputs) -> TracedModel:
    from .export_trace import export_model  # torch.export loads lazily; fx users never pay for it

    return export_model(model, inputs)


def _opaque_share(model: nn.Module, traced: TracedModel) -> float:
    """Share of the model's parameters inside modules fx made opaque automatically."""
    auto = [name for name, reason in traced.opaque.items() if reason.startswith("made opaque")]
    if not auto:
        return 0.0
    total = {id(p): p.numel() for p in model.parameters()}
    hidden = {id(p): p.numel() for name in auto for p in model.get_submodule(name).parameters()}
    return sum(hidden.values()) / max(sum(total.values()), 1)
