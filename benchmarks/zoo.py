"""Model-zoo coverage: does `simfx.transform` hold on the models people train?

For each model of a zoo (randomly initialised, at the smallest probed input it
accepts) the runner does: transform (with simfx's transform-time check, whose
outcome is its own column) -> one eager training step (forward, backward, SGD
step) -> eval-equality check against the original model -> one training step
and the eval-equality check again at a second shape (batch 3, and the next
probed resolution, or the library model's second sequence length or
resolution) -> optionally ``torch.compile(fullgraph=True)`` and one compiled
step. Each model runs in its own subprocess with a time budget, so a crash or a
hang costs one row, not the run.

    python benchmarks/zoo.py                              # torchvision classification
    python benchmarks/zoo.py --zoo torchvision-extra      # segmentation, video, a detection backbone
    python benchmarks/zoo.py --zoo timm                   # one (smallest) model per timm family
    python benchmarks/zoo.py --zoo timm --models 'conv*' --compile aot_eager

Results go to ``benchmarks/results/zoo-<zoo>.json`` and ``.md`` (``zoo-<zoo>-subset.*`` when
``--models`` filters the zoo).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo

HERE = Path(__file__).resolve().parent
RESULT_MARK = "ZOO-RESULT "
IMAGE_SIZES = (64, 96, 128, 160, 192, 224, 256, 299)
VIDEO_SHAPES = ((3, 4, 64, 64), (3, 8, 64, 64), (3, 8, 112, 112), (3, 16, 112, 112), (3, 16, 224, 224))


@dataclass
class ModelSpec:
    """How to build one zoo model and which input shapes (without batch) to probe, smallest first.

    Library models that take more than an image (token ids, masks, a timestep) give
    ``built``: a function returning ``(model, example_inputs)`` instead of ``build``,
    and ``second``: a training batch at their second shape.
    """

    name: str
    zoo: str
    build: Callable[[], torch.nn.Module] | None = field(default=None, repr=False)
    shapes: tuple[tuple[int, ...], ...] = tuple((3, s, s) for s in IMAGE_SIZES)
    built: Callable[[], tuple[torch.nn.Module, Any]] | None = field(default=None, repr=False)
    second: Callable[[], Any] | None = field(default=None, repr=False)


@dataclass
class ZooResult:
    model: str
    zoo: str
    input_shape: list[int] | None = None
    params: int | None = None
    plain_fx: bool | None = None
    traced: bool = False
    candidates: int | None = None
    boundaries: int | None = None
    opaque: int | None = None
    frontend: str | None = None
    calls: int | None = None
    check: str | None = None
    added_params_pct: float | None = None
    step_ok: bool = False
    eval_equal: bool = False
    second_shape: list[int] | None = None
    second_ok: bool | None = None
    compile_ok: bool | None = None
    seconds: float | None = None
    stage: str = ""
    error: str = ""


# --- zoos ---------------------------------------------------------------------------


def _torchvision_classification() -> list[ModelSpec]:
    from torchvision import models

    specs = []
    for name in models.list_models(module=models):
        kwargs: dict[str, Any] = {"weights": None, "num_classes": 10}
        shapes = ModelSpec.shapes
        if name.startswith("vit_"):
            # ViTs fix their grid at build time; four patches per side is the same
            # architecture with a smaller positional table.
            patch = int(name.rsplit("_", 1)[1])
            kwargs["image_size"] = 4 * patch
            shapes = ((3, 4 * patch, 4 * patch),)
        if name in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = True
        specs.append(ModelSpec(name, "torchvision", lambda n=name, k=kwargs: models.get_model(n, **k), shapes))
    return specs


def _torchvision_extra() -> list[ModelSpec]:
    from torchvision import models

    specs = []
    for name in models.list_models(module=models.segmentation):
        specs.append(ModelSpec(
            name, "torchvision-extra",
            lambda n=name: models.get_model(n, weights=None, weights_backbone=None, num_classes=5, aux_loss=False),
        ))
    for name in models.list_models(module=models.video):
        specs.append(ModelSpec(
            name, "torchvision-extra", lambda n=name: models.get_model(n, weights=None, num_classes=10),
            shapes=VIDEO_SHAPES,
        ))
    for name in ("fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn"):
        specs.append(ModelSpec(
            f"{name}.backbone", "torchvision-extra",
            lambda n=name: models.get_model(n, weights=None, weights_backbone=None, num_classes=5).backbone,
        ))
    return specs


def timm_families() -> dict[str, str]:
    """One model per timm module (family): the variant with the fewest parameters.

    Parameters are counted on the meta device, so nothing is allocated.
    """
    import timm

    chosen: dict[str, str] = {}
    for family in timm.list_modules():
        best = None
        # timm's test_* models are toy configurations, not a family's real variants.
        for name in (n for n in timm.list_models(module=family) if not n.startswith("test_")):
            try:
                with torch.device("meta"):
                    count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - a variant that cannot build is simply not a candidate
                continue
            if best is None or count < best[0]:
                best = (count, name)
        if best is not None:
            chosen[family] = best[1]
    return chosen


def _timm() -> list[ModelSpec]:
    import timm

    cache = HERE / "results" / "timm-families.json"
    families = json.loads(cache.read_text()) if cache.exists() else None
    if families is None:
        families = timm_families()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(families, indent=1, sort_keys=True))
    specs = []
    for family, name in sorted(families.items()):
        def build(n=name):
            return timm.create_model(n, pretrained=False, num_classes=10)

        cfg_size = None
        try:
            cfg_size = tuple(timm.models.get_pretrained_cfg(name).input_size)
        except Exception:  # noqa: BLE001 - no pretrained cfg: probe the generic sizes
            pass
        shapes = tuple((3, s, s) for s in IMAGE_SIZES)
        if cfg_size is not None and cfg_size not in shapes:
            shapes = shapes + (cfg_size,)
        specs.append(ModelSpec(f"{family}:{name}", "timm", build, shapes=shapes))
    return specs


def _libraries() -> list[ModelSpec]:
    sys.path.insert(0, str(HERE))
    from library_models import LIBRARY

    return [ModelSpec(name, "libraries", built=entry.example, second=entry.second) for name, entry in LIBRARY.items()]


ZOOS: dict[str, Callable[[], list[ModelSpec]]] = {
    "torchvision": _torchvision_classification,
    "torchvision-extra": _torchvision_extra,
    "timm": _timm,
    "libraries": _libraries,
}


# --- one model ------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _task_loss(output: Any) -> torch.Tensor:
    """A stand-in task loss touching every floating output (models return tensors, tuples or dicts)."""
    return sum(t.float().square().mean() for t in _tensors(output) if t.is_floating_point())


def plain_fx_traces(model: torch.nn.Module) -> bool:
    """Whether plain ``torch.fx`` traces the model with the library's own leaf registrations.

    This is the yardstick of the zoo targets: what fx alone manages (with timm's
    notrace marks when timm is imported), before simfx's opaque retries or export.
    """
    leaf_classes: tuple[type, ...] = ()
    autowrap: tuple[Callable, ...] = ()
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is not None:
        leaf_classes = tuple(timm_fx.get_notrace_modules())
        autowrap = tuple(timm_fx.get_notrace_functions())

    class _LibraryTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            return isinstance(module, leaf_classes) or super().is_leaf_module(module, qualified_name)

    try:
        _LibraryTracer(autowrap_functions=autowrap).trace(copy.deepcopy(model).train())
        return True
    except Exception:  # noqa: BLE001 - any trace failure means "not plain-fx traceable"
        return False


def outputs_identical(expected: Any, got: Any) -> bool:
    """Bit-equality of every output tensor, NaNs at the same places counting as equal.

    A random-init model can overflow after one training step; both the original
    and the transformed model then hold the same NaNs, which ``torch.equal`` rejects.
    """
    left, right = _tensors(expected), _tensors(got)
    if len(left) != len(right):
        return False
    for a, b in zip(left, right):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            nan_a, nan_b = torch.isnan(a), torch.isnan(b)
            if not torch.equal(nan_a, nan_b) or not torch.equal(a[~nan_a], b[~nan_b]):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _call(module, example: Any):
    """Call ``module`` the way ``example_inputs`` describe a call: a tensor, positional args, or keywords."""
    if isinstance(example, dict):
        return module(**example)
    if isinstance(example, (tuple, list)):
        return module(*example)
    return module(example)


def smallest_input(model: torch.nn.Module, shapes, batch: int = 2) -> tuple[int, ...]:
    """The first shape (with batch) a training-mode forward of a copy of ``model`` accepts."""
    probe = copy.deepcopy(model).train()
    last: BaseException | None = None
    for shape in shapes:
        try:
            with torch.no_grad():
                probe(torch.randn(batch, *shape))
            return (batch, *shape)
        except Exception as error:  # noqa: BLE001 - too small an input raises anything
            last = error
    raise RuntimeError(f"no probed input shape works: {_first_line(last)}")


def check_model(spec: ModelSpec, compile_backend: str | None = None, batch: int = 2) -> ZooResult:
    """Transform, train one step, compare eval outputs, optionally compile; never raises."""
    import simfx

    result = ZooResult(spec.name, spec.zoo)
    started = time.perf_counter()
    stage = "build"
    try:
        torch.manual_seed(0)
        if spec.built is not None:
            model, example = spec.built()
            inputs = lambda: example  # noqa: E731 - the library example, again
        else:
            model = spec.build()
        result.params = sum(p.numel() for p in model.parameters())
        result.plain_fx = plain_fx_traces(model)
        stage = "input"
        if spec.built is None:
            shape = smallest_input(model, spec.shapes, batch)
            example = torch.randn(*shape)
            inputs = lambda: torch.randn(*shape)  # noqa: E731 - a fresh batch of the same shape
        result.input_shape = list(_tensors(example)[0].shape)

        stage = "transform"
        sim = simfx.transform(model, example)
        info = sim.simfx_info
        result.traced = True
        result.candidates = len(info.candidates)
        result.boundaries = len(info.plan.blocks)
        result.opaque = len(info.opaque)
        result.frontend = info.frontend
        result.calls = len(info.calls)
        result.check = info.check
        added = sum(p.numel() for p in sim.simfx.parameters())
        result.added_params_pct = round(100.0 * added / max(result.params, 1), 3)

        stage = "train step"
        sim.train()
        optimizer = torch.optim.SGD(sim.parameters(), lr=1e-3)
        out, sim_loss = _call(sim, inputs())
        if not torch.isfinite(sim_loss) or not sim_loss > 0:
            raise RuntimeError(f"sim_loss is {sim_loss.item()}")
        (_task_loss(out) + sim_loss).backward()
        missing = [n for n, p in sim.simfx.named_parameters() if p.grad is None]
        if missing:
            raise RuntimeError(f"no gradient for reconstructor parameters {missing[:3]}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.step_ok = True

        stage = "eval equality"
        result.eval_equal = _evaluates_equal(model, sim, inputs())

        stage = "second shape"
        result.second_ok = False
        x = spec.second() if spec.second is not None else _second_image(model, spec.shapes, example)
        result.second_shape = list(_tensors(x)[0].shape)
        sim.train()
        out, sim_loss = _call(sim, x)
        if not torch.isfinite(sim_loss) or not sim_loss > 0:
            raise RuntimeError(f"sim_loss is {sim_loss.item()}")
        (_task_loss(out) + sim_loss).backward()
        optimizer.step()
        result.second_ok = _evaluates_equal(model, sim, x)

        if compile_backend:
            stage = "compile"
            result.compile_ok = False
            torch._dynamo.reset()
            sim.train()
            compiled = torch.compile(sim, backend=compile_backend, fullgraph=True)
            out, sim_loss = _call(compiled, inputs())
            (_task_loss(out) + sim_loss).backward()
            if not torch.isfinite(sim_loss):
                raise RuntimeError("compiled sim_loss is not finite")
            result.compile_ok = True
        stage = ""
    except Exception as error:  # noqa: BLE001 - the runner records every failure as a row
        result.stage, result.error = stage, _first_line(error)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _evaluates_equal(model: torch.nn.Module, sim: torch.nn.Module, x: Any) -> bool:
    """In eval mode the transformed module's output is the model's, bit for bit, with a zero loss; else an error."""
    model.eval()
    sim.eval()
    with torch.no_grad():
        expected = _call(model, x)
        got, zero = _call(sim, x)
    if outputs_identical(expected, got) and float(zero) == 0.0:
        return True
    pairs = list(zip(_tensors(expected), _tensors(got)))
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.shape == b.shape), default=-1)
    raise RuntimeError(f"eval output differs from the original model (max abs diff {diff:.3g})")


def _second_image(model: torch.nn.Module, shapes, example: torch.Tensor) -> torch.Tensor:
    """A batch of 3 at the next probed shape the model accepts after the example's (else at the example's)."""
    now = tuple(example.shape[1:])
    later = tuple(s for s in shapes if s > now) if now in shapes else ()
    try:
        return torch.randn(*smallest_input(model, later, batch=3)) if later else torch.randn(3, *now)
    except RuntimeError:  # no later shape works: the model fixes its size
        return torch.randn(3, *now)


# --- the runner ---------------------------------------------------------------------


def _run_in_subprocess(spec: ModelSpec, args) -> ZooResult:
    command = [sys.executable, __file__, "--worker", spec.name, "--zoo", spec.zoo]
    if args.compile:
        command += ["--compile", args.compile]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.budget, env=env)
    except subprocess.TimeoutExpired:
        return ZooResult(spec.name, spec.zoo, stage="budget", error=f"over the {args.budget:.0f} s budget")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return ZooResult(**json.loads(line[len(RESULT_MARK):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return ZooResult(spec.name, spec.zoo, stage="crash", error=f"exit {proc.returncode}: {tail}"[:300])


def _mark(value) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value] if isinstance(value, (bool, type(None))) else str(value)


def _check_mark(check: str | None) -> str:
    if check is None:
        return "-"
    return "passed" if check == "passed" else f"**{check}**"


def to_markdown(results: list[ZooResult], compile_backend: str | None) -> str:
    header = ["model", "input", "plain fx", "traced", "frontend", "auto blocks", "as calls", "opaque", "check",
              "added params %", "step", "eval bit-equal", "second shape", "trains and evals there"]
    if compile_backend:
        header.append(f"compile ({compile_backend})")
    header += ["s", "first error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [
            r.model, "x".join(map(str, r.input_shape or [])) or "-", _mark(r.plain_fx), _mark(r.traced),
            _mark(r.frontend), _mark(r.boundaries), _mark(r.calls), _mark(r.opaque), _check_mark(r.check),
            _mark(r.added_params_pct), _mark(r.step_ok), _mark(r.eval_equal),
            "x".join(map(str, r.second_shape or [])) or "-", _mark(r.second_ok),
        ]
        if compile_backend:
            row.append(_mark(r.compile_ok))
        row += [_mark(r.seconds), (f"{r.stage}: {r.error}" if r.error else "").replace("|", "\\|")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(results: list[ZooResult], compile_backend: str | None) -> str:
    n = len(results)
    full = sum(r.traced and r.step_ok and r.eval_equal for r in results)
    text = f"{full}/{n} models transform, train a step and evaluate bit-equal ({100.0 * full / max(n, 1):.1f}%)"
    checked = sum(r.check == "passed" for r in results)
    text += f"; the transform-time check passed on {checked}/{n}"
    second = sum(bool(r.second_ok) for r in results)
    text += f"; {second}/{n} also train and evaluate bit-equal at a second batch size and shape"
    plain = [r for r in results if r.plain_fx]
    plain_full = sum(r.traced and r.step_ok and r.eval_equal for r in plain)
    if plain:  # the library models all need simfx's own capture: no such clause for them
        text += (
            f"; of the {len(plain)} that plain torch.fx traces, {plain_full} "
            f"({100.0 * plain_full / len(plain):.1f}%)"
        )
    if compile_backend:
        compiled = sum(bool(r.compile_ok) for r in results)
        text += f"; {compiled}/{n} compile with fullgraph=True ({compile_backend})"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="torchvision")
    parser.add_argument("--models", default="*", help="glob over model names (default: all)")
    parser.add_argument("--compile", metavar="BACKEND", default=None,
                        help="also torch.compile(fullgraph=True) with this backend (inductor, aot_eager, eager)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per model (default 300)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    specs = [s for s in ZOOS[args.zoo]() if fnmatch.fnmatch(s.name, args.models)]
    if args.worker:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        spec = next(s for s in specs if s.name == args.worker)
        print(RESULT_MARK + json.dumps(asdict(check_model(spec, args.compile))), flush=True)
        return 0
    if not specs:
        print(f"no model of zoo {args.zoo!r} matches {args.models!r}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    results = []
    bar = tqdm(specs, unit="model")
    for spec in bar:
        bar.set_postfix_str(spec.name)
        result = _run_in_subprocess(spec, args)
        results.append(result)
        if result.error:
            tqdm.write(f"{spec.name}: {result.stage}: {result.error}")
    args.out.mkdir(parents=True, exist_ok=True)
    # A filtered run (re-checking a few models) must not overwrite the full zoo's table.
    stem = args.out / (f"zoo-{args.zoo}" if args.models == "*" else f"zoo-{args.zoo}-subset")
    meta = {
        "command": "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "summary": summary(results, args.compile),
    }
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=1))
    stem.with_suffix(".md").write_text(
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}\n\n"
        f"{meta['summary']}\n\n{to_markdown(results, args.compile)}\n"
    )
    print(meta["summary"])
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
