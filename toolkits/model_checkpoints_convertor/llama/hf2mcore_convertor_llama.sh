#!/usr/bin/env bash
# Checkpoint conversion for every Llama generation (same arguments as
# hf2mcore_convertor_llama3_1.sh, which explains them):
#   bash hf2mcore_convertor_llama.sh MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP \
#        mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]
# MODEL_SIZE names the generation too:
#   llama-7B|13B|33B|65B  llama2-7B|13B|70B  llama3-8B|70B  llama3_1-8B|70B|405B
#   <generation>-tiny     auto (every shape from SOURCE's config.json: any Llama model)
#   bash hf2mcore_convertor_llama.sh llama2-13B /path/hf /path/mcore-tp2-pp1 2 1 false true false bf16
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/convert_common.sh"
mp_help_if_asked "$0" "$@"
size="${1:-}"
case "$size" in
    auto) model="auto" ;;
    llama-?*|llama2-?*|llama3-?*|llama3_1-?*) model="$size" ;;   # size checked by Python
    *) model="" ;;
esac
mp_convert "$(basename "$0")" "GENERATION-SIZE (e.g. llama2-13B, llama3-70B, llama-65B, llama3_1-tiny) or auto" "$model" "$@"
