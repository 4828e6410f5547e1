"""benchmarks/gpu_check.sh where there is no GPU: its arguments, the no-CUDA stop, dry runs.

The real check runs on a lent GPU machine; what can go wrong before that (a typo in
an option, a pytest selection that matches nothing, a benchmark flag that does not
exist, a budget that cannot fit) is checked here, on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import loaded_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def _run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running these tests, not PATH's python3
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _summary(folder: Path) -> dict[str, dict]:
    return {step["step"]: step for step in json.loads((folder / "summary.json").read_text())["steps"]}


@pytest.mark.parametrize("args, message", [
    ([], "missing OUTDIR"),
    (["--part", "some", "OUT"], "--part is all, tests or bench, got 'some'"),
    (["--budget", "soon", "OUT"], "--budget takes whole seconds, got 'soon'"),
    (["--fast", "OUT"], "unknown option '--fast'"),
    (["OUT", "OTHER"], "one OUTDIR, got 'OUT' and 'OTHER'"),
    (["--part"], "usage: benchmarks/gpu_check.sh"),
])
def test_bad_arguments_exit_2_and_say_what_is_wrong(args, message, tmp_path):
    done = _run(*(str(tmp_path / a) if a.isupper() else a for a in args))
    assert done.returncode == 2 and done.stdout == ""
    assert message.replace("'OUT'", f"'{tmp_path / 'OUT'}'").replace("'OTHER'", f"'{tmp_path / 'OTHER'}'") \
        in done.stderr
    assert not (tmp_path / "OUT").exists()


def test_help_names_every_step():
    done = _run("--help")
    assert done.returncode == 0
    for words in ("usage", "pytest -m gpu", "first_compile.py", "overhead.py --device cuda", "reduce-overhead",
                  "max_memory_allocated", "--dry-run", "summary.json"):
        assert words in done.stdout, words


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "results"
    start = time.monotonic()
    done = _run(str(out))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("gpu_check.sh: no CUDA device (torch ") and "run it on the GPU machine" in done.stderr
    assert time.monotonic() - start < 60  # importing torch, nothing more
    assert not out.exists()


def test_dry_run_collects_the_gpu_tests_in_two_halves(tmp_path):
    done = _run("--dry-run", "--part", "tests", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    steps = _summary(tmp_path)
    collected = {}
    for name, step in steps.items():
        assert step["status"] == "passed", step  # pytest exits 5 where a selection matches nothing
        collected[name] = int(re.match(r"(\d+)/\d+ tests collected", step["result"]).group(1))
    fast = collected["tests (collect only): -m gpu -k 'not autotune'"]
    autotune = collected["tests (collect only): -m gpu -k 'autotune'"]
    assert autotune == 1 and fast >= 1  # the max-autotune compile test runs beside all the others
    listed = (tmp_path / "gpu-tests-autotune.log").read_text()
    assert "test_cuda_inductor_modes_train_resnet50[max-autotune-no-cudagraphs]" in listed


def test_dry_run_of_the_benchmarks_gives_commands_their_scripts_accept(tmp_path):
    done = _run("--dry-run", "--part", "bench", "results", cwd=tmp_path)  # OUTDIR relative to the caller
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "results"
    steps = _summary(out)
    assert list(steps) == ["first-compile", "overhead"] and all(s["status"] == "dry run" for s in steps.values())
    for step, script in (("first-compile", "first_compile.py"), ("overhead", "overhead.py")):
        line = (out / steps[step]["log"]).read_text()
        command = shlex.split(line.split(": ", 1)[1])
        assert command[1] == f"benchmarks/{script}"
        with loaded_script(ROOT / "benchmarks" / script, f"gpu_check_{step.replace('-', '_')}") as module:
            args = module.parse_args(command[2:])  # every flag the check passes exists
        assert (args.device, args.image_size, args.batch, args.dtype) == ("cuda", 224, 128, "bf16")
        assert args.out == str(out)
    assert args.models == ["resnet50"] and args.modes == ["eager", "compiled", "reduce-overhead"]


def test_a_budget_too_small_for_a_step_skips_it_and_fails(tmp_path):
    done = _run("--dry-run", "--budget", "40", str(tmp_path))
    assert done.returncode == 1
    statuses = {name: step["status"] for name, step in _summary(tmp_path).items()}
    # The tests keep 260 s for the benchmarks, first-compile 150 s for overhead: neither fits in 40 s.
    assert list(statuses.values()) == ["not run: out of time"] * 3 + ["dry run"]
    assert "not run: out of time" in (tmp_path / "summary.md").read_text()
