"""Leaf-module and autowrap registrations for model libraries, applied when they are imported.

timm marks the pieces of its own code that ``torch.fx`` cannot trace
(``timm.layers.register_notrace_module`` / ``register_notrace_function``); simfx
honours those marks, so a timm model traces here exactly as timm's own feature
extraction traces it. The registrations are read before every trace, and only
from libraries the user has already imported: simfx never imports them itself.
"""

from __future__ import annotations

import sys

from .capture.fx_trace import add_registration_hook, register_autowrap_function, register_leaf_module

__all__: list[str] = []


def _timm_registrations() -> None:
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return
    for module_class in getattr(timm_fx, "get_notrace_modules", lambda: ())():
        register_leaf_module(module_class)
    for function in getattr(timm_fx, "get_notrace_functions", lambda: ())():
        register_autowrap_function(function)


add_registration_hook(_timm_registrations)
