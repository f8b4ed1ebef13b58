#!/usr/bin/env bash
# The real-photo protocol (params.flickr8k.yaml) stage by stage, the commands dvc.yaml runs, for
# machines without DVC (the GPU check) and for the CPU test. `make flickr8k` runs it through DVC.
#
#   scripts/flickr8k.sh OUTDIR [PARAMS]      (PARAMS default: params.flickr8k.yaml)
#
# Everything goes under OUTDIR: shards/, protected/, clean/ + protected-victim/ runs, metrics/,
# table.md, and times.txt (stage name, seconds since start; appended as each stage ends; TIMES
# puts it elsewhere).
# Environment: TRAIN_CSV / TEST_CSV replace the profile's CSVs; PREPARE_ARGS, POISON_ARGS,
# VICTIM_ARGS, EVAL_ARGS are extra flags per stage (tiny models in the test); MME is the command
# (default: python -m mme).
set -euo pipefail
out=${1:?usage: scripts/flickr8k.sh OUTDIR [PARAMS]}
params=${2:-params.flickr8k.yaml}
mme=${MME:-python -m mme}
mkdir -p "$out/metrics"
times=${TIMES:-$out/times.txt}
SECONDS=0
stamp() { echo "$1 $SECONDS" >>"$times"; }
csv=()
[[ -n ${TRAIN_CSV:-} ]] && csv+=(--train-csv "$TRAIN_CSV")
[[ -n ${TEST_CSV:-} ]] && csv+=(--test-csv "$TEST_CSV")

# shellcheck disable=SC2086  # the *_ARGS are lists of flags
{
  $mme prepare --params "$params" --out "$out/shards" "${csv[@]}" ${PREPARE_ARGS:-}
  stamp prepare
  $mme poison --params "$params" --clean "$out/shards" --out "$out/protected" \
    --private "$out/private" ${POISON_ARGS:-}
  stamp poison
  for run in clean protected; do
    shards=$out/shards
    [[ $run == protected ]] && shards=$out/protected
    $mme train --params "$params" --shards "$shards" --run-dir "$out/victim-$run" ${VICTIM_ARGS:-}
    stamp "train_$run"
  done
  for run in clean protected; do
    $mme evaluate --params "$params" --checkpoint "$out/victim-$run/checkpoint.pt" \
      --shards "$out/shards" --out "$out/metrics/$run.json" ${EVAL_ARGS:-}
    stamp "evaluate_$run"
  done
  $mme report --params "$params" --metrics "$out"/metrics/*.json --out "$out/table.md"
  stamp report
}
