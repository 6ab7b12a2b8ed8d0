#!/usr/bin/env bash
# Issue 8 GPU performance run, ONE device call (<= 9 min): GPU tests, kernel benchmark with config sweeps,
# end-to-end decode. Run from the repo root on the device box:  bash benchmarks/device/gpu_perf.sh
# Writes 8 files under $OUT: env.txt gpu_tests.txt kernels.{json,md} kernels_log.txt e2e_decode.{json,md} e2e_log.txt
# Each stage has its own timeout, so a hang in one still leaves the others' results.
set -u
OUT=${OUT:-/tmp/inlaid_gpu_perf}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

# 1. correctness on the GPU: kernels (incl. skinny W4A16 reduce/fixup), CUDA-graph replay == eager, engine parity
timeout 95 python -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/worker tests/engine/test_engine_gpu.py \
  > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$? after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"

# 2. kernels: W4A16 skinny/fused/dequant+mm vs cuBLAS fp16 with config sweeps (best printed per point),
#    multi-LoRA eager and under CUDA graphs, decode attention
timeout 165 python benchmarks/kernels_bench.py --out "$OUT/kernels" --budget-s 100 > "$OUT/kernels_log.txt" 2>&1
echo "kernels_bench rc=$? after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"

# 3. end to end: eager vs CUDA graphs, bf16 vs W4 g128 7B shapes, SmolLM2 shapes, vs transformers+PEFT
left=$(( 500 - ($(date +%s) - t0) ))
[ "$left" -lt 60 ] && left=60
budget=$(( left - 45 ))
[ "$budget" -lt 60 ] && budget=60
timeout "$left" python benchmarks/e2e_decode.py --out "$OUT/e2e_decode" --budget-s "$budget" > "$OUT/e2e_log.txt" 2>&1
echo "e2e_decode rc=$? after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"
ls -la "$OUT"
