"""Patch registry semantics and backend selection at import."""
import os
import subprocess
import sys
import types

import pytest
import torch

from megatron_patch.backends.registry import PatchRegistry, PatchTargetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def target_module():
    mod = types.ModuleType("mp_fake_target")

    def f(x):
        return x + 1

    class C:
        @classmethod
        def make(cls, x):
            return ("made", cls.__name__, x)

        @staticmethod
        def helper(x):
            return x * 2

        def method(self):
            return "orig"

    mod.f, mod.C = f, C
    sys.modules["mp_fake_target"] = mod
    yield mod
    del sys.modules["mp_fake_target"]


def test_apply_remove_wrap_idempotent(target_module):
    reg = PatchRegistry("t")
    orig_f = target_module.f
    reg.register("mp_fake_target.f", wrapper=lambda fn: (lambda x: fn(x) * 10), reason="test")
    reg.register("mp_fake_target.C.make", wrapper=lambda fn: (lambda cls, x: fn(cls, x + 1)), reason="t")
    reg.register("mp_fake_target.C.helper", wrapper=lambda fn: (lambda x: fn(x) + 1), reason="t")
    reg.register("mp_fake_target.C.method", lambda self: "patched", reason="t")
    reg.apply()
    reg.apply()  # idempotent: not wrapped twice
    assert target_module.f(1) == 20
    assert target_module.C.make(1) == ("made", "C", 2)
    assert target_module.C().make(1) == ("made", "C", 2)
    assert target_module.C.helper(3) == 7 and target_module.C().helper(3) == 7
    assert target_module.C().method() == "patched"
    reg.remove()
    assert target_module.f is orig_f and target_module.f(1) == 2
    assert target_module.C.make(1) == ("made", "C", 1) and target_module.C.helper(3) == 6
    assert isinstance(target_module.C.__dict__["make"], classmethod)
    assert target_module.C().method() == "orig"


def test_missing_target_is_loud():
    reg = PatchRegistry("t")
    reg.register("megatron.core.tensor_parallel.random.no_such_function", lambda: 0, reason="t")
    with pytest.raises(PatchTargetError, match="no_such_function"):
        reg.apply()
    with pytest.raises(ValueError, match="twice"):
        reg.register("megatron.core.tensor_parallel.random.no_such_function", lambda: 0, reason="t")


def test_cpu_backend_active_and_patches_removable():
    import megatron.core  # noqa: F401  (megatron-core patches land when it is imported)

    import megatron_patch
    from megatron_patch.backends import active_backend, select_backend
    b = active_backend()
    assert b.name == "cpu" and megatron_patch.backend is b
    assert select_backend() is b  # importing/selecting again does nothing new
    assert all(p.applied for p in b.registry)
    assert torch.cuda.current_device() == torch.device("cpu")
    from megatron.core.transformer import utils as tu
    b.deactivate()
    try:
        assert not b.registry.applied
        with pytest.raises((RuntimeError, AssertionError, AttributeError)):
            torch.cuda.current_device()  # the original: no CUDA in this build
        with pytest.raises((RuntimeError, AssertionError)):
            tu.get_default_causal_mask(4)  # device="cuda" literal
    finally:
        b.activate()
    mask = tu.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True, True]


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=120)


def test_impossible_explicit_choice_fails_clearly():
    # the backend is chosen as soon as megatron_patch and torch are both imported, in
    # either order
    for code in ("import megatron_patch, torch", "import torch, megatron_patch"):
        r = _run(code, MEGATRON_PATCH_BACKEND="cuda")
        assert r.returncode != 0, code
        assert "BackendUnavailableError" in r.stderr and \
            "torch.cuda.is_available() is False" in r.stderr
    r = _run("import megatron_patch", MEGATRON_PATCH_BACKEND="cuda")
    assert r.returncode == 0  # no torch yet: nothing to run on, nothing chosen
    r = _run("import megatron_patch", MEGATRON_PATCH_BACKEND="tpu")
    assert r.returncode != 0 and "choose one of auto, cpu, cuda, npu" in r.stderr


def test_megatron_patches_wait_for_megatron_core_import():
    code = ("import sys, torch, megatron_patch\n"
            "assert 'megatron.core' not in sys.modules\n"
            "assert torch.cuda.current_device() == torch.device('cpu')  # torch patch: at once\n"
            "b = megatron_patch.backend\n"
            "assert not b.registry.all_applied\n"
            "from megatron.core.tensor_parallel import random as r\n"
            "assert b.registry.all_applied\n"
            "assert r._get_cuda_rng_state is b.registry.get("
            "'megatron.core.tensor_parallel.random._get_cuda_rng_state').replacement\n"
            "print('ok')\n")
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_without_torch_is_light():
    """The launcher's plan and the shape tools import megatron_patch without torch; the
    backend is active the moment torch arrives, before any torch code of ours runs."""
    code = ("import sys, megatron_patch\n"
            "from megatron_patch.training import launch_plan\n"
            "from megatron_patch.models.llama import resolve, parallel_layout\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "from megatron_patch.backends import _active\n"
            "assert _active is None\n"
            "import torch\n"
            "from megatron_patch import backends\n"
            "assert backends._active is not None and backends._active.name == 'cpu'\n"
            "assert torch.cuda.current_device() == torch.device('cpu')\n"
            "print('ok')\n")
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_auto_picks_cpu_here():
    r = _run("import megatron_patch; print(megatron_patch.backend.name)", MEGATRON_PATCH_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cpu"


def test_megatron_core_version_is_checked(monkeypatch):
    import importlib.metadata as md

    import megatron_patch
    monkeypatch.setattr(md, "version", lambda name: "0.15.0")
    with pytest.raises(ImportError, match="megatron-core==0.16.1"):
        megatron_patch._check_megatron_core()
