# Shared by hf2mcore_convertor_llama3_1.sh and hf2mcore_convertor_llama.sh (sourced).
# Validates the 10 positional arguments of the converter contract -- one error line per
# bad value -- then runs the single Python entry, megatron_patch.conversion.cli.
#   mp_convert SCRIPT_NAME SIZE_HELP QUALIFIED_MODEL_SIZE "$@"
# QUALIFIED_MODEL_SIZE is "auto" or GENERATION-SIZE (already checked by the caller).

# the interpreter rule and --help shared by all entry scripts
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/scripts/entry_helpers.sh"

MP_CONVERT_USAGE="MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]"

mp_convert() {
    local script="$1" size_help="$2" model="$3"
    shift 3
    local bad=0
    if [ "$#" -ne 9 ] && [ "$#" -ne 10 ]; then
        echo "$script: error: expected 9 or 10 arguments, got $#; usage: bash $script $MP_CONVERT_USAGE (MODEL_SIZE: $size_help; --help for more)" >&2
        return 2
    fi
    local source="$2" target="$3" tp="$4" pp="$5" mg2hf="$6" check="$7" check_only="$8" pr="$9"
    local hf_path="${10:-}"
    if [ -z "$model" ]; then
        echo "$script: error: MODEL_SIZE='$1': choose $size_help" >&2; bad=1
    fi
    if [ ! -e "$source" ]; then
        echo "$script: error: SOURCE_CKPT_PATH='$source' does not exist" >&2; bad=1
    fi
    if [ -z "$target" ] && [ "$check_only" != "true" ]; then
        echo "$script: error: TARGET_CKPT_PATH is empty" >&2; bad=1
    fi
    case "$tp" in ''|*[!0-9]*|0) echo "$script: error: TP='$tp': must be a positive integer" >&2; bad=1;; esac
    case "$pp" in ''|*[!0-9]*|0) echo "$script: error: PP='$pp': must be a positive integer" >&2; bad=1;; esac
    local name value
    for name in mg2hf CHECK CHECK_ONLY; do
        case "$name" in mg2hf) value="$mg2hf";; CHECK) value="$check";; *) value="$check_only";; esac
        case "$value" in true|false) ;; *) echo "$script: error: $name='$value': choose true or false" >&2; bad=1;; esac
    done
    case "$pr" in fp32|bf16|fp16) ;; *) echo "$script: error: PR='$pr': choose fp32, bf16 or fp16" >&2; bad=1;; esac
    if [ -n "$hf_path" ] && [ ! -d "$hf_path" ]; then
        echo "$script: error: HF_CKPT_PATH='$hf_path' is not a directory" >&2; bad=1
    fi
    [ "$bad" -eq 0 ] || return 2

    # the repository this script lives in, so the converter runs from a plain checkout too
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
    mp_python "$script" "$repo" || return 2
    local py="$MP_PYTHON"
    # the converter is CPU work (streaming I/O; the check runs both models on the CPU)
    MEGATRON_PATCH_BACKEND="${MEGATRON_PATCH_BACKEND:-cpu}" \
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$py" -m megatron_patch.conversion.cli \
        "$model" "$source" "$target" "$tp" "$pp" "$mg2hf" "$check" "$check_only" "$pr" ${hf_path:+"$hf_path"}
}
