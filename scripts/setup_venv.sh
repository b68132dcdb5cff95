#!/bin/sh
# Create or update the repository's .venv with the README's manual setup
#   python3.11 -m venv .venv && .venv/bin/pip install -r requirements-cpu.txt
# Usage: sh scripts/setup_venv.sh            (from any directory; no arguments)
# The quickstart and tests/run.sh call it first, unless MP_PYTHON is set.
#
# Idempotent: .venv/.megatron-patch-setup holds a hash of requirements-cpu.txt and
# pyproject.toml, written only after pip succeeded. When it matches, nothing is installed
# (well under a second). When it is missing or differs (first run, an interrupted install,
# changed requirements) it is deleted first, then pip installs into .venv again, so a
# half-finished install is never taken for a complete one.
# Python 3.11 is looked for as python3.11, then python3; without it: one error line, exit 1.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"
NAME=setup_venv.sh
if [ $# -ne 0 ]; then
    echo "$NAME: error: no arguments expected, got '$1' (see --help)" >&2
    exit 2
fi

VENV=$ROOT/.venv
VPY=$VENV/bin/python
MARKER=$VENV/.megatron-patch-setup
say() { echo "setup: $*"; }
fail() { echo "$NAME: error: $*" >&2; exit 1; }

# What pip installs from: the requirements file and the project metadata it names (-e .[...]).
requirements_hash() {
    set -- "$ROOT/requirements-cpu.txt" "$ROOT/pyproject.toml"
    if command -v sha256sum >/dev/null 2>&1; then
        cat "$@" | sha256sum
    elif command -v shasum >/dev/null 2>&1; then
        cat "$@" | shasum -a 256
    else
        cat "$@" | cksum
    fi | { read -r hash _; echo "$hash"; }
}

up_to_date() {
    [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] && "$VPY" -c "" >/dev/null 2>&1
}

# python3.11, else python3 if it is 3.11; a command that exists but does not run (a pyenv
# shim for a version that is not installed) does not count.
find_python311() {
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

WANT=$(requirements_hash)
if up_to_date; then
    say ".venv is up to date ($VPY)"
    exit 0
fi

# One install at a time (say the quickstart and the tests started together on a fresh
# clone). The lock is held on the requirements file itself, so no lock file is left behind.
if command -v flock >/dev/null 2>&1; then
    exec 9<"$ROOT/requirements-cpu.txt"
    if ! flock -n 9; then
        say "waiting for another setup of .venv to finish"
        flock 9
        if up_to_date; then
            say ".venv is up to date ($VPY)"
            exit 0
        fi
    fi
fi

START=$(date +%s)
if [ -d "$VENV" ] && "$VPY" -c "" >/dev/null 2>&1; then
    # reuse it (a changed requirements file, an interrupted install, or a hand-made .venv)
    version=$("$VPY" -c "import sys; print('%d.%d' % sys.version_info[:2])")
    if [ "$version" != 3.11 ]; then
        fail "$VENV uses Python $version, this project needs 3.11: remove it (rm -rf $VENV) and run again, or set MP_PYTHON"
    fi
    rm -f "$MARKER"
    say "updating $VENV (requirements changed or the last install did not finish)"
    "$VPY" -m pip --version >/dev/null 2>&1 || "$VPY" -m ensurepip --upgrade >/dev/null ||
        fail "$VENV has no pip and ensurepip failed: remove it (rm -rf $VENV) and run again"
else
    PY311=$(find_python311) ||
        fail "Python 3.11 not found (tried python3.11 and python3): install Python 3.11 with its venv module (e.g. apt-get install python3.11 python3.11-venv), or set MP_PYTHON to a Python you manage"
    if [ -d "$VENV" ]; then
        say "$VENV is broken (its python does not run): recreating it"
    fi
    say "creating $VENV with $PY311 ($(command -v "$PY311"))"
    if ! "$PY311" -m venv --clear "$VENV"; then
        rm -rf "$VENV"
        fail "'$PY311 -m venv' failed: install Python 3.11's venv module (e.g. apt-get install python3.11-venv)"
    fi
fi

say "installing requirements-cpu.txt into $VENV (torch, megatron-core, transformers, lm-eval...: a few minutes the first time)"
# -e . in the requirements file is relative to the working directory
if ! (cd "$ROOT" && "$VPY" -m pip install -r requirements-cpu.txt); then
    fail "pip install -r requirements-cpu.txt failed (see above); $VENV stays marked incomplete and the next run installs again"
fi
printf '%s\n' "$WANT" > "$MARKER.tmp.$$"
mv "$MARKER.tmp.$$" "$MARKER"
say ".venv ready in $(( $(date +%s) - START )) s ($VPY)"
