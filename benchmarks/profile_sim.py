"""Where SIM's time goes in an eager training step: per-op profile and per-block cost.

Two views of one model (default resnet18, 16x3x64x64, one torch thread, CPU):

* **per op**: ``torch.profiler`` self-CPU time per aten op over ``--steps`` steps of
  the plain model and of ``simfx.transform(model)``, interleaved; the table lists
  what the transformed step spends beyond the plain one, op by op, grouped into
  matrix products (SIM's FLOPs), the fused rho_sim node's own Python, the
  optimizer, and the rest;
* **per block**: each reconstructor alone on the block's real activations
  (forward + backward, best of ``--repeats``), next to the time of its matrix
  products alone (the same products on random data): what is left is the
  block's fixed cost;
* **split**: whole steps without the profiler, interleaved, of the plain model, the
  transformed one, and the transformed one with its heads' maths switched off (each
  block's loss a zero on the same sampled tokens, so the sampling, the gradient
  path through the tokens, the aggregate and the graph still run): SIM's surplus
  split into the reconstructors (with their optimizer update) and everything
  around them, medians of ``--split-rounds`` paired ratios.

    python benchmarks/profile_sim.py                      # resnet18
    python benchmarks/profile_sim.py --model vit_b_16 --steps 3
    python benchmarks/profile_sim.py --threads 2          # the split at torch's default on 2 cores (wall clock)

Writes ``profile-sim-<model>.json`` and ``.md`` into ``--out``. Profiler times
include the profiler's own cost per op (a few microseconds), so read the totals
as a split, and ``overhead.py`` for the step ratio.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runinfo and overhead, however this file is loaded
from overhead import CLASSES, build_model  # noqa: E402
from runinfo import load_average, markdown_header, run_meta, write_results  # noqa: E402

import simfx  # noqa: E402
from simfx.runtime import heads  # noqa: E402
from simfx.runtime.tokens import sample_count, to_tokens  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmv", "aten::mv", "aten::addr"}


def _step_fn(module, optimizer, x, labels, returns_loss):
    def step():
        optimizer.zero_grad(set_to_none=True)
        result = module(x)
        loss = F.cross_entropy(result[0], labels) + result[1] if returns_loss else F.cross_entropy(result, labels)
        loss.backward()
        optimizer.step()
    return step


def per_op(base_step, sim_step, steps: int) -> dict:
    """Self-CPU ms per step by op, plain and transformed, and the transformed step's surplus by group.

    The two variants are profiled a step at a time, alternately, so load changes on a
    shared machine reach both alike. The surplus counts the ops the transformed step
    calls more often than the plain one (SIM's, and the optimizer's over its extra
    parameters), and the optimizer's own Python; ops called equally often are the
    model's own, and their difference is noise. The optimizer's per-parameter aten
    ops (``add_``, ``mul_``) count among "other ops".
    """
    from torch.profiler import ProfilerActivity, profile

    totals = ({}, {})
    for _ in range(steps):
        for step, total in zip((base_step, sim_step), totals):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                ms, calls = total.get(e.key, (0.0, 0))
                total[e.key] = (ms + e.self_cpu_time_total / 1e3 / steps, calls + e.count)
    base, sim = ({k: (ms, calls // steps) for k, (ms, calls) in t.items()} for t in totals)
    surplus = {k: ms - base.get(k, (0.0, 0))[0] for k, (ms, calls) in sim.items()
               if calls > base.get(k, (0, 0))[1] or k.startswith("Optimizer.")}
    groups = {"matrix products": 0.0, "fused rho_sim node (Python)": 0.0, "optimizer": 0.0, "other ops": 0.0}
    for key, ms in surplus.items():
        if key in MATMUL:
            groups["matrix products"] += ms
        elif key.startswith("_RhoSimNormMSE"):  # its self time: the Python between its aten calls
            groups["fused rho_sim node (Python)"] += ms
        elif key.startswith("Optimizer."):
            groups["optimizer"] += ms
        else:
            groups["other ops"] += ms
    top = sorted(surplus.items(), key=lambda kv: -kv[1])[:25]
    return {
        "base_ms": round(sum(v[0] for v in base.values()), 2),
        "sim_ms": round(sum(v[0] for v in sim.values()), 2),
        "base_calls": sum(v[1] for v in base.values()), "sim_calls": sum(v[1] for v in sim.values()),
        "groups_ms": {k: round(v, 2) for k, v in groups.items()},
        "top": [{"op": k, "ms": round(v, 3), "calls": sim.get(k, (0, 0))[1], "base_calls": base.get(k, (0, 0))[1]}
                for k, v in top],
    }


def _best_ms(fn, repeats: int) -> float:
    for _ in range(min(3, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def per_block(model, sim, x, repeats: int) -> list[dict]:
    """Each reconstructor alone, forward + backward, on its block's activations; and its products alone."""
    pairs, handles = {}, []
    for block in sim.simfx_info.plan.blocks:
        def keep(module, args, output, key=block.key):
            pairs[key] = (args[0].detach(), output.detach())
        handles.append(model.get_submodule(block.name).register_forward_hook(keep))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    rows = []
    for key, (block_in, block_out) in pairs.items():
        head = sim.simfx[key]
        y = block_out.clone().requires_grad_(True)
        full = _best_ms(lambda: head(block_in, y).backward(), repeats)
        row = {"block": key, "full_ms": round(full, 3)}
        objective = head.objective
        if hasattr(objective, "proj"):
            row.update(_products_alone(head, block_in, y, repeats))
        rows.append(row)
    return rows


def _products_alone(head, block_in, y, repeats: int) -> dict:
    """The rho_sim matrix products of this block (forward and backward) on random rows of its size."""
    tokens = to_tokens(y, head.out_channel_dim)
    rows = tokens.shape[0] * sample_count(tokens.shape[1], head.ratio[0], head.ratio[1], head.min_tokens)
    objective = head.objective
    layers = [m for m in (objective.pre_proj, *objective.proj, objective.predictor) if isinstance(m, torch.nn.Linear)]
    shared = set(objective.proj)
    work = []
    for layer in layers:
        a = torch.randn(rows, layer.in_features)
        g = torch.randn(rows, layer.out_features)
        work.append((a, layer.weight.detach(), g, layer in shared))

    def products():
        for a, w, g, shared_layer in work:
            torch.mm(a, w.t())
            if shared_layer:
                torch.mm(a, w.t())  # the target rows, no gradient
            torch.mm(g.t(), a)
            torch.mm(g, w)

    return {"rows": rows, "products_ms": round(_best_ms(products, repeats), 3)}


def _zero_loss(objective, x_tokens, y_tokens):
    """A block loss of zero with a gradient path through the sampled tokens: the head's maths off."""
    return y_tokens.sum() * 0.0


def split(base_step, sim_step, rounds: int) -> dict:
    """Plain, transformed and heads-off steps interleaved: where SIM's surplus goes, without the profiler.

    Process CPU time at one thread (what the step costs), wall time at more (what it
    takes); each round runs the three in a rotating order, and the ratios are medians
    of the per-round ratios to the plain step of the same round. With the heads off
    the reconstructors get no gradient, so their optimizer update counts with them.
    """
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    def heads_off():
        with mock.patch.object(heads, "rho_sim_norm_mse", _zero_loss):
            sim_step()

    steps = {"plain": base_step, "transformed": sim_step, "heads off": heads_off}
    times = {name: [] for name in steps}
    for round_ in range(rounds + 2):
        names = list(steps)[round_ % 3:] + list(steps)[:round_ % 3]
        for name in names:
            start = clock()
            steps[name]()
            if round_ >= 2:  # two warm-up rounds
                times[name].append(1e3 * (clock() - start))
    ratio = {name: statistics.median(t / b for t, b in zip(times[name], times["plain"])) for name in steps}
    plain_ms = statistics.median(times["plain"])
    return {
        "clock": "cpu" if clock is time.process_time else "wall", "rounds": rounds,
        "ms": {name: round(statistics.median(t), 2) for name, t in times.items()},
        "ratio": {name: round(r, 3) for name, r in ratio.items()},
        "heads_ms": round((ratio["transformed"] - ratio["heads off"]) * plain_ms, 2),
        "around_ms": round((ratio["heads off"] - 1.0) * plain_ms, 2),
    }


def markdown(result: dict, meta: dict) -> str:
    ops = result["per_op"]
    lines = [
        *markdown_header(meta, f"{result['model']} {result['batch']}x3x{result['image_size']}x{result['image_size']}, "
                               f"eager, {result['steps']} profiled steps per variant."),
        "",
        f"Self-CPU per step: plain {ops['base_ms']:.1f} ms ({ops['base_calls']} op calls), transformed "
        f"{ops['sim_ms']:.1f} ms ({ops['sim_calls']} op calls).",
        "",
        "| SIM's surplus by group | ms / step |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in ops["groups_ms"].items()),
        "",
        "| op | surplus ms / step | calls (transformed) | calls (plain) |",
        "|---|---|---|---|",
        *(f"| `{t['op']}` | {t['ms']:.2f} | {t['calls']} | {t['base_calls']} |" for t in ops["top"]),
        "",
        "| block | rows (B x k) | forward + backward ms | its matrix products alone ms | the rest ms |",
        "|---|---|---|---|---|",
    ]
    for r in result["per_block"]:
        products = r.get("products_ms")
        rest = "" if products is None else f"{r['full_ms'] - products:.2f}"
        lines.append(f"| {r['block']} | {r.get('rows', '')} | {r['full_ms']:.2f} | "
                     f"{'' if products is None else format(products, '.2f')} | {rest} |")
    cut = result.get("split")
    if cut:
        lines += [
            "",
            f"Split, no profiler ({cut['rounds']} interleaved rounds, {cut['clock']} clock, medians of paired "
            f"ratios): the heads' maths {cut['heads_ms']:.2f} ms, everything around them {cut['around_ms']:.2f} ms.",
            "",
            "| step | median ms | ratio to plain |",
            "|---|---|---|",
            *(f"| {name} | {cut['ms'][name]:.2f} | {cut['ratio'][name]:.3f}x |" for name in cut["ms"]),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model overhead.py builds")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant (default 5)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per block (default 30, best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--split-rounds", type=int, default=30,
                        help="interleaved rounds of the split view (default 30; 0 leaves it out)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", help="result file stem (default profile-sim-<model>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32x32, batch 4, 1 step, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.batch, args.steps, args.repeats, args.split_rounds = 32, 4, 1, 2, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_before = datetime.datetime.now(datetime.timezone.utc), load_average()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, CLASSES, (args.batch,))
    model = build_model(args.model, args.image_size).train()
    plain, sim = copy.deepcopy(model), simfx.transform(copy.deepcopy(model), x[:2])
    base_step = _step_fn(plain, torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9), x, labels, False)
    sim_step = _step_fn(sim, torch.optim.SGD(sim.parameters(), lr=1e-3, momentum=0.9), x, labels, True)
    for _ in range(min(2, args.steps)):
        base_step()
        sim_step()
    result = {"model": args.model, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
              "per_op": per_op(base_step, sim_step, args.steps),
              "per_block": per_block(copy.deepcopy(model).train(), sim, x, args.repeats)}
    if args.split_rounds:
        result["split"] = split(base_step, sim_step, args.split_rounds)
    meta = run_meta("profile_sim.py", argv, started, load_before)
    payload = {"meta": meta, **result}
    text = markdown(result, meta)
    stem = args.name or f"profile-sim-{args.model}"
    folder = write_results(args.out, stem, payload, text)
    print(text)
    print(f"wrote {folder}/{stem}.{{json,md}}")
    return payload


if __name__ == "__main__":
    main()
