"""Leaf-module and autowrap registrations kept by model libraries, read when they are imported.

timm marks the pieces of its own code that ``torch.fx`` cannot trace
(``timm.layers.register_notrace_module`` / ``register_notrace_function``); simfx
honours those marks, so a timm model traces here exactly as timm's own feature
extraction traces it. The marks are read from timm at every trace (sources of
:mod:`simfx.capture.registry`, never copied in), and only from a timm the user
has already imported: simfx never imports it itself.
"""

from __future__ import annotations

import sys

from ..capture.registry import AUTOWRAP_FUNCTIONS, LEAF_MODULES

__all__: list[str] = []


def _timm_marks(name: str):
    def source():
        timm_fx = sys.modules.get("timm.layers._fx")
        return tuple(getattr(timm_fx, name, lambda: ())()) if timm_fx is not None else ()
    return source


LEAF_MODULES.add_source(_timm_marks("get_notrace_modules"))
AUTOWRAP_FUNCTIONS.add_source(_timm_marks("get_notrace_functions"))
