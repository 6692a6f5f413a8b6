#!/usr/bin/env bash
# The size of a log's code part (the lines before its first line of 100 '='), for the runs in the
# README's table: 4 steps each on synthetic shards, logs in a temporary folder.
# Run from the repository root: bash records/2026-12-06_code_part_sizes/measure.sh
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 data/synthetic.py --out "$tmp/data" --train-shards 1 --shard-tokens 200000 >/dev/null 2>&1
sep=$(printf '=%.0s' {1..100})
printf '%-44s %s\n' "run" "code-part lines"
for run in "tiny" "tiny --rule muon" "tiny --rule normuon" "aurora_2860+tiny" "soap_2690+tiny"; do
  name=$(echo "$run" | tr -c 'a-z0-9_\n' '_')
  # shellcheck disable=SC2086
  python3 train_gpt.py --preset $run --train-steps 4 --seed 0 --no-diagnostics --data-dir "$tmp/data" \
    --records-dir "$tmp/records" --run-name "$name" >/dev/null
  log=$(ls "$tmp"/records/*_"$name"/*.txt)
  lines=$(awk -v sep="$sep" '$0 == sep {exit} {n++} END {print n}' "$log")
  printf '%-44s %s\n' "--preset $run" "$lines"
done
