"""Export-frontend transform time against a plain ``torch.export.export`` of the same model.

For each model, process CPU time of

* ``torch.export.export(model.train(), args, kwargs, strict=False)`` (plain export,
  static shapes: the axes simfx exports with, since the exported graph is only
  analysed and the model trains itself at any shape);
* ``simfx.transform(model, example, frontend="export")``, with and without the
  transform-time check (``check=False``), and its time per stage;
* ``simfx.transform(model, example)`` (``frontend="auto"``: fx first, export when
  fx cannot capture the model), what a user gets with defaults;
* with ``--before REV``, the same export-frontend transform by simfx at git
  revision ``REV`` with ``check=False`` (an earlier check may refuse a model), in a
  subprocess, interleaved with the runs above.

Medians over ``--repeats`` runs after one warm-up of each (the first export in a
process pays one-time costs), with a garbage collection before each run so one
run's garbage is not collected on another's clock. CPU time, not wall time: the
transform is single-threaded Python, and on a shared machine wall time also
measures waiting for a core. The flags simfx passes to the capture
(``use_cache=False``) are passed to the plain export too.

    python benchmarks/export_time.py                       # the table, into benchmarks/results/export_time.{json,md}
    python benchmarks/export_time.py --before 09a8c8a      # with simfx at 09a8c8a beside it
    python benchmarks/export_time.py --models llama-110m --repeats 3
    python benchmarks/export_time.py --quick               # one repeat of the smallest model (a smoke test)

``--transform-only`` times the export-frontend transform alone, for the
``--before`` subprocess (an older simfx first on the path).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import sys
import time
import warnings
from collections import defaultdict
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any, Callable
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import library_models  # noqa: E402
from runinfo import load_average, markdown_header, run_meta, write_results  # noqa: E402

# Stage -> (module whose global the pipeline calls, attribute): each is timed where it is called.
STAGES = {
    "export": ("simfx.capture.export_trace", "export_model"),  # imported where it is used
    "shapes": ("simfx.api", "propagate_shapes"),
    "boundaries": ("simfx.api", "find_candidates"),
    "select": ("simfx.api", "select_blocks"),
    "rewrite": ("simfx.api", "rewrite"),
    "check": ("simfx.api", "check_training_graph"),
}


def _bert():
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=32)
    return transformers.BertModel(config), torch.randint(0, 100, (2, 12))


def _llama_110m():
    import transformers

    config = transformers.LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 16000, (2, 128))}


def _resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
    "bert-2x32": _bert,
    "transformers/mamba": library_models.mamba,
    "transformers/gpt2": library_models.gpt2,
    "transformers/llama": library_models.LIBRARY_MODELS["transformers/llama"],
    "llama-110m": _llama_110m,
    "ultralytics/yolo11n": library_models.LIBRARY_MODELS["ultralytics/yolo11n"],
    "torchvision/resnet18": _resnet18,
}


def _call(model, example) -> tuple[tuple, dict]:
    """The example as ``(args, kwargs)``, with the flags simfx passes in training (``use_cache=False``)."""
    try:
        from simfx.capture.inputs import TRAINING_FLAGS
    except ImportError:  # an older simfx (--transform-only) passed none: give its transform today's flags
        TRAINING_FLAGS = {"use_cache": False}
    if isinstance(example, dict):
        args, kwargs = (), dict(example)
    else:
        args, kwargs = (example if isinstance(example, tuple) else (example,)), {}
    parameters = list(inspect.signature(type(model).forward).parameters)[1:]
    given = set(parameters[: len(args)]) | set(kwargs)
    kwargs.update({k: v for k, v in TRAINING_FLAGS.items() if k in parameters and k not in given})
    return args, kwargs


def _keywords(model, example) -> Any:
    """The example with every argument by keyword (a form every simfx version takes), or as it is."""
    args, kwargs = _call(model, example)
    if not kwargs:
        return example
    parameters = list(inspect.signature(type(model).forward).parameters)[1:]
    return {**dict(zip(parameters, args)), **kwargs}


def _cpu_seconds(function: Callable[[], Any]) -> float:
    gc.collect()
    start = time.process_time()
    function()
    return time.process_time() - start


def plain_export_seconds(model, example) -> float:
    """One plain export in training mode, static shapes."""
    args, kwargs = _call(model, example)
    return _cpu_seconds(lambda: torch.export.export(model.train(), args, kwargs, strict=False))


def transform_seconds(model, example, check: bool = True, frontend: str = "export") -> tuple[float, dict[str, float]]:
    """CPU seconds of ``simfx.transform(model, example, frontend=frontend)``, in all and per stage."""
    import simfx

    if check is None:  # --transform-only: the call every simfx version takes, no stages
        example = _keywords(model, example)
        return _cpu_seconds(lambda: simfx.transform(model, example, frontend="export")), {}

    stages: dict[str, float] = defaultdict(float)

    def timed(stage, function):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                stages[stage] += time.process_time() - start
        return wrapper

    with ExitStack() as stack:
        for stage, (module_name, attribute) in STAGES.items():
            module = importlib.import_module(module_name)
            stack.enter_context(mock.patch.object(module, attribute, timed(stage, getattr(module, attribute))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's notes about opaque modules, once per model is enough
            total = _cpu_seconds(lambda: simfx.transform(model, example, frontend=frontend, check=check))
    return total, dict(stages)


def measure(names, repeats: int, log=print, transform_only: bool = False, before: str | None = None) -> list[dict]:
    rows = []
    for name in names:
        model, example = MODELS[name]()
        check = None if transform_only else True
        # Warm-ups: the first export and the first transform in a process pay one-time costs.
        plain_export_seconds(model, example)
        transform_seconds(model, example, check=check)
        plain, runs, unchecked, auto, earlier = [], [], [], [], []
        for _ in range(repeats):  # interleaved, so a change of load hits every column alike
            plain.append(plain_export_seconds(model, example))
            runs.append(transform_seconds(model, example, check=check))
            if not transform_only:
                unchecked.append(transform_seconds(model, example, check=False)[0])
                auto.append(transform_seconds(model, example, frontend="auto")[0])
            if before:
                earlier.append(_transform_seconds_at(before, name))
        base = max(median(plain), 1e-9)
        row = {
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "plain_export_s": _rounded(plain),
            "transform_s": _rounded([r[0] for r in runs]),
            "transform_no_check_s": _rounded(unchecked),
            "transform_auto_s": _rounded(auto),
            "stages_s": {s: _rounded([r[1][s] for r in runs if s in r[1]]) for s in STAGES},
            "ratio": _rounded([r[0] for r in runs], base, 2),
            "ratio_no_check": _rounded(unchecked, base, 2),
            "before": before,
            "transform_before_s": _rounded(earlier),
            "ratio_before": _rounded(earlier, base, 2),
        }
        rows.append(row)
        log(f"{name}: plain export {row['plain_export_s']} s, transform {row['transform_s']} s "
            f"({row['transform_no_check_s']} s with check=False): {row['ratio']}x ({row['ratio_no_check']}x without "
            f"the check)" + (f"; simfx at {before}: {row['ratio_before']}x" if before else ""))
    return rows


def _transform_seconds_at(revision: str, name: str) -> float:
    """The export-frontend transform time (check=False) of simfx at git ``revision``: one run after a warm-up,
    in a subprocess."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "archive", revision, "simfx"], cwd=HERE.parent, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        script = (
            "import export_time as e, simfx, torch; torch.set_num_threads(1);"
            f"m, x = e.MODELS[{name!r}](); x = e._keywords(m, x);"
            "run = lambda: simfx.transform(m, x, frontend='export', check=False); run();"
            "print('SECONDS', e._cpu_seconds(run))"
        )
        env = {**__import__("os").environ, "PYTHONPATH": f"{folder}:{HERE}"}
        out = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True,
                             check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("SECONDS")))


def _rounded(values: list[float], per: float = 1.0, digits: int = 3) -> float | None:
    """The median of ``values`` over ``per``, rounded; None for a column not measured."""
    return round(median(values) / max(per, 1e-9), digits) if values else None


def _cell(value, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def to_markdown(rows: list[dict]) -> str:
    before = next((r["before"] for r in rows if r.get("before")), None)
    header = ["model", "params", "plain export (s)", "simfx transform (s)", "ratio", "transform, check=False (s)",
              "ratio, check=False", "check (s)"]
    if before:
        header += [f"transform at {before}, check=False (s)", f"ratio at {before}, check=False"]
    header += ["transform, frontend='auto' (s)", *(f"{s} (s)" for s in STAGES if s != "check")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", _cell(r["plain_export_s"]), _cell(r["transform_s"]),
                 _cell(r["ratio"], "x"), _cell(r["transform_no_check_s"]), _cell(r["ratio_no_check"], "x"),
                 _cell(r["stages_s"].get("check"))]
        if before:
            cells += [_cell(r["transform_before_s"]), _cell(r["ratio_before"], "x")]
        cells += [_cell(r["transform_auto_s"]), *(_cell(r["stages_s"][s]) for s in STAGES if s != "check")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of bert-2x32 only")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--stem", default=None, help="result file name (default export_time, export_time-quick)")
    parser.add_argument("--transform-only", action="store_true",
                        help="time the transform alone (no stages, check=False or auto): works with older simfx")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also time the export-frontend transform of simfx at this git revision")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names, repeats = (["bert-2x32"], 1) if args.quick else (args.models, args.repeats)
    started, load_before = datetime.now(), load_average()
    rows = measure(names, repeats, transform_only=args.transform_only, before=args.before)
    meta = run_meta("export_time.py", argv, started, load_before)
    markdown = "\n".join([
        *markdown_header(meta, f"process CPU seconds, medians of {repeats} after a warm-up, one torch thread"),
        "", to_markdown(rows), "",
    ])
    stem = args.stem or ("export_time-quick" if args.quick else "export_time")
    write_results(args.out, stem, {**meta, "rows": rows}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
