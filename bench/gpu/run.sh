#!/usr/bin/env bash
# Run ON the device machine (see prepare.sh): the GPU workloads of `preftune bench`, one rows JSON and one
# summary JSON per workload in $OUT (so a workload cut short by the time limit loses only itself), one log for
# all, and the GPU's name and versions: at most 3 workloads x 2 + 2 = 8 files, the device tool's limit.
#   WORKLOADS=gpu-0.4b-short,gpu-0.4b-2k,gpu-1.5b-short (default; all: see `preftune bench --help`). gpu-1.5b-2k
#                                                         needs ~115-120 GB without gradient checkpointing (review
#                                                         estimate): an H200, or EXTRA="--preftune
#                                                         train.gradient_checkpointing=true"
#   EXTRA="--preftune train.compile=true"               (extra bench options, e.g. a preftune-only setting)
#   STEPS="--warmup-steps 2 --steps 6"                   (fewer than the workloads' 3 + 10: three workloads fit
#                                                         one device call; STEPS= for the full count)
#   PER_WORKLOAD_S=180                                   (time limit per workload)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/preftune-gpu-out}
mkdir -p "$OUT"
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export PREFTUNE_TOKENIZER_DIR="$PWD/.gpu/tokenizer" PREFTUNE_CACHE=/tmp/preftune-cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
"$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|trl|datasets|accelerate|peft|pyarrow|fsspec|huggingface|regex|safetensors|tokenizers) " \
  | tee -a "$OUT/env.txt"
# stop at once (not after every workload failed in turn) when the carried packages do not import
"$PY" -c 'import torch, transformers, trl, datasets, peft, preftune.benchmark.systems
from trl import DPOConfig, DPOTrainer  # trl imports lazily: load the trainer module itself
from transformers import LlamaForCausalLM
print("imports ok:", torch.__version__, transformers.__version__, trl.__version__, datasets.__version__,
      torch.cuda.is_available())' \
  2>&1 | tee -a "$OUT/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "imports failed: see $OUT/env.txt"; exit 1; }
IFS=, read -ra names <<< "${WORKLOADS:-gpu-0.4b-short,gpu-0.4b-2k,gpu-1.5b-short}"
gate=""
for w in "${names[@]}"; do
  echo "== $w"
  # shellcheck disable=SC2086
  timeout "${PER_WORKLOAD_S:-180}" "$PY" -m preftune.cli bench --workloads "$w" $gate ${STEPS---warmup-steps 2 --steps 6} \
    ${EXTRA:-} --out "$OUT/$w.json" 2>&1 \
    | grep -v -E "Loading weights|it/s\]|FutureWarning|warnings.warn" | tee -a "$OUT/bench.log" | tail -15
  gate="--skip-gate"  # the correctness gate (tiny model, CPU) ran with the first workload
done
ls -la "$OUT"
