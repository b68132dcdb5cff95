#!/bin/sh
# Evaluate a model with lm-eval, offline, through accelerate launch.
#
#   sh run_eval.sh MODEL_PATH TASKS BATCH_SIZE [OUTPUT_PATH] [more lm_eval options...]
#
# MODEL_PATH  an HF model directory (config.json + weights, e.g. the converter's mg2hf output)
#             -> accelerate launch --main_process_port 29051 -m lm_eval --model hf ...
#             or a Megatron checkpoint (latest_checkpointed_iteration.txt, any TP/PP)
#             -> accelerate launch ... -m megatron_patch.evaluation --model megatron_patch ...
# TASKS       comma-separated: mmlu_local, cmmlu_local, ceval_local-valid (offline copies that
#             read the official file layouts, see README.md), mp_tiny_mmlu (bundled), any
#             lm-eval task. mmlu, cmmlu and ceval-valid are mapped to the offline copies.
# BATCH_SIZE  a positive integer (or auto for --model hf)
# OUTPUT_PATH where lm-eval writes results_*.json (and samples with --log_samples)
#
# Environment:
#   EVAL_DATA_DIR (holding mmlu/ cmmlu/ ceval/) or MMLU_DIR, CMMLU_DIR, CEVAL_DIR
#   TP, PP (Megatron checkpoints; default 1), NPROC (processes, default TP*PP; for HF models
#   default 1: data parallel when >1), TOKENIZER (HF tokenizer dir for a Megatron checkpoint,
#   default the checkpoint's own copy), PRECISION (fp32|bf16|fp16), MODEL_ARGS (extra
#   key=value,... for --model_args), DEVICE (cuda|cpu, default: cuda when nvidia-smi sees a
#   GPU), MAIN_PROCESS_PORT (29051), MP_PYTHON (interpreter; default the repository's
#   .venv/bin/python, else python3), ACCELERATE (an accelerate command to use instead of
#   MP_PYTHON -m accelerate.commands.launch).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"

die() { echo "run_eval.sh: error: $*" >&2; exit 2; }
usage="usage: sh run_eval.sh MODEL_PATH TASKS BATCH_SIZE [OUTPUT_PATH] [lm_eval options...]"

[ "$#" -ge 3 ] || die "expected at least 3 arguments; $usage"
MODEL_PATH=$1
TASKS=$2
BATCH_SIZE=$3
shift 3
OUTPUT_PATH=""
if [ "$#" -ge 1 ]; then
    case "$1" in
        -*) ;;
        *) OUTPUT_PATH=$1; shift ;;
    esac
fi

TASKS_DIR="$HERE/tasks"
PORT=${MAIN_PROCESS_PORT:-29051}
TP=${TP:-1}
PP=${PP:-1}

case "$BATCH_SIZE" in
    ''|*[!0-9]*) [ "$BATCH_SIZE" = auto ] || die "BATCH_SIZE=$BATCH_SIZE: a positive integer or auto" ;;
    0) die "BATCH_SIZE=0: a positive integer or auto" ;;
esac
for v in TP PP; do
    eval "val=\$$v"
    case "$val" in ''|*[!0-9]*|0) die "$v=$val: a positive integer" ;; esac
done
[ -n "$TASKS" ] || die "TASKS is empty; $usage"
[ -d "$MODEL_PATH" ] || die "MODEL_PATH=$MODEL_PATH: no such directory"
mp_python run_eval.sh "$ROOT" || exit 2
PYTHON=$MP_PYTHON

# offline: never reach the hub
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

# familiar names -> the offline copies
mapped=""
old_ifs=$IFS
IFS=,
for t in $TASKS; do
    case "$t" in
        mmlu) n=mmlu_local ;;
        cmmlu) n=cmmlu_local ;;
        ceval-valid) n=ceval_local-valid ;;
        *) n=$t ;;
    esac
    [ "$n" = "$t" ] || echo "run_eval.sh: task $t -> $n (offline copy, see LM-Evaluation-Harness/README.md)" >&2
    mapped="${mapped:+$mapped,}$n"
done
IFS=$old_ifs
TASKS=$mapped

if [ -f "$MODEL_PATH/latest_checkpointed_iteration.txt" ] || ls -d "$MODEL_PATH"/mp_rank_* >/dev/null 2>&1; then
    MODEL=megatron_patch
    MODULE=megatron_patch.evaluation
    ARGS="load=$MODEL_PATH,tp=$TP,pp=$PP"
    [ -z "${TOKENIZER:-}" ] || ARGS="$ARGS,tokenizer=$TOKENIZER"
    [ -z "${PRECISION:-}" ] || ARGS="$ARGS,precision=$PRECISION"
    NPROC=${NPROC:-$((TP * PP))}
elif [ -f "$MODEL_PATH/config.json" ]; then
    MODEL=hf
    MODULE=lm_eval
    ARGS="pretrained=$MODEL_PATH"
    case "${PRECISION:-}" in
        '') ;;
        fp32) ARGS="$ARGS,dtype=float32" ;;
        bf16) ARGS="$ARGS,dtype=bfloat16" ;;
        fp16) ARGS="$ARGS,dtype=float16" ;;
        *) die "PRECISION=$PRECISION: fp32, bf16 or fp16" ;;
    esac
    NPROC=${NPROC:-1}
else
    die "MODEL_PATH=$MODEL_PATH: neither an HF model directory (config.json) nor a Megatron checkpoint (latest_checkpointed_iteration.txt)"
fi
[ -z "${MODEL_ARGS:-}" ] || ARGS="$ARGS,$MODEL_ARGS"
case "$NPROC" in ''|*[!0-9]*|0) die "NPROC=$NPROC: a positive integer" ;; esac

if [ -z "${DEVICE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        DEVICE=cuda
    else
        DEVICE=cpu
    fi
fi

# one clear line for a wrong path, an unknown task or missing task data
"$PYTHON" -m megatron_patch.evaluation.preflight --model "$MODEL" --model_args "$ARGS" --tasks "$TASKS" \
    --include_path "$TASKS_DIR" "$@" || exit 2

if [ "$NPROC" -gt 1 ]; then
    LAUNCH="--multi_gpu --num_processes $NPROC"
elif [ "$DEVICE" = cpu ]; then
    LAUNCH="--cpu --num_processes 1"
else
    LAUNCH="--num_processes 1"
fi

# lm_eval options first, then the user's own (which may override them)
set -- --model "$MODEL" --model_args "$ARGS" --tasks "$TASKS" --batch_size "$BATCH_SIZE" \
    --device "$DEVICE" --include_path "$TASKS_DIR" "$@"
[ -z "$OUTPUT_PATH" ] || set -- "$@" --output_path "$OUTPUT_PATH"
# shellcheck disable=SC2086  # LAUNCH is a word list
set -- $LAUNCH --num_machines 1 --mixed_precision no --dynamo_backend no \
    --main_process_port "$PORT" -m "$MODULE" "$@"
if [ -n "${ACCELERATE:-}" ]; then
    echo "run_eval.sh: $ACCELERATE launch $*" >&2
    # shellcheck disable=SC2086  # ACCELERATE may be a word list
    exec $ACCELERATE launch "$@"
fi
# accelerate from the same interpreter (an `accelerate` on PATH may belong to another environment)
echo "run_eval.sh: $PYTHON -m accelerate.commands.launch $*" >&2
exec "$PYTHON" -m accelerate.commands.launch "$@"
