"""The shell entry points' shared behaviour, checked cheaply (no real install, no model):

- scripts/setup_venv.sh's decisions, with python3.11 and the venv's python replaced by stubs
  that record their calls: a fresh clone installs, a second run installs nothing, changed
  requirements install again, a failed install is never taken for a complete one, a missing
  Python 3.11 is one error line;
- tests/run.sh and .ci/run: setup first, then pytest with the venv; "no tests" fails;
- the interpreter rule (MP_PYTHON, else the repository's .venv, else python3) in every script
  that runs Python, under dash and bash, from another working directory;
- --help / -h on every entry script: usage, exit 0, nothing run or created;
- every entry script is executable.
The real install is measured by hand (README), not here: it takes minutes.
"""
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".megatron-patch-setup"

# (path, shell, a word its help must show)
ENTRY_SCRIPTS = [
    ("examples/quickstart/run_quickstart.sh", "sh", "OUTPUT_DIR"),
    ("tests/run.sh", "sh", "PYTEST_ARGS"),
    ("scripts/setup_venv.sh", "sh", "requirements-cpu.txt"),
    ("examples/llama/run_mcore_llama.sh", "sh", "OUTPUT_BASEPATH"),
    ("examples/llama/run_mcore_llama1.sh", "sh", "OUTPUT_BASEPATH"),
    ("examples/llama2/run_mcore_llama2.sh", "sh", "OUTPUT_BASEPATH"),
    ("examples/llama3/run_mcore_llama3.sh", "sh", "OUTPUT_BASEPATH"),
    ("examples/llama3_1/run_mcore_llama3_1.sh", "sh", "OUTPUT_BASEPATH"),
    ("toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama.sh", "bash", "CHECK_ONLY"),
    ("toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama3_1.sh", "bash", "CHECK_ONLY"),
    ("toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset.sh", "sh", "OUTPUT_PREFIX"),
    ("toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh", "sh", "OUTPUT_PREFIX"),
    ("LM-Evaluation-Harness/run_eval.sh", "sh", "BATCH_SIZE"),
]

# The venv's python: pip and pytest are recorded and answer FAKE_PIP_RC / FAKE_PYTEST_RC;
# `-c` (the setup's own checks) runs the real interpreter; anything else (a script or
# module of the project) is recorded and fails with 3, so the caller stops there.
VENV_PY = r"""#!/bin/sh
venv=$(cd "$(dirname "$0")/.." && pwd)
case "$1 $2" in
    "-m pip")
        echo "venv-python [$(pwd)] $*" >> "$FAKE_LOG"
        [ "$3" = --version ] && exit 0
        [ -e "$venv/.megatron-patch-setup" ] && echo "MARKER PRESENT DURING PIP" >> "$FAKE_LOG"
        exit "${FAKE_PIP_RC:-0}" ;;
    "-m pytest")
        echo "venv-python $*" >> "$FAKE_LOG"; exit "${FAKE_PYTEST_RC:-0}" ;;
    -c*)
        exec "$REAL_PY" "$@" ;;
esac
echo "venv-python $*" >> "$FAKE_LOG"
exit 3
"""

# python3.11 on PATH: `-m venv DIR` makes DIR with the stub above; `-c` runs the real one.
PY311 = r"""#!/bin/sh
echo "python3.11 $*" >> "$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then
    for dir; do :; done
    mkdir -p "$dir/bin" "$dir/lib/python3.11"
    cp "$FAKE_VENV_PY" "$dir/bin/python"
    exit 0
fi
exec "$REAL_PY" "$@"
"""

# A command that is on PATH but does not run (what a pyenv shim does for a missing version).
BROKEN = """#!/bin/sh
echo "pyenv: $(basename "$0"): command not found" >&2
exit 127
"""

# python3 / python on PATH, for the interpreter rule: recorded, fail with 3.
PATH_PY = """#!/bin/sh
echo "path-python $*" >> "$FAKE_LOG"
exit 3
"""


def _write_exe(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return str(path)


class Fake:
    """A copy of the repository's scripts with stub interpreters, under tmp_path."""

    def __init__(self, tmp_path, path_stubs=None):
        self.root = tmp_path / "repo"
        for d in ("scripts", "examples", "toolkits", "LM-Evaluation-Harness", ".ci"):
            shutil.copytree(os.path.join(ROOT, d), self.root / d,
                            ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
        (self.root / "tests").mkdir()
        for f in ("requirements-cpu.txt", "pyproject.toml", "tests/run.sh"):
            shutil.copy2(os.path.join(ROOT, f), self.root / f)
        self.log = tmp_path / "calls.log"
        self.log.write_text("")
        self.bin = tmp_path / "bin"
        self.venv_py_template = _write_exe(tmp_path / "stubs" / "venv_python", VENV_PY)
        stubs = {"python3.11": PY311} if path_stubs is None else path_stubs
        for name, text in stubs.items():
            _write_exe(self.bin / name, text)
        self.cwd = tmp_path / "elsewhere"   # scripts must not depend on the working directory
        self.cwd.mkdir()
        self.env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                        FAKE_LOG=str(self.log), REAL_PY=sys.executable,
                        FAKE_VENV_PY=self.venv_py_template)
        self.env.pop("MP_PYTHON", None)

    def run(self, script, *args, shell="sh", **env):
        e = dict(self.env, **env)
        return subprocess.run([shell, str(self.root / script), *map(str, args)], cwd=self.cwd,
                              env=e, capture_output=True, text=True, timeout=60)

    def calls(self):
        return self.log.read_text().splitlines()

    def clear_log(self):
        self.log.write_text("")

    def make_venv(self):
        """A .venv as a hand-made setup leaves it (no completion marker)."""
        _write_exe(self.root / ".venv" / "bin" / "python", VENV_PY)
        (self.root / ".venv" / "lib" / "python3.11").mkdir(parents=True)

    def requirements_sha256(self):
        data = (self.root / "requirements-cpu.txt").read_bytes() + (self.root / "pyproject.toml").read_bytes()
        return hashlib.sha256(data).hexdigest()


def _installs(calls):
    return [c for c in calls if "-m pip install" in c]


# --- scripts/setup_venv.sh ---------------------------------------------------------------

def test_setup_installs_once_then_skips(tmp_path):
    fake = Fake(tmp_path)
    venv = fake.root / ".venv"
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    assert f"python3.11 -m venv --clear {venv}" in calls
    # pip runs in the repository (requirements' "-e ." is relative to the working directory)
    assert _installs(calls) == [f"venv-python [{fake.root}] -m pip install -r requirements-cpu.txt"]
    assert "MARKER PRESENT DURING PIP" not in calls
    assert "installing" in r.stdout            # says what it is doing before the long part
    assert (venv / MARKER).read_text().strip() == fake.requirements_sha256()

    fake.clear_log()
    t0 = time.monotonic()
    r = fake.run("scripts/setup_venv.sh")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert not [c for c in fake.calls() if "-m pip" in c or "-m venv" in c], fake.calls()
    assert "up to date" in r.stdout
    assert elapsed < 2.0, elapsed


def test_setup_reinstalls_when_requirements_change(tmp_path):
    fake = Fake(tmp_path)
    assert fake.run("scripts/setup_venv.sh").returncode == 0
    old = (fake.root / ".venv" / MARKER).read_text()
    with open(fake.root / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency would go here\n")
    fake.clear_log()
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    assert len(_installs(calls)) == 1, calls
    assert not [c for c in calls if "-m venv" in c], calls       # the venv itself is reused
    assert "MARKER PRESENT DURING PIP" not in calls              # stale marker removed first
    new = (fake.root / ".venv" / MARKER).read_text().strip()
    assert new != old.strip() and new == fake.requirements_sha256()


def test_failed_install_is_not_taken_for_complete(tmp_path):
    fake = Fake(tmp_path)
    r = fake.run("scripts/setup_venv.sh", FAKE_PIP_RC="1")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("setup_venv.sh: error: pip install")
    assert not (fake.root / ".venv" / MARKER).exists()
    # the next run finishes the job instead of skipping it
    fake.clear_log()
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 0, r.stderr
    assert len(_installs(fake.calls())) == 1
    assert (fake.root / ".venv" / MARKER).exists()
    # an update that fails leaves no marker either (not even the old one)
    with open(fake.root / "requirements-cpu.txt", "a") as f:
        f.write("# changed\n")
    r = fake.run("scripts/setup_venv.sh", FAKE_PIP_RC="1")
    assert r.returncode != 0 and not (fake.root / ".venv" / MARKER).exists()


def test_hand_made_venv_is_completed_not_recreated(tmp_path):
    """The README's manual setup (python3.11 -m venv .venv; pip install ...) leaves no marker:
    the helper installs into that .venv once instead of deleting it."""
    fake = Fake(tmp_path)
    fake.make_venv()
    (fake.root / ".venv" / "keep").write_text("user file")
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    assert len(_installs(calls)) == 1 and not [c for c in calls if "-m venv" in c], calls
    assert (fake.root / ".venv" / "keep").exists()


def test_missing_python311_is_one_line(tmp_path):
    # python3.11 exists but does not run (pyenv shim), python3 is not 3.11
    fake = Fake(tmp_path, path_stubs={"python3.11": BROKEN,
                                      "python3": "#!/bin/sh\nexit 1\n"})
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python 3.11" in lines[0] and "install" in lines[0], r.stderr
    assert not (fake.root / ".venv").exists()
    # the same through the README's two commands
    for script in ("tests/run.sh", "examples/quickstart/run_quickstart.sh"):
        r = fake.run(script)
        assert r.returncode != 0 and r.stderr.strip().splitlines() == lines, (script, r.stderr)
    assert not (fake.cwd / "output_quickstart").exists()


def test_failed_venv_creation_leaves_no_venv(tmp_path):
    """python3.11 without its venv module (Debian's python3.11-venv missing) fails half-way:
    no .venv is left for the interpreter rule to pick up."""
    failing = PY311.replace('    cp "$FAKE_VENV_PY" "$dir/bin/python"\n    exit 0',
                            '    cp "$FAKE_VENV_PY" "$dir/bin/python"\n    exit 1')
    assert failing != PY311
    fake = Fake(tmp_path, path_stubs={"python3.11": failing})
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("setup_venv.sh: error: ") and "venv" in r.stderr
    assert not (fake.root / ".venv").exists()


def test_setup_waits_for_a_running_setup(tmp_path):
    """Two setups at once (the quickstart and the tests started together on a fresh clone)
    must not both install: the second waits, then finds .venv complete."""
    import fcntl
    if not shutil.which("flock"):
        pytest.skip("no flock(1) here: setups are not serialised")
    fake = Fake(tmp_path)
    with open(fake.root / "requirements-cpu.txt") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen(["sh", str(fake.root / "scripts/setup_venv.sh")], cwd=fake.cwd,
                                   env=fake.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None and not _installs(fake.calls())
        # meanwhile the lock holder completes its install
        fake.make_venv()
        (fake.root / ".venv" / MARKER).write_text(fake.requirements_sha256() + "\n")
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "waiting" in out and "up to date" in out
    assert not _installs(fake.calls())


def test_setup_refuses_a_venv_of_another_python(tmp_path):
    fake = Fake(tmp_path)
    _write_exe(fake.root / ".venv" / "bin" / "python",
               '#!/bin/sh\ncase "$2" in *print*) echo 3.12 ;; esac\nexit 0\n')
    r = fake.run("scripts/setup_venv.sh")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "3.12" in r.stderr and "rm -rf" in r.stderr
    assert (fake.root / ".venv" / "bin" / "python").exists()     # not deleted behind the user's back
    assert not _installs(fake.calls())


# --- tests/run.sh and .ci/run ------------------------------------------------------------

def test_test_runner_sets_up_then_runs_pytest(tmp_path):
    fake = Fake(tmp_path)
    r = fake.run("tests/run.sh")
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    pytest_calls = [c for c in calls if "-m pytest" in c]
    assert pytest_calls == [f"venv-python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 {fake.root / 'tests'}"], calls
    assert calls.index(pytest_calls[0]) > calls.index(_installs(calls)[0])   # setup first
    # arguments go to pytest unchanged; pytest's status is the script's
    fake.clear_log()
    r = fake.run("tests/run.sh", "tests/test_x.py", "-k", "a b", FAKE_PYTEST_RC="1")
    assert r.returncode == 1
    assert [c for c in fake.calls() if "-m pytest" in c] == ["venv-python -m pytest tests/test_x.py -k a b"]
    assert not _installs(fake.calls())                          # set up already


@pytest.mark.parametrize("script", [".ci/run", "tests/run.sh"])
def test_no_tests_collected_fails(tmp_path, script):
    fake = Fake(tmp_path)
    r = fake.run(script, FAKE_PYTEST_RC="5")
    assert r.returncode == 1 and "collected no tests" in r.stderr
    assert _installs(fake.calls())        # CI's clean clone gets the setup from the same command


def test_mp_python_skips_setup(tmp_path):
    fake = Fake(tmp_path)
    mine = _write_exe(tmp_path / "mine" / "python", '#!/bin/sh\necho "mine $*" >> "$FAKE_LOG"\n')
    r = fake.run("tests/run.sh", MP_PYTHON=mine)
    assert r.returncode == 0, r.stderr
    assert fake.calls() == [f"mine -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 {fake.root / 'tests'}"]
    assert not (fake.root / ".venv").exists()


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert commands[:2] == ["sh examples/quickstart/run_quickstart.sh", "sh tests/run.sh"], commands
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == "exec " + commands[1], ci


# --- the interpreter rule ----------------------------------------------------------------

@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_interpreter_rule(tmp_path, shell):
    if not shutil.which(shell):
        pytest.skip(f"no {shell}")
    helpers = os.path.join(ROOT, "scripts", "entry_helpers.sh")
    repo = tmp_path / "repo"
    repo.mkdir()
    code = f'. "{helpers}"; mp_python NAME "$1" && echo "$MP_PYTHON"'

    def rule(path=os.environ["PATH"], **env):
        e = {k: v for k, v in os.environ.items() if k != "MP_PYTHON"}
        e.update(env, PATH=path)
        return subprocess.run([shutil.which(shell), "-c", code, "x", str(repo)], cwd=tmp_path,
                              env=e, capture_output=True, text=True, timeout=30)

    assert rule().stdout.strip() == "python3"
    venv_py = _write_exe(repo / ".venv" / "bin" / "python", "#!/bin/sh\n")
    assert rule().stdout.strip() == venv_py
    assert rule(MP_PYTHON="/opt/mine/python").stdout.strip() == "/opt/mine/python"
    os.remove(venv_py)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = rule(path=str(empty))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("NAME: error: no Python"), r.stderr


def _rule_cases(fake, tmp_path):
    """(script, shell, args) that reach their first Python call in the fake repository."""
    src = tmp_path / "src"
    (src / "hf").mkdir(parents=True)
    (src / "hf" / "config.json").write_text("{}")
    return [
        ("examples/llama3_1/run_mcore_llama3_1.sh", "sh", []),
        ("examples/llama/run_mcore_llama1.sh", "sh", []),
        ("toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama3_1.sh", "bash",
         ["tiny", src / "hf", src / "out", 1, 1, "false", "false", "false", "fp32"]),
        ("toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama.sh", "bash",
         ["auto", src / "hf", src / "out", 1, 1, "false", "false", "false", "fp32"]),
        ("toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset.sh", "sh",
         [src / "in.jsonl", src / "hf", src / "out"]),
        ("toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh", "sh",
         [src / "in.json", "llama3", 128, src / "out", src / "hf"]),
        ("LM-Evaluation-Harness/run_eval.sh", "sh", [src / "hf", "mp_tiny_mmlu", 8]),
    ]


def test_entry_scripts_use_the_venv_then_python3(tmp_path):
    """Without MP_PYTHON every script runs the repository's .venv, not the python on PATH
    (the launcher once said "needs megatron-core" because python3 was not the venv);
    without .venv, python3; MP_PYTHON wins over both."""
    fake = Fake(tmp_path, path_stubs={"python3": PATH_PY, "python": PATH_PY, "python3.11": PY311})
    fake.make_venv()
    mine = _write_exe(tmp_path / "mine" / "python", '#!/bin/sh\necho "mine $*" >> "$FAKE_LOG"\nexit 3\n')
    for script, shell, args in _rule_cases(fake, tmp_path):
        for setting, expect in (("venv", "venv-python"), ("MP_PYTHON", "mine"), ("no venv", "path-python")):
            if setting == "no venv":
                shutil.rmtree(fake.root / ".venv", ignore_errors=True)
            elif not (fake.root / ".venv").exists():
                fake.make_venv()
            fake.clear_log()
            env = {"MP_PYTHON": mine} if setting == "MP_PYTHON" else {}
            r = fake.run(script, *args, shell=shell, **env)
            first = fake.calls()[:1]
            assert first and first[0].split()[0] == expect, (script, setting, fake.calls(), r.stderr)
            assert r.returncode != 0     # the stub failed; the script did not carry on
    # the quickstart: sets up .venv (no MP_PYTHON), then runs everything with it
    shutil.rmtree(fake.root / ".venv", ignore_errors=True)
    fake.clear_log()
    r = fake.run("examples/quickstart/run_quickstart.sh", tmp_path / "qs")
    calls = [c for c in fake.calls() if not c.startswith("python3.11")]
    assert _installs(calls) and calls[-1].startswith("venv-python ") and "make_tiny_llama3.py" in calls[-1], calls
    assert not [c for c in calls if c.startswith("path-python")], calls


# --- --help and execute bits -------------------------------------------------------------

@pytest.mark.parametrize("script,shell,word", ENTRY_SCRIPTS, ids=[s[0] for s in ENTRY_SCRIPTS])
def test_help(tmp_path, script, shell, word):
    log = tmp_path / "calls.log"
    stub = _write_exe(tmp_path / "stub" / "python", f'#!/bin/sh\necho "$*" >> "{log}"\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, MP_PYTHON=stub)
    env.pop("MP_GENERATION", None)
    for flag in ("--help", "-h"):
        r = subprocess.run([shell, os.path.join(ROOT, script), flag], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stderr == "", (flag, r.stderr)
        assert word in r.stdout, r.stdout
    assert not log.exists()              # no Python ran
    assert os.listdir(cwd) == []         # nothing created (the quickstart used to mkdir ./--help)


def test_entry_scripts_are_executable():
    for script in [s[0] for s in ENTRY_SCRIPTS] + [".ci/run"]:
        path = os.path.join(ROOT, script)
        assert os.stat(path).st_mode & stat.S_IXUSR, f"{script} is not executable (chmod +x; git update-index --chmod=+x)"
        with open(path) as f:
            assert f.readline().startswith("#!"), f"{script} has no #! line"
