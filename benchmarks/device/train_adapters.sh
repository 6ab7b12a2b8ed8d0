#!/usr/bin/env bash
# Device run: convert the bundled model, train every task's demo adapter, pack them into $OUT.
set -euo pipefail
HF=$(bash benchmarks/device/setup_smollm2.sh | tail -1)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout "${TRAIN_TIMEOUT:-470}" python3 benchmarks/train_adapters.py --model-dir "$HF" --device cuda --out /tmp/adapters \
  --log "$OUT/train_log.json" "$@" 2>&1 | tee "$OUT/train.txt" || echo "training stopped early"
tar -C /tmp/adapters -czf - . | split -b 15M - "$OUT/adapters.tgz."
ls -la "$OUT"
