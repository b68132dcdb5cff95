"""Warning noise outside training (issue 16, item 11): on the cpu backend a converter run
prints none of the library notes that are irrelevant to it; on cuda the Transformer Engine
fallback notes become one short line. The filters live in megatron_patch/warnings_policy.py.
"""
from __future__ import annotations

import subprocess
import sys

from train_helpers import ROOT, launcher_env, make_world

# what megatron-core, torch and transformers print on a CPU run without the policy
NOISE = ("Transformer Engine", "Apex", "apex", "cuda_graph_scope", "full scope is deprecated",
         "CUDA_DEVICE_MAX_CONNECTIONS", "clean_up_tokenization_spaces", "Warning",
         "warnings.warn")


def _env(**extra):
    env = launcher_env(TQDM_DISABLE="1", **extra)
    env.pop("PYTHONWARNINGS")  # the default filters: every warning shows
    return env


def test_tiny_conversion_prints_no_irrelevant_warnings(tmp_path_factory, tmp_path):
    """hf2mcore with CHECK (both models built: megatron-core's layer specs, config and
    optimizer modules all import) on the cpu backend: stderr holds none of the noise."""
    w = make_world(str(tmp_path_factory.getbasetemp() / "train_world"))
    r = subprocess.run([sys.executable, "-m", "megatron_patch.conversion.cli", "auto", w.hf,
                        str(tmp_path / "t"), "1", "1", "false", "true", "false", "fp32"],
                       env=_env(MEGATRON_PATCH_BACKEND="cpu"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CHECK PASSED" in r.stdout  # the models were built and run
    found = [n for n in NOISE if n in r.stderr]
    assert not found, (found, r.stderr[-3000:])


def _emit_megatron_notes(backend: str) -> subprocess.CompletedProcess:
    """The policy for ``backend``, then the notes megatron-core emits at import (their real
    texts), each from its own place, as Python shows them by default."""
    code = (
        "import warnings\n"
        "from megatron_patch import warnings_policy\n"
        f"warnings_policy.install({backend!r})\n"
        "for msg in ('Transformer Engine and Apex are not installed. Falling back to Torch "
        "optimizers.', 'Apex is not installed. Falling back to Torch Norm', 'Transformer "
        "Engine and Apex are not installed. Falling back to local implementations of "
        "multi_tensor_applier and multi_tensor_scale', 'full scope is deprecated. Use empty "
        "cuda_graph_scope to capture the whole layer.'):\n"
        "    warnings.warn(msg)\n"
        "warnings.warn('a warning of our own that must still show')\n")
    env = _env()
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cpu_drops_the_fallback_notes_and_keeps_other_warnings():
    r = _emit_megatron_notes("cpu")
    assert r.returncode == 0, r.stderr
    assert "Transformer Engine" not in r.stderr and "Apex" not in r.stderr
    assert "cuda_graph_scope" not in r.stderr
    assert "a warning of our own that must still show" in r.stderr  # not a blanket ignore


def test_cuda_shows_the_fallback_once_briefly():
    """Without Transformer Engine (as here) a cuda run gets one short note, not one per
    megatron-core module."""
    r = _emit_megatron_notes("cuda")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "Transformer Engine" in x or "Apex" in x]
    assert lines == ["megatron_patch: note: Transformer Engine is not installed: megatron-core "
                     "runs its local layers and torch optimizers (slower; "
                     "backends/cuda/README.md)"]
    assert "a warning of our own that must still show" in r.stderr
