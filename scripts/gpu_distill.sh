#!/usr/bin/env bash
# Train and validate the distilled judge on a lent GPU machine (no internet, 64 MiB per call), then judge
# every run of record with it. Prepare here (after `make venv`):
#   bash scripts/gpu_distill.sh prepare      -> .carry-ga/ .carry-gb/ (model parts), .carry-gc/ (last part,
#                                               the judged folder, the gguf wheel); all git-ignored
# Then, on the device machine, calls back to back (it goes back 30 s after a call ends):
#   bash scripts/gpu_distill.sh stash        (carry .carry-ga)   (carry .carry-gb)   (carry .carry-gc)
#   bash scripts/gpu_distill.sh run SECONDS  every remaining step, each skipped once done; stops before SECONDS
#                                            pass (rerun it in the next call to go on); results under $OUT
# Steps: cv-frozen, cv-lora (repository folds), choose (higher held-out aligned Spearman), final (train on
# all repositories), speed (answers/s), rejudge (every run of record with the new judge), pack.
set -uo pipefail
STASH=$HOME/emlib-carry
W=$HOME/distill-run
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_MININTERVAL=15 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
export EMLIB_CACHE=$STASH/cache EMLIB_JUDGED_DIR=$STASH/judged
[ -f "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf" ] && export EMLIB_EMBEDDED_GGUF=$STASH/SmolLM2-135M-Instruct.Q4_1.gguf
cmd=${1:-}; shift || true
case "$cmd" in
  prepare)
    PY=${PY:-.venv/bin/python}
    g=$($PY -c "from emlib.models import embedded_gguf_path as p; print(p())")
    rm -rf .carry-ga .carry-gb .carry-gc; mkdir -p .carry-ga .carry-gb .carry-gc/whl
    split -b 40M -d -a 1 "$g" .carry-gc/part-
    mv .carry-gc/part-0 .carry-ga/; mv .carry-gc/part-1 .carry-gb/
    sha256sum "$g" | cut -c1-64 > .carry-gc/SHA256
    cp -r "${EMLIB_JUDGED_DIR:-../shared/data/judged}" .carry-gc/judged
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .carry-gc/whl "gguf==$($PY -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
    du -sh .carry-ga .carry-gb .carry-gc ;;
  stash)
    mkdir -p "$STASH"
    for d in .carry-ga .carry-gb .carry-gc; do [ -d $d ] && cp -r $d/* "$STASH/"; done
    if [ -d "$STASH/whl" ] && [ ! -f /tmp/site/.gguf ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STASH"/whl/*.whl && touch /tmp/site/.gguf
    fi
    if [ -f "$STASH/part-0" ] && [ -f "$STASH/part-1" ] && [ -f "$STASH/part-2" ]; then
      cat "$STASH"/part-0 "$STASH"/part-1 "$STASH"/part-2 > "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"
      got=$(sha256sum "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -c1-64)
      [ "$got" = "$(cat "$STASH/SHA256")" ] || { echo "sha256 mismatch: $got"; rm -f "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"; exit 1; }
      rm -f "$STASH"/part-*; echo "model reassembled, sha256 $got"
    fi
    ls "$STASH"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv ;;
  run)
    budget=${1:-560}; deadline=$(( $(date +%s) + budget )); mkdir -p "$W"
    step() {  # step NAME CMD...: run once (a marker file records success), within the time left
      local name=$1; shift
      [ -f "$W/done-$name" ] && return 0
      local left=$(( deadline - $(date +%s) ))
      [ "$left" -gt 20 ] || { echo "[gpu_distill] no time left for $name: run again"; return 3; }
      echo "[gpu_distill] $name ($left s left)"
      local t0=$(date +%s)
      timeout "$left" "$@" 2>&1 | grep -v "it/s\]$" | tee -a "$W/log-$name.txt"
      local rc=${PIPESTATUS[0]}
      echo "[gpu_distill] $name rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$W/timings.txt"
      [ "$rc" -eq 0 ] && touch "$W/done-$name"
      return "$rc"
    }
    pack() {
      cp "$W"/log-*.txt "$W"/timings.txt "$OUT/" 2>/dev/null
      (cd "$W" && tar czf "$OUT/distill-cv.tar.gz" cv_*.parquet choice.txt 2>/dev/null)
      [ -d "$W/final" ] && (cd "$W" && tar czf "$OUT/distill-final.tar.gz" final/SHA256SUMS final/*.json final/*.safetensors)
      [ -f "$W/speed_gpu.json" ] && cp "$W/speed_gpu.json" "$OUT/"
      [ -d "$W/rejudged" ] && (cd "$W" && tar czf "$OUT/rejudged.tar.gz" --exclude='*.sqlite*' rejudged)
      ls -la "$OUT"
    }
    trap pack EXIT
    V=${VARIANTS:-frozen lora}
    for v in $V; do step "cv-$v" python3 -m emlib.distill cv --variant "$v" --out "$W" $EXTRA_CV || exit $?; done
    step choose python3 -m emlib.distill choose --out "$W" || exit $?
    best=$(cat "$W/choice.txt")
    step final python3 -m emlib.distill train --variant "$best" --out "$W/final" $EXTRA_TRAIN || exit $?
    step speed python3 -m emlib.distill speed --weights "$W/final" --n 4000 --batch-size 128 --json "$W/speed_gpu.json" || exit $?
    export EMLIB_DISTILLED_DIR=$W/final; step rejudge python3 -m emlib.rejudge --record --judge distilled --out "$W/rejudged" || exit $? ;;
  *) echo "usage: bash scripts/gpu_distill.sh prepare | stash | run [SECONDS]"; exit 2 ;;
esac
