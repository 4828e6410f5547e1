"""Helpers shared by the benchmark scripts: machine description, load average, result files.

Every benchmark records the machine it ran on and the load average around the
run, because on a shared machine a timing means little without them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

try:  # run from a checkout without installing simfx
    import simfx
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import simfx

__all__ = ["machine_info", "load_average", "median", "write_results", "command_line", "run_meta", "markdown_header"]


def machine_info() -> dict:
    """Python, torch and simfx versions, core count, torch threads, CPU (and GPU) model."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "simfx": simfx.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu_model"] = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), None
        )
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded (None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def median(values) -> float:
    return float(statistics.median(values))


def command_line(script: str, argv) -> str:
    """The command that reproduces this run, as typed."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([f"python benchmarks/{script}", *args]).strip()


def run_meta(script: str, argv, started, load_before) -> dict:
    """The header every result file carries: command, start time, load average around the run, machine."""
    return {
        "command": command_line(script, argv),
        "date": started.isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }


def markdown_header(meta: dict, details: str) -> list[str]:
    """A result's first Markdown lines: the command, then date, machine, torch, load and ``details``."""
    m = meta["machine"]
    return [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; {m.get('gpu') or m['cpu_model']}, {m['cpu_count']} cores ({m['machine']}), "
        f"{m['torch_threads']} torch threads, torch {m['torch']}; load average before/after "
        f"{meta['load_average_before']}/{meta['load_average_after']}; {details}",
    ]


def write_results(out: str | os.PathLike, stem: str, payload: dict, markdown: str) -> Path:
    """Write ``<stem>.json`` (atomically) and ``<stem>.md`` into ``out``; return the folder."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(folder / f"{stem}.json")
    (folder / f"{stem}.md").write_text(markdown)
    return folder
