"""The ``simfx`` command: inspect, demo, --help and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from simfx.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "simfx", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_inspect_torchvision_resnet18_writes_report_svg_and_json(tmp_path, capsys):
    if shutil.which("dot") is None:  # --svg draws with graphviz, else with matplotlib
        pytest.importorskip("matplotlib")
    md, svg, js = tmp_path / "r.md", tmp_path / "r.svg", tmp_path / "out" / "r.json"
    code = main(["inspect", "torchvision:resnet18", "--input-shape", "2,3,32,32",
                 "--report", str(md), "--svg", str(svg), "--json", str(js)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 boundaries with SIM in torchvision:resnet18" in printed
    assert "1 output token(s) at the example input" in printed  # layer4 is 1x1 at 32x32: rejected
    assert md.read_text().count("| `layer") == 6
    ET.parse(svg)
    data = json.loads(js.read_text())
    assert [b["name"] for b in data["blocks"]] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert data["totals"]["added_params"] == sum(b["params"] for b in data["blocks"])
    assert len(data["graph_diff"]["added_nodes"]) == 7
    assert {r["name"] for r in data["rejected"]} >= {"layer4.0", "layer4.1", "fc"}


def test_inspect_a_factory_file_with_selectors(tmp_path, capsys):
    (tmp_path / "models.py").write_text(
        "import torch\n"
        "from conftest import TinyResNet\n"
        "def build(num_classes=5):\n"
        "    return TinyResNet(num_classes), torch.randn(2, 3, 16, 16)\n"
    )
    code = main(["inspect", f"{tmp_path / 'models.py'}:build", "--model-arg", "num_classes=3",
                 "--blocks", "blocks.*", "--exclude", "blocks.2", "--markdown"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| `blocks.0`" in out and "| `blocks.1`" in out and "| `blocks.2`" not in out
    assert "excluded by 'blocks.2'" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "resnet18"], "MODEL must look like torchvision:resnet50"),
    (["inspect", "torchvision:resnet1"], "did you mean resnet18"),
    (["inspect", "torchvision:resnet18", "--input-shape", "3x"], "--input-shape"),
    (["inspect", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--blocks", "nothing*"], "matched no block"),
    (["inspect", "nowhere.py:build"], "no such file"),
])
def test_errors_are_one_line_and_non_zero(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("simfx inspect: error:")


@pytest.mark.parametrize("command", [[], ["inspect"], ["demo"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: simfx" in out
    assert {"": "inspect", "inspect": "--input-shape", "demo": "--epochs"}[" ".join(command)] in out


def test_bad_arguments_in_a_subprocess():
    bad = _run("inspect")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "MODEL" in bad.stderr


def test_demo_tiny_run(tmp_path, capsys):
    for name in ("sklearn", "matplotlib", "tqdm"):  # simfx[demo]
        pytest.importorskip(name)
    png = tmp_path / "curves.png"
    code = main(["demo", "--epochs", "1", "--subset", "48", "--batch-size", "24", "--image-size", "32",
                 "--no-progress", "--out", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    for word in ("baseline", "sim", "task loss", "SIM loss", "test acc", str(png)):
        assert word in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
