"""tests/gpu/memory_switches_check.py (peak device memory with and without each memory
switch on an 8B-shaped model) as CI sees it: one line and exit 0 without CUDA; its CPU
rehearsal runs every case through the trainer's setup and train_step and reports them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu", "memory_switches_check.py")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def test_without_cuda_one_line_and_exit_0():
    p = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=_env(),
                       timeout=120, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [p.stdout.strip()]
    assert p.stdout.startswith("memory_switches_check: skipped: no CUDA device")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MP_TEST_GPU_REHEARSAL"),
                    reason="the GPU script's CPU rehearsal (~40 s) runs with MP_TEST_GPU_REHEARSAL=1")
def test_cpu_rehearsal_runs_every_case(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--cpu-rehearsal", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=600, cwd="/")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "memory_switches.json").read_text())
    cases = summary["cases"]
    assert summary["ok"] and set(cases) == {"baseline", "ac_offload", "optimizer_static",
                                            "optimizer_auto", "sft_dense_mask",
                                            "sft_packed_thd"}
    assert cases["ac_offload"]["activation_bytes_offloaded"] > 0
    assert any("offload fraction 1 " in l for l in cases["optimizer_static"]["log"])
    assert any("offload fraction 0.0" in l for l in cases["optimizer_auto"]["log"])
    # the same weights and batches: the switches change no loss (bf16 on the CPU here)
    base = cases["baseline"]["losses"]
    for name in ("ac_offload", "optimizer_static", "optimizer_auto"):
        assert all(abs(a - b) < 1e-5 for a, b in zip(cases[name]["losses"], base)), name
    assert all(abs(a - b) < 1e-4 for a, b in zip(cases["sft_packed_thd"]["losses"],
                                                  cases["sft_dense_mask"]["losses"]))
