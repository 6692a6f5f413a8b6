#!/usr/bin/env bash
# ./run.sh [train_gpt.py flags]
#   With NVIDIA GPUs: fetch the FineWeb shards the record needs (skipped when present), then train
#   on every GPU of this node with torchrun. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and
#   MASTER_PORT on every node.
#   Without GPUs: generate synthetic shards (once) and run the `tiny` preset on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

has_flag() {  # has_flag --name "$@": is --name (or --name=...) among the arguments?
  local name=$1; shift
  for a in "$@"; do [[ $a == "$name" || $a == "$name="* ]] && return 0; done
  return 1
}
is_tiny() {
  local prev=""
  for a in "$@"; do
    [[ $a == "--preset=tiny" || ( $prev == "--preset" && $a == "tiny" ) ]] && return 0
    prev=$a
  done
  return 1
}
ensure_synthetic() {
  if [[ ! -f data/synthetic/fineweb_val_000000.bin ]]; then
    echo "run.sh: generating synthetic shards in data/synthetic/"
    "$PYTHON" data/synthetic.py --out data/synthetic
  fi
}

# GPUs that torch can use (honours CUDA_VISIBLE_DEVICES; set it empty to force the CPU path).
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

if [[ $NGPU -eq 0 ]]; then
  echo "run.sh: no NVIDIA GPU found: running the tiny preset on the CPU (synthetic data)."
  echo "run.sh: the record needs 8 GPUs; see README.md."
  has_flag --data-dir "$@" || ensure_synthetic
  has_flag --preset "$@" && exec "$PYTHON" train_gpt.py "$@"
  exec "$PYTHON" train_gpt.py --preset tiny "$@"
fi

if ! has_flag --data-dir "$@"; then
  if is_tiny "$@"; then
    ensure_synthetic
  else
    "$PYTHON" data/cached_fineweb10B.py
  fi
fi

NNODES=${NNODES:-1}
if [[ $NNODES -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
  exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NGPU" train_gpt.py "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_gpt.py "$@"
