#!/usr/bin/env bash
# Issue 9 serving experiment on the device, in independent PARTS that run in parallel, one GPU each.
#
#   one part (then the page + tar of whatever $OUT holds):
#     PART=sweep100 CUDA_VISIBLE_DEVICES=0 bash benchmarks/device/serving.sh
#   several parts in parallel (round-robin over GPUS; a group "a+b" runs a then b on one GPU; parts that land
#   on the same GPU run one after another), then the page once and one tar:
#     PARTS="sweep100 sweep_fp16+peft sweep10+http sweep1000+capacity" GPUS="0 1 2 3" bash benchmarks/device/serving.sh
#   CPU rehearsal of either mode (tiny random Llama, seconds per part):
#     OUT=/tmp/sq PARTS="sweep100 sweep10+http" GPUS="0 1" bash benchmarks/device/serving.sh --quick
#
# Parts (each under its own `timeout`, cap <= 420 s, override with CAP_<part>=seconds; expected H100/H200 wall
# in brackets, from the session-3 run times: ~1 s of wall per 1 s of engine time, engine build 16 s):
#   sweep100   [~320 s, cap 420] in-process policy sweep (serving_matrix.py --driver engine), llama2-7b shapes,
#              W4 g128, 100 adapters (ranks 8-64 on q,v, power-law popularity), 32 slots, 1500 requests per
#              run: probe, warm-up run, inlaid/fifo/mlfq + the 3 ablations at 1.5x saturation, inlaid/fifo/mlfq
#              at 1.0x, a repeat of the first run (warm-up and repeat: step-log checks, not results). Why 1500 requests at 1.5x (the SLO target): serving_rate_choice.md (the simulator with the
#              committed GPU cost model predicts FIFO 7% / inlaid 100% SLO there; with session 3's 300 requests a
#              higher rate does not collapse FIFO: 2.0x gives 29% vs 67%)
#   sweep_fp16 [~240 s, cap 360] the same on the fp16 base: inlaid/fifo/mlfq at 1.5x and 1.0x, no ablations
#   sweep10    [~170 s, cap 240] W4, 10 adapters, inlaid/fifo/mlfq at 1.5x
#   sweep1000  [~220 s, cap 360] W4, 1000 adapters (16 distinct weight sets under 1000 names: 1.0 GiB of host
#              memory; 1000 distinct rank-8..64 q,v adapters would be ~63 GiB), inlaid/fifo/mlfq at 1.5x
#   capacity   [~80 s, cap 150]  13B shapes, W4 vs fp16 at 40 GB: accounting + engines built at N and N+step
#   peft       [~45 s, cap 90]   transformers+PEFT vs inlaid, SmolLM2 config, 8/32/100 adapters
#   http       [~120 s, cap 240] one real `inlaid serve` point (client-measured TTFT/TPOT): 7B fp16, 100
#              adapters, inlaid at the fp16 probe's 1.0x rate (its in-process twin is in sweep_fp16; waits up
#              to 200 s for that probe when run in parallel; HTTP_RATE=<req/s> gives the rate when sweep_fp16
#              ran in an earlier call); skipped when python3 lacks uvicorn/fastapi
# Every part writes its own log $OUT/serving/logs/part_<part>.log and its JSONs under $OUT/serving/ (sweeps and
# http: $OUT/serving/$RUN/ with names <model>_<quant>_<N>a_<driver/policy>..., distinct per part; capacity.json;
# peft_baseline.json). Then: the page (serving.md, plots, from $RUN + the committed history runs) and
# $OUT/serving.tar.gz (serving/ + serving.md: extract into benchmarks/results/). $OUT also gets env.txt and
# steps.log (one line per part start/end, all parts).
set -u
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT=${OUT:-/tmp/inlaid_serving}
R="$OUT/serving"
RUN=${RUN:-json_s4}
mkdir -p "$R/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
LOG="$OUT/steps.log"
note() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
M="python3 benchmarks/serving_matrix.py"

if [ "$QUICK" = 1 ]; then
  M7="$OUT/tiny"; NA=6
  COMMON="--device cpu --num-requests 16 --lengths synthetic --max-tokens 8 --max-prompt 32 --jobs 2 --slots 2 --ranks 4 8 --max-num-seqs 16 --num-blocks 256 --probe-requests 8 --calibrate 2 --max-duration 20"
  A10="--adapters 3"; A1000="--adapters 60 --distinct-adapters 4"; D1000=""
  CAP="--budget-gb 40"
  PEFT="--model $OUT/tiny --device cpu --adapters 2 4 --requests 8 --batch 4 --max-tokens 4 --max-prompt 16 --lengths synthetic --ranks 4 8 --num-blocks 128"
else
  M7=llama2-7b-shapes; NA=100
  COMMON="--device cuda --num-requests 1500 --lengths suite --max-tokens 512 --max-prompt 1024 --jobs 4 --slots 32 --ranks 8 16 32 64 --max-num-seqs 64 --probe-requests 128 --calibrate 4 --max-duration 60"
  A10="--adapters 10"; A1000="--adapters 1000 --distinct-adapters 16"
  D1000="--max-duration 90"  # adapter loads (1000 adapters, 32 slots) may slow a FIFO run past 60 s
  CAP="--verify --budget-gb 40"
  PEFT="--device cuda --adapters 8 32 100 --requests 64 --batch 32 --max-tokens 64"
fi
SWEEP="$M --driver engine --models $M7 $COMMON --policies inlaid fifo mlfq --results $R --run-name $RUN --no-page"

default_cap() {
  case "$1" in
    sweep100) echo 420 ;; sweep_fp16) echo 360 ;; sweep10) echo 240 ;; sweep1000) echo 360 ;;
    capacity) echo 150 ;; peft) echo 90 ;; http) echo 240 ;; *) echo 0 ;;
  esac
}

tiny_model() {  # --quick: the tiny random Llama every part serves (made once)
  [ "$QUICK" = 1 ] && [ ! -f "$OUT/tiny/config.json" ] && python3 -c "import sys; sys.path.insert(0, 'tests'); \
from pathlib import Path; from tiny import make_tiny_llama_dir; make_tiny_llama_dir(Path('$OUT/tiny'))" > /dev/null 2>&1
  return 0
}

http_rate() {  # the fp16 probe's 1.0x rate (the same rounding as policy_sweep), waiting for sweep_fp16's probe;
  # HTTP_RATE=<req/s> instead (sweep_fp16 ran in an earlier call: its 1.0x rate, e.g. 63.284 in session 4)
  [ -n "${HTTP_RATE:-}" ] && { echo "$HTTP_RATE"; return 0; }
  local probe="$R/$RUN/$(basename "$M7")_fp16_${NA}a_engine_probe.json" waited=0
  while [ ! -f "$probe" ] && [ "$waited" -lt "${HTTP_WAIT_S:-200}" ]; do sleep 5; waited=$(( waited + 5 )); done
  python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print(round(1.0 * p['probe']['rps'], 3))" "$probe" \
    2>/dev/null || echo 4
}

part_cmd() {  # part name, seconds -> runs the part (its stdout/stderr go to the part's log)
  local p=$1 T=$2 B=$(( $2 - 30 ))
  case "$p" in
    sweep100)   $SWEEP --part "$p" --quants w4 --adapters "$NA" --rate-x 1.5 1.0 --budget-s "$B" ;;
    sweep_fp16) $SWEEP --part "$p" --quants fp16 --adapters "$NA" --rate-x 1.5 1.0 --ablations --budget-s "$B" ;;
    sweep10)    $SWEEP --part "$p" --quants w4 $A10 --rate-x 1.5 --ablations --budget-s "$B" ;;
    sweep1000)  $SWEEP --part "$p" --quants w4 $A1000 --rate-x 1.5 --ablations --budget-s "$B" $D1000 ;;
    capacity)   python3 benchmarks/capacity.py $CAP --out "$R" ;;
    peft)       python3 benchmarks/peft_baseline.py $PEFT --budget-s $(( T - 20 )) --out "$R" ;;
    http)
      python3 -c "import uvicorn, fastapi" 2>/dev/null || { echo "skipped: no uvicorn/fastapi in this python3"; return 3; }
      local rate; rate=$(http_rate)
      echo "HTTP point at $rate req/s"
      $M --driver http --models "$M7" --quants fp16 $COMMON --adapters "$NA" --policies inlaid --rates "$rate" \
        --distinct-adapters 8 --start-timeout $(( T / 2 )) --results "$R" --run-name "$RUN" --no-page --part http ;;
    *) echo "unknown part $p (choose: sweep100 sweep_fp16 sweep10 sweep1000 capacity peft http)"; return 2 ;;
  esac
}

run_part() {  # one part under its own timeout, its own log
  local p=$1 T=${2:-}
  [ -z "$T" ] && T=$(eval echo "\${CAP_$p:-$(default_cap "$p")}")
  [ "$T" -gt 420 ] && T=420
  note "part $p start (GPU ${CUDA_VISIBLE_DEVICES:-default}, timeout ${T}s)"
  local s=$(date +%s)
  timeout "$T" bash -c "$(declare -f part_cmd http_rate); part_cmd $p $T" \
    > "$R/logs/part_$p.log" 2>&1
  note "part $p rc=$? in $(( $(date +%s) - s ))s"
}

finish() {  # the page from everything present, then one tar
  note "page"
  timeout "${PAGE_S:-120}" $M --page-only --models "$M7" $COMMON --results "$R" --run-name "$RUN" \
    --history json json_session2 --page "$OUT/serving.md" > "$R/logs/page.log" 2>&1
  note "   rc=$?"
  tar -czf "$OUT/serving.tar.gz" -C "$OUT" serving serving.md 2>>"$LOG"
  rm -rf "$OUT/tiny"
  note "done"
  ls -la "$OUT"
}

{
  nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
  git log --oneline -1 2>/dev/null || true
  echo "quick=$QUICK PART=${PART:-} PARTS=${PARTS:-} GPUS=${GPUS:-} RUN=$RUN"
} > "$OUT/env.txt" 2>&1
export QUICK OUT R RUN M M7 NA COMMON A10 A1000 D1000 CAP PEFT SWEEP PYTHONPATH
[ -n "${HTTP_RATE:-}" ] && export HTTP_RATE
tiny_model

if [ -n "${PART:-}" ]; then
  export HTTP_WAIT_S=${HTTP_WAIT_S:-0}  # alone, http uses the probe already under $OUT (or 4 req/s)
  run_part "$PART"
  finish
  exit 0
fi

# launcher: groups round-robin over the GPUs; one background queue per GPU (its parts run one after another)
PARTS=${PARTS:-"sweep100 sweep_fp16+peft sweep10+http sweep1000+capacity"}
# http waits for sweep_fp16's probe only when that part runs now
[[ " ${PARTS//+/ } " == *" sweep_fp16 "* ]] || export HTTP_WAIT_S=${HTTP_WAIT_S:-0}
read -r -a gpus <<< "${GPUS:-0}"
declare -A queue=()
i=0
for group in $PARTS; do
  g=${gpus[$(( i % ${#gpus[@]} ))]}
  queue[$g]="${queue[$g]:-} ${group//+/ }"
  i=$(( i + 1 ))
done
note "start (quick=$QUICK): $(for g in "${!queue[@]}"; do printf 'GPU %s:%s; ' "$g" "${queue[$g]}"; done)"
pids=()
for g in "${!queue[@]}"; do
  ( export CUDA_VISIBLE_DEVICES=$g; for p in ${queue[$g]}; do run_part "$p"; done ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
finish
