#!/usr/bin/env bash
# One GPU check of the attention kernels, < 8 minutes on one H100 / H200 (issue 15).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # default OUT: benchmarks/results/gpu-check
#
# Every step runs under its own `timeout` and writes into $OUT as it goes (each JSON is
# rewritten after every case), so a step that hangs or runs long costs only its own budget:
#
#   setup        35 s  import torch / triton / flowmap_convert (editable install, no deps, if needed)
#   env          15 s  device, versions                                     -> env.json
#   correctness 100 s  bf16 / fp16, L 1/65/257/1024, D 64/72/128, MeanFlow
#                      grads, autocast q-k norm, B*H > 65535, fp32          -> correctness.json
#   pytest-gpu   95 s  pytest -m gpu tests/test_kernels.py                  -> log.txt
#   timing      110 s  B=4 H=16 N 1024/4096 D 72/128: fused, SDPA flash,
#                      math JVP, jvp+backward, extra memory, gates          -> timing.json
#   dmf-step     85 s  one DMF step, SiT-XL/2-sized q-k-norm model, bf16,
#                      per attention backend (s / step, peak memory)        -> dmf-step.json
#   table        15 s  the JSONs as markdown                                -> attention-<device>.md
#
# Limits sum to 455 s. Step exit codes and durations: $OUT/steps.jsonl; all output: $OUT/log.txt
# (7 files in all: a device run returns at most 8).
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

SETUP='"$PY" -c "import torch, triton, flowmap_convert.kernels" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 2;
    "$PY" -c "import torch, triton, flowmap_convert.kernels; print(torch.__version__, triton.__version__)"'

step setup 35 bash -c "$SETUP"
step env 15 "$PY" benchmarks/attention_jvp.py env --out "$OUT"
step correctness 100 "$PY" benchmarks/attention_jvp.py correctness --out "$OUT"
step pytest-gpu 95 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
step timing 110 "$PY" benchmarks/attention_jvp.py timing --out "$OUT"
step dmf-step 85 "$PY" benchmarks/attention_jvp.py dmf-step --out "$OUT"
step table 15 "$PY" benchmarks/attention_jvp.py table --out "$OUT" --results "$OUT"
echo "total $(($(date +%s) - T0)) s; results in $OUT" | tee -a "$LOG"
