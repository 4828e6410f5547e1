"""Export-frontend transform time against a plain ``torch.export.export`` of the same model.

For each model, process CPU time of

* ``torch.export.export(model.train(), args, kwargs, strict=False)`` (plain export);
* the same with the batch axis of every input tensor symbolic (``Dim.AUTO``), as
  simfx exports so that the transformed module takes any batch size;
* ``simfx.transform(model, example, frontend="export")``, with and without the
  transform-time check (``check=False``), and its time per stage.

Medians over ``--repeats`` runs after one warm-up of each (the first export in a
process pays one-time costs), with a garbage collection before each run so one
run's garbage is not collected on another's clock. CPU time, not wall time: the
transform is single-threaded Python, and on a shared machine wall time also
measures waiting for a core. The flags simfx passes in training
(``use_cache=False``) are passed to the plain export too.

    python benchmarks/export_time.py                 # the table, into benchmarks/results/export_time.{json,md}
    python benchmarks/export_time.py --models bert-2x32 --repeats 3
    python benchmarks/export_time.py --quick         # one repeat of the smallest model (a smoke test)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import sys
import time
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


def _resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
    "bert-2x32": _bert,
    "transformers/mamba": library_models.mamba,
    "transformers/gpt2": library_models.gpt2,
    "transformers/llama": library_models.LIBRARY_MODELS["transformers/llama"],
    "ultralytics/yolo11n": library_models.LIBRARY_MODELS["ultralytics/yolo11n"],
    "torchvision/resnet18": _resnet18,
}


def _call(model, example) -> tuple[tuple, dict]:
    """The example as ``(args, kwargs)``, with the flags simfx passes in training."""
    from simfx.capture.inputs import example_inputs, training_inputs

    inputs, _ = training_inputs(model, example_inputs(example, model, "export_time"))
    return tuple(inputs.args), dict(inputs.kwargs)


def _batch_dynamic(model, args: tuple, kwargs: dict) -> dict:
    """``dynamic_shapes`` by forward parameter: axis 0 of every input tensor is ``Dim.AUTO``."""
    auto = torch.export.Dim.AUTO

    def spec(value):
        return {0: auto} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    shapes = {}
    for name, value in bound.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        else:
            shapes[name] = spec(value)
    return shapes


def _cpu_seconds(function: Callable[[], Any]) -> float:
    gc.collect()
    start = time.process_time()
    function()
    return time.process_time() - start


def plain_export_seconds(model, example, dynamic_batch: bool = False) -> float:
    """One plain export in training mode; with ``dynamic_batch``, the batch axis symbolic as simfx exports it."""
    args, kwargs = _call(model, example)
    shapes = _batch_dynamic(model, args, kwargs) if dynamic_batch else None
    return _cpu_seconds(lambda: torch.export.export(model.train(), args, kwargs, dynamic_shapes=shapes, strict=False))


def transform_seconds(model, example, check: bool = True) -> tuple[float, dict[str, float]]:
    """CPU seconds of ``simfx.transform(model, example, frontend="export")``, in all and per stage."""
    import simfx

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
        total = _cpu_seconds(lambda: simfx.transform(model, example, frontend="export", check=check))
    return total, dict(stages)


def measure(names, repeats: int, log=print) -> list[dict]:
    rows = []
    for name in names:
        model, example = MODELS[name]()
        # Warm-ups: the first export and the first transform in a process pay one-time costs.
        plain_export_seconds(model, example)
        plain_export_seconds(model, example, dynamic_batch=True)
        transform_seconds(model, example)
        plain, dynamic, runs, unchecked = [], [], [], []
        for _ in range(repeats):  # interleaved, so a change of load hits every column alike
            plain.append(plain_export_seconds(model, example))
            dynamic.append(plain_export_seconds(model, example, dynamic_batch=True))
            runs.append(transform_seconds(model, example))
            unchecked.append(transform_seconds(model, example, check=False)[0])
        row = {
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "plain_export_s": round(median(plain), 3),
            "plain_export_dynamic_batch_s": round(median(dynamic), 3),
            "transform_s": round(median(r[0] for r in runs), 3),
            "transform_no_check_s": round(median(unchecked), 3),
            "stages_s": {s: round(median(r[1].get(s, 0.0) for r in runs), 3) for s in STAGES},
        }
        base = max(row["plain_export_s"], 1e-9)
        row["ratio"] = round(row["transform_s"] / base, 2)
        row["ratio_no_check"] = round(row["transform_no_check_s"] / base, 2)
        row["ratio_dynamic_batch"] = round(row["transform_s"] / max(row["plain_export_dynamic_batch_s"], 1e-9), 2)
        rows.append(row)
        log(f"{name}: plain export {row['plain_export_s']} s ({row['plain_export_dynamic_batch_s']} s with a "
            f"dynamic batch), transform {row['transform_s']} s ({row['transform_no_check_s']} s with check=False): "
            f"{row['ratio']}x ({row['ratio_no_check']}x without the check, {row['ratio_dynamic_batch']}x against "
            f"the dynamic-batch export)")
    return rows


def to_markdown(rows: list[dict]) -> str:
    header = ["model", "params", "plain export (s)", "plain export, dynamic batch (s)", "simfx transform (s)",
              "transform, check=False (s)", "ratio", "ratio, check=False", "ratio vs dynamic-batch export",
              *(f"{s} (s)" for s in STAGES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], f"{r['params']:,}", str(r["plain_export_s"]), str(r["plain_export_dynamic_batch_s"]),
            str(r["transform_s"]), str(r["transform_no_check_s"]), f"{r['ratio']}x", f"{r['ratio_no_check']}x",
            f"{r['ratio_dynamic_batch']}x", *(str(r["stages_s"][s]) for s in STAGES)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of bert-2x32 only")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--stem", default=None, help="result file name (default export_time, export_time-quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names, repeats = (["bert-2x32"], 1) if args.quick else (args.models, args.repeats)
    started, load_before = datetime.now(), load_average()
    rows = measure(names, repeats)
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
