#!/usr/bin/env bash
# GPU preflight of a new node, in at most about 10 minutes, ending with a one-line verdict:
# does the suite pass with CUDA, does the record preset compile and run STEPS steps on ONE GPU
# (gradient accumulation 8), its steady step time, compile time and peak memory, and does a
# torchrun (NCCL) launch run. Synthetic shards in the real format with GPT-2's vocabulary
# (data/synthetic.py; the hub may be unreachable), so the losses are not FineWeb's.
#   tools/gpu_check.sh OUT_DIR [STEPS]        (STEPS default 40)
# Writes into OUT_DIR: env.txt, pytest_cpu.txt (the CPU suite, CUDA hidden, run on the CPU cores
# beside the GPU work), pytest_cuda.txt (tests/test_cuda.py on the GPU, run while the shards are
# written), record_run.txt and torchrun.txt (each ends with an "exit N" line), records/, and
# verdict.txt (the last line printed). Exits non-zero if a step failed.
# Environment overrides (tests/test_distributed.py uses them for a CPU smoke run):
#   PRESET (record), VOCAB (50257), SHARD_TOKENS (12000000), TRAIN_SHARDS (2), VAL_TOKENS
#   (524288: one record batch), DATA (shard folder), PYTEST (1; 0 skips both test runs),
#   BUDGET (600: seconds; each step's timeout is what is left of it), TRAIN_FLAGS (more
#   train_gpt.py flags for both runs, e.g. smaller shapes; default none).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [STEPS]}
STEPS=${2:-40}
PRESET=${PRESET:-record}
VOCAB=${VOCAB:-50257}
SHARD_TOKENS=${SHARD_TOKENS:-12000000}
TRAIN_SHARDS=${TRAIN_SHARDS:-2}
VAL_TOKENS=${VAL_TOKENS:-524288}
DATA=${DATA:-/tmp/synthetic${VOCAB}}
BUDGET=${BUDGET:-600}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }  # seconds left, at least 10

{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } >"$OUT/env.txt" 2>&1
DEVICE=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" 2>/dev/null || echo "torch does not import")

FAILED=""
check() {  # check NAME STATUS FILE: note a failed step (and say so on stderr)
  if [[ $2 != 0 ]]; then
    FAILED="$FAILED $1"
    echo "gpu_check: $1 failed (exit $2): see $3" >&2
  fi
}
finish_tests() {  # wait for the CPU suite (bounded by the budget) and note its result
  [[ ${PYTEST:-1} == 0 ]] && return
  wait "$CPU_TESTS"
  local status=$?
  echo "pytest exit $status" >>"$OUT/pytest_cpu.txt"
  check "cpu tests" "$status" "$OUT/pytest_cpu.txt"
}
tests_summary() {  # "N passed ..." of a pytest output, or "not run"
  [[ -f $1 ]] && grep -E '^=* ?[0-9]+ (passed|failed)|[0-9]+ passed' "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ in [0-9.]*s.*//' || echo "not run"
}

# 1. the CPU suite in the background, with CUDA hidden (the tests CI runs), whole budget
if [[ ${PYTEST:-1} != 0 ]]; then
  # test files in parallel when pytest-xdist is installed (requirements.txt has it)
  PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")
  CUDA_VISIBLE_DEVICES= timeout "$(left)" python3 -m pytest -q -rs $PARALLEL tests/ --ignore=tests/test_cuda.py \
    -p no:cacheprovider >"$OUT/pytest_cpu.txt" 2>&1 &
  CPU_TESTS=$!
fi

# 2. synthetic shards (background) while the CUDA tests use the GPU
SHARDS=0
if [[ ! -f $DATA/fineweb_val_000000.bin ]]; then
  python3 data/synthetic.py --out "$DATA" --vocab "$VOCAB" --train-shards "$TRAIN_SHARDS" \
    --shard-tokens "$SHARD_TOKENS" --val-tokens "$((VAL_TOKENS + 1))" >"$OUT/synthetic.txt" 2>&1 &  # +1: the last target
  SHARDS=$!
fi
if [[ ${PYTEST:-1} != 0 ]]; then
  timeout "$(left)" python3 -m pytest -q -rs tests/test_cuda.py -p no:cacheprovider >"$OUT/pytest_cuda.txt" 2>&1
  STATUS=$?
  echo "pytest exit $STATUS" >>"$OUT/pytest_cuda.txt"
  check "cuda tests" "$STATUS" "$OUT/pytest_cuda.txt"
fi
if [[ $SHARDS != 0 ]] && ! wait "$SHARDS"; then
  check "synthetic data" 1 "$OUT/synthetic.txt"
  finish_tests
  echo "gpu_check: FAILED:$FAILED (no data, nothing trained) on $DEVICE" | tee "$OUT/verdict.txt"
  exit 1
fi

# 3. the record preset, STEPS steps, compiled (auto: on with CUDA), validated at 0 and STEPS
RUN_START=$SECONDS
timeout "$(left)" python3 train_gpt.py --preset "$PRESET" --data-dir "$DATA" --train-steps "$STEPS" \
  --val-tokens "$VAL_TOKENS" --records-dir "$OUT/records" --run-name gpu_check_$PRESET $TRAIN_FLAGS \
  >"$OUT/record_run.txt" 2>&1
STATUS=$?
RUN_WALL=$(( SECONDS - RUN_START ))
echo "exit $STATUS" >>"$OUT/record_run.txt"
check "record-preset run" "$STATUS" "$OUT/record_run.txt"

# 4. torchrun with one rank: the NCCL process group and Aurora's all-gather at world size 1
timeout "$(left)" python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py \
  --preset "$PRESET" --data-dir "$DATA" --train-steps 3 --val-tokens "$VAL_TOKENS" --no-diagnostics \
  --records-dir "$OUT/records" --run-name gpu_check_torchrun $TRAIN_FLAGS >"$OUT/torchrun.txt" 2>&1
STATUS=$?
echo "exit $STATUS" >>"$OUT/torchrun.txt"
check "torchrun run" "$STATUS" "$OUT/torchrun.txt"

finish_tests

# 5. the verdict: step 1's train time holds the compilation; the steady step is the mean of the
#    steps after it (train_time of the last train line minus step 1's, over the steps between)
NUMBERS=$(python3 - "$OUT/record_run.txt" "$STEPS" <<'EOF'
import re, sys
text, steps = open(sys.argv[1]).read(), int(sys.argv[2])
times = {int(s): float(t) for s, t in re.findall(r"^step:(\d+)/\d+ train_loss:\S+ train_time:([\d.]+)s", text, re.M)}
peak = re.search(r"^peak memory allocated: ([\d.]+ GiB)", text, re.M)
if 1 in times and len(times) > 1:
    last = max(times)
    step = (times[last] - times[1]) / (last - 1)
    print(f"{len(times)} steps, step {1000 * step:.0f} ms, compile+first step {times[1]:.1f} s "
          f"(compile ~{times[1] - step:.1f} s), peak {peak.group(1) if peak else 'n/a (no CUDA)'}")
else:
    print(f"{len(times)} of {steps} steps")
EOF
)
if [[ -n $FAILED ]]; then
  VERDICT="gpu_check: FAILED:$FAILED"
else
  VERDICT="gpu_check: PASS"
fi
VERDICT="$VERDICT | $DEVICE | tests: cpu $(tests_summary "$OUT/pytest_cpu.txt"), cuda $(tests_summary "$OUT/pytest_cuda.txt") | $PRESET preset: $NUMBERS, run ${RUN_WALL} s | total ${SECONDS} s"
echo "$VERDICT" | tee "$OUT/verdict.txt"
[[ -z $FAILED ]]
