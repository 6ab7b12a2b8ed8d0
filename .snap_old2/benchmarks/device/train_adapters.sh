#!/usr/bin/env bash
# Device run: convert the bundled model, train every task's demo adapter, pack them into $OUT.
# Tasks train in PARALLEL processes (a 135M model leaves the GPU mostly idle at batch 16):
# TRAIN_PROCS (default 4) processes, tasks dealt round-robin. Extra args go to train_adapters.py.
set -euo pipefail
HF=$(bash benchmarks/device/setup_smollm2.sh | tail -1)
echo "$HF" > /tmp/keep/smol_dir
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
PROCS=${TRAIN_PROCS:-4}
TASKS=$(python3 -c "from inlaid.tasks.registry import resolve_tasks; print(' '.join(t.name for t in resolve_tasks('all')))")
i=0; declare -a GROUPS_
for t in $TASKS; do GROUPS_[$((i % PROCS))]+="${GROUPS_[$((i % PROCS))]:+,}$t"; i=$((i+1)); done
pids=()
for g in $(seq 0 $((PROCS-1))); do
  [ -n "${GROUPS_[$g]:-}" ] || continue
  timeout "${TRAIN_TIMEOUT:-420}" python3 benchmarks/train_adapters.py --model-dir "$HF" --device cuda --out /tmp/adapters \
    --tasks "${GROUPS_[$g]}" --log "/tmp/train_log_$g.json" "$@" > "/tmp/train_$g.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "a training process stopped early (exit $?)"; done
cat /tmp/train_*.txt | grep -v "it/s\]\|s/it\]" > "$OUT/train.txt" || true
python3 - "$OUT/train_log.json" /tmp/train_log_*.json <<'PY'
import json, sys
parts = [json.load(open(p)) for p in sys.argv[2:]]
merged = dict(parts[0]); merged["tasks"] = sorted((e for p in parts for e in p["tasks"]), key=lambda e: e["task"])
merged["total_adapter_bytes"] = sum(e["adapter_bytes"] for e in merged["tasks"])
json.dump(merged, open(sys.argv[1], "w"), indent=2)
print(len(merged["tasks"]), "adapters,", merged["total_adapter_bytes"] / 1e6, "MB")
PY
tar -C /tmp/adapters -czf "$OUT/adapters.tgz" .
ls -la "$OUT"
