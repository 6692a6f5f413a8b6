#!/usr/bin/env bash
# The Muon / NorMuon / Aurora ablation at 124M scale on ONE GPU (`small` preset: the record's
# model with a quarter of the batch), on synthetic shards with GPT-2's vocabulary, while the full
# test suite runs on the CPU cores beside it.
#   tools/gpu_ablation.sh OUT_DIR [STEPS]
# Leaves OUT_DIR/ablation.tar.gz (record directories, ablation.md, PNGs), OUT_DIR/ablate.txt and
# OUT_DIR/pytest.txt. Exits non-zero if the ablation or the tests failed (after both have finished
# and written their outputs). Environment overrides (used by tests/test_bench.py for a CPU smoke run):
#   PRESET (small), VOCAB (50257), SHARD_TOKENS (20000000), DATA (shard folder), PYTEST (1; 0 skips),
#   TRAIN_FLAGS (more train_gpt.py flags for every run, e.g. smaller shapes; default none).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_ablation.sh OUT_DIR [STEPS]}
STEPS=${2:-300}
PRESET=${PRESET:-small}
VOCAB=${VOCAB:-50257}
SHARD_TOKENS=${SHARD_TOKENS:-20000000}
DATA=${DATA:-/tmp/synthetic${VOCAB}_${PRESET}}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ ${PYTEST:-1} != 0 ]]; then
  PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")  # with pytest-xdist
  python3 -m pytest -q -rs $PARALLEL tests/ >"$OUT/pytest.txt" 2>&1 &  # -rs: the skipped tests and why
  TESTS=$!
fi
wait_for_tests() {  # the tests' exit status (0 when they were not run)
  [[ ${PYTEST:-1} == 0 ]] && return 0
  wait "$TESTS"
  local status=$?
  echo "pytest exit $status" >>"$OUT/pytest.txt"
  [[ $status == 0 ]] || echo "gpu_ablation: tests failed (exit $status): see $OUT/pytest.txt" >&2
  return "$status"
}
if [[ ! -f $DATA/fineweb_val_000000.bin ]]; then
  if ! python3 data/synthetic.py --out "$DATA" --vocab "$VOCAB" --train-shards 2 \
      --shard-tokens "$SHARD_TOKENS" --val-tokens $((SHARD_TOKENS / 20)) >"$OUT/synthetic.txt" 2>&1; then
    echo "synthetic data failed: see $OUT/synthetic.txt" >&2
    wait_for_tests
    exit 1
  fi
fi
ABL=$(mktemp -d)/ablation_$PRESET
python3 tools/ablate.py --preset "$PRESET" --train-steps "$STEPS" --data-dir "$DATA" --out "$ABL" $TRAIN_FLAGS \
  2>&1 | tee "$OUT/ablate.txt"
STATUS=${PIPESTATUS[0]}
[[ $STATUS == 0 ]] || echo "gpu_ablation: ablation failed (exit $STATUS): see $OUT/ablate.txt" >&2
tar -czf "$OUT/ablation.tar.gz" -C "$(dirname "$ABL")" "ablation_$PRESET"
wait_for_tests
TEST_STATUS=$?
if [[ $STATUS == 0 && $TEST_STATUS != 0 ]]; then
  STATUS=$TEST_STATUS
fi
exit "$STATUS"
