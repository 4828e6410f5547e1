"""Export-frontend transform time against a plain ``torch.export.export`` of the same model.

For each model: process CPU time of ``torch.export.export(model.train(), args, strict=False)``
and of ``simfx.transform(model, example, frontend="export")``, medians over
``--repeats`` runs after one warm-up of each (the first export in a process pays
one-time costs), the ratio, and the transform's time per stage. CPU time, not wall
time: the transform is single-threaded Python, and on a shared machine wall time
also measures waiting for a core.

    python benchmarks/export_time.py                 # the table, into benchmarks/results/export_time.{json,md}
    python benchmarks/export_time.py --quick         # one repeat of the smallest model (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from statistics import median
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import library_models  # noqa: E402
from runinfo import load_average, markdown_header, run_meta, write_results  # noqa: E402

STAGES = {
    "export": ("simfx.capture.export_trace", "export_model"),
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


MODELS = {
    "bert-2x32": _bert,
    "llama-2x32": lambda: library_models._llama("Llama"),
    "resnet18": _resnet18,
}


def _args(example):
    if isinstance(example, dict):
        return (), example
    return (example if isinstance(example, tuple) else (example,)), {}


def plain_export_seconds(model, example, dynamic_batch: bool = False) -> float:
    """One plain export in training mode; with ``dynamic_batch``, the batch axis symbolic as simfx exports it.

    The flags simfx passes in training (``use_cache=False``) are passed here too.
    """
    from simfx.capture.inputs import ExampleInputs, training_inputs

    args, kwargs = _args(example)
    kwargs = dict(training_inputs(model, ExampleInputs(args, kwargs))[0].kwargs)
    shapes = None
    if dynamic_batch:
        auto = torch.export.Dim.AUTO
        shapes = (tuple({0: auto} for _ in args) if args else None) or {
            k: ({0: auto} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
    start = time.process_time()
    torch.export.export(model.train(), args, kwargs, dynamic_shapes=shapes, strict=False)
    return time.process_time() - start


def transform_seconds(model, example) -> tuple[float, dict[str, float]]:
    import importlib

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
        start = time.process_time()
        simfx.transform(model, example, frontend="export")
        total = time.process_time() - start
    return total, dict(stages)


def measure(names, repeats: int, log=print) -> list[dict]:
    rows = []
    for name in names:
        model, example = MODELS[name]()
        plain_export_seconds(model, example)  # warm-up: one-time costs of the first export
        transform_seconds(model, example)
        plain = [plain_export_seconds(model, example) for _ in range(repeats)]
        dynamic = [plain_export_seconds(model, example, dynamic_batch=True) for _ in range(repeats)]
        runs = [transform_seconds(model, example) for _ in range(repeats)]
        row = {
            "model": name,
            "plain_export_s": round(median(plain), 3),
            "plain_export_dynamic_batch_s": round(median(dynamic), 3),
            "transform_s": round(median(r[0] for r in runs), 3),
            "stages_s": {s: round(median(r[1].get(s, 0.0) for r in runs), 3) for s in STAGES},
        }
        row["ratio"] = round(row["transform_s"] / max(row["plain_export_s"], 1e-9), 2)
        row["ratio_dynamic_batch"] = round(row["transform_s"] / max(row["plain_export_dynamic_batch_s"], 1e-9), 2)
        rows.append(row)
        log(f"{name}: plain export {row['plain_export_s']} s ({row['plain_export_dynamic_batch_s']} s with a "
            f"dynamic batch), transform {row['transform_s']} s: {row['ratio']}x ({row['ratio_dynamic_batch']}x)")
    return rows


def to_markdown(rows: list[dict]) -> str:
    header = ["model", "plain export (s)", "plain export, dynamic batch (s)", "simfx transform (s)", "ratio",
              "ratio vs dynamic", *(f"{s} (s)" for s in STAGES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(
            [r["model"], str(r["plain_export_s"]), str(r["plain_export_dynamic_batch_s"]), str(r["transform_s"]),
             f"{r['ratio']}x", f"{r['ratio_dynamic_batch']}x", *(str(r["stages_s"][s]) for s in STAGES)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of bert-2x32 only")
    parser.add_argument("--out", type=Path, default=HERE / "results")
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
    write_results(args.out, "export_time-quick" if args.quick else "export_time", {**meta, "rows": rows}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
