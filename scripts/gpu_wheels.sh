#!/usr/bin/env bash
# Rebuild .whl/: the wheels a GPU machine without internet (CPython 3.12, x86_64
# Linux, glibc >= 2.28) lacks to run the chapters: nnsight, papermill + a python3
# kernel (ipykernel, ipython, jupyter_client, pyzmq, tornado, ...), jupytext,
# ipywidgets and gguf, with their whole dependency closure minus what that
# machine already has (its pip list: torch, transformers, peft, numpy, pandas,
# pyyaml, requests, httpx, huggingface_hub, aiohttp, attrs, psutil, ...).
# Versions follow constraints.txt; the list lives in scripts/gpu_wheels.txt. Left out to stay under
# the 64 MiB a device call carries: debugpy (the kernel runs without its debugger), zstandard and
# websocket-client (nnsight imports them only for remote execution).
#
# Run from the repo root (needs PyPI):  bash scripts/gpu_wheels.sh
# Install on the GPU machine (offline, no deps resolved there):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail

list=scripts/gpu_wheels.txt
dest=.whl
[ -f "$list" ] || { echo "run from the repo root ($list not found)" >&2; exit 1; }

mapfile -t reqs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')

rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$dest" "${reqs[@]}"

# exactly one wheel per listed package, nothing else
n=$(find "$dest" -mindepth 1 -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$n" -ne "${#reqs[@]}" ]; then
    echo "expected ${#reqs[@]} wheels in $dest, found $n" >&2
    exit 1
fi
echo "$n wheels in $dest: $(du -cb "$dest"/*.whl | tail -1 | awk '{printf "%.1f MB", $1/1e6}')"
