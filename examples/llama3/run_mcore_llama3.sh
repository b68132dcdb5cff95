#!/bin/sh
# Llama-3 training (pretraining and SFT) with the 25-argument launcher
# (examples/llama/run_mcore_llama.sh explains every argument and env knob).
# MODEL_SIZE: 8B 70B, tiny (a few-million-parameter Llama-3-shaped model for CPU runs),
# or auto (every shape from the config.json next to PRETRAIN_CHECKPOINT_PATH).
MP_GENERATION=llama3
MP_LAUNCHER_NAME=${MP_LAUNCHER_NAME:-$(basename "$0")}
export MP_GENERATION MP_LAUNCHER_NAME
case "${1:-}" in   # this header (the sizes), then the launcher's manual
    -h|--help) . "$(dirname "$0")/../../scripts/entry_helpers.sh"; mp_print_help "$0"; echo ;;
esac
exec sh "$(dirname "$0")/../llama/run_mcore_llama.sh" "$@"
