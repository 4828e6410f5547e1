#!/usr/bin/env bash
# One-shot GPU check of simfx on a lent GPU machine (H100/H200 with torch 2.11,
# torchvision 0.26 and timm; no package registry needed): every CUDA-only test, then
# the GPU benchmarks, in under 8 minutes, from the working tree (PYTHONPATH=.).
#
#   benchmarks/gpu_check.sh [--part all|tests|bench] [--budget SECONDS] [--dry-run] OUTDIR
#
# Steps, each under its own timeout inside one overall budget (default 470 s), so a
# hang costs its step and not the run:
#   1. tests          python -m pytest -m gpu: the tests marked gpu (CUDA-only); the
#                     max-autotune compile test runs beside the others, in a second
#                     process, because it is the slowest and correctness is all it checks
#   2. first-compile  benchmarks/first_compile.py: first compiled training step of plain
#                     vs transformed resnet50 (224x224, batch 128, bf16), each in a fresh
#                     process with empty compile caches
#   3. overhead       benchmarks/overhead.py --device cuda: resnet50 224x224 batch 128 bf16;
#                     baseline, simfx and hooks, eager and torch.compile, plus
#                     mode="reduce-overhead"; step times, peak memory
#                     (torch.cuda.max_memory_allocated), added FLOPs (the floor)
# Writes into OUTDIR: summary.md and summary.json (every step's status, seconds and log),
# the pytest logs and JUnit XML, first-compile-cuda.{md,json}, overhead-cuda.{md,json}.
# Exit status: 0 every step passed; 1 a step failed, timed out or had no time left;
# 2 bad arguments, a missing package, or no CUDA device (checked first, in seconds).
# --dry-run works without CUDA: the tests step only collects (pytest --collect-only, so
# a selection that matches nothing fails), the benchmark steps print their commands.
set -uo pipefail

# The comment block above, without its '#': the help text; its synopsis line: the usage.
header() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
usage() { header | sed -n 's/^  benchmarks\/gpu_check.sh/usage: benchmarks\/gpu_check.sh/p'; }

part=all
budget=470
dry=0
outdir=
while (($#)); do
    case "$1" in
        -h|--help) usage; header; exit 0 ;;
        --part) part=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --budget) budget=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --dry-run) dry=1; shift ;;
        -*) echo "gpu_check.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *) [[ -z $outdir ]] || { echo "gpu_check.sh: one OUTDIR, got '$outdir' and '$1'" >&2; exit 2; }
           outdir=$1; shift ;;
    esac
done
[[ -n $outdir ]] || { echo "gpu_check.sh: missing OUTDIR (where the results go)" >&2; usage >&2; exit 2; }
[[ $part =~ ^(all|tests|bench)$ ]] || { echo "gpu_check.sh: --part is all, tests or bench, got '$part'" >&2; exit 2; }
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget takes whole seconds, got '$budget'" >&2; exit 2; }

[[ $outdir == /* ]] || outdir=$PWD/$outdir  # relative to where it was called, not the repository
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
start=$(date +%s)

# Fail fast, with one line, where this cannot work.
if ! preflight=$(DRY=$dry "$PY" - <<'EOF' 2>&1
import importlib.util, os, sys
missing = [m for m in ("torch", "torchvision", "pytest", "hypothesis", "networkx") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: {', '.join(missing)} not importable by {sys.executable}; this check installs nothing")
import torch
if not torch.cuda.is_available() and os.environ["DRY"] == "1":
    print(f"no CUDA device (dry run); torch {torch.__version__}")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
             "torch.cuda.is_available() is False); run it on the GPU machine")
import torchvision
timm = importlib.util.find_spec("timm") is not None
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, timm {'yes' if timm else 'absent'}, python {sys.version.split()[0]}")
EOF
); then
    echo "${preflight##*$'\n'}" >&2
    exit 2
fi

mkdir -p "$outdir" || exit 2
work=$(mktemp -d "${TMPDIR:-/tmp}/simfx-gpu-check.XXXXXX")  # compile caches: large, not results
trap 'rm -rf "$work"' EXIT
steps="$work/steps.tsv"
: >"$steps"
echo "gpu_check.sh: $preflight; budget ${budget}s; results in $outdir"

# limit CAP RESERVE: seconds a step may take: CAP, or less to leave RESERVE for later steps.
limit() {
    local left=$((budget - ($(date +%s) - start) - $2))
    echo $(($1 < left ? $1 : left))
}

# record NAME RC SECONDS LOG: one row of the summary.
record() {
    local status
    case "$2" in
        0) status=passed ;;
        dry) status="dry run" ;;
        5) status="failed: pytest collected no test" ;;
        124|137) status="timed out" ;;
        skip) status="not run: out of time" ;;
        *) status="failed (exit $2)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$1" "$status" "$3" "$4" >>"$steps"
    echo "gpu_check.sh: $1: $status after ${3}s (log: $4)"
}

# run NAME CAP RESERVE LOG CMD...: CMD under $(limit CAP RESERVE), logged to OUTDIR/LOG.
run() {
    local name=$1 cap log=$4 t0 rc
    cap=$(limit "$2" "$3")
    shift 4
    if ((cap < 30)); then record "$name" skip 0 "$log"; return; fi
    if ((dry)); then
        echo "would run, under timeout ${cap}s: ${*@Q}" >"$outdir/$log"
        record "$name" dry 0 "$log"
        return
    fi
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" >"$outdir/$log" 2>&1
    rc=$?
    record "$name" "$rc" $(($(date +%s) - t0)) "$log"
}

if [[ $part != bench ]]; then
    # Two pytest processes side by side (16 cores, one GPU with room to spare); the
    # -k split covers every gpu test once (tests/test_gpu_check.py checks that).
    declare -A select=([fast]="not autotune" [autotune]="autotune") pid=()
    cap=$(limit 190 $([[ $part == all ]] && echo 260 || echo 0))
    t0=$(date +%s)
    pytest=(-v -rA --junitxml) label=tests
    ((dry)) && pytest=(--collect-only -q --junitxml) label="tests (collect only)"  # the selection, not the run
    for half in fast autotune; do
        if ((cap < 30)); then record "$label: -m gpu -k '${select[$half]}'" skip 0 "gpu-tests-$half.log"; continue; fi
        TORCHINDUCTOR_CACHE_DIR="$work/cache-tests" timeout --kill-after=10 "$cap" \
            "$PY" -m pytest -m gpu -k "${select[$half]}" -p no:cacheprovider \
            "${pytest[@]}" "$outdir/gpu-tests-$half.xml" >"$outdir/gpu-tests-$half.log" 2>&1 &
        pid[$half]=$!
    done
    for half in "${!pid[@]}"; do
        wait "${pid[$half]}"
        rc=$?
        record "$label: -m gpu -k '${select[$half]}'" "$rc" $(($(date +%s) - t0)) "gpu-tests-$half.log"
    done
fi

if [[ $part != tests ]]; then
    bench=(--device cuda --image-size 224 --batch 128 --dtype bf16 --out "$outdir")
    run first-compile 140 150 first-compile.log \
        "$PY" benchmarks/first_compile.py --model resnet50 "${bench[@]}" --cache-root "$work/cache-cold"
    # Start from simfx's cold-compiled cache: its compile is measured above, and this
    # step's own budget goes to steps, not to compiling it again.
    TORCHINDUCTOR_CACHE_DIR="$work/cache-cold/simfx-default-0" run overhead 400 0 overhead.log \
        "$PY" benchmarks/overhead.py --models resnet50 "${bench[@]}" \
        --modes eager compiled reduce-overhead --steps 10 --warmup 2
fi

"$PY" - "$steps" "$outdir" "$preflight" "$part" "$budget" "$(($(date +%s) - start))" "$dry" <<'EOF'
"""Render steps.tsv as summary.md and summary.json."""
import datetime, json, pathlib, re, sys

steps_file, outdir, machine, part, budget, total, dry = sys.argv[1:]
outdir = pathlib.Path(outdir)
rows = []
for line in pathlib.Path(steps_file).read_text().splitlines():
    name, status, seconds, log = line.split("\t")
    text = (outdir / log).read_text(errors="replace") if (outdir / log).exists() else ""
    # pytest's last line ("3 passed, 1 skipped in 80.1s") or the log's last line.
    found = re.findall(r"=+ (.*(?:passed|failed|error|skipped|deselected|no tests ran).*) =+", text)
    last = found[-1] if found else (text.strip().splitlines() or [""])[-1][:200]
    rows.append({"step": name, "status": status, "seconds": int(seconds), "log": log, "result": last})
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": machine, "part": part, "budget_s": int(budget), "total_s": int(total),
    "command": f"benchmarks/gpu_check.sh --part {part} --budget {budget}{' --dry-run' * (dry == '1')} OUTDIR",
    "steps": rows, "passed": all(r["status"] in ("passed", "dry run") for r in rows),
}
(outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
md = [f"# simfx GPU check, {summary['date']}", "", f"Machine: {machine}  ",
      f"Command: `{summary['command']}`; {total} s of a {budget} s budget.", "",
      "| step | status | seconds | result | log |", "|---|---|---|---|---|"]
md += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['result'].replace('|', '/')} | {r['log']} |" for r in rows]
md += ["", "Benchmarks: [first-compile-cuda.md](first-compile-cuda.md), [overhead-cuda.md](overhead-cuda.md)."]
(outdir / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if summary["passed"] else 1)
EOF
