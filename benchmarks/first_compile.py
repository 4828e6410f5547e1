"""First compiled training step of the plain vs the transformed model, each compiled cold.

The first step of ``torch.compile(model)`` is the compile: users feel it every time
they start a run. This script measures it for the plain model and for
``simfx.transform(model)``, each in a **fresh Python process with empty inductor and
Triton caches**, so neither compile reuses kernels the other one built (in one
process, kernels with the same source are compiled once, which would flatter
whichever variant goes second). Each child builds the model from the same seed,
compiles it with ``fullgraph=True``, and times the first step (zero_grad, forward,
cross-entropy (+ ``sim_loss``), backward, SGD step: ``overhead.py``'s step) and
the next few steps, which shows when the compile is over. Each row also splits the
first step by compile stage, by torch's own timers: dynamo's tracing, the forward and
backward compiles (AOT autograd and inductor), and the C++ build inside them.

    python benchmarks/first_compile.py --device cuda --model resnet50              # 224x224, batch 128, bf16
    python benchmarks/first_compile.py --device cuda --modes default reduce-overhead
    python benchmarks/first_compile.py --model resnet18 --repeats 5                # CPU: the median of 5 cold pairs
    python benchmarks/first_compile.py --quick                                     # smoke run: aot_eager, CPU

Writes ``first-compile-<device>.json`` and ``.md`` (or ``--name``) into ``--out``.
``--cache-root DIR`` keeps each child's cache in ``DIR/<variant>-<mode>-<repeat>`` (each must
be new or empty), so a later run can start from them. A cold compile's time moves by a tenth
or more from run to run on a shared CPU: ``--repeats N`` compiles N cold pairs in turn and
reports the median of their ratios with the range.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runinfo and overhead, however this file is loaded
from overhead import CLASSES, DEVICE_DEFAULTS, DTYPES, Variant, build_model, compile_module, timed_step  # noqa: E402
from runinfo import load_average, markdown_header, run_meta, write_results  # noqa: E402

import simfx

VARIANTS = ("baseline", "simfx")
COMPILE_MODES = ("default", "reduce-overhead")


# --- one child: one variant, one compile, a few steps ---------------------------------


def child(args) -> dict:
    """Build, compile and step one variant; the caller gave this process empty caches."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, CLASSES, (args.batch,), device=device)
    module = build_model(args.model, args.image_size).to(device).train()
    transform_s = None
    if args.child == "simfx":
        start = time.perf_counter()
        module = simfx.transform(module, x[:2])
        transform_s = time.perf_counter() - start
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    compiled = compile_module(module, args.mode, args.backend)
    row_mode = "reduce-overhead" if args.mode == "reduce-overhead" else "compiled"
    v = Variant(args.child, row_mode, compiled, args.child == "simfx", optimizer)
    amp_dtype = DTYPES[args.dtype]
    first = timed_step(v, x, labels, amp_dtype)[0]
    stages = compile_stages()  # the first step's, before a later step could add to them
    later = [timed_step(v, x, labels, amp_dtype)[0] for _ in range(args.later_steps)]
    return {"variant": args.child, "mode": args.mode, "first_step_s": round(first, 3),
            "later_steps_s": [round(t, 4) for t in later],
            "transform_s": None if transform_s is None else round(transform_s, 3),
            "stages_s": stages, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


# Where a compile spends its time, by torch's own timers (torch._dynamo.utils): the name
# shown in the report -> the timer. "C++ build" is inside the two compiler stages.
STAGES = {
    "dynamo": "bytecode_tracing",
    "forward compile": "compile_fx.<locals>.fw_compiler_base",
    "backward compile": "compile_fx.<locals>.bw_compiler",
    "C++ build": "compile_file",
}


def compile_stages() -> dict:
    """Seconds per compile stage so far in this process (``None`` for a timer this torch lacks)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {name: round(sum(compilation_time_metrics[key]), 2) if key in compilation_time_metrics else None
            for name, key in STAGES.items()}


def run_child(args, variant: str, mode: str, cache: Path) -> dict:
    """One child process with ``cache`` (new, empty) as its only compile cache."""
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"first_compile.py: {cache} is not empty, so the compile would not be cold; "
                         "pass a --cache-root that does not exist yet.")
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--mode", mode,
               "--device", args.device, "--model", args.model, "--image-size", str(args.image_size),
               "--batch", str(args.batch), "--dtype", args.dtype, "--backend", args.backend,
               "--later-steps", str(args.later_steps), "--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "mode": mode, "error": f"timed out after {args.child_timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"variant": variant, "mode": mode, "error": last}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 2)  # with python, torch and model start-up
    return result


# --- the report -------------------------------------------------------------------------


def summarise(rows: list[dict]) -> list[dict]:
    """Per compile mode: the first step of simfx over that of the plain model, the median over repeats.

    Each repeat's pair gives one ratio; a cold compile's time moves by a tenth or more between
    runs on a shared CPU, so with several repeats the median and the range are reported.
    """
    by = {(r.get("repeat", 0), r["mode"], r["variant"]): r for r in rows if "error" not in r}
    ratios = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pairs = [(by[(rep, mode, "baseline")]["first_step_s"], by[(rep, mode, "simfx")]["first_step_s"])
                 for rep in sorted({r.get("repeat", 0) for r in rows})
                 if (rep, mode, "baseline") in by and (rep, mode, "simfx") in by]
        if pairs:
            each = [sim / base for base, sim in pairs]
            ratios.append({"mode": mode, "first_step_ratio": round(statistics.median(each), 3),
                           "ratio_range": [round(min(each), 3), round(max(each), 3)], "pairs": len(pairs),
                           "baseline_s": round(statistics.median(base for base, _ in pairs), 2),
                           "simfx_s": round(statistics.median(sim for _, sim in pairs), 2),
                           "added_s": round(statistics.median(sim - base for base, sim in pairs), 2)})
    return ratios


def markdown(rows, ratios, meta, args) -> str:
    lines = [
        *markdown_header(meta, f"{args.model} {args.batch}x3x{args.image_size}x{args.image_size}, {args.dtype}, "
                               f"backend {args.backend}; each variant compiled in a fresh process with empty caches."),
        "",
        f"| repeat | mode | variant | first step s | {' | '.join(f'{name} s' for name in STAGES)} | later steps s "
        "| transform s | process s |",
        "|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('repeat', 0)} | {r['mode']} | {r['variant']} | failed: {r['error']} |"
                         + " |" * (len(STAGES) + 3))
            continue
        later = ", ".join(f"{t:.3f}" for t in r["later_steps_s"])
        transform = "" if r["transform_s"] is None else f"{r['transform_s']:.2f}"
        stages = " | ".join("" if r["stages_s"].get(name) is None else f"{r['stages_s'][name]:.1f}" for name in STAGES)
        lines.append(f"| {r.get('repeat', 0)} | {r['mode']} | {r['variant']} | {r['first_step_s']:.2f} | {stages} | "
                     f"{later} | {transform} | {r['process_s']:.1f} |")
    lines.append("")
    for r in ratios:
        spread = "" if r["pairs"] == 1 else (
            f", the median of {r['pairs']} pairs ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}x; medians "
            f"{r['baseline_s']:.1f} s plain, {r['simfx_s']:.1f} s simfx)")
        lines.append(f"- {r['mode']}: simfx's first compiled step takes {r['first_step_ratio']:.2f}x the plain "
                     f"model's ({r['added_s']:+.1f} s){spread}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_DEFAULTS))
    parser.add_argument("--model", default="resnet50", help="a torchvision model overhead.py builds (default resnet50)")
    parser.add_argument("--modes", nargs="+", default=["default"], choices=COMPILE_MODES,
                        help="torch.compile modes (default: default)")
    parser.add_argument("--image-size", type=int, help="default: 64 on CPU, 224 on GPU")
    parser.add_argument("--batch", type=int, help="default: 16 on CPU, 128 on GPU")
    parser.add_argument("--dtype", choices=DTYPES, help="autocast dtype or fp32 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--later-steps", type=int, default=3, help="steps timed after the first (default 3)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="cold pairs (plain, simfx) in turn; the ratio reported is their median (default 1)")
    # One thread, as in overhead.py: on a shared CPU more threads mostly wait for each other.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--child-timeout", type=int, default=600, help="seconds per child process (default 600)")
    parser.add_argument("--cache-root", help="keep each child's compile cache under this new folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: CPU, resnet18, 32x32, batch 4, aot_eager")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    parser.add_argument("--name", help="result file stem (default first-compile-<device>)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # set by the parent process
    parser.add_argument("--mode", choices=COMPILE_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    image_size, batch, dtype, _ = DEVICE_DEFAULTS[args.device]
    if args.quick:
        args.device, args.model, args.backend, args.later_steps = "cpu", "resnet18", "aot_eager", 1
        image_size, batch, dtype = 32, 4, "fp32"
    args.image_size, args.batch = args.image_size or image_size, args.batch or batch
    args.dtype = args.dtype or dtype
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"first_compile.py: --device cuda, but torch {torch.__version__} sees no CUDA device; "
                         "run on a GPU machine or use --device cpu.")
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(child(args)))
        return {}
    started, load_before = datetime.datetime.now(datetime.timezone.utc), load_average()
    with tempfile.TemporaryDirectory(prefix="simfx-first-compile-") as scratch:
        root = Path(args.cache_root) if args.cache_root else Path(scratch)
        rows = []
        # Pairs, one repeat after the other, so a change of load hits both variants of a pair.
        for repeat in range(args.repeats):
            for mode in args.modes:
                for variant in VARIANTS:
                    rows.append({"repeat": repeat, **run_child(args, variant, mode, root / f"{variant}-{mode}-{repeat}")})
                    print(f"  {repeat} {mode} {variant}: {rows[-1].get('first_step_s', rows[-1].get('error'))}",
                          flush=True)
    ratios = summarise(rows)
    meta = run_meta("first_compile.py", argv, started, load_before)
    payload = {"meta": meta, "rows": rows, "ratios": ratios}
    text = markdown(rows, ratios, meta, args)
    stem = args.name or f"first-compile-{args.device}"
    folder = write_results(args.out, stem, payload, text)
    print(text)
    print(f"wrote {folder}/{stem}.{{json,md}}")
    if any("error" in r for r in rows):
        raise SystemExit("first_compile.py: a child failed (see the table above).")
    return payload


if __name__ == "__main__":
    main()
