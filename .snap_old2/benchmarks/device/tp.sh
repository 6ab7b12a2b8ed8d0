#!/usr/bin/env bash
# Issue 10 tensor-parallel run, ONE device call on 2 GPUs (nvidia-h200-x2), budget <= 4 min. From the repo root:
#   bash benchmarks/device/tp.sh                 (writes under $OUT, default /tmp/inlaid_tp)
#   QUICK=1 bash benchmarks/device/tp.sh         (CPU plumbing check: tiny shapes, gloo, 2 ranks)
# Steps, each under its own hard timeout (a failure or hang still leaves the other steps' results):
#   a. benchmarks/tp_bench.py --layers 4: Llama-2-13B-shaped random GPTQ W4 g128 (real hidden sizes, 4 decoder
#      layers): TP=1 vs TP=2 prefill logits and greedy tokens; decode tokens/s at batch 1/32; collective share
#   b. the same at the full 40 layers if at least 150 s of the budget are left (else recorded as skipped)
# NVLink multicast stays off (KINDS.md): NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1.
# $OUT gets (<= 8 files): env.txt, tp.md (a + b), tp_4l.json, tp_40l.json, tp_4l.log, tp_40l.log
set -u
OUT=${OUT:-/tmp/inlaid_tp}
mkdir -p "$OUT"
command -v python >/dev/null 2>&1 || ln -sf "$(command -v python3)" /usr/local/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
left() { echo $(( 230 - ($(date +%s) - t0) )); }  # seconds left of the 4-minute budget (10 s kept)
ARGS=""
[ "${QUICK:-0}" = 1 ] && ARGS="--device cpu --quick"
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count())"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1
  git log --oneline -1 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
run() {  # run LAYERS MAX_SECONDS
  local layers=$1 max=$2 lim; lim=$(left); [ "$lim" -gt "$max" ] && lim=$max
  if [ "$lim" -lt 30 ]; then echo "layers=$layers: skipped (budget, ${lim}s left)" | tee -a "$OUT/env.txt"; return; fi
  echo "== layers=$layers (timeout ${lim}s) at $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"
  timeout -k 5 "$lim" python3 benchmarks/tp_bench.py $ARGS --layers "$layers" --out "$OUT/run_${layers}l" \
      --work "/tmp/inlaid_tp_work" > "$OUT/tp_${layers}l.log" 2>&1
  echo "layers=$layers rc=$? after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/env.txt"
  tail -n 20 "$OUT/tp_${layers}l.log"
  [ -f "$OUT/run_${layers}l/tp.md" ] && cat "$OUT/run_${layers}l/tp.md" >> "$OUT/tp.md" && echo >> "$OUT/tp.md"
  [ -f "$OUT/run_${layers}l/tp.json" ] && mv "$OUT/run_${layers}l/tp.json" "$OUT/tp_${layers}l.json"
  rm -rf "$OUT/run_${layers}l"
}
if [ "${QUICK:-0}" = 1 ]; then run 2 200; exit 0; fi
run 4 130
if [ "$(left)" -ge 150 ]; then run 40 "$(left)"; else echo "layers=40: skipped (budget, $(left)s left)" | tee -a "$OUT/env.txt"; fi
