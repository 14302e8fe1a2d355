#!/usr/bin/env bash
# The GPU benchmark in one prepared script (fits a 15-minute device budget with room for a rerun):
# plain TRL vs cft-train with and without the fast path, Mistral-7B architecture, NF4, seq 2048.
# Missing packages travel as wheels in .whl_train/. On a machine without a GPU pass SIZE=tiny.
#   SIZE=7b bash benchmarks/gpu/run.sh
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
if [ -d .whl_train ] && ! python3 -c "import trl, bitsandbytes, datasets, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_train/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 CFT_CACHE_DIR=/tmp/cft_cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SIZE="${SIZE:-7b}"
if [ "$SIZE" = tiny ]; then EXTRA="--seq 256 --steps 4"; else EXTRA="--seq 2048 --steps 8"; fi
python3 benchmarks/gpu/bench_train.py --size "$SIZE" $EXTRA --out "$OUT" 2>&1 | grep -v -E "it/s\]|s/it\]" | tail -40
