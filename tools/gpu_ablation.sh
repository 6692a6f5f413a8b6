#!/usr/bin/env bash
# The Muon / NorMuon / Aurora ablation at 124M scale on ONE GPU (`small` preset: the record's
# model with a quarter of the batch), on synthetic shards with GPT-2's vocabulary, while the full
# test suite runs on the CPU cores beside it.
#   tools/gpu_ablation.sh OUT_DIR [STEPS]
# Leaves OUT_DIR/ablation.tar.gz (record directories, ablation.md, PNGs) and OUT_DIR/pytest.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_ablation.sh OUT_DIR [STEPS]}
STEPS=${2:-300}
DATA=${DATA:-/tmp/synthetic50257_small}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pytest -q tests/ >"$OUT/pytest.txt" 2>&1 &
TESTS=$!
if [[ ! -f $DATA/fineweb_val_000000.bin ]]; then
  python3 data/synthetic.py --out "$DATA" --vocab 50257 --train-shards 2 --shard-tokens 20000000 \
    --val-tokens 1000000 >/dev/null 2>&1 || { echo "synthetic data failed"; exit 1; }
fi
ABL=$(mktemp -d)/ablation_small
python3 tools/ablate.py --preset small --train-steps "$STEPS" --data-dir "$DATA" --out "$ABL" \
  2>&1 | tee "$OUT/ablate.txt"
tar -czf "$OUT/ablation.tar.gz" -C "$(dirname "$ABL")" ablation_small
wait $TESTS; echo "pytest exit $?" >>"$OUT/pytest.txt"
