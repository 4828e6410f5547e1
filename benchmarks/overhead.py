"""Training-step overhead of SIM: baseline vs simfx vs hand-written forward hooks.

For each model the script builds three variants from the same initial weights:

* ``baseline``: the plain model;
* ``simfx``: ``simfx.transform(model)`` with default options (rho_sim on the
  auto-selected blocks), loss ``cross_entropy + sim_loss``;
* ``hooks``: what users write without simfx — forward hooks on the *same* blocks
  computing the same rho_sim loss by hand, written here from DESIGN.md.

Modes: ``eager``; ``compiled`` (``torch.compile(fullgraph=True)``, all three
variants); ``reduce-overhead`` (the same with ``mode="reduce-overhead"``: CUDA
graphs, so GPU only; baseline and simfx). A step is zero_grad, forward, loss,
backward, SGD step. The variants are interleaved in one process (round robin, the order rotating every round), warmed
up, and reported as medians; each ratio is the median over rounds of the paired
per-round ratio against the baseline of the same mode, so a load change on a
shared machine hits both sides of a ratio alike. On CPU the times are the
process's CPU time per step at one torch thread (the default): on a shared machine
the wall time mostly measures waiting for a core; wall times are kept as well.
``--threads 0`` keeps torch's default thread count (what users run with) and times
the wall clock. Also reported: peak memory of a step and the FLOPs of a step
(forward + backward, each variant's own aten calls, counted on the eager variants;
a compiled row does the same maths). The hand-written ``hooks`` variant computes
SIM's maths as DESIGN.md writes it, so its added FLOPs are the floor of SIM's time
overhead: a step cannot cost less than its arithmetic (simfx's own count can be
lower: it multiplies ``Wp W3`` once instead of each token by both).

    python benchmarks/overhead.py                                   # CPU: resnet18/50, vit_b_16, 64x64, batch 16
    python benchmarks/overhead.py --models resnet18 --steps 30      # the CPU target run
    python benchmarks/overhead.py --models resnet18 --threads 0     # torch's default threads, wall clock
    python benchmarks/overhead.py --device cuda --models resnet50   # GPU: 224x224, batch 128, bf16 autocast,
                                                                    # eager, compiled and reduce-overhead
    python benchmarks/overhead.py --quick                           # smoke run, seconds

Writes ``overhead-<device>.json`` and ``overhead-<device>.md`` (or ``--name``) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runinfo, however this file is loaded
from runinfo import load_average, markdown_header, median, run_meta, write_results  # noqa: E402

import simfx

MODELS = ("resnet18", "resnet50", "vit_b_16")
# Mode -> torch.compile mode (None: eager). "compiled" uses --compile-mode.
MODES = {"eager": None, "compiled": "default", "reduce-overhead": "reduce-overhead"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype (None: no autocast)
# Per device: image size, batch, dtype, modes.
DEVICE_DEFAULTS = {
    "cpu": (64, 16, "fp32", ("eager", "compiled")),
    "cuda": (224, 128, "bf16", ("eager", "compiled", "reduce-overhead")),
}
CLASSES = 100


# --- the hand-written version -------------------------------------------------------


class HookSim(nn.Module):
    """rho_sim written by hand with forward hooks, as a user would without simfx.

    Same maths as DESIGN.md (tokens, pooling onto the output grid, shared token
    sampling, pre_proj + projector + predictor, norm_mse, beta * mean), on the
    blocks named in ``names``. Block losses are collected in a list during the
    forward: the usual hook pattern.
    """

    def __init__(self, model: nn.Module, names, example: torch.Tensor, *, dim: int = 128,
                 token_ratio: float = 0.2, beta: float = 5e-3):
        super().__init__()
        self.model, self.token_ratio, self.beta = model, token_ratio, beta
        widths = self._widths(model, names, example)
        device = example.device
        self.heads = nn.ModuleDict()
        for name in names:
            cin, cout = widths[name]
            self.heads[name.replace(".", "_")] = nn.ModuleDict({
                "pre_proj": nn.Linear(cout, cin, bias=False) if cin != cout else nn.Identity(),
                "proj": nn.Sequential(nn.Linear(cin, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim), nn.ReLU(),
                                      nn.Linear(dim, dim)),
                "predictor": nn.Linear(dim, dim),
            }).to(device)
        self._losses: list[torch.Tensor] = []
        for name in names:
            model.get_submodule(name).register_forward_hook(partial(self._hook, name.replace(".", "_")))

    @staticmethod
    def _widths(model, names, example):
        """Channel counts of each block's input and output, from one no-grad run."""
        widths, handles = {}, []
        for name in names:
            def record(module, args, output, name=name):
                widths[name] = (args[0].shape[_channel_axis(args[0])], output.shape[_channel_axis(output)])
            handles.append(model.get_submodule(name).register_forward_hook(record))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example[:2])
        model.train(was_training)
        for handle in handles:
            handle.remove()
        return widths

    def _hook(self, key, module, args, output):
        if self.training:
            self._losses.append(self._block_loss(self.heads[key], args[0].detach(), output))

    def _block_loss(self, head, x, y):
        if x.dim() == 4 and x.shape[-2:] != y.shape[-2:]:
            x = F.adaptive_avg_pool2d(x, y.shape[-2:])
        xt, yt = _tokens(x), _tokens(y)
        n = yt.shape[1]
        k = min(n, max(2, int(n * self.token_ratio)))
        index = torch.randperm(n, device=y.device)[:k]
        xs, ys = xt.index_select(1, index), yt.index_select(1, index)
        # Prediction first, as simfx does: under autocast on torch 2.5 a no-grad target
        # branch first would leave the projector without a gradient (cast cache).
        prediction = head["predictor"](head["proj"](head["pre_proj"](ys)))
        with torch.no_grad():
            target = head["proj"](xs)
        return _norm_mse(prediction.float(), target.float())

    def forward(self, x):
        self._losses = []
        out = self.model(x)
        if not self.training:
            return out, out.new_zeros((), dtype=torch.float32)
        losses, self._losses = self._losses, []
        return out, self.beta * torch.stack(losses).mean()


def _channel_axis(t: torch.Tensor) -> int:
    return 1 if t.dim() == 4 else t.dim() - 1


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2) if t.dim() == 4 else t


def _norm_mse(prediction, target):
    def standardise(z):
        return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)

    return torch.linalg.vector_norm(standardise(prediction) - standardise(target), dim=-1).mean()


# --- variants ------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    mode: str
    module: nn.Module
    returns_loss: bool
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)  # on the clock the ratios use
    wall_times: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    peak_bytes: int | None = None
    flops: int | None = None


def build_model(name: str, image_size: int) -> nn.Module:
    if name.startswith("vit"):
        return getattr(torchvision.models, name)(num_classes=CLASSES, image_size=image_size)
    return getattr(torchvision.models, name)(num_classes=CLASSES)


def compile_module(module: nn.Module, mode: str | None, backend: str = "inductor") -> nn.Module:
    """``torch.compile(fullgraph=True)``; ``mode`` only means something to inductor."""
    if backend != "inductor":
        return torch.compile(module, fullgraph=True, backend=backend)
    return torch.compile(module, fullgraph=True, mode=mode)


def build_variants(name: str, x: torch.Tensor, modes, *, compile_mode: str | None,
                   backend: str = "inductor") -> list[Variant]:
    """The variants of ``modes``, each its own copy of the same initial weights."""
    torch.manual_seed(0)
    model = build_model(name, x.shape[-1]).to(x.device).train()
    blocks = [b.name for b in simfx.transform(copy.deepcopy(model), x[:2]).simfx_info.plan.blocks]
    builders = {
        "baseline": (lambda: copy.deepcopy(model), False),
        "simfx": (lambda: simfx.transform(copy.deepcopy(model), x[:2]), True),
        "hooks": (lambda: HookSim(copy.deepcopy(model), blocks, x).train(), True),
    }
    variants = []
    for mode in modes:
        # CUDA graphs are what reduce-overhead adds: measured for the model and simfx.
        names = ("baseline", "simfx") if mode == "reduce-overhead" else tuple(builders)
        for variant in names:
            build, returns_loss = builders[variant]
            module = build()
            optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
            if MODES[mode] is not None:
                module = compile_module(module, compile_mode if mode == "compiled" else MODES[mode], backend)
            variants.append(Variant(variant, mode, module, returns_loss, optimizer))
    return variants


def run_step(v: Variant, x, labels, amp_dtype) -> None:
    v.optimizer.zero_grad(set_to_none=True)
    if v.mode == "reduce-overhead":  # a new training step: CUDA graph trees may reuse the last one's memory
        torch.compiler.cudagraph_mark_step_begin()
    autocast = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with autocast:
        result = v.module(x)
        if v.returns_loss:
            out, sim_loss = result
            loss = F.cross_entropy(out.float(), labels) + sim_loss
        else:
            loss = F.cross_entropy(result.float(), labels)
    loss.backward()
    v.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(v, x, labels, amp_dtype) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step."""
    _sync(x.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    run_step(v, x, labels, amp_dtype)
    _sync(x.device)
    return time.perf_counter() - start, time.process_time() - cpu_start


# --- memory and FLOPs ------------------------------------------------------------------


def peak_step_bytes(v: Variant, x, labels, amp_dtype) -> int | None:
    """Peak bytes of one step: the variant's weights, buffers and optimizer state, plus
    the highest total allocated during a step that starts with the gradients freed
    (activations, gradients, temporaries). The other variants in the process do not count.

    GPU: the step's part from ``torch.cuda.max_memory_allocated`` minus what was live
    when it began; ``None`` for reduce-overhead, whose CUDA graph replays in a private
    pool without calling the allocator, so its counters do not see the step.
    CPU: the step's part from the profiler's memory events.
    """
    if x.device.type == "cuda":
        if v.mode == "reduce-overhead":
            return None
        v.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        live_at_start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(v, x, labels, amp_dtype)
        torch.cuda.synchronize()
        return _state_bytes(v) + int(torch.cuda.max_memory_allocated() - live_at_start)
    from torch.profiler import ProfilerActivity, profile, record_function

    # Two steps under the profiler, the second one measured: the profiler cannot
    # account for frees of blocks allocated before it started, but it can for
    # those of the first profiled step.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(v, x, labels, amp_dtype)
        v.optimizer.zero_grad(set_to_none=True)
        with record_function("measured_step"):
            run_step(v, x, labels, amp_dtype)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    span = next(e for e in events if e.get("name") == "measured_step" and e.get("ph") == "X")
    start, end = span["ts"], span["ts"] + span["dur"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    before = [total for ts, total in memory if ts < start]
    inside = [total for ts, total in memory if start <= ts <= end]
    live_at_start = before[-1] if before else 0
    return _state_bytes(v) + int(max(inside, default=live_at_start) - live_at_start)


def _state_bytes(v: Variant) -> int:
    tensors = {id(p): p for p in v.optimizer.param_groups[0]["params"]}
    for state in v.optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    tensors.update({id(b): b for b in v.module.buffers()})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_flops(v: Variant, x, labels, amp_dtype) -> int:
    """FLOPs of one step, counted per aten call with torch's formulas (FlopCounterMode's).

    Not FlopCounterMode itself: it tracks modules with global forward hooks, and simfx's
    eager fast path steps aside for global hooks (a hook must see its module run), so
    under it simfx would run, and count, its reference path instead of its own.
    """
    from torch.utils.flop_counter import flop_registry
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count():
        run_step(v, x, labels, amp_dtype)
    return int(Count.total)


# --- the measurement --------------------------------------------------------------------


def measure_model(name, device, image_size, batch, amp_dtype, modes, warmup, steps, compile_mode, clock="wall",
                  log=print, backend="inductor"):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    variants = build_variants(name, x, modes, compile_mode=compile_mode, backend=backend)
    failed = []
    for v in list(variants):  # the first step compiles: time it on its own
        try:
            v.first_step_s = timed_step(v, x, labels, amp_dtype)[0]
        except Exception as error:  # a compiled mode that fails is reported; the other rows still count
            if v.mode == "eager":
                raise
            failed.append({"mode": v.mode, "variant": v.name, "error": f"{type(error).__name__}: {error}"[:500]})
            log(f"  {name} {v.mode:8s} {v.name:8s} FAILED: {failed[-1]['error']}")
            variants.remove(v)
            continue
        log(f"  {name} {v.mode:8s} {v.name:8s} first step {v.first_step_s:.2f} s")
    # A mode without its baseline has nothing to be a ratio of.
    variants = [v for v in variants if any(b.mode == v.mode and b.name == "baseline" for b in variants)]
    if not variants:
        raise RuntimeError(f"{name}: every variant failed to compile: {failed}")
    for round_ in range(warmup + steps):
        shift = round_ % len(variants)
        for v in variants[shift:] + variants[:shift]:
            wall, cpu = timed_step(v, x, labels, amp_dtype)
            if round_ >= warmup:
                v.times.append(cpu if clock == "cpu" else wall)
                v.wall_times.append(wall)
    for v in variants:
        v.peak_bytes = peak_step_bytes(v, x, labels, amp_dtype)
        if v.mode == "eager":
            v.flops = step_flops(v, x, labels, amp_dtype)
    eager_flops = {v.name: v.flops for v in variants if v.mode == "eager"}
    for v in variants:  # compiling changes the kernels, not the arithmetic
        v.flops = eager_flops.get(v.name)
    return {**summarise(name, image_size, batch, variants), "failed": failed}


def _paired(a: Variant, b: Variant, wall: bool = False) -> float:
    """Median over rounds of a's step time over b's in the same round."""
    pairs = zip(a.wall_times, b.wall_times) if wall else zip(a.times, b.times)
    return median([ta / tb for ta, tb in pairs])


def summarise(model, image_size, batch, variants) -> dict:
    by = {(v.mode, v.name): v for v in variants}
    rows = []
    # The floor: SIM's maths as DESIGN.md writes it (the hand-written variant), over the plain model.
    reference = by.get(("eager", "hooks"))
    for v in variants:
        base = by[(v.mode, "baseline")]
        floor_flops = reference.flops if reference is not None and v.name != "baseline" else v.flops
        rows.append({
            "model": model, "image_size": image_size, "batch": batch, "mode": v.mode, "variant": v.name,
            "median_ms": round(1e3 * median(v.times), 2),
            "p25_ms": round(1e3 * sorted(v.times)[len(v.times) // 4], 2),
            "p75_ms": round(1e3 * sorted(v.times)[(3 * len(v.times)) // 4], 2),
            "ratio": round(_paired(v, base), 3),
            "wall_median_ms": round(1e3 * median(v.wall_times), 2),
            "wall_ratio": round(_paired(v, base, wall=True), 3),
            "first_step_s": round(v.first_step_s, 2),
            "peak_mb": None if v.peak_bytes is None else round(v.peak_bytes / 2**20, 1),
            "peak_ratio": round(v.peak_bytes / base.peak_bytes, 3) if v.peak_bytes and base.peak_bytes else None,
            "gflops": round(v.flops / 1e9, 3) if v.flops else None,
            "added_flops_pct": round(100 * (v.flops / base.flops - 1), 1) if v.flops and base.flops else None,
            # The least this step can cost relative to the baseline: the share of SIM's arithmetic.
            "flop_floor": round(floor_flops / base.flops, 3) if floor_flops and base.flops else None,
            "steps": len(v.times),
        })
    comparisons = {}
    if ("eager", "simfx") in by:
        comparisons["simfx_eager_vs_hooks"] = round(_paired(by[("eager", "simfx")], by[("eager", "hooks")]), 3)
    if ("compiled", "simfx") in by:
        sim_c = by[("compiled", "simfx")]
        if ("compiled", "hooks") in by:
            comparisons["simfx_compiled_vs_hooks_compiled"] = round(_paired(sim_c, by[("compiled", "hooks")]), 3)
        if ("eager", "hooks") in by:
            comparisons["hooks_eager_vs_simfx_compiled"] = round(_paired(by[("eager", "hooks")], sim_c), 3)
    # Overhead against the faster of the baselines too: compiling does not always pay (DESIGN.md).
    baselines = [v for v in variants if v.name == "baseline"]
    fastest = min(baselines, key=lambda v: median(v.times))
    for v in variants:
        if v.name == "simfx" and len(baselines) > 1:
            key = f"simfx_{v.mode.replace('-', '_')}_vs_fastest_baseline"
            comparisons[key] = round(median(v.times) / median(fastest.times), 3)
    return {"model": model, "rows": rows, "comparisons": comparisons}


# --- targets and report ------------------------------------------------------------------


# The issues' targets (6 and 19): (device, model) -> (label, row (mode, variant) or "comparisons", key, limit, sense).
# The CPU ones hold at any thread count: run with --threads 1 (CPU time) and --threads 0 (torch's default, wall).
TARGETS = {
    ("cpu", "resnet18"): [
        ("eager simfx step <= 1.14x eager baseline", ("eager", "simfx"), "ratio", 1.14, "max"),
        ("compiled simfx step <= 1.14x compiled baseline", ("compiled", "simfx"), "ratio", 1.14, "max"),
        ("eager simfx no slower than hooks", "comparisons", "simfx_eager_vs_hooks", 1.0, "max"),
        ("eager simfx peak memory <= 1.10x", ("eager", "simfx"), "peak_ratio", 1.10, "max"),
        ("compiled simfx peak memory <= 1.10x", ("compiled", "simfx"), "peak_ratio", 1.10, "max"),
    ],
    ("cpu", "vit_b_16"): [
        ("eager simfx step <= 1.03x eager baseline", ("eager", "simfx"), "ratio", 1.03, "max"),
        ("eager simfx peak memory <= 1.10x", ("eager", "simfx"), "peak_ratio", 1.10, "max"),
    ],
    ("cuda", "resnet50"): [
        ("compiled simfx step <= 1.20x compiled baseline", ("compiled", "simfx"), "ratio", 1.20, "max"),
        ("compiled simfx peak memory <= 1.10x", ("compiled", "simfx"), "peak_ratio", 1.10, "max"),
        ("compiled simfx >= 1.3x faster than eager hooks", "comparisons", "hooks_eager_vs_simfx_compiled", 1.3,
         "min"),
    ],
}


def check_targets(results: list[dict], device: str) -> list[dict]:
    """The targets this run can judge: target, measured value, met."""
    found = []
    for result in results:
        rows = {(r["mode"], r["variant"]): r for r in result["rows"]}
        for label, where, key, limit, sense in TARGETS.get((device, result["model"]), []):
            value = (result["comparisons"] if where == "comparisons" else rows.get(where, {})).get(key)
            if value is not None:
                met = value <= limit if sense == "max" else value >= limit
                found.append({"target": f"{result['model']}: {label}", "measured": value, "met": met})
    return found


def _peak(row: dict) -> str:
    """``170 | 1.12x``, or ``n/a | n/a`` where the step's memory is not measured (CUDA graphs)."""
    if row["peak_mb"] is None:
        return "n/a | n/a"
    return f"{row['peak_mb']:.0f} | {row['peak_ratio']:.2f}x"


def _added_flops(row: dict) -> str:
    """``+10.7% (1.107x)``: SIM's added FLOPs and the step-time ratio they set as a floor."""
    if row["added_flops_pct"] is None:
        return ""
    return f"{row['added_flops_pct']:+.1f}% ({row['flop_floor']:.3f}x)"


def markdown(results, targets, meta) -> str:
    lines = [
        *markdown_header(meta, f"{meta['steps']} timed steps after {meta['warmup']} warm-up rounds, {meta['dtype']}, "
                               f"compile backend {meta['backend']}; times and ratios on the {meta['clock']} clock "
                               "(wall-clock ratios in the JSON)."),
        "",
        "| model | input | mode | variant | median ms (p25-p75) | ratio vs baseline | peak MB | peak ratio "
        "| GFLOPs/step | added FLOPs (floor) | first step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for r in result["rows"]:
            lines.append(
                f"| {r['model']} | {r['batch']}x3x{r['image_size']}² | {r['mode']} | {r['variant']} | "
                f"{r['median_ms']:.1f} ({r['p25_ms']:.1f}-{r['p75_ms']:.1f}) | {r['ratio']:.2f}x | "
                f"{_peak(r)} | "
                f"{'' if r['gflops'] is None else format(r['gflops'], '.2f')} | "
                f"{_added_flops(r)} | "
                f"{r['first_step_s']:.1f} |"
            )
    lines.append("")
    for result in results:
        for key, value in result["comparisons"].items():
            lines.append(f"- {result['model']}: `{key}` = {value:.2f}x")
        for f in result.get("failed", ()):
            lines.append(f"- {result['model']}: {f['mode']} {f['variant']} **failed**: {f['error']}")
    if targets:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']:.2f} | {'yes' if t['met'] else 'no'} |" for t in targets]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_DEFAULTS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="default: eager compiled on CPU, eager compiled reduce-overhead on GPU")
    parser.add_argument("--image-size", type=int, help="default: 64 on CPU, 224 on GPU")
    parser.add_argument("--batch", type=int, help="default: 16 on CPU, 128 on GPU")
    parser.add_argument("--dtype", choices=DTYPES, help="autocast dtype, or fp32 for none (default: fp32 on CPU, "
                        "bf16 on GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first step (default 3)")
    # One thread by default on CPU: on a shared machine, two threads per process
    # contend with other jobs and the timings scatter far more.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1); 0 keeps torch's default, what users run with")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the 'compiled' rows (default: torch's default)")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend (default inductor; aot_eager checks the compiled path fast)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: resnet18, eager, 32x32, batch 4, 2 steps")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    parser.add_argument("--name", help="result file stem (default overhead-<device>)")
    # Process CPU time on CPU: on a shared machine a step's wall time mostly measures
    # how long it waited for a core, CPU time the work it did (one thread).
    parser.add_argument("--clock", choices=("cpu", "wall"), help="clock for times and ratios (default: cpu on "
                        "CPU at one thread, wall otherwise: with more threads, CPU time adds the threads up); "
                        "the JSON has wall times either way")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"overhead.py: --device cuda, but torch {torch.__version__} sees no CUDA device; "
                         "run on a GPU machine or leave --device out for the CPU benchmark.")
    if "reduce-overhead" in (args.modes or ()) and args.device != "cuda":
        raise SystemExit("overhead.py: --modes reduce-overhead records CUDA graphs; it needs --device cuda.")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    image_size, batch, dtype, modes = DEVICE_DEFAULTS[args.device]
    if args.quick:
        args.models, modes, args.steps, args.warmup = ["resnet18"], ["eager"], 2, 1
        image_size, batch = 32, 4
    image_size, batch = args.image_size or image_size, args.batch or batch
    args.modes, amp_dtype = args.modes or list(modes), DTYPES[args.dtype or dtype]
    clock = args.clock or ("cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall")
    device = torch.device(args.device)
    started, load_before = datetime.datetime.now(datetime.timezone.utc), load_average()
    results = []
    for name in args.models:
        print(f"{name}: {batch}x3x{image_size}x{image_size} on {device}", flush=True)
        results.append(measure_model(name, device, image_size, batch, amp_dtype, args.modes, args.warmup,
                                     args.steps, args.compile_mode, clock, backend=args.backend))
    # The targets speak of inductor; another backend's compiled rows do not answer them.
    targets = check_targets(results, args.device) if args.backend == "inductor" else []
    meta = {
        **run_meta("overhead.py", argv, started, load_before),
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": f"{amp_dtype} autocast" if amp_dtype else "float32",
        "clock": clock,
        "backend": args.backend,
    }
    payload = {"meta": meta, "results": results, "targets": targets}
    text = markdown(results, targets, meta)
    stem = args.name or f"overhead-{args.device}"
    folder = write_results(args.out, stem, payload, text)
    print(text)
    print(f"wrote {folder}/{stem}.{{json,md}}")
    if any(result["failed"] for result in results):
        raise SystemExit("overhead.py: a compiled variant failed (see the report above); the other rows stand.")
    return payload


if __name__ == "__main__":
    main()
