"""Every console command in pyproject.toml names an importable callable (a renamed or moved
main() would otherwise only fail for users after pip install)."""
from __future__ import annotations

import importlib
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_target_is_callable(name):
    module, _, attr = SCRIPTS[name].partition(":")
    fn = getattr(importlib.import_module(module), attr)
    assert callable(fn)


def test_plan_command_answers_bad_input_in_one_line(capsys):
    from megatron_patch.training.launch_plan import main
    assert main(["llama3_1", "dsw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected 25 arguments, got 1" in err[0]
