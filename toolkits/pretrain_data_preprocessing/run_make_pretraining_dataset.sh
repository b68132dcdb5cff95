#!/bin/sh
# Usage: sh run_make_pretraining_dataset.sh INPUT TOKENIZER_DIR OUTPUT_PREFIX [WORKERS] [JSON_KEYS] [APPEND_EOD]
#   INPUT: json/jsonl/parquet/txt file, directory or glob;  WORKERS: default 4
#   JSON_KEYS: record key to tokenise (default text);  APPEND_EOD: true | false (default true)
# Writes OUTPUT_PREFIX_<key>_document.{bin,idx}. Validates, then calls preprocess_data.py.
# Env: MP_PYTHON (interpreter; default the repository's .venv/bin/python, else python3).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"
usage() { echo "usage: $0 INPUT TOKENIZER_DIR OUTPUT_PREFIX [WORKERS] [JSON_KEYS] [APPEND_EOD]" >&2; exit 2; }
[ $# -ge 3 ] && [ $# -le 6 ] || usage
INPUT=$1; TOKENIZER=$2; OUTPUT_PREFIX=$3
WORKERS=${4:-4}; JSON_KEYS=${5:-text}; APPEND_EOD=${6:-true}
case $WORKERS in ''|*[!0-9]*|0) echo "error: WORKERS must be a positive integer, got '$WORKERS'" >&2; exit 2;; esac
case $APPEND_EOD in true) EOD_FLAG=--append-eod;; false) EOD_FLAG=;; *) echo "error: APPEND_EOD must be true or false, got '$APPEND_EOD'" >&2; exit 2;; esac
mp_python "$(basename "$0")" "$ROOT" || exit 2
exec "$MP_PYTHON" "$HERE/preprocess_data.py" --input "$INPUT" --tokenizer-name-or-path "$TOKENIZER" \
    --output-prefix "$OUTPUT_PREFIX" --workers "$WORKERS" --json-keys "$JSON_KEYS" $EOD_FLAG
