#!/usr/bin/env bash
# Prepare the git-ignored folders that carry a run of record to a GPU machine without internet
# (the device tool moves at most 64 MiB per call, so the model travels in parts):
#   .carry-smol1/ .. .carry-smol4/  SmolLM2-135M-Instruct.Q4_1.gguf in parts of 24 MiB (split_model below)
#   .carry-data/paper/             the paper's public data (from ../shared/data/paper; never committed)
#   .carry-lee/                    the Lee news corpus files (offline text for chapter 6, from gensim)
#   .whl/                          wheels for what the GPU image lacks (scripts/gpu_wheels.sh)
# Usage: bash scripts/gpu_carry.sh   (from the repository root, after `make venv`)
#        bash scripts/gpu_carry.sh plan   which folders to carry in which device call (each call <= 64 MiB);
#                                         `plan qwen` adds the Qwen parts (.carry-qwenN, left out otherwise)
#        bash scripts/gpu_carry.sh aside  move record/ (27 MiB of the 31 MiB working tree, which every call carries) out
#                                         of the checkout to ../record-aside, so that `plan` fits the model, wheels and
#                                         data in 3 calls instead of 4; each run of record's config.json and results.json
#                                         (~0.3 MiB) stay: `record run --speculate record` reads chapter 3's choice there
#        bash scripts/gpu_carry.sh back   put record/ back (from ../record-aside, else from git); run it once the
#                                         GPU calls are done, before any commit
#
# Optional second model (a local GGUF, e.g. Qwen2.5-Coder-0.5B-Instruct Q4_K_M, never a default):
#   bash scripts/gpu_carry.sh qwen /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# splits the file into equal parts that fit beside the working tree (64 MiB a call), one per folder .carry-qwen1/, .carry-qwen2/, ...
# (carry ONE folder per device call, with `bash scripts/gpu_record.sh setup`; the last call's setup
# reassembles ~/emlib-carry/<file>.gguf). Each folder also holds qwen-SHA256 ("<sha256>  <file name>")
# and qwen-PARTS (how many parts there are), so any call can tell what is still missing.
# It leaves the SmolLM2/data/Lee folders alone.
#   bash scripts/gpu_carry.sh whl   splits .whl/ into .carry-whl-a/, -b/ and -c/ (three thirds by size), so the
# wheels ride along with three of the four model parts (`plan` says which); `setup` installs whichever it carries.
set -euo pipefail
PY=${PY:-.venv/bin/python}
if [ "${1:-}" = whl ]; then  # three folders of about equal size (largest wheel first, into the lightest folder)
  rm -rf .carry-whl-a .carry-whl-b .carry-whl-c; mkdir -p .carry-whl-a .carry-whl-b .carry-whl-c
  for f in $(ls -S .whl/*.whl); do
    d=$(du -sb .carry-whl-a .carry-whl-b .carry-whl-c | sort -n | head -1 | cut -f2)
    cp "$f" "$d/"
  done
  du -sh .carry-whl-a .carry-whl-b .carry-whl-c; exit 0
fi
# split_model FILE PREFIX: FILE into .carry-PREFIX1/, .carry-PREFIX2/, ... each with one part PREFIX-part-NN,
# PREFIX-SHA256 ("<sha256>  <file name>") and PREFIX-PARTS (how many parts); `gpu_record.sh setup` reassembles
# ~/emlib-carry/<file name> once every part has come. Parts fill what a call leaves beside the working tree
# (64 MiB in all, 1.5 MiB to spare), or PART_MB MiB each when set (room for wheels or data in the same call).
tree_bytes() {  # what every call carries anyway: tracked and untracked-not-ignored files that are there now
  git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | du -cb --files0-from=- | tail -1 | cut -f1
}
ASIDE=../record-aside
if [ "${1:-}" = aside ]; then
  [ -d record ] || { echo "no record/ here (already aside in $ASIDE?)"; exit 1; }
  [ ! -e "$ASIDE" ] || { echo "$ASIDE exists: run \`bash scripts/gpu_carry.sh back\` first, or remove it"; exit 1; }
  [ -z "$(git status --porcelain -- record)" ] || { echo "record/ has uncommitted changes: commit them first"; exit 1; }
  mv record "$ASIDE"
  for f in "$ASIDE"/*/config.json "$ASIDE"/*/results.json; do  # what --speculate record reads stays in the tree
    [ -f "$f" ] || continue; d=record/${f#"$ASIDE"/}; mkdir -p "$(dirname "$d")"; cp "$f" "$d"
  done
  echo "record/ is in $ASIDE until \`bash scripts/gpu_carry.sh back\` (its runs' config.json and results.json stay)"
  exit 0
fi
if [ "${1:-}" = back ]; then
  if [ -d "$ASIDE" ]; then rm -rf record && mv "$ASIDE" record
  elif [ -n "$(git status --porcelain -- record)" ]; then git checkout -- record
  else echo "record/ is here already"; exit 0; fi
  [ -z "$(git status --porcelain -- record)" ] && echo "record/ is back, as committed"; exit 0
fi
room_bytes() {  # what a call (64 MiB) leaves beside the working tree, with 1.5 MiB to spare for later commits
  echo $(( 64 * 1024 * 1024 - $(tree_bytes) - 3 * 1024 * 1024 / 2 ))
}
split_model() {
  local src=$1 prefix=$2
  [ -f "$src" ] || { echo "no such file: $src"; exit 1; }
  local max size n chunk got sha i d
  max=$(room_bytes)
  [ -n "${PART_MB:-}" ] && max=$(( PART_MB * 1024 * 1024 ))
  [ "$max" -gt $((8 * 1024 * 1024)) ] || { echo "the working tree ($(tree_bytes) bytes) leaves no room for model parts"; exit 1; }
  size=$(stat -c %s "$src")
  n=$(( (size + max - 1) / max ))             # fewest parts that fit ...
  chunk=$(( (size + n - 1) / n ))             # ... of (nearly) equal size
  rm -rf .carry-"$prefix"[0-9]* .carry-"$prefix"-split
  mkdir .carry-"$prefix"-split
  split -b "$chunk" -d -a 2 "$src" .carry-"$prefix"-split/"$prefix"-part-
  got=$(ls .carry-"$prefix"-split | wc -l)
  [ "$got" -eq "$n" ] || { echo "split made $got parts, expected $n"; exit 1; }
  sha=$(sha256sum "$src" | cut -c1-64)
  for i in $(seq 0 $((n - 1))); do
    d=.carry-$prefix$((i + 1))
    mkdir "$d"
    mv .carry-"$prefix"-split/"$prefix"-part-$(printf %02d "$i") "$d/"
    printf '%s  %s\n' "$sha" "$(basename "$src")" > "$d/$prefix-SHA256"
    echo "$n" > "$d/$prefix-PARTS"
  done
  rmdir .carry-"$prefix"-split
  echo "$(basename "$src"): $size bytes, sha256 $sha, $n parts of <= $chunk bytes in .carry-${prefix}1..$n"
  du -sh .carry-"$prefix"[0-9]*
}
if [ "${1:-}" = plan ]; then  # which .carry-* folders to carry in which device call (first fit, largest first);
  # the .carry-qwenN parts only with `plan qwen` (a SmolLM2 run does not need them: 9 calls more)
  python3 - "$(tree_bytes)" "$(room_bytes)" "${2:-}" <<'PLAN'
import re
import sys
from pathlib import Path
room = int(sys.argv[2])
qwen = sys.argv[3] == "qwen"
size = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in Path(".").glob(".carry-*")
        if d.is_dir() and (qwen or not re.fullmatch(r"\.carry-qwen[0-9]+", d.name))}
calls: list[list[str]] = []
for name in sorted(size, key=lambda n: -size[n]):
    if size[name] > room:
        sys.exit(f"{name} ({size[name] / 2**20:.1f} MiB) does not fit beside the working tree ({room / 2**20:.1f} MiB left)")
    fit = next((c for c in calls if sum(size[n] for n in c) + size[name] <= room), None)
    fit.append(name) if fit is not None else calls.append([name])
for i, c in enumerate(calls, 1):
    print(f"call {i}: carry {c!r} ({sum(size[n] for n in c) / 2**20:.1f} MiB) + `bash scripts/gpu_record.sh setup`")
print(f"{len(calls)} calls; the working tree is {int(sys.argv[1]) / 2**20:.1f} MiB of each call's 64 MiB")
PLAN
  [ ! -d "$ASIDE" ] || echo "record/ is aside in $ASIDE: \`bash scripts/gpu_carry.sh back\` once the GPU calls are done"
  exit 0
fi
if [ "${1:-}" = qwen ]; then
  split_model "${2:?usage: bash scripts/gpu_carry.sh qwen /path/to/model.gguf}" qwen; exit 0
fi
if [ "${1:-}" = model ]; then
  split_model "${2:?usage: bash scripts/gpu_carry.sh model FILE PREFIX}" "${3:?a PREFIX (letters) for the folders}"
  exit 0
fi
gguf=$($PY -c "from emlib.models import embedded_gguf_path as p; print(p())")
paper=${EMLIB_DATA_DIR:-../shared/data/paper}
rm -rf .carry-gguf1 .carry-gguf2 .carry-data .carry-lee
mkdir -p .carry-data .carry-lee
PART_MB=${PART_MB:-24} split_model "$gguf" smol   # 4 parts of 24 MiB: room for a wheel half or the data
cp -r "$paper" .carry-data/paper
lee=$($PY -c "from emlib.corpus import offline_corpus_files as f; print(' '.join(map(str, f())))")
cp $lee .carry-lee/
du -sh .carry-data .carry-lee .whl 2>/dev/null || true
