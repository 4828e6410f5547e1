"""Run the code blocks of README.md that are marked as tested, exactly as they are written.

A block is marked by the comment ``<!-- tested: NAME -->`` on the line before its
```` ```python ```` fence. :func:`run_readme_block` executes it in a namespace holding
the names the README leaves to the reader's script (``model``, ``loader``, ...), here
tiny ones, and returns that namespace for the test to inspect.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    """The source of the README block marked ``<!-- tested: name -->``."""
    found = re.findall(rf"<!-- tested: {re.escape(name)} -->\n```python\n(.*?)\n```", README.read_text(), re.S)
    assert len(found) == 1, f"README.md has {len(found)} blocks marked '<!-- tested: {name} -->', expected one"
    return found[0]


def run_readme_block(name: str, **names: Any) -> dict[str, Any]:
    """Execute the marked block with ``names`` defined; returns the namespace it ran in."""
    namespace = {"__name__": f"readme_{name}", **names}
    exec(compile(readme_block(name), f"README.md <!-- tested: {name} -->", "exec"), namespace)
    return namespace
