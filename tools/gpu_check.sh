#!/usr/bin/env bash
# GPU validation of the record configuration on ONE GPU (gradient accumulation 8), on synthetic
# shards in the real format with GPT-2's vocabulary (the hub is unreachable on our GPU machines).
#   tools/gpu_check.sh OUT_DIR [STEPS]
# Writes into OUT_DIR: env.txt, pytest.txt, the record-config run's log (records/...), and a
# torchrun/NCCL 1-rank smoke run. Numbers from it go to README.md with the device and torch version.
# Every step runs; the script exits non-zero if the tests or either run failed (each step's
# "exit N" line is at the end of its output file).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [STEPS]}
STEPS=${2:-100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DATA=${DATA:-/tmp/synthetic50257}

{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } >"$OUT/env.txt" 2>&1

FAILED=""
check() {  # check NAME STATUS FILE: note a failed step (and say so on stderr)
  if [[ $2 != 0 ]]; then
    FAILED="$FAILED $1"
    echo "gpu_check: $1 failed (exit $2): see $3" >&2
  fi
}

# 1. the test suite (CPU tests plus the CUDA-only ones); -rs lists the skipped tests and why
python3 -m pytest -q -rs ${PYTEST_ARGS:-tests/} >"$OUT/pytest.txt" 2>&1
STATUS=$?
echo "pytest exit $STATUS" >>"$OUT/pytest.txt"
check pytest "$STATUS" "$OUT/pytest.txt"

# 2. synthetic shards: 3 x 20M train tokens (114 record batches), 2M val tokens, vocab 50257
if [[ ! -f $DATA/fineweb_val_000000.bin ]]; then
  python3 data/synthetic.py --out "$DATA" --vocab 50257 --train-shards 3 --shard-tokens 20000000 \
    --val-tokens 2000000 >"$OUT/synthetic.txt" 2>&1
fi

# 3. the record configuration, STEPS steps, validation on 2 batches (1,048,576 tokens)
python3 train_gpt.py --data-dir "$DATA" --train-steps "$STEPS" --val-tokens 1048576 \
  --records-dir "$OUT/records" --run-name gpu_record_config >"$OUT/record_run.txt" 2>&1
STATUS=$?
echo "exit $STATUS" >>"$OUT/record_run.txt"
check "record-config run" "$STATUS" "$OUT/record_run.txt"

# 4. torchrun with one rank: NCCL process group, Aurora's all-gather path with world size 1
python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py --data-dir "$DATA" \
  --train-steps 10 --val-tokens 524288 --records-dir "$OUT/records" --run-name gpu_torchrun_nccl \
  >"$OUT/torchrun.txt" 2>&1
STATUS=$?
echo "exit $STATUS" >>"$OUT/torchrun.txt"
check "torchrun run" "$STATUS" "$OUT/torchrun.txt"

if [[ -n $FAILED ]]; then
  echo "gpu_check: FAILED:$FAILED" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
