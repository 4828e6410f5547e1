"""The stack integrations import their libraries only when used, and their docstring examples run."""

from __future__ import annotations

import doctest
import subprocess
import sys


STACKS = ("transformers", "ultralytics", "lightning", "pytorch_lightning", "accelerate", "tensorboard", "timm")


def test_importing_simfx_and_its_integrations_imports_no_stack_library():
    code = (
        "import sys, simfx, simfx.metrics, simfx.integrations.transformers, simfx.integrations.ultralytics, "
        "simfx.integrations.lightning\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({STACKS!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_integration_docstring_examples_run():
    from simfx.integrations import lightning, ultralytics

    modules = [lightning]
    if _installed("ultralytics"):
        ultralytics.SimDetectionTrainer  # noqa: B018 - builds the class, whose docstring holds an example
        modules.append(ultralytics)
    for module in modules:
        failures, tried = doctest.testmod(module)[:2]
        assert tried > 0 and failures == 0, module.__name__


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
