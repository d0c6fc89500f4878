#!/usr/bin/env bash
# One command for a run of record on a GPU machine that has only torch/transformers/peft installed and no
# internet (see README "Results of record"). From the repository root:
#   bash scripts/gpu_record.sh setup            install .whl/ into /tmp/site, stash GGUF parts in ~/emlib-carry
#   bash scripts/gpu_record.sh start NAME ARGS  start `python -m emlib.record run ARGS` in the background
#                                               (survives the calling shell), log in ~/record-NAME.log
#   bash scripts/gpu_record.sh wait NAME SECS   print progress until the run ends or SECS pass
#   bash scripts/gpu_record.sh pack NAME RUN_DIR [DEST]   record.tar.gz + cache.tar.gz + the log into DEST ($OUT)
# Environment it sets: PYTHONPATH (/tmp/site + the checkout), EMLIB_EMBEDDED_GGUF (the reassembled model),
# EMLIB_DATA_DIR (.carry-data/paper), EMLIB_LEE_DIR (.carry-lee), HF_HUB_OFFLINE=1.
set -uo pipefail
STASH=$HOME/emlib-carry
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export EMLIB_CACHE=$STASH/cache PYDEVD_DISABLE_FILE_VALIDATION=1
[ -f "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf" ] && export EMLIB_EMBEDDED_GGUF=$STASH/SmolLM2-135M-Instruct.Q4_1.gguf
[ -d "$STASH/paper" ] && export EMLIB_DATA_DIR=$STASH/paper
[ -d "$STASH/lee" ] && export EMLIB_LEE_DIR=$STASH/lee
cmd=${1:-}; shift || true
case "$cmd" in
  setup)
    mkdir -p "$STASH"
    if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ] && [ ! -f /tmp/site/.emlib-wheels ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.emlib-wheels || { echo "wheel install failed"; exit 1; }
    fi
    for d in .carry-gguf1 .carry-gguf2; do [ -d $d ] && cp $d/* "$STASH/"; done
    [ -d .carry-data/paper ] && rm -rf "$STASH/paper" && cp -r .carry-data/paper "$STASH/paper"
    [ -d .carry-lee ] && mkdir -p "$STASH/lee" && cp .carry-lee/* "$STASH/lee/"
    if [ -f "$STASH/part-00" ] && [ -f "$STASH/part-01" ]; then
      cat "$STASH/part-00" "$STASH/part-01" > "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf.tmp"
      got=$(sha256sum "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf.tmp" | cut -c1-64)
      if [ "$got" = "$(cat "$STASH/SHA256")" ]; then
        mv "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf.tmp" "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"
        rm -f "$STASH/part-00" "$STASH/part-01"; echo "model reassembled, sha256 $got"
      else
        echo "sha256 mismatch: $got"; exit 1
      fi
    fi
    ls "$STASH"; python3 -c "import nnsight, papermill, jupytext, gguf; print('imports ok')"
    ;;
  start)
    name=$1; shift
    [ -f "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf" ] && export EMLIB_EMBEDDED_GGUF=$STASH/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -d "$STASH/paper" ] && export EMLIB_DATA_DIR=$STASH/paper
    [ -d "$STASH/lee" ] && export EMLIB_LEE_DIR=$STASH/lee
    setsid nohup python3 -m emlib.record run "$@" > "$HOME/record-$name.log" 2>&1 < /dev/null &
    echo "started $name (pid $!)"
    ;;
  wait)
    name=$1; secs=${2:-540}; t0=$(date +%s)
    while pgrep -f "emlib.record run" > /dev/null && [ $(( $(date +%s) - t0 )) -lt "$secs" ]; do sleep 10; done
    grep -v -i "warning\|TCP without" "$HOME/record-$name.log" | tail -40
    pgrep -f "emlib.record run" > /dev/null && echo "STILL RUNNING" || echo "RUN ENDED"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    ;;
  pack)
    name=$1; run=$2; dest=${3:-$OUT}
    python3 -m emlib.record pack "$run" "$dest"; cp "$HOME/record-$name.log" "$dest/record-$name.log"
    ;;
  *) echo "usage: $0 setup | start NAME ARGS... | wait NAME SECS"; exit 2;;
esac
