#!/usr/bin/env bash
# GPU sanity check of the CUDA path (NF4 on the GPU, bf16 compute, lm-eval scoring, replay
# generation, placement scans), run on a lent GPU machine with no network. The Python packages the
# machine lacks travel as wheels in .whl/ (see the device tool's README); the repo is on PYTHONPATH.
#   bash benchmarks/gpu/smoke_check.sh            # writes what it measured to $OUT (or ./gpu_out)
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 CFT_CACHE_DIR=/tmp/cft_cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, peft, bitsandbytes, datasets, lm_eval; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 -m cft_adapters.cli recipes/smoke.yaml output_dir=/tmp/runs/smoke 2>&1 | tail -40 | tee "$OUT/smoke.log"
echo "smoke rc=${PIPESTATUS[0]} seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/smoke.log"
cp /tmp/runs/smoke/run.json "$OUT/smoke_run.json" 2>/dev/null; cp /tmp/runs/smoke/report.md "$OUT/smoke_report.md" 2>/dev/null
for r in smoke_gr10 smoke_lf_h2 smoke_spectrum smoke_mixed; do
  python3 -m cft_adapters.cli "recipes/$r.yaml" "output_dir=/tmp/runs/$r" "eval.tasks=[]" > "/tmp/$r.log" 2>&1
  echo "$r rc=$?" | tee -a "$OUT/variants.log"; tail -12 "/tmp/$r.log" >> "$OUT/variants.log"
done
python3 -c "from cft_adapters.cli import eval_main; raise SystemExit(eval_main())" /tmp/runs/smoke --base-precision bf16 --tasks cft_smoke_en --limit 8 2>&1 | tail -15 | tee "$OUT/rescore.log"
python3 -c "from cft_adapters.cli import analyze_main; raise SystemExit(analyze_main())" drift /tmp/runs/smoke 2>&1 | tail -5 | tee -a "$OUT/rescore.log"
