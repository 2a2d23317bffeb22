#!/usr/bin/env bash
# The hardware group on one CUDA GPU, in one command of under 8 minutes:
#   1. the smoke pipeline SFT -> RM -> PPO -> eval with hardware=gpu (bf16-mixed), then again with
#      trainer.precision=32-true;
#   2. hardware=fsdp and hardware=deepspeed for SFT and RM (trainer.devices=1): each must either train
#      or be refused with one `rlhf: error:` line (exit 2);
#   3. rlhf.bench for SFT, RM and PPO on a randomly initialised model of SmolLM2-135M's shape,
#      printing tokens/s (pairs/s, episodes/s), peak GPU memory and MFU against the GPU's bf16 peak.
#
# Prepare first, where PyPI is reachable: scripts/prepare_device.sh (fills .device/). Then, on the
# GPU machine, from the repository root with .device carried:
#   bash scripts/device_check.sh            # writes its log and summary to $OUT (or /tmp/device-check)
#
# The GPU machine has torch, transformers, Lightning, PEFT, accelerate, pandas and pyarrow, but not
# hydra, datasets, MLflow or the packaged model: the wheels come from .device/whl, the model's
# config and tokenizer from .device/smollm2, and runs are untracked (tracking=none), so each stage
# names the directory of the one before instead of `latest` (which reads MLflow).
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=$PWD/.device
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
LOG=$OUT/device_check.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
START=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }

[ -d "$DEV/whl" ] && [ -f "$DEV/smollm2/config.json" ] || { echo "run scripts/prepare_device.sh first" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEV"/whl/*.whl >>"$LOG" 2>&1 \
    || { echo "installing the wheels failed; see $LOG" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export RLHF_CACHE=/tmp/rlhf-cache MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$SUMMARY"
python3 -c "import torch, pytorch_lightning, transformers; print('torch', torch.__version__, 'lightning', pytorch_lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$SUMMARY"

RUNS=/tmp/device-check-runs
rm -rf "$RUNS"
# The tiny shrink of SmolLM2 (model=tiny) read from the carried config and tokenizer.
TINY=(model=tiny "model.name_or_path=$DEV/smollm2" model.gguf_file=null)
# A random model of SmolLM2-135M's full shape: model=tiny's random initialisation with SmolLM2's own sizes.
SMOLLM2=(model=tiny model.name=smollm2-135m-random "model.name_or_path=$DEV/smollm2" model.gguf_file=null
    model.random_init.hidden_size=576 model.random_init.intermediate_size=1536 model.random_init.num_hidden_layers=30
    model.random_init.num_attention_heads=9 model.random_init.num_key_value_heads=3 model.random_init.head_dim=64)
SHORT=(trainer.max_steps=8 trainer.val_check_interval=8 checkpoint.every_n_steps=8 tracking=none)

# step <label> <seconds> <args...>: one `python -m rlhf` run; its outcome goes to the summary.
step() {
    local label=$1 limit=$2; shift 2
    local began=$SECONDS
    echo "=== $label: python -m rlhf $*" >>"$LOG"
    timeout "$limit" python3 -m rlhf "$@" >>"$LOG" 2>"$OUT/last.stderr"
    local rc=$?
    cat "$OUT/last.stderr" >>"$LOG"
    if [ $rc -eq 0 ]; then
        note "ok      $label ($((SECONDS - began)) s)"
    elif [ $rc -eq 2 ]; then
        note "refused $label: $(grep '^rlhf: error:' "$OUT/last.stderr" | head -1)"
    else
        note "FAILED  $label (exit $rc, $((SECONDS - began)) s): $(grep -v '^\s*$' "$OUT/last.stderr" | tail -1)"
    fi
    return 0
}

pipeline() {  # pipeline <name> <overrides...>
    local name=$1; shift
    local dir=$RUNS/$name
    step "$name sft" 150 experiment=smoke stage=sft "${TINY[@]}" "${SHORT[@]}" "output_dir=$dir/sft" "$@"
    step "$name rm" 150 experiment=smoke stage=rm "stage.init_from=$dir/sft/model" "${TINY[@]}" "${SHORT[@]}" \
        "output_dir=$dir/rm" "$@"
    step "$name ppo" 150 experiment=smoke stage=ppo "stage.policy_from=$dir/sft/model" "stage.reward_from=$dir/rm/model" \
        "${TINY[@]}" "${SHORT[@]}" "output_dir=$dir/ppo" "$@"
    step "$name eval" 150 experiment=smoke stage=eval "stage.policies=[$dir/sft/model,$dir/ppo/model]" \
        "stage.reward_from=$dir/rm/model" "stage.reference=$dir/sft/model" stage.num_prompts=32 \
        "${TINY[@]}" tracking=none "output_dir=$dir/eval" "$@"
}

note "--- 1. the smoke pipeline"
pipeline gpu-bf16-mixed hardware=gpu
pipeline gpu-32-true hardware=gpu trainer.precision=32-true

note "--- 2. sharded strategies on one device"
for strategy in fsdp deepspeed; do
    step "sft $strategy" 120 experiment=smoke stage=sft "${TINY[@]}" "${SHORT[@]}" "hardware=$strategy" trainer.devices=1 \
        "output_dir=$RUNS/$strategy/sft"
    step "rm $strategy" 120 experiment=smoke stage=rm stage.init_from=base "${TINY[@]}" "${SHORT[@]}" "hardware=$strategy" \
        trainer.devices=1 "output_dir=$RUNS/$strategy/rm"
done

note "--- 3. throughput, SmolLM2-135M shape, random weights, hardware=gpu (bf16-mixed)"
# bf16 dense peak of the GPU (FLOP/s) for MFU; H100 and H200 (SXM): 989 TFLOP/s. Override with BF16_PEAK_TFLOPS.
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU_NAME" in
    *H100* | *H200*) PEAK=${BF16_PEAK_TFLOPS:-989} ;;
    *A100*) PEAK=${BF16_PEAK_TFLOPS:-312} ;;
    *) PEAK=${BF16_PEAK_TFLOPS:-0} ;;
esac
bench() {  # bench <stage> <args...>
    local stage=$1; shift
    echo "=== bench $stage: $*" >>"$LOG"
    if timeout 150 python3 -m rlhf.bench "stage=$stage" "${SMOLLM2[@]}" hardware=gpu tracking=none "$@" \
        >"$OUT/bench_$stage.out" 2>>"$LOG"; then
        python3 - "$OUT/bench_$stage.out" "$PEAK" <<'PY' | tee -a "$SUMMARY"
import json, sys
text = open(sys.argv[1]).read()
figures = json.loads(text[text.rindex("\n{") + 1 :] if not text.startswith("{") else text)
peak = float(sys.argv[2]) * 1e12
keep = ["stage", "workload", "step_time_s", "tokens_per_s", "pairs_per_s", "episodes_per_s", "model_gflops",
        "generation_s", "scoring_s", "training_s", "peak_gpu_mb", "peak_rss_mb"]
line = {k: figures[k] for k in keep if k in figures}
if peak and "model_gflops" in figures:
    line["mfu_bf16_peak"] = round(figures["model_gflops"] * 1e9 / peak, 3)
print(json.dumps(line))
PY
    else
        note "FAILED  bench $stage: $(grep -v '^\s*$' "$LOG" | tail -1)"
    fi
}
bench sft bench.batch_size=16 bench.length=512 bench.steps=10 bench.warmup=2
bench rm stage.init_from=base bench.batch_size=16 bench.length=512 bench.steps=10 bench.warmup=2
bench ppo stage.policy_from=base stage.reward_from=fn:rlhf.tasks.assistant.gold_reward stage.rollout.max_new_tokens=32 \
    stage.ppo_epochs=4 bench.batch_size=16 bench.steps=4 bench.warmup=1

note "--- done in $((SECONDS - START)) s"
