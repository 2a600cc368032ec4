#!/usr/bin/env bash
# metakd's first hour on a GPU: one script, run as is, under 10 minutes on one H100 / H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR: the argument, else $OUT, else ./gpu_check
#
# Writes at most 8 small files: gpu_check.log (everything printed), env.txt, throughput_b32.json,
# throughput_b128.json, throughput_tf32off.json, shared_gpu.json (without Ray), gpu_memory.csv and
# summary.txt. Scratch (data, teachers, students, Ray state) goes to $GPU_CHECK_WORK (default: a
# fresh temporary directory), not to OUT_DIR.
#
# Steps, each under its own time limit and all under GPU_CHECK_BUDGET_S (570 s):
#  1. the environment: GPU name and memory, driver, torch and CUDA versions, bf16 support, TF32;
#  2. benchmarks/throughput.py at the default shapes (BERT-base teacher, TinyBERT-4L student,
#     seq 128, batch 32); after steps 3 and 4, at batch 128 (is batch 32 launch-bound?) and at
#     batch 32 once more with NVIDIA_TF32_OVERRIDE=0 (every fp32 matmul IEEE, whatever the code asks);
#  3. metakd run sweeps/example_run.yaml on the GPU: all six methods, precision auto = bf16;
#  4. four student workers at 0.25 GPU on the smoke sweep's jobs while nvidia-smi samples memory per
#     process every second: `metakd sweep` of sweeps/smoke.yaml with its resources overridden (when
#     Ray is installed), else benchmarks/shared_gpu.py (the same four workers as processes, no Ray);
#  5. a summary table (summary.txt).
# Without a GPU it says so and stops; GPU_CHECK_CPU=1 runs the CPU-possible parts instead
# (environment, a CPU-sized throughput run, the shared-workers step on the CPU, the summary).
# Python packages: the image's python3 with torch is used as is (PYTHON=... to choose another); the
# repository is imported from here (PYTHONPATH), and `pip install -e .` is tried only when metakd's
# own imports fail (a machine without network cannot install anything: missing packages are named).

set -u -o pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT_DIR=${1:-${OUT:-$REPO/gpu_check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/metakd-gpu-check.XXXXXX")}
mkdir -p "$WORK"
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error RAY_USAGE_STATS_ENABLED=0
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
STEPS="$WORK/steps.tsv"
: > "$STEPS"

say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), record "NAME<TAB>rc<TAB>seconds"
step() {
    local name=$1 limit=$2 remaining t0 rc
    shift 2
    remaining=$(left)
    if (( remaining < 20 )); then
        say "SKIP $name: the budget of ${BUDGET_S}s is spent"
        printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
        return 0
    fi
    (( limit > remaining )) && limit=$remaining
    say "START $name (at most ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    (( rc == 124 || rc == 137 )) && say "TIMEOUT $name after ${limit}s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
    say "END $name: rc $rc"
    return 0
}

say "repo $REPO, output $OUT_DIR, scratch $WORK, budget ${BUDGET_S}s, python $PY"

# ----------------------------------------------------------------------------- packages
if ! "$PY" -c 'import torch' 2>/dev/null; then
    say "no torch in $PY: trying pip install torch (a CUDA build on Linux)"
    "$PY" -m pip install --retries 1 --timeout 20 torch || { say "FATAL: no torch and it cannot be installed here (set PYTHON=...)"; exit 4; }
fi

# ----------------------------------------------------------------------------- a GPU?
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
        && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    GPU=1
fi
if (( GPU == 0 )) && [[ "${GPU_CHECK_CPU:-0}" != 1 ]]; then
    say "no GPU here: nvidia-smi finds none or torch.cuda.is_available() is false. Nothing to measure;"
    say "run this on a machine with an NVIDIA GPU, or GPU_CHECK_CPU=1 for the CPU-possible parts."
    [[ -z "${GPU_CHECK_WORK:-}" ]] && rm -rf "$WORK"
    exit 3
fi

IMPORTS='import torch, transformers, tokenizers, safetensors, yaml, pyarrow, pandas, scipy, metakd.cli, metakd.jobs.run'
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
    say "metakd's imports fail: pip install -e . (then --no-deps, then --no-build-isolation)"
    PIP=("$PY" -m pip install --retries 1 --timeout 20)
    "${PIP[@]}" -e . || "${PIP[@]}" --no-deps -e . || "${PIP[@]}" --no-deps --no-build-isolation -e . \
        || say "pip install failed (no network?): running from the repository (PYTHONPATH)"
fi
MISSING=$("$PY" - <<'EOF'
import importlib
print(" ".join(m for m in ("torch", "transformers", "tokenizers", "safetensors", "yaml", "pyarrow", "pandas",
                           "scipy", "sklearn", "matplotlib", "datasets", "optuna", "ray")
               if importlib.util.find_spec(m) is None))
EOF
)
say "python packages missing: ${MISSING:-none}"
HAVE_RAY=1
case " $MISSING " in *" ray "*|*" optuna "*) HAVE_RAY=0 ;; esac

# ----------------------------------------------------------------------------- 1. environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "cpus: $(nproc)"
    if (( GPU )); then
        nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm --format=csv
        nvidia-smi -L
    fi
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
from metakd import flops
from metakd.train import precision
print(f"python torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    print(f"device 0: {name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 supported {torch.cuda.is_bf16_supported()}")
    print(f"dense bf16 peak (metakd.flops): {flops.peak_bf16_tflops(name)} TFLOP/s")
    print(f"precision auto -> {precision.resolve('auto', 'cuda')}; planned for GPU workers "
          f"{precision.planned('auto', 'auto', 0.25)}; TF32 before any runtime: {precision.tf32_enabled()}")
for name in ("transformers", "tokenizers", "safetensors", "pyarrow", "pandas", "ray", "optuna", "datasets"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} -")
EOF
    echo "NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-unset}"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# ----------------------------------------------------------------------------- 2. throughput
# (batch 128 and TF32 off come last, after the correctness checks, in what time is left)
if (( GPU )); then
    step throughput_b32 150 "$PY" benchmarks/throughput.py --repeats 3 --json "$OUT_DIR/throughput_b32.json"
else
    step throughput_b32 300 env OMP_NUM_THREADS=1 "$PY" benchmarks/throughput.py --cpu-small --repeats 1 \
        --json "$OUT_DIR/throughput_b32.json"
fi

# ----------------------------------------------------------------------------- 3. example_run on the GPU
if (( GPU )); then
    step example_run 200 "$PY" -m metakd.cli run sweeps/example_run.yaml --output-dir "$WORK/runs"
else
    say "SKIP example_run: CPU figures are in the README (GPU_CHECK_CPU)"
    printf 'example_run\tskipped\t0\n' >> "$STEPS"
fi

# ----------------------------------------------------------------------------- 4. four workers at 0.25 GPU
SAMPLER=""
if (( GPU )); then
    # every second: each process's memory (app, timestamp, pid, name, MiB; a VM may list none) and the
    # device's (device, timestamp, MiB used)
    echo "kind, timestamp, pid, process_name, used_memory [MiB]  |  device, timestamp, memory.used [MiB]" \
        > "$OUT_DIR/gpu_memory.csv"
    while true; do
        nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv,noheader,nounits \
            | sed 's/^/app, /'
        nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits | sed 's/^/device, /'
        sleep 1
    done >> "$OUT_DIR/gpu_memory.csv" 2>/dev/null &
    SAMPLER=$!
fi
if (( HAVE_RAY && GPU )); then
    "$PY" - "$WORK" <<'EOF'
import sys
import yaml
work = sys.argv[1]
raw = yaml.safe_load(open("sweeps/smoke.yaml"))
raw["name"] = "smoke_gpu"
raw["search"]["storage"] = f"{work}/sweeps"
# teachers at half a GPU (two trials side by side), students four to a GPU
raw["search"]["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0.5,
                              "student_workers": 4, "student_gpus_per_worker": 0.25, "max_concurrent_trials": 2}
yaml.safe_dump(raw, open(f"{work}/smoke_gpu.yaml", "w"), sort_keys=False)
EOF
    step smoke_sweep 240 bash -c "set -o pipefail; '$PY' -m metakd.cli sweep '$WORK/smoke_gpu.yaml' 2>&1 \
        | tee '$WORK/smoke_sweep.txt'"
else
    say "no Ray (or no GPU): the four workers run as processes (benchmarks/shared_gpu.py)"
    DEVICE=cuda
    (( GPU )) || DEVICE=cpu
    step shared_gpu 240 "$PY" benchmarks/shared_gpu.py --yaml sweeps/smoke.yaml --workers 4 --device "$DEVICE" \
        --store "$WORK/shared" --json "$OUT_DIR/shared_gpu.json"
fi
[[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null

# ----------------------------------------------------------------------------- 2'. throughput, the rest
if (( GPU )); then
    step throughput_b128 150 "$PY" benchmarks/throughput.py --batch 128 --repeats 2 \
        --json "$OUT_DIR/throughput_b128.json"
    step throughput_tf32off 100 env NVIDIA_TF32_OVERRIDE=0 "$PY" benchmarks/throughput.py --repeats 2 \
        --json "$OUT_DIR/throughput_tf32off.json"
fi

# ----------------------------------------------------------------------------- 5. summary
"$PY" - "$OUT_DIR" "$WORK" "$STEPS" <<'EOF' | tee "$OUT_DIR/summary.txt"
import csv, glob, json, os, sys
out, work, steps = sys.argv[1:4]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

print("== metakd gpu_check summary ==")
with open(os.path.join(out, "env.txt")) as f:
    env = [l.rstrip() for l in f if l.startswith(("device 0", "python torch", "dense bf16", "precision auto"))]
print("\n".join(env) or "no CUDA device")
print("\nsteps (rc 0 = ok, 124 = timed out):")
for line in open(steps):
    name, rc, secs = line.rstrip("\n").split("\t")
    print(f"  {name:20} rc {rc:8} {secs:>5} s")

runs = {k: load(f"throughput_{k}.json") for k in ("b32", "b128", "tf32off")}
if any(runs.values()):
    print("\nthroughput (examples/s; MFU vs the dense bf16 peak):")
    print(f"  {'step':8} {'setting':40}" + "".join(f" {k:>14}" for k, v in runs.items() if v))
    base = next(v for v in runs.values() if v)
    for i, row in enumerate(base["rows"]):
        cells = []
        for v in runs.values():
            if v:
                r = v["rows"][i]
                mfu = f" {r['mfu']:5.1%}" if r.get("mfu") is not None else ""
                cells.append(f"{r['ex_s']:8.0f}{mfu:>6}")
        print(f"  {row['step']:8} {row['setting']:40}" + "".join(f" {c:>14}" for c in cells))
    for k, v in runs.items():
        if v:
            print(f"  ratios {k}: " + ", ".join(f"{n} {x:.2f}x" for n, x in v["ratios"].items()))
    b32, b128 = runs["b32"], runs["b128"]
    if b32 and b128:
        s2 = [r for r in b32["rows"] if r["step"] == "stage2" and "cache" in r["setting"]][0]["ex_s"]
        s2b = [r for r in b128["rows"] if r["step"] == "stage2" and "cache" in r["setting"]][0]["ex_s"]
        print(f"  cached stage 2 at batch 128 / batch 32: {s2b / s2:.2f}x examples/s "
              f"({'launch-bound at 32' if s2b / s2 > 1.5 else 'not launch-bound at 32'})")

try:
    import pandas as pd
    from metakd.report import results
    df = results.load(glob.glob(os.path.join(work, "runs", "*"))[0])
    ok = df[(df["status"] == "ok") & (df["split"] == "test")]
    print("\nexample_run on this device (test accuracy %, mean over domains; compare the README's CPU figures):")
    for method, acc in ok.groupby("method")["accuracy"].mean().items():
        print(f"  {method:18} {100 * acc:6.2f}")
    prec = sorted(set(ok["latency_precision"].dropna())) if "latency_precision" in ok else []
    print(f"  students' latency precision {prec}, latency_ms_b1 median {ok['latency_ms_b1'].median():.3f}")
except Exception as e:  # noqa: BLE001
    print(f"\nexample_run: no results ({type(e).__name__}: {e})")

shared = load("shared_gpu.json")
if shared:
    print(f"\n{shared['workers']} workers side by side ({shared['wall_s']:.0f}s; setup {shared['setup_s']:.0f}s):")
    for r in shared["reports"]:
        mem = f"peak allocated {r['max_allocated_mib']:.0f} MiB, reserved {r['max_reserved_mib']:.0f} MiB" \
            if r["max_allocated_mib"] is not None else "CPU"
        budget = [l for l in r["cache_log"] if "budget" in l][:1]
        print(f"  worker {r['rank']} pid {r['pid']} share {r['gpu_share']:g}: {len(r['jobs'])} job(s), {mem}; "
              f"{budget[0] if budget else ''}")
elif os.path.exists(os.path.join(work, "smoke_sweep.txt")):
    lines = open(os.path.join(work, "smoke_sweep.txt")).read().splitlines()
    print("\nsmoke sweep (4 student workers at 0.25 GPU), last lines:")
    print("\n".join("  " + l for l in lines[-12:]))

path = os.path.join(out, "gpu_memory.csv")
if os.path.exists(path):
    peak, seen, device = {}, {}, []
    with open(path) as f:
        for row in csv.reader(f):
            row = [c.strip() for c in row]
            if row[:1] == ["app"] and len(row) >= 5 and row[4].isdigit():
                peak[row[2]] = max(peak.get(row[2], 0), int(row[4]))
                seen[row[2]] = row[3]
            elif row[:1] == ["device"] and len(row) >= 3 and row[2].isdigit():
                device.append(int(row[2]))
    print(f"\nGPU memory during step 4 (nvidia-smi every second, {len(device)} samples): device peak "
          f"{max(device, default=0)} MiB; {len(peak)} processes listed")
    for pid, mib in sorted(peak.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  pid {pid:>8} peak {mib:6d} MiB  {seen[pid][-40:]}")
EOF
say "done in $(( $(date +%s) - START ))s; reports in $OUT_DIR"
