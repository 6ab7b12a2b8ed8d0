#!/usr/bin/env bash
# Issue 9 serving experiment in ONE device call (<= 8 min wall on an H100, everything included: the steps
# share TOTAL_S=420 s, the page step has its own 40 s, so the worst case is about 470 s; the per-step caps
# below add up to TOTAL_S, and every step is cut to the time left).
# From the repo root on the device box:   bash benchmarks/device/serving.sh
# CPU rehearsal of the same pipeline:     OUT=/tmp/serving_quick bash benchmarks/device/serving.sh --quick
#
# Steps (each under its own `timeout`, sized from the time left, so one failure still leaves the others):
#   1a. policy sweep, in-process (serving_matrix.py --driver engine): llama2-7b shapes, fp16 and W4 g128,
#      100 adapters (ranks 8-64 on q,v, power-law popularity), 32 device slots (sized to q,v at rank 64);
#      a saturation probe per engine, then inlaid/fifo/mlfq + the 3 inlaid ablations at 1.5x saturation,
#      inlaid/fifo/mlfq at 1.0x
#   1b. the same for W4 7B at 10 and 1000 adapters, inlaid/fifo/mlfq at 1.5x only (no ablations), 32 slots.
#      Host memory of 1000 adapters: the sweep registers the N names over 16 distinct weight sets
#      (--distinct-adapters), fp32 on the host: ranks 8/16/32/64 x 4 each x r*(4096+4096)*2 modules*32
#      layers*4 B = 1.0 GiB whatever N (1000 *distinct* rank-8..64 q,v adapters would be ~63 GiB).
#   2. adapter capacity, 13B shapes, W4 vs fp16 at 40 GB, slots sized to q,v at rank 64 (accounting +
#      engines built at N and N+step)
#   3. one HTTP point (real `inlaid serve`, client-measured TTFT/TPOT): 7B fp16, 100 adapters, inlaid,
#      at the fp16 probe's 1.0x rate (the in-process twin of this point is in step 1: cross-check); skipped
#      at once when the image's python3 lacks uvicorn/fastapi (the H200 image of session 2 did)
#   4. transformers+PEFT baseline vs inlaid, SmolLM2 config, 8/32/100 adapters (8 built by PEFT, the rest
#      aliased: seconds, not the >65 s of 100 add_adapter calls)
#   5. the results page (serving.md + plots) from the JSONs
# Writes under $OUT: env.txt, steps.log, serving.md, serving.tar.gz (serving/{json,plots,logs,*.json} +
# serving.md: extract into benchmarks/results/).
set -u
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT=${OUT:-/tmp/inlaid_serving}
R="$OUT/serving"
mkdir -p "$R"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
TOTAL=${TOTAL_S:-420}
END=$(( t0 + TOTAL ))
LOG="$OUT/steps.log"
# cap MAX RESERVE: seconds a step may take = min(MAX, time left - RESERVE for the later steps), at least 15
cap() { local l=$(( END - $(date +%s) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 15 ] && l=15; echo "$l"; }
note() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
  git log --oneline -1 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

if [ "$QUICK" = 1 ]; then
  python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from tiny import make_tiny_llama_dir; make_tiny_llama_dir(Path('$OUT/tiny'))" > /dev/null 2>&1
  M7="$OUT/tiny"; DEV=cpu
  COMMON="--device cpu --num-requests 16 --lengths synthetic --max-tokens 8 --max-prompt 32 --jobs 2 --slots 2 --ranks 4 8 --max-num-seqs 16 --num-blocks 256"
  SWEEP="--adapters 6 --probe-requests 8 --calibrate 2 --max-duration 20"
  SWEEP_B="--adapters 3 60 --probe-requests 8 --calibrate 2 --max-duration 20"
  CAP="--budget-gb 40"
  PEFT="--model $OUT/tiny --device cpu --adapters 2 4 --requests 8 --batch 4 --max-tokens 4 --max-prompt 16 --lengths synthetic --ranks 4 8 --num-blocks 128"
else
  M7=llama2-7b-shapes; DEV=cuda
  COMMON="--device cuda --num-requests 300 --lengths suite --max-tokens 512 --max-prompt 1024 --jobs 4 --slots 32 --ranks 8 16 32 64 --max-num-seqs 64"
  SWEEP="--adapters 100 --probe-requests 128 --calibrate 4 --max-duration 40"
  SWEEP_B="--adapters 10 1000 --probe-requests 128 --calibrate 4 --max-duration 30"
  CAP="--verify --budget-gb 40"
  PEFT="--device cuda --adapters 8 32 100 --requests 64 --batch 32 --max-tokens 64"
fi
note "start (quick=$QUICK, total budget ${TOTAL}s)"

# 1a. in-process policy sweep, 100 adapters (reserve for 1b-4: 110 + 70 + 60 + 45 = 285 s)
T=$(cap 135 285)
note "1a. policy sweep (100 adapters), timeout ${T}s"
timeout "$T" python3 benchmarks/serving_matrix.py --driver engine --models "$M7" --quants fp16 w4 $COMMON $SWEEP \
  --policies inlaid fifo mlfq --rate-x 1.5 1.0 --budget-s $(( T - 20 )) --results "$R" --page "$OUT/serving.md" \
  > "$OUT/sweep_log.txt" 2>&1
note "   rc=$?"

# 1b. W4 at 10 and 1000 adapters, 1.5x only, no ablations (reserve 175)
T=$(cap 110 175)
note "1b. policy sweep (W4, 10 and 1000 adapters), timeout ${T}s"
timeout "$T" python3 benchmarks/serving_matrix.py --driver engine --models "$M7" --quants w4 $COMMON $SWEEP_B \
  --policies inlaid fifo mlfq --rate-x 1.5 --ablations --budget-s $(( T - 15 )) --results "$R" \
  --page "$OUT/serving.md" >> "$OUT/sweep_log.txt" 2>&1
note "   rc=$?"

# 2. capacity: 4 engine builds of 13B shapes (reserve 105)
T=$(cap 70 105)
note "2. capacity, timeout ${T}s"
timeout "$T" python3 benchmarks/capacity.py $CAP --out "$R" > "$R/capacity_log.txt" 2>&1
note "   rc=$?"

# 3. one HTTP point at the fp16 probe's 1.0x rate (reserve 45)
RATE=$(python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print(round(1.0 * p['probe']['rps'], 3))" \
  "$R/json/$(basename "$M7")_fp16_$( [ "$QUICK" = 1 ] && echo 6 || echo 100 )a_engine_probe.json" 2>/dev/null || echo 4)
T=$(cap 60 45)
note "3. HTTP point at ${RATE} req/s, timeout ${T}s"
python3 -c "import uvicorn, fastapi" 2>/dev/null || { note "   skipped: no uvicorn/fastapi in this python3"; T=0; }
[ "$T" -gt 0 ] && timeout "$T" python3 benchmarks/serving_matrix.py --driver http --models "$M7" --quants fp16 $COMMON $SWEEP \
  --policies inlaid --rates "$RATE" --distinct-adapters 8 --start-timeout $(( T - 30 )) --max-duration 30 \
  --results "$R" --page "$OUT/serving.md" > "$OUT/http_log.txt" 2>&1
note "   rc=$?"

# 4. transformers + PEFT baseline
T=$(cap 45 0)
note "4. PEFT baseline, timeout ${T}s"
timeout "$T" python3 benchmarks/peft_baseline.py $PEFT --budget-s $(( T - 20 )) --out "$R" > "$R/peft_log.txt" 2>&1
note "   rc=$?"

# 5. the page from everything present
note "5. page"
timeout 40 python3 benchmarks/serving_matrix.py --page-only --models "$M7" $COMMON $SWEEP --results "$R" \
  --page "$OUT/serving.md" >> "$OUT/sweep_log.txt" 2>&1
note "   rc=$?"
cp "$OUT/sweep_log.txt" "$OUT/http_log.txt" "$R/" 2>/dev/null
tar -czf "$OUT/serving.tar.gz" -C "$OUT" serving serving.md 2>>"$LOG"
rm -rf "$OUT/tiny" "$OUT/sweep_log.txt" "$OUT/http_log.txt"
note "done"
ls -la "$OUT"
