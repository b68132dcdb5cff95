#!/bin/sh
# The training launcher for every Llama generation (pretraining and SFT), with the 25
# positional arguments of Pai-Megatron-Patch's run_mcore_llama.sh, in the same order:
#
#   sh run_mcore_llama3_1.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN \
#      PAD_LEN PR TP PP CP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH \
#      VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS \
#      WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH
#
# The per-generation wrappers (examples/llama3_1/run_mcore_llama3_1.sh, examples/llama3/
# run_mcore_llama3.sh, examples/llama2/run_mcore_llama2.sh, examples/llama/
# run_mcore_llama1.sh) set MP_GENERATION and call this script; it can also be run directly
# with MP_GENERATION=llama|llama2|llama3|llama3_1.
#
# CP   context parallelism: each sequence is split over CP ranks (2 x CP chunks, rank r
#      keeps chunks r and 2*CP-1-r), so SEQ_LEN (PAD_LEN for SFT) must be a multiple of
#      2 x CP; processes = TP x PP x CP x data-parallel size. Attention: Transformer
#      Engine's with TE on CUDA, else megatron_patch's ContextParallelAttention (K/V
#      all-gathered over the CP group); the log names it. The loss is the global token
#      mean over DP x CP (CP=2 reproduces CP=1); checkpoints do not depend on CP. Limits:
#      causal attention only, no MP_SFT_PACKING, no attention dropout.
#      (docs/context-parallel.md)
# ENV  dsw: this machine, one process per local device (GPUs/NPUs; on CPU MP_NPROC, default
#      1). dlc: PAI-DLC multi-node (MASTER_ADDR, MASTER_PORT, WORLD_SIZE = nodes, RANK = node
#      rank), one torchrun per node, processes per node from MP_NPROC, else
#      KUBERNETES_CONTAINER_RESOURCE_GPU, else the visible devices; a node waits up to
#      MP_RDZV_TIMEOUT seconds (600) for the others, then stops with one line.
# Env knobs: MP_DATASET_TYPE=idxmap|raw (SFT data), MP_AC_LAYERS (AC=full|offload layers,
#      default 1), MP_OFFLOAD_FRACTION (OPTIMIZER_OFFLOAD=static, default 1.0),
#      MP_VP (virtual pipeline stages), MP_PP0_LAYERS (layers on the first pipeline stage),
#      MP_SFT_PACKING=true|false (not with CP>1), MP_CP_COMM_TYPE=p2p|all_gather|a2a
#      (Transformer Engine's CP exchange, default p2p), MP_TOKENIZER (HF tokenizer dir for
#      SFT when none sits next to the checkpoint), MP_EVAL_INTERVAL (10000), MP_EVAL_ITERS
#      (10), MP_DATA_SPLIT (99,1,0), MP_SEED (1234), MP_NPROC, MP_MASTER_PORT (dsw; default
#      a free port), MP_PYTHON (interpreter; default the repository's .venv/bin/python, else
#      python3), MP_RESUME_FROM (continue another run's checkpoint directory in this run's
#      layout: weights and optimizer state are re-sharded), MP_RDZV_TIMEOUT,
#      MP_CKPT_FORMAT=torch|torch_dist (checkpoints as per-rank files, default, or
#      megatron-core dist_checkpointing).
# Killing this script (or its process group) kills every worker it started.
# Output: OUTPUT_BASEPATH/checkpoint/<run name> (resumed automatically when it holds a
#      complete checkpoint), OUTPUT_BASEPATH/tensorboard/<run name>_<time>,
#      OUTPUT_BASEPATH/log/<run name>_<time>.log (everything printed, all ranks).
#
# Shell only parses and calls Python: every argument is validated by
# megatron_patch.training.launch_plan (no torch import, well under a second) before anything
# starts; a bad one gives one line "error: NAME=value is not valid: ..." and exit status 2.
# docs/launcher.md documents the contract.

MP_LAUNCHER_NAME=${MP_LAUNCHER_NAME:-$(basename "$0")}
export MP_LAUNCHER_NAME
ROOT=$(cd "$(dirname "$0")/../.." && pwd) || exit 1
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"

if [ -z "${MP_GENERATION:-}" ]; then
    echo "$MP_LAUNCHER_NAME: error: MP_GENERATION is not set: run a per-generation wrapper (examples/llama3_1/run_mcore_llama3_1.sh, ...) or set MP_GENERATION=llama|llama2|llama3|llama3_1" >&2
    exit 2
fi

# MP_PYTHON, else the repository's .venv, else python3 (scripts/entry_helpers.sh)
mp_python "$MP_LAUNCHER_NAME" "$ROOT" || exit 2
PY=$MP_PYTHON

# Validate the 25 arguments and plan the processes (prints MP_PLAN_* assignments).
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
PLAN=$("$PY" -m megatron_patch.training.launch_plan "$MP_GENERATION" "$@") || exit $?
eval "$PLAN"

BASE=${25}
mkdir -p "$BASE/checkpoint" "$BASE/tensorboard" "$BASE/log" || exit 1

LOG=$MP_PLAN_LOG_FILE
if [ "$MP_PLAN_NODE_RANK" != "0" ]; then
    LOG="$LOG.node$MP_PLAN_NODE_RANK"
fi

PYTHONUNBUFFERED=1
CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
MP_LOG_TEED=1
# the workers watch this shell and die with it (torchrun puts them in sessions of their
# own, out of reach of a signal to this process group): megatron_patch/training/lifetime.py
MP_LAUNCHER_PID=$$
export PYTHONUNBUFFERED CUDA_DEVICE_MAX_CONNECTIONS MP_LOG_TEED MP_LAUNCHER_PID

echo "$MP_LAUNCHER_NAME: $MP_PLAN_NNODES node(s) x $MP_PLAN_NPROC process(es), run $MP_PLAN_RUN_NAME" >&2
echo "$MP_LAUNCHER_NAME: log $LOG" >&2

RCFILE=$(mktemp "${TMPDIR:-/tmp}/mp_rc.XXXXXX") || exit 1
{
    if [ "$MP_PLAN_NNODES" = "1" ] && [ "$MP_PLAN_NPROC" = "1" ]; then
        # one process: no torchrun needed (same environment torchrun would give it)
        RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 \
        MASTER_ADDR=127.0.0.1 MASTER_PORT=$MP_PLAN_MASTER_PORT \
            "$PY" -m megatron_patch.training.pretrain --generation "$MP_GENERATION" --timestamp "$MP_PLAN_TIMESTAMP" -- "$@" 2>&1
    else
        "$PY" -m megatron_patch.training.torchrun --nproc_per_node "$MP_PLAN_NPROC" \
            --nnodes "$MP_PLAN_NNODES" --node_rank "$MP_PLAN_NODE_RANK" \
            --master_addr "$MP_PLAN_MASTER_ADDR" --master_port "$MP_PLAN_MASTER_PORT" \
            --rdzv_conf "timeout=$MP_PLAN_RDZV_TIMEOUT" \
            -m megatron_patch.training.pretrain --generation "$MP_GENERATION" --timestamp "$MP_PLAN_TIMESTAMP" -- "$@" 2>&1
    fi
    echo $? > "$RCFILE"
} | tee -a "$LOG"
RC=$(cat "$RCFILE" 2>/dev/null)
rm -f "$RCFILE"
exit "${RC:-1}"
