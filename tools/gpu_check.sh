#!/usr/bin/env bash
# GPU validation of the record configuration on ONE GPU (gradient accumulation 8), on synthetic
# shards in the real format with GPT-2's vocabulary (the hub is unreachable on our GPU machines).
#   tools/gpu_check.sh OUT_DIR [STEPS]
# Writes into OUT_DIR: env.txt, pytest.txt, the record-config run's log (records/...), and a
# torchrun/NCCL 1-rank smoke run. Numbers from it go to README.md with the device and torch version.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [STEPS]}
STEPS=${2:-100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DATA=${DATA:-/tmp/synthetic50257}

{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } >"$OUT/env.txt" 2>&1

# 1. the test suite (CPU tests plus the CUDA-only ones)
python3 -m pytest -q ${PYTEST_ARGS:-tests/} >"$OUT/pytest.txt" 2>&1; echo "pytest exit $?" >>"$OUT/pytest.txt"

# 2. synthetic shards: 3 x 20M train tokens (114 record batches), 2M val tokens, vocab 50257
if [[ ! -f $DATA/fineweb_val_000000.bin ]]; then
  python3 data/synthetic.py --out "$DATA" --vocab 50257 --train-shards 3 --shard-tokens 20000000 \
    --val-tokens 2000000 >"$OUT/synthetic.txt" 2>&1
fi

# 3. the record configuration, STEPS steps, validation on 2 batches (1,048,576 tokens)
python3 train_gpt.py --data-dir "$DATA" --train-steps "$STEPS" --val-tokens 1048576 \
  --records-dir "$OUT/records" --run-name gpu_record_config >"$OUT/record_run.txt" 2>&1
echo "exit $?" >>"$OUT/record_run.txt"

# 4. torchrun with one rank: NCCL process group, Aurora's all-gather path with world size 1
python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py --data-dir "$DATA" \
  --train-steps 10 --val-tokens 524288 --records-dir "$OUT/records" --run-name gpu_torchrun_nccl \
  >"$OUT/torchrun.txt" 2>&1
echo "exit $?" >>"$OUT/torchrun.txt"
