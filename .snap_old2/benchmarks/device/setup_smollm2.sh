#!/usr/bin/env bash
# Reassemble the bundled SmolLM2 GGUF on the device machine and convert it once.
# Prints the HF directory on the last line of stdout.
set -euo pipefail
KEEP=/tmp/keep
mkdir -p "$KEEP"
[ -f .gpu1/smol.part.aa ] && cp .gpu1/smol.part.aa "$KEEP/"
[ -f .gpu2/smol.part.ab ] && cp .gpu2/smol.part.ab "$KEEP/"
GGUF="$KEEP/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ]; then
  cat "$KEEP/smol.part.aa" "$KEEP/smol.part.ab" > "$GGUF"
fi
echo "a1231443440b107ff29f02bdb38c9d0a  $GGUF" | md5sum -c - >&2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >&2 || true
export PYTHONPATH=/tmp/site:$PWD
python3 - <<PY
from pathlib import Path
from inlaid.model.loader import resolve_model_path
print(resolve_model_path("$GGUF", cache_dir=Path("/tmp/cache")))
PY
