#!/usr/bin/env bash
# The prepared GPU check of issue 9 (docs/gpu.md), for a session that has a device machine.
# Prepare here:  make gpu-wheels gpu-data      (ignored folders .whl/ and .gpu/)
# Then, on the device, from the repository root, with carry [".whl", ".gpu"]:
#   scripts/gpu_check.sh bench      # mme bench: RN50, 224 px, batch 128, bf16 (~3 min, est.)
#   scripts/gpu_check.sh flickr8k   # the params.flickr8k.yaml protocol (~10 min, estimate)
#   scripts/gpu_check.sh all        # both (over one call's 10-minute limit: use two calls)
# Results go into $OUT as they come (each stage appends or copies): env.txt, log.txt,
# bench.json, bench.md, flickr8k_times.txt, flickr8k_table.md, flickr8k_{clean,protected}.json.
# PY (default python3) and BENCH_ARGS override the interpreter and the bench flags (the CPU test).
set -uo pipefail
what=${1:-bench}
PY=${PY:-python3}
BENCH_ARGS=${BENCH_ARGS:---model RN50 --batch-size 128 --batches 4 --steps 10 --device cuda}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 MME_TRACKING=off HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true

if [[ -d .whl ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  nproc
  "$PY" -c "import torch, open_clip, webdataset, pydantic; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__)"
} >"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; echo "gpu_check: preflight failed"; exit 1; }
cat "$OUT/env.txt"

if [[ $what == bench || $what == all ]]; then
  # shellcheck disable=SC2086  # a list of flags
  "$PY" -m mme bench $BENCH_ARGS --out "$OUT/bench.json" | tee "$OUT/bench.md"
fi

if [[ $what == flickr8k || $what == all ]]; then
  for split in flickr8k-train flickr8k-dev; do
    [[ -f .gpu/$split/captions.csv ]] || { echo "gpu_check: .gpu/$split missing"; exit 1; }
  done
  work=/tmp/flickr8k
  rm -rf "$work"
  TRAIN_CSV=.gpu/flickr8k-train/captions.csv TEST_CSV=.gpu/flickr8k-dev/captions.csv \
    TIMES="$OUT/flickr8k_times.txt" MME="$PY -m mme" \
    scripts/flickr8k.sh "$work" params.flickr8k.yaml
  rc=$?
  cp "$work/table.md" "$OUT/flickr8k_table.md" 2>/dev/null
  for run in clean protected; do
    cp "$work/metrics/$run.json" "$OUT/flickr8k_$run.json" 2>/dev/null
  done
  exit $rc
fi
