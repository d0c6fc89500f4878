#!/usr/bin/env bash
# One command for a run of record on a GPU machine that has only torch/transformers/peft installed and no
# internet (see README "Results of record"). From the repository root:
#   bash scripts/gpu_record.sh setup            install .whl/ into /tmp/site, stash GGUF parts in ~/emlib-carry,
#                                               compile the bytecode the packages lack (scripts/bytecode.py)
#   bash scripts/gpu_record.sh start NAME ARGS  start `python -m emlib.record run ARGS` in the background
#                                               (survives the calling shell), log in ~/record-NAME.log;
#                                               add --mps to share the GPU through an MPS daemon (bench/README)
#   bash scripts/gpu_record.sh wait NAME SECS [RUN_DIR]   print progress until the run ends or SECS pass; with
#                                               RUN_DIR, pack what the run has so far into $OUT/so-far
#   bash scripts/gpu_record.sh py SCRIPT ARGS   a Python script (a bench) in the same environment
#   bash scripts/gpu_record.sh stop             stop the started run, its workers and kernels and its MPS daemon
#   bash scripts/gpu_record.sh pack NAME RUN_DIR [DEST]   record.tar.gz + cache.tar.gz + adapters.tar.gz (rank-1 weights) + the log into DEST ($OUT)
#                                               + monitor-NAME.csv (CPU load and GPU use every 5 s while it ran)
# The lent machine is given back 30 s after a call ends, background runs or not: keep `wait` calls going
# back to back until `pack` has run and its files came back (a machine that went back loses everything).
# At most 8 files come back from $OUT per call: `pack` (and `wait ... RUN_DIR`) writes 6, so one run's files per
# call (2026-12-06: a call that packed a finished run and waited on the next lost the second's logs).
# A machine can also be taken back during a call (2026-12-05: 370 s of a run lost, nothing returned): keep
# each `wait` to about 270 s with RUN_DIR, so what the run has so far comes back at least that often.
# Environment it sets: PYTHONPATH (/tmp/site + the checkout), EMLIB_EMBEDDED_GGUF (the reassembled model),
# EMLIB_DATA_DIR (.carry-data/paper), EMLIB_LEE_DIR (.carry-lee), HF_HUB_OFFLINE=1.
# To continue an earlier run (e.g. chapters that did not finish): copy its run directory (without the
# answers' .csv.gz tables, which no later chapter reads) to .carry-run/NAME/ and carry it; `setup` puts it
# at ~/NAME, then `start NAME2 --run-dir $HOME/NAME --chapters 05 ...` trains nothing that is finished there.
# Models in parts (`bash scripts/gpu_carry.sh` for the embedded SmolLM2 as .carry-smolN/, `... qwen FILE.gguf`
# or `... model FILE PREFIX` for another): each `setup` stashes the .carry-PREFIXN/ folder(s) it sees; once
# every part listed in PREFIX-PARTS is there it reassembles ~/emlib-carry/<file> and checks its sha256. The
# embedded SmolLM2 (the distilled judge's base too) is exported as EMLIB_EMBEDDED_GGUF; for another model pass
# `--model $HOME/emlib-carry/FILE.gguf` to the run (converted once into $EMLIB_CACHE).
set -uo pipefail
STASH=$HOME/emlib-carry
# the run's own process only (`start` runs "python3 -m emlib.record run ...": its command line starts with python).
# A bare `pgrep -f "emlib.record run"` also matched the shell of a device call whose command line held those
# words, and `wait` then waited out its SECS after the run had ended (2026-12-06: 200 s of device time).
RUN_PAT='^[^ ]*python[0-9.]* -m emlib[.]record run'
running() { pgrep -f "$RUN_PAT" > /dev/null; }
pack_into() {  # pack_into NAME RUN_DIR DEST: the run's archives (emlib.record pack), its log and monitor into DEST
  python3 -m emlib.record pack "$2" "$3" && cp "$HOME/record-$1.log" "$3/record-$1.log" \
    && { [ ! -f "$HOME/monitor-$1.csv" ] || cp "$HOME/monitor-$1.csv" "$3/monitor-$1.csv"; } \
    && { [ ! -f "$HOME/monitor-$1-apps.csv" ] || cp "$HOME/monitor-$1-apps.csv" "$3/monitor-$1-apps.csv"; }
}
monitor() {  # monitor NAME: every 5 s while the run lives, one CSV row: seconds since start, 1-min load,
  # busy share of all CPU cores (%), GPU utilization (%), GPU memory used (MiB), board power (W) and SM clock
  # (MHz): "utilization" only says a kernel was running; the power drawn says how hard the card worked
  # (an H100 80GB read 121 W idle, 696 W matmul-bound, 385 W copy-bound: bench/gpu_power.py, 2026-12-06)
  # (+ monitor-NAME-apps.csv: each process's GPU memory as nvidia-smi lists it, with its command line's start)
  local f=$HOME/monitor-$1.csv a=$HOME/monitor-$1-apps.csv t0 prev cur t
  t0=$(date +%s); echo "t_s,load1,cpu_busy_pct,gpu_util_pct,gpu_mem_mib,gpu_power_w,sm_clock_mhz" > "$f"
  echo "t_s,pid,used_mib,command" > "$a"
  prev=$(awk '/^cpu /{printf "%d %d\n", $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
  while sleep 5 && running; do
    cur=$(awk '/^cpu /{printf "%d %d\n", $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
    echo "$(( $(date +%s) - t0 )),$(cut -d' ' -f1 /proc/loadavg),$(echo "$prev $cur" \
      | awk '{d=$3-$1; printf "%.0f", (d > 0 ? 100 * (d - ($4 - $2)) / d : 0)}'),$(nvidia-smi \
      --query-gpu=utilization.gpu,memory.used,power.draw,clocks.sm --format=csv,noheader,nounits | head -1 | tr -d ' ')" >> "$f"
    t=$(( $(date +%s) - t0 ))
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null | tr -d ' ' \
      | while IFS=, read -r pid mib; do
          echo "$t,$pid,$mib,$(ps -o args= -p "$pid" 2>/dev/null | tr -d ',' | cut -c1-80)"; done >> "$a"
    prev=$cur
  done
}
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
    for d in .carry-whl-*; do  # wheels split over several calls (bash scripts/gpu_carry.sh whl)
      [ -d "$d" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$d"/*.whl && echo "installed the wheels of $d"
    done
    [ -d .carry-data/paper ] && rm -rf "$STASH/paper" && cp -r .carry-data/paper "$STASH/paper"
    [ -d .carry-lee ] && mkdir -p "$STASH/lee" && cp .carry-lee/* "$STASH/lee/"
    for d in .carry-run/*/; do  # an earlier run directory to continue (its finetunes, results.json)
      [ -d "$d" ] && n=$(basename "$d") && rm -rf "$HOME/$n" && cp -r "$d" "$HOME/$n" && echo "run dir $HOME/$n ready"
    done
    for d in .carry-*[0-9]*/; do  # model parts (bash scripts/gpu_carry.sh model FILE PREFIX): PREFIX-part-NN
      [ -d "$d" ] && ls "$d"/*-PARTS > /dev/null 2>&1 && cp "$d"/* "$STASH/"
    done
    for parts in "$STASH"/*-PARTS; do
      [ -f "$parts" ] || continue
      p=$(basename "$parts" -PARTS); n=$(cat "$parts"); want=$(cut -c1-64 "$STASH/$p-SHA256")
      mname=$(awk '{print $2}' "$STASH/$p-SHA256"); missing=""
      if [ -f "$STASH/$mname" ]; then
        rm -f "$STASH/$p"-part-*; echo "$mname already reassembled"; continue
      fi
      for i in $(seq 0 $((n - 1))); do
        [ -f "$STASH/$p-part-$(printf %02d "$i")" ] || missing="$missing $(printf %02d "$i")"
      done
      if [ -n "$missing" ]; then
        echo "$mname: parts still missing:$missing (of $n; carry the matching .carry-${p}N folders)"
      else
        for i in $(seq 0 $((n - 1))); do cat "$STASH/$p-part-$(printf %02d "$i")"; done > "$STASH/$mname.tmp"
        got=$(sha256sum "$STASH/$mname.tmp" | cut -c1-64)
        if [ "$got" = "$want" ]; then
          mv "$STASH/$mname.tmp" "$STASH/$mname"; rm -f "$STASH/$p"-part-*
          echo "$mname reassembled, sha256 $got (any model but the embedded one runs with --model $STASH/$mname)"
        else
          rm -f "$STASH/$mname.tmp"; echo "$mname: sha256 mismatch: $got, expected $want"; exit 1
        fi
      fi
    done
    # bytecode (scripts/bytecode.py says why): the image's packages once per machine, the wheels and emlib each call
    if [ ! -f /tmp/.emlib-bytecode ]; then
      python3 scripts/bytecode.py $(python3 -c "import site; print(' '.join(site.getsitepackages()))") \
        && touch /tmp/.emlib-bytecode
    fi
    python3 scripts/bytecode.py /tmp/site emlib
    ls "$STASH"; python3 -c "import nnsight, papermill, jupytext, gguf; print('imports ok')"
    ;;
  start)
    name=$1; shift  # the environment above (model, data, corpus) is inherited by the run
    setsid nohup python3 -m emlib.record run "$@" > "$HOME/record-$name.log" 2>&1 < /dev/null &
    echo "started $name (pid $!)"
    sleep 2  # the monitor ends with the run (its own session, like the run: it outlives this call)
    setsid nohup bash "$0" monitor "$name" > /dev/null 2>&1 < /dev/null &
    ;;
  wait)
    name=$1; secs=${2:-540}; run=${3:-}; t0=$(date +%s)
    while running && [ $(( $(date +%s) - t0 )) -lt "$secs" ]; do sleep 10; done
    grep -v -i "warning\|TCP without\|Loading weights\|de-quantizing" "$HOME/record-$name.log" | tail -40
    running && echo "STILL RUNNING" || echo "RUN ENDED"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    if [ -n "$run" ] && [ -n "${OUT:-}" ]; then  # what the run has so far comes back with every call: a
      pack_into "$name" "$run" "$OUT/so-far" > /dev/null   # machine taken back between calls loses nothing packed
      ls "$OUT/so-far"
    fi
    ;;
  pack)
    pack_into "$1" "$2" "${3:-$OUT}"
    ;;
  stop)  # stop a started run and what it started: its workers and chapter kernels, its MPS daemon
    # (2026-12-06: `pkill -f 'emlib.record run'` or `pkill -f ipykernel_launcher` typed into a device call matched
    # that call's own shell, whose command line holds the words, and ended the call; these patterns live here)
    if ! running; then echo "no run is running"; else
      pkill -INT -f "$RUN_PAT"  # KeyboardInterrupt: the run's own clean-up runs; its workers stop with it
      for _ in $(seq 20); do running || break; sleep 1; done
      if running; then pkill -KILL -f "$RUN_PAT"; echo "the run did not stop in 20 s: killed"; else echo "the run stopped"; fi
    fi
    sleep 2
    pkill -KILL -f 'ipykernel[_]launcher' && echo "killed leftover chapter kernels"
    pkill -KILL -f 'multiprocessing[.]spawn' && echo "killed leftover workers"
    for pipe in /tmp/emlib-mps-*/pipe; do  # emlib.runner.mps_daemon's folders
      [ -d "$pipe" ] && echo quit | CUDA_MPS_PIPE_DIRECTORY=$pipe timeout 10 nvidia-cuda-mps-control > /dev/null 2>&1 \
        && echo "asked the MPS daemon of $(dirname "$pipe") to quit"
    done
    echo "processes on the GPU: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | wc -l)"
    ;;
  py)  # a Python script in the run's environment (a bench before the run: py bench/ablate_rows_gpu.py --out $OUT)
    python3 "$@"
    ;;
  monitor)  # started by `start`
    monitor "$1"
    ;;
  *) echo "usage: $0 setup | start NAME ARGS... | wait NAME SECS [RUN_DIR] | py SCRIPT ARGS... | pack NAME RUN_DIR [DEST] | stop"; exit 2;;
esac
