#!/usr/bin/env bash
# Issue 4 + 7 GPU numbers in one unattended run (budget: about 7 minutes wall on one H100).
#   benchmarks/device/quality.sh SMOL_DIR      (or env SMOL_DIR; the bundled SmolLM2 as an HF dir)
# Steps, each under a hard timeout (a failure or timeout keeps the others' results; quality.py rewrites
# its JSON after every cell, so a killed run still returns the cells it finished):
#   1. benchmarks/quality.py       all tasks, NLL on 32 / metric on 16 test examples per task, 4:128 then
#                                  3:64 then 4:64 / 3:128 while its --deadline allows
#   2. benchmarks/quant_memory.py  dummy Llama-2-7B shapes, 4 layers: peak CUDA memory, time per layer
#   3. benchmarks/dynamic.py       3 old tasks + 1 new, mlgptq-diag, load test before/during/after
# Results under $OUT (7 files): quality_gpu.{json,md}, quant_memory_gpu.{json,md}, dynamic_gpu.{json,md},
# logs.tar.gz. Regenerate the pages locally with the commands in docs/quantize.md.
# STEPS="quality" (or "quant_memory dynamic") runs a subset, e.g. one per GPU in parallel; overrides:
#   CONFIGS, METHODS (quality.py --methods; e.g. only new methods: merge later with --from-json), DEADLINE,
#   LIMIT, GEN_LIMIT, SKIP_FP=1 (do not evaluate the unquantized model again), QUALITY_TIMEOUT, DYNAMIC_TIMEOUT, DYN_ARGS (all dynamic.py args),
#   TAG (suffix of the output names, for two runs sharing $OUT). The session-3 run (2x H200, one per GPU):
#   CUDA_VISIBLE_DEVICES=0 TAG=_a CONFIGS=4:128,3:64 STEPS=quality ... &  CUDA_VISIBLE_DEVICES=1 TAG=_b
#   CONFIGS=4:64,3:128 STEPS=quality ... ; merged with quality.py --from-json A.json,B.json
# CPU end-to-end check of this script (tiny model, synthetic data, minutes): QUICK=1 benchmarks/device/quality.sh
set -uo pipefail
SMOL="${1:-${SMOL_DIR:-}}"
if [ "${QUICK:-0}" = 1 ]; then
  DEV=cpu; SMOL=tiny
  QA=(--tiny --limit 4 --gen-limit 2 --max-new-tokens-cap 8 --calib-samples 8 --max-seq-len 64 --configs 4:32)
  [ -n "${METHODS:-}" ] && QA+=(--methods "$METHODS")
  MA=(--quick --layers 1)
  DA=(--tiny --bits 4 --group-size 32 --calib-samples 8 --max-seq-len 64 --eval-limit 4 --clients 2 --max-tokens 4
      --phase-seconds 3)
else
  DEV=cuda
  QA=(--model "$SMOL" --deadline "${DEADLINE:-195}" --limit "${LIMIT:-32}" --gen-limit "${GEN_LIMIT:-16}"
      --max-new-tokens-cap 64 --calib-samples 32 --max-seq-len 384 --configs "${CONFIGS:-4:128,3:64,4:64,3:128}"
      --primary-configs 4 ${METHODS:+--methods "$METHODS"})
  MA=(--layers 4 --tasks 2 --samples 32 --seq-len 512)
  DA=(--model "$SMOL" --bits 4 --group-size 64 --calib-samples 16 --max-seq-len 256 --eval-limit 32 --clients 8
      --max-tokens 32 --phase-seconds 8)
  [ -n "${DYN_ARGS:-}" ] && read -r -a DA <<< "$DYN_ARGS"  # e.g. a dummy 7B-shaped model instead
fi
if [ "$SMOL" != tiny ] && { [ -z "$SMOL" ] || [ ! -f "$SMOL/config.json" ]; }; then
  echo "usage: $0 SMOL_DIR (an HF directory with config.json; or set SMOL_DIR)" >&2
  exit 2
fi
OUT="${OUT:-/tmp/quality_out}"
TAG="${TAG:-}"  # suffix of every output name, so two runs (one per GPU) can share $OUT
LOGS="$OUT/logs$TAG"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
command -v python >/dev/null 2>&1 || ln -sf "$(command -v python3)" /usr/local/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1 || true
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== [$(( start - T0 )) s] $name (timeout ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - start )) s"
  grep -v "it/s\]\|s/it\]\|layer/s\]\|s/layer\]\|batch/s\]" "$LOGS/$name.log" | tail -n 6
}

want() { [[ " ${STEPS:-quality quant_memory dynamic} " == *" $1 "* ]]; }  # STEPS="..." runs a subset
for s in quality quant_memory dynamic; do want $s && rm -rf "/tmp/inlaid_$s$TAG"; done
[ "${SKIP_FP:-0}" = 1 ] && QA+=(--skip-unquantized)
want quality && step quality "${QUALITY_TIMEOUT:-215}" python3 benchmarks/quality.py --device "$DEV" "${QA[@]}" --work "/tmp/inlaid_quality$TAG" \
  --json "$OUT/quality_gpu$TAG.json" --out "$OUT/quality_gpu$TAG.md"
want quant_memory && step quant_memory 75 python3 benchmarks/quant_memory.py --device "$DEV" "${MA[@]}" --out "$OUT/quant_memory_gpu$TAG.json"
want dynamic && step dynamic "${DYNAMIC_TIMEOUT:-120}" python3 benchmarks/dynamic.py --device "$DEV" --method mlgptq-diag "${DA[@]}" \
  --work "/tmp/inlaid_dynamic$TAG" --out "$OUT/dynamic_gpu$TAG.md"
tar czf "$OUT/logs$TAG.tar.gz" -C "$OUT" "logs$TAG" && rm -rf "$LOGS"
echo "== done in $(( $(date +%s) - T0 )) s; files:"
ls -la "$OUT"
