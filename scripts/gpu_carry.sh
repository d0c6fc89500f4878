#!/usr/bin/env bash
# Prepare the git-ignored folders that carry a run of record to a GPU machine without internet
# (the device tool moves at most 64 MiB per call, so the model travels in parts):
#   .carry-gguf1/, .carry-gguf2/   SmolLM2-135M-Instruct.Q4_1.gguf split in two (cat them back in order)
#   .carry-data/paper/             the paper's public data (from ../shared/data/paper; never committed)
#   .carry-lee/                    the Lee news corpus files (offline text for chapter 6, from gensim)
#   .whl/                          wheels for what the GPU image lacks (scripts/gpu_wheels.sh)
# Usage: bash scripts/gpu_carry.sh   (from the repository root, after `make venv`)
#
# Optional second model (a local GGUF, e.g. Qwen2.5-Coder-0.5B-Instruct Q4_K_M, never a default):
#   bash scripts/gpu_carry.sh qwen /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# splits the file into equal parts that fit beside the working tree (64 MiB a call), one per folder .carry-qwen1/, .carry-qwen2/, ...
# (carry ONE folder per device call, with `bash scripts/gpu_record.sh setup`; the last call's setup
# reassembles ~/emlib-carry/<file>.gguf). Each folder also holds qwen-SHA256 ("<sha256>  <file name>")
# and qwen-PARTS (how many parts there are), so any call can tell what is still missing.
# It leaves the SmolLM2/data/Lee folders alone.
#   bash scripts/gpu_carry.sh whl   splits .whl/ into .carry-whl-a/ and .carry-whl-b/ (two halves by size),
# so the wheels can ride along with two model parts; `setup` installs whichever half a call carries.
set -euo pipefail
PY=${PY:-.venv/bin/python}
if [ "${1:-}" = whl ]; then
  rm -rf .carry-whl-a .carry-whl-b; mkdir -p .carry-whl-a .carry-whl-b
  i=0
  for f in $(ls -S .whl/*.whl); do  # largest first, alternating halves
    if [ $((i % 2)) -eq 0 ]; then cp "$f" .carry-whl-a/; else cp "$f" .carry-whl-b/; fi; i=$((i + 1))
  done
  du -sh .carry-whl-a .carry-whl-b; exit 0
fi
if [ "${1:-}" = qwen ]; then
  src=${2:?usage: bash scripts/gpu_carry.sh qwen /path/to/model.gguf}
  [ -f "$src" ] || { echo "no such file: $src"; exit 1; }
  # every call carries the whole working tree too (tracked + untracked-not-ignored files, 64 MiB in all):
  # size the parts to what is left, with 1.5 MiB to spare for commits made before the calls
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
  max=$(( 64 * 1024 * 1024 - tree - 3 * 1024 * 1024 / 2 ))
  [ "$max" -gt $((8 * 1024 * 1024)) ] || { echo "the working tree ($tree bytes) leaves no room for model parts"; exit 1; }
  size=$(stat -c %s "$src")
  n=$(( (size + max - 1) / max ))             # fewest parts that fit ...
  chunk=$(( (size + n - 1) / n ))             # ... of (nearly) equal size
  rm -rf .carry-qwen[0-9]* .carry-qwen-split
  mkdir .carry-qwen-split
  split -b "$chunk" -d -a 2 "$src" .carry-qwen-split/qwen-part-
  got=$(ls .carry-qwen-split | wc -l)
  [ "$got" -eq "$n" ] || { echo "split made $got parts, expected $n"; exit 1; }
  sha=$(sha256sum "$src" | cut -c1-64)
  for i in $(seq 0 $((n - 1))); do
    d=.carry-qwen$((i + 1))
    mkdir "$d"
    mv .carry-qwen-split/qwen-part-$(printf %02d "$i") "$d/"
    printf '%s  %s\n' "$sha" "$(basename "$src")" > "$d/qwen-SHA256"
    echo "$n" > "$d/qwen-PARTS"
  done
  rmdir .carry-qwen-split
  echo "$(basename "$src"): $size bytes, sha256 $sha, $n parts of <= $chunk bytes"
  du -sh .carry-qwen[0-9]*
  exit 0
fi
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
