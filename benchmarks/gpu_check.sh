#!/usr/bin/env bash
# One GPU check of the attention kernels, < 8 minutes on one H100 / H200 (issues 15 and 24).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # default OUT: benchmarks/results/gpu-check
#
# It runs from the checkout without installing anything: PYTHONPATH=benchmarks/checkout:. with
# benchmarks/checkout/sitecustomize.py mapping flowmap_convert.adapters / .kernels onto adapters/ and kernels/
# (the package-dir of pyproject.toml). If `import torch, triton, flowmap_convert.kernels` fails, the script stops
# at once (exit 3) instead of letting every later step die on the same ImportError.
#
# Every step runs under its own `timeout` and writes into $OUT as it goes (each JSON is
# rewritten after every case), so a step that hangs or runs long costs only its own budget:
#
#   setup        40 s  import torch / triton / flowmap_convert.kernels from the checkout; stop if it fails
#   env          30 s  device, versions                                     -> env.json
#   correctness  95 s  bf16 / fp16, L 1/65/257/1024, D 64/72/128, MeanFlow
#                      grads, autocast q-k norm, B*H > 65535, fp32          -> correctness.json
#   pytest-gpu   90 s  pytest -m gpu tests/test_kernels.py                  -> log.txt
#   timing      120 s  DMF shape B=32 H=16 N=256 D=72, then B=4 H=16 N 1024/4096 D 72/128: fused, SDPA flash,
#                      cuDNN (the Hopper baseline), math JVP, jvp+backward; triton.testing.do_bench medians,
#                      TFLOP/s, extra memory, gates; the autotune winner, registers and spills per head dim -> timing.json
#   dmf-step     85 s  one DMF step, SiT-XL/2-sized q-k-norm model, bf16, auto and math (s / step, peak memory)
#                                                                            -> dmf-step.json
#   table        15 s  the JSONs as markdown                                -> attention-<device>.md
#
# Limits sum to 475 s (under 8 minutes). Step exit codes and durations: $OUT/steps.jsonl; all output:
# $OUT/log.txt (7 files in all: a device run returns at most 8). Without a GPU every GPU step exits 2 with one line.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PY PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
T0=$(date +%s)
LOG="$OUT/log.txt"
: >"$OUT/steps.jsonl"
: >"$LOG"

step() {  # step NAME LIMIT_SECONDS CMD...
    local name=$1 limit=$2 start rc timed_out=false
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then timed_out=true; fi
    printf '{"step": "%s", "rc": %d, "seconds": %d, "timed_out": %s}\n' "$name" "$rc" "$(($(date +%s) - start))" \
        "$timed_out" | tee -a "$OUT/steps.jsonl"
    return 0
}

export PYTHONPATH="$PWD/benchmarks/checkout:$PWD${PYTHONPATH:+:$PYTHONPATH}"
step setup 40 "$PY" -c "import torch, triton, flowmap_convert.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
if [ "$(tail -n 1 "$OUT/steps.jsonl" | grep -c '"rc": 0,')" != 1 ]; then
    echo "setup failed: torch, triton or flowmap_convert.kernels does not import from this checkout (see $LOG); stopping." | tee -a "$LOG"
    tail -n 5 "$LOG"
    exit 3
fi
step env 30 "$PY" benchmarks/attention_jvp.py env --out "$OUT"
step correctness 95 "$PY" benchmarks/attention_jvp.py correctness --out "$OUT"
step pytest-gpu 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
step timing 120 "$PY" benchmarks/attention_jvp.py timing --out "$OUT"
step dmf-step 85 "$PY" benchmarks/attention_jvp.py dmf-step --out "$OUT"
step table 15 "$PY" benchmarks/attention_jvp.py table --out "$OUT" --results "$OUT"
echo "total $(($(date +%s) - T0)) s; results in $OUT" | tee -a "$LOG"
