#!/usr/bin/env bash
# ./run.sh [train_gpt.py flags]
#   With NVIDIA GPUs: check the flags, fetch the FineWeb shards the run needs (skipped when
#   present), then train on every GPU of this node with torchrun.
#   Multi-node: set NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR and optionally MASTER_PORT
#   (default 29500) on every node.
#   Without GPUs (or with CUDA_VISIBLE_DEVICES= set empty): train on the CPU; the `tiny` preset
#   on synthetic shards unless you pass --preset (record, small and aurora_* on a CPU also need
#   --allow-cpu, unless combined with tiny);
#   a + list with tiny (--preset aurora_2860+tiny) trains on the synthetic shards too.
#
# Before any download, data generation or launch, the flags are checked by
# `train_gpt.py --dry-run` with WORLD_SIZE set to the number of ranks the real run will have.
# Relative paths in the flags (--data-dir, --records-dir, --resume, ...) are relative to the
# directory you call run.sh from: run.sh does not change directory.
#
# Environment:
#   PYTHON        the Python interpreter (default python3); also runs torchrun and the downloader
#   NNODES        number of nodes (default 1); NODE_RANK, MASTER_ADDR, MASTER_PORT as above
#   RUN_SH_NGPU   number of GPUs to assume instead of asking torch (for tests)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

die() { echo "run.sh: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[0-9]{1,6}$ ]]; }  # a non-negative integer of sane size

# ---- environment: checked before anything runs -------------------------------------------------
NNODES=${NNODES:-1}
is_count "$NNODES" && (( 10#$NNODES >= 1 )) \
  || die "NNODES must be a positive integer (the number of nodes), got '$NNODES'"
NNODES=$((10#$NNODES))
NODE_RANK=${NODE_RANK:-}
if [[ -n $NODE_RANK ]]; then
  is_count "$NODE_RANK" && (( 10#$NODE_RANK < NNODES )) \
    || die "NODE_RANK must be an integer from 0 to NNODES-1 = $((NNODES - 1)), got '$NODE_RANK'" \
           "(NNODES=$NNODES$( ((NNODES > 1)) || echo "; set NNODES for a multi-node run"))"
  NODE_RANK=$((10#$NODE_RANK))
elif (( NNODES > 1 )); then
  die "NNODES=$NNODES: set NODE_RANK (0..$((NNODES - 1))) on every node, 0 on the node at MASTER_ADDR"
fi
MASTER_ADDR=${MASTER_ADDR:-}
if (( NNODES > 1 )) && [[ -z $MASTER_ADDR ]]; then
  die "NNODES=$NNODES: set MASTER_ADDR to the address of node 0 on every node"
fi
MASTER_PORT=${MASTER_PORT:-29500}
is_count "$MASTER_PORT" && (( 10#$MASTER_PORT >= 1 && 10#$MASTER_PORT <= 65535 )) \
  || die "MASTER_PORT must be a port number from 1 to 65535, got '$MASTER_PORT'"
MASTER_PORT=$((10#$MASTER_PORT))
if [[ -n ${RUN_SH_NGPU:-} ]]; then
  is_count "$RUN_SH_NGPU" || die "RUN_SH_NGPU must be a non-negative integer, got '$RUN_SH_NGPU'"
fi

# ---- the interpreter: it must run before anything is said about GPUs or data ---------------------
command -v "$PYTHON" >/dev/null 2>&1 \
  || die "PYTHON=$PYTHON: no such command (set PYTHON to a Python 3 interpreter, or unset it for python3)"
probe_rc=0
probe=$("$PYTHON" -c 'import sys; print("python", sys.version_info[0])' 2>&1) || probe_rc=$?
[[ $probe_rc == 0 && $probe == "python 3" ]] \
  || die "PYTHON=$PYTHON does not run Python 3 (exit status $probe_rc${probe:+: $(tail -n 1 <<<"$probe")})"
# torch found without importing it (the GPU count below imports it, and hides why it failed)
"$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null \
  || die "torch is not installed for PYTHON=$PYTHON ($(command -v "$PYTHON")): install the requirements" \
         "with \`$PYTHON -m pip install -r requirements.txt\`, or set PYTHON to an interpreter that has torch"

# ---- GPUs that torch can use (honours CUDA_VISIBLE_DEVICES; empty forces the CPU path) ----------
if [[ -n ${RUN_SH_NGPU:-} ]]; then
  NGPU=$((10#$RUN_SH_NGPU))
else
  NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null | tail -n 1) || true
  is_count "${NGPU:-}" || NGPU=0
  NGPU=$((10#$NGPU))
fi

has_flag() {  # has_flag --name "$@": is --name (or --name=...) among the arguments?
  local name=$1 a; shift
  for a in "$@"; do [[ $a == "$name" || $a == "$name="* ]] && return 0; done
  return 1
}
preset_of() {  # the preset train_gpt.py will use: the last --preset given, else record
  local preset=record prev="" a
  for a in "$@"; do
    if [[ $prev == --preset ]]; then preset=$a; elif [[ $a == --preset=* ]]; then preset=${a#--preset=}; fi
    prev=$a
  done
  echo "$preset"
}

if (( NGPU == 0 )); then
  (( NNODES == 1 )) || die "NNODES=$NNODES but no NVIDIA GPU found on this node; multi-node runs need GPUs"
  echo "run.sh: no NVIDIA GPU found: CPU run (the record needs 8 GPUs; see README.md)."
  has_flag --preset "$@" || set -- --preset tiny "$@"  # no --preset: the CPU smoke run
  WORLD=1
else
  WORLD=$((NGPU * NNODES))
fi
PRESET=$(preset_of "$@")
TINY=0  # the tiny preset, alone or in a + list (aurora_2860+tiny): synthetic shards
[[ "+$PRESET+" == *+tiny+* ]] && TINY=1

# ---- check the flags and the configuration: nothing is downloaded, generated or launched yet ----
rc=0
checked=$(WORLD_SIZE=$WORLD "$PYTHON" "$HERE/train_gpt.py" --dry-run "$@") || rc=$?
[[ -n $checked ]] && printf '%s\n' "$checked"
(( rc == 0 )) || exit "$rc"
if ! grep -q '^dry run: configuration ok' <<<"$checked" || has_flag --dry-run "$@"; then
  exit 0  # --help, or a dry run asked for: nothing to train
fi

# ---- data ----------------------------------------------------------------------------------------
if ! has_flag --data-dir "$@"; then
  if (( TINY )); then
    # written again when meta.json (written last) is missing or a shard no longer matches it
    "$PYTHON" "$HERE/data/synthetic.py" --out "$HERE/data/synthetic" --if-needed
  else
    echo "run.sh: fetching the FineWeb shards into data/fineweb10B/ (skipped when present)"
    "$PYTHON" "$HERE/data/cached_fineweb10B.py"
  fi
fi

# ---- train ----------------------------------------------------------------------------------------
if (( NGPU == 0 )); then
  if has_flag --data-dir "$@"; then data="the shards in --data-dir"
  elif (( TINY )); then data="synthetic shards from data/synthetic/"
  else data="FineWeb shards from data/fineweb10B/"; fi
  echo "run.sh: running the $PRESET preset on the CPU with $data."
  exec "$PYTHON" "$HERE/train_gpt.py" "$@"
fi
if (( NNODES > 1 )); then
  echo "run.sh: node $NODE_RANK of $NNODES: $NGPU GPU(s) here, world size $WORLD, master $MASTER_ADDR:$MASTER_PORT"
  exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --nproc_per_node="$NGPU" \
    "$HERE/train_gpt.py" "$@"
fi
echo "run.sh: training on $NGPU GPU(s)."
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" "$HERE/train_gpt.py" "$@"
