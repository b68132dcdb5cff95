#!/usr/bin/env bash
# Llama-3.1 checkpoint conversion, Pai-Megatron-Patch's command line:
#   bash hf2mcore_convertor_llama3_1.sh MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP \
#        mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]
# MODEL_SIZE: 8B | 70B | 405B | tiny | auto (every shape from SOURCE's config.json).
# mg2hf=false: HF -> megatron-core at TP x PP; mg2hf=true: megatron-core -> HF.
# CHECK=true: per-layer parity table, exit 1 on a failing row. CHECK_ONLY=true: only check.
# PR: fp32 | bf16 | fp16. HF_CKPT_PATH: the HF model's config/tokenizer for mg2hf.
# Env: MP_OVERWRITE=1 to replace a non-empty TARGET, MP_PP0_LAYERS=N layers on the first
# stage, MP_HF_SHARD_SIZE=4G, MP_CHECK_LONG=0, TQDM_DISABLE=1 (see megatron_patch/conversion/cli.py).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/convert_common.sh"
mp_help_if_asked "$0" "$@"
size="${1:-}"
case "$size" in
    8B|70B|405B|tiny) model="llama3_1-$size" ;;
    auto) model="auto" ;;
    *) model="" ;;
esac
mp_convert "$(basename "$0")" "8B, 70B, 405B, tiny or auto" "$model" "$@"
