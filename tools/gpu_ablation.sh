#!/usr/bin/env bash
# The Muon / NorMuon / Aurora ablation at 124M scale on ONE GPU (`small` preset: the record's
# model with a quarter of the batch), on synthetic shards with GPT-2's vocabulary, while the full
# test suite runs on the CPU cores beside it.
#   tools/gpu_ablation.sh OUT_DIR [STEPS]
# Leaves OUT_DIR/ablation.tar.gz (record directories, ablation.md, PNGs), OUT_DIR/ablate.txt and
# OUT_DIR/pytest.txt. Environment overrides (used by tests/test_bench.py for a CPU smoke run):
#   PRESET (small), VOCAB (50257), SHARD_TOKENS (20000000), DATA (shard folder), PYTEST (1; 0 skips).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_ablation.sh OUT_DIR [STEPS]}
STEPS=${2:-300}
PRESET=${PRESET:-small}
VOCAB=${VOCAB:-50257}
SHARD_TOKENS=${SHARD_TOKENS:-20000000}
DATA=${DATA:-/tmp/synthetic${VOCAB}_${PRESET}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ ${PYTEST:-1} != 0 ]]; then
  python3 -m pytest -q tests/ >"$OUT/pytest.txt" 2>&1 &
  TESTS=$!
fi
if [[ ! -f $DATA/fineweb_val_000000.bin ]]; then
  python3 data/synthetic.py --out "$DATA" --vocab "$VOCAB" --train-shards 2 \
    --shard-tokens "$SHARD_TOKENS" --val-tokens $((SHARD_TOKENS / 20)) >"$OUT/synthetic.txt" 2>&1 \
    || { echo "synthetic data failed: see $OUT/synthetic.txt" >&2; exit 1; }
fi
ABL=$(mktemp -d)/ablation_$PRESET
python3 tools/ablate.py --preset "$PRESET" --train-steps "$STEPS" --data-dir "$DATA" --out "$ABL" \
  2>&1 | tee "$OUT/ablate.txt"
STATUS=${PIPESTATUS[0]}
tar -czf "$OUT/ablation.tar.gz" -C "$(dirname "$ABL")" "ablation_$PRESET"
if [[ ${PYTEST:-1} != 0 ]]; then
  wait $TESTS; echo "pytest exit $?" >>"$OUT/pytest.txt"
fi
exit "$STATUS"
