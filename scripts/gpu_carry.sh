#!/usr/bin/env bash
# Prepare the git-ignored folders that carry a run of record to a GPU machine without internet
# (the device tool moves at most 64 MiB per call, so the model travels in parts):
#   .carry-gguf1/, .carry-gguf2/   SmolLM2-135M-Instruct.Q4_1.gguf split in two (cat them back in order)
#   .carry-data/paper/             the paper's public data (from ../shared/data/paper; never committed)
#   .carry-lee/                    the Lee news corpus files (offline text for chapter 6, from gensim)
#   .whl/                          wheels for what the GPU image lacks (scripts/gpu_wheels.sh)
# Usage: bash scripts/gpu_carry.sh   (from the repository root, after `make venv`)
set -euo pipefail
PY=${PY:-.venv/bin/python}
gguf=$($PY -c "from emlib.models import embedded_gguf_path as p; print(p())")
paper=${EMLIB_DATA_DIR:-../shared/data/paper}
rm -rf .carry-gguf1 .carry-gguf2 .carry-data .carry-lee
mkdir -p .carry-gguf1 .carry-gguf2 .carry-data .carry-lee
head -c 40M "$gguf" > .carry-gguf1/part-00          # 40 MiB travel with the wheels,
tail -c +$((40 * 1024 * 1024 + 1)) "$gguf" > .carry-gguf2/part-01   # the rest with the data
cp -r "$paper" .carry-data/paper
lee=$($PY -c "from emlib.corpus import offline_corpus_files as f; print(' '.join(map(str, f())))")
cp $lee .carry-lee/
sha256sum "$gguf" | cut -c1-64 > .carry-gguf2/SHA256
du -sh .carry-gguf1 .carry-gguf2 .carry-data .carry-lee .whl 2>/dev/null || true
