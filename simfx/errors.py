"""Errors simfx raises. Each message names the module or node involved and what to do next."""

from __future__ import annotations


class SimfxError(Exception):
    """Base class of every error simfx raises on purpose."""


class TraceError(SimfxError, RuntimeError):
    """torch.fx could not trace the model.

    Attributes:
        module_name: qualified name of the innermost module being traced when it
            failed ("" for the model's own forward).
        module_type: that module's class, or None.
        cause: the first line of the tracer's own error.
    """

    def __init__(self, message: str, module_name: str = "", module_type: type | None = None, cause: str = ""):
        super().__init__(message)
        self.module_name = module_name
        self.module_type = module_type
        self.cause = cause


class NoEligibleBlockError(SimfxError, ValueError):
    """No boundary of the model could take SIM (or the selection left none)."""


class SelectorError(SimfxError, ValueError):
    """A selector in ``blocks=``, ``exclude=`` or ``overrides=`` matched nothing usable."""


class ExampleInputsError(SimfxError, TypeError):
    """``example_inputs`` is missing or is not a tensor / tuple of arguments."""


class FaithfulnessError(SimfxError, RuntimeError):
    """simfx's training graph would not compute what the model computes, and simfx cannot fix it.

    Raised at transform time when the check on the example inputs finds a
    difference (output structure or values, which parameters get gradients), or
    when tracing would lose something the model relies on; and at run time when
    a module whose code was traced has changed since (new hooks, a different
    train/eval mode). The message names the module or source line and the fix.
    """


class InputShapeError(SimfxError, ValueError):
    """Kept for code that catches it; simfx no longer raises it.

    A model captured with torch.export used to train through a graph specialised to the
    example's sizes; it now trains by running its own forward, at every shape it accepts.
    """


class UnsupportedModelError(SimfxError, TypeError):
    """The model is wrapped in a way simfx cannot transform (DDP, FSDP, TorchScript)."""
