# shellcheck shell=sh
# Sourced by every shell entry point (POSIX sh: works under dash and bash):
#   . "$ROOT/scripts/entry_helpers.sh"
# The caller knows the repository root (a sourced file cannot find its own path under dash).

# mp_python NAME ROOT -- the one interpreter rule for all entry points:
#   1. $MP_PYTHON when set (an environment you manage),
#   2. else ROOT/.venv/bin/python when it exists (what `sh scripts/setup_venv.sh` makes),
#   3. else python3 on PATH.
# Sets and exports MP_PYTHON, so scripts this one calls make the same choice. Without any
# Python: one error line naming NAME, status 2.
mp_python() {
    if [ -n "${MP_PYTHON:-}" ]; then
        :
    elif [ -x "$2/.venv/bin/python" ]; then
        MP_PYTHON=$2/.venv/bin/python
    elif command -v python3 >/dev/null 2>&1; then
        MP_PYTHON=python3
    else
        echo "$1: error: no Python found: run sh $2/scripts/setup_venv.sh (makes .venv), or set MP_PYTHON" >&2
        return 2
    fi
    export MP_PYTHON
}

# mp_print_help FILE -- print FILE's leading comment block (after the #! line): each entry
# script's header is its manual, so --help and the source cannot disagree.
mp_print_help() {
    awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# mp_help_if_asked FILE "$@" -- on -h/--help as the first argument: the help, exit 0.
mp_help_if_asked() {
    case "${2:-}" in
        -h|--help) mp_print_help "$1"; exit 0 ;;
    esac
}
