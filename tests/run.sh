#!/bin/sh
# The test suite, complete by itself on a fresh clone: sets up .venv when it is missing or
# outdated (scripts/setup_venv.sh), then runs pytest with .venv's Python.
# Usage: sh tests/run.sh [PYTEST_ARGS...]     (from any directory)
#   no arguments: the whole suite (tests/); otherwise the arguments go to pytest as they are,
#   e.g. sh tests/run.sh tests/test_presets.py -x
# Env: MP_PYTHON=/path/to/python runs pytest with that interpreter instead, without setup.
# Exit status: pytest's, except that collecting no tests (pytest's 5) is a failure (1).
# .ci/run runs exactly this command on a clean clone.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"
if [ -z "${MP_PYTHON:-}" ]; then
    sh "$ROOT/scripts/setup_venv.sh"
fi
mp_python run.sh "$ROOT" || exit 2
# the whole suite on every core: most time is process start-up (torch + megatron-core
# imports), so two pytest workers keep both cores busy; a file stays on one worker (its
# module fixtures are built once), longest files first (tests/conftest.py: xdist would
# otherwise order files by test count). MP_TEST_WORKERS=0 runs in one process.
[ $# -gt 0 ] || set -- -n "${MP_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
    --durations=15 "$ROOT/tests"
echo "tests: $MP_PYTHON -m pytest $*"
set +e
"$MP_PYTHON" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
