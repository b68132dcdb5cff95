#!/bin/sh
# Usage (Pai-Megatron-Patch order):
#   sh run_build_idxmap_sft_dataset.sh INPUT TOKENIZER SEQ_LEN OUTPUT_PREFIX LOAD_DIR [PACKING] [WORKERS]
#   TOKENIZER: LLamaTokenizer | LLama2Tokenizer | LLama3Tokenizer (chat template of LLaMA-1
#              alpaca style, Llama-2 [INST], Llama-3 headers) or llama | llama2 | llama3 | llama3_1
#   LOAD_DIR:  HF checkpoint or tokenizer directory;  PACKING: true | false (default false)
#   WORKERS:   tokenizer processes (default 1)
# Validates the arguments, then calls build_idxmap_sft_dataset.py (which does the work).
# Env: MP_PYTHON (interpreter; default the repository's .venv/bin/python, else python3).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"
usage() { echo "usage: $0 INPUT TOKENIZER SEQ_LEN OUTPUT_PREFIX LOAD_DIR [PACKING] [WORKERS]" >&2; exit 2; }
[ $# -ge 5 ] && [ $# -le 7 ] || usage
INPUT=$1; TOKENIZER=$2; SEQ_LEN=$3; OUTPUT_PREFIX=$4; LOAD_DIR=$5
PACKING=${6:-false}; WORKERS=${7:-1}
case $SEQ_LEN in ''|*[!0-9]*) echo "error: SEQ_LEN must be a positive integer, got '$SEQ_LEN'" >&2; exit 2;; esac
case $WORKERS in ''|*[!0-9]*|0) echo "error: WORKERS must be a positive integer, got '$WORKERS'" >&2; exit 2;; esac
case $TOKENIZER in
  LLamaTokenizer|LLama2Tokenizer|LLama3Tokenizer|llama|llama1|llama2|llama3|llama3_1) ;;
  *) echo "error: TOKENIZER must be LLamaTokenizer, LLama2Tokenizer, LLama3Tokenizer, llama, llama2, llama3 or llama3_1, got '$TOKENIZER'" >&2; exit 2;;
esac
case $PACKING in true) PACK_FLAG=--packing;; false) PACK_FLAG=;; *) echo "error: PACKING must be true or false, got '$PACKING'" >&2; exit 2;; esac
mp_python "$(basename "$0")" "$ROOT" || exit 2
exec "$MP_PYTHON" "$HERE/build_idxmap_sft_dataset.py" --input "$INPUT" --load "$LOAD_DIR" \
    --patch-tokenizer-type "$TOKENIZER" --seq-length "$SEQ_LEN" --output-prefix "$OUTPUT_PREFIX" \
    --workers "$WORKERS" $PACK_FLAG
