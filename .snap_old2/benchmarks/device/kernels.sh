#!/usr/bin/env bash
# Issue 8 W4A16 tuning run, ONE device call (budget <= 6 min on an H100). From the repo root on the device box:
#   bash benchmarks/device/kernels.sh            (writes under $OUT, default /tmp/inlaid_kernels)
#   QUICK=1 bash benchmarks/device/kernels.sh    (CPU plumbing check: interpreter sweep on tiny shapes, no install;
#                                                 the CUDA-only steps report their failure and the script goes on)
# Steps, each under its own hard timeout (a failure or hang still leaves the other steps' results):
#   (the gpu-marked pytest suite is NOT run here -- it compiles ~40 kernels and would eat the budget; run it
#    separately: python3 -m pytest -q -m gpu tests/kernels. The sweep and kernels_bench check correctness themselves.)
#   a+b. benchmarks/w4a16_sweep.py: EVERY candidate GEMV config checked on the GPU (fp16+bf16, NaN-poisoned output,
#      own shape + 576x1536 g128 act-order partial last group) -- failing ones dropped -- then timed vs cuBLAS;
#      fastest correct per (shape, M bucket) -> $OUT/w4a16_configs.json, installed into inlaid/kernels/
#   c. benchmarks/kernels_bench.py with the tuned table (ratios vs cuBLAS in the same run, TB/s vs 3.0)
#   d. benchmarks/e2e_decode.py --w4-b1-only: W4 g128 Llama-2-7B-shaped decode at batch 1 vs the roofline
# $OUT gets (<= 8 files): env.txt, w4a16_configs.json, sweep_log.txt, kernels.md, e2e_decode.md, results.tar.gz
set -u
OUT=${OUT:-/tmp/inlaid_kernels}
RES="$OUT/results"
mkdir -p "$RES"
command -v python >/dev/null 2>&1 || ln -sf "$(command -v python3)" /usr/local/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
left() { echo $(( 345 - ($(date +%s) - t0) )); }  # seconds left of the 6-minute budget (15 s kept for tar)
step() {  # step NAME MAX_SECONDS CMD...: run with timeout min(MAX, left), log to $RES/NAME.log
  local name=$1 max=$2; shift 2
  local lim; lim=$(left); [ "$lim" -gt "$max" ] && lim=$max
  if [ "$lim" -lt 20 ]; then echo "$name: skipped (budget)" | tee -a "$OUT/env.txt"; return; fi
  echo "== $name (timeout ${lim}s) at $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"
  timeout "$lim" "$@" > "$RES/$name.log" 2>&1
  echo "$name rc=$? after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"
  tail -n 5 "$RES/$name.log"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

SWEEP_ARGS="--install --budget-s 125"
[ "${QUICK:-0}" = 1 ] && SWEEP_ARGS="--device cpu --quick"
step sweep 165 python3 benchmarks/w4a16_sweep.py --out "$RES/w4a16_configs" $SWEEP_ARGS
[ -f "$RES/w4a16_configs.json" ] && cp "$RES/w4a16_configs.json" "$OUT/w4a16_configs.json"
cp "$RES/sweep.log" "$OUT/sweep_log.txt" 2>/dev/null
step kernels_bench 95 python3 benchmarks/kernels_bench.py --out "$RES/kernels" --budget-s 10
cp "$RES/kernels.md" "$OUT/kernels.md" 2>/dev/null
step e2e_decode 80 python3 benchmarks/e2e_decode.py --w4-b1-only --skip-hf --new-tokens 24 --budget-s 55 \
  --out "$RES/e2e_decode"
cp "$RES/e2e_decode.md" "$OUT/e2e_decode.md" 2>/dev/null
cp inlaid/kernels/w4a16_configs.json "$RES/installed_w4a16_configs.json" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$RES"
echo "done in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"
ls -la "$OUT"
