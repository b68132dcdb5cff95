"""tests/gpu/gpu_check.py, the one-shot GPU check, as CI sees it:

- without CUDA it prints one line and exits 0;
- its parser reads the trainer's own iteration line (train_log.iteration_line);
- a failed step makes the summary not ok (and the exit status 1);
- slow: its --cpu-rehearsal runs every step (converter, parity, the real launcher in bf16
  and fp8, the transformers baseline) on the CPU with a tiny model and reports each.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def test_without_cuda_one_line_and_exit_0():
    p = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=_env(),
                       timeout=300, cwd="/")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped: no CUDA device"), p.stdout


def test_parses_the_trainers_iteration_line():
    from megatron_patch.training.train_log import iteration_line
    gc = _module()
    log = "\n".join([
        "> megatron_patch training: x",
        iteration_line(1, 10, 8, 32768, 812.5, 1e-5, 8, 11.7653, 1.0, 3.2, 0, 0, 40329.8, 412.9),
        iteration_line(10, 10, 80, 327680, 500.0, 1e-6, 8, 9.5, 1.0, None, 0, 0, 65536.0, 670.1),
        iteration_line(2, 10, 16, 65536, 1.0, 1e-6, 8, float("nan"), 1.0, None, 0, 0, 1.0, 1.0)])
    its = gc.parse_iterations(log)
    assert [i["iteration"] for i in its] == [1, 10, 2]
    assert its[0] == {"iteration": 1, "ms": 812.5, "loss": 11.7653, "tokens_per_s": 40329.8,
                      "tflops": 412.9}
    assert its[1]["tokens_per_s"] == 65536.0 and its[1]["tflops"] == 670.1
    assert its[2]["loss"] != its[2]["loss"]  # nan is kept, not dropped


def test_a_failed_step_fails_the_check(tmp_path, monkeypatch):
    gc = _module()
    check = gc.Check(gc.Shape(rehearsal=True), str(tmp_path), str(tmp_path))
    results = {"environment": {"megatron.core_importable": True, "torchao_importable": False},
               "peak": {"bf16_matmul_tflops": 100.0}, "prepare": {"checkpoint": "x"},
               "parity": {"passed": True}, "hf_sdpa": {"tokens_per_s": 1000.0, "tflops": 50.0}}
    monkeypatch.setattr(check, "step", lambda name, timeout: results[name])

    def broken_launcher(pr, timeout):
        check.fail(f"train_{pr}: launcher exit 1")
        return {"returncode": 1, "error_tail": ["boom"]}
    monkeypatch.setattr(check, "train", broken_launcher)
    s = check.run()
    assert not s["ok"] and s["failures"] == ["train_bf16: launcher exit 1"]
    assert s["train_fp8"] == {"skipped": "neither Transformer Engine nor torchao is importable"}
    assert s["hf_sdpa"]["mfu"] == 0.5 and "speedup_vs_hf" not in s
    assert json.load(open(tmp_path / "gpu_check.json"))["ok"] is False
    monkeypatch.setattr(gc.Check, "run", lambda self: s)
    assert gc.main(["--cpu-rehearsal", "--out", str(tmp_path / "o")]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MP_TEST_GPU_REHEARSAL"),
                    reason="the GPU script's CPU rehearsal (~40 s) runs with MP_TEST_GPU_REHEARSAL=1")
def test_cpu_rehearsal_runs_every_step(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, SCRIPT, "--cpu-rehearsal", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=900, cwd="/")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / "gpu_check.json").read_text())
    assert s["ok"] and not s["failures"], s["failures"]
    assert s["environment"]["backend"] == "cpu" and s["environment"]["torchao_importable"]
    assert s["parity"]["passed"] and s["parity"]["core_attention"] == "SDPAttention"
    assert [r["point"] for r in s["parity"]["rows"]][-1] == "logits"
    bf16, fp8, hf = s["train_bf16"], s["train_fp8"], s["hf_sdpa"]
    assert bf16["returncode"] == 0 and bf16["iterations"] == 5 and bf16["tokens_per_s"] > 0
    assert bf16["command"].startswith("sh examples/llama3/run_mcore_llama3.sh dsw auto 1 2 ")
    assert "fp8 via torchao" in fp8["fp8_path"] and "emulated" in fp8["fp8_path"]
    assert fp8["iterations"] == 5 and fp8["losses"] != bf16["losses"]
    assert max(abs(a - b) / b for a, b in zip(fp8["losses"], bf16["losses"])) < 0.02
    assert hf["attn_implementation"] == "sdpa" and hf["tokens_per_s"] > 0
    assert s["speedup_vs_hf"] == round(bf16["tokens_per_s"] / hf["tokens_per_s"], 3)
    assert bf16["tflops"] == pytest.approx(bf16["tokens_per_s"] * s["prepare"]["flops_per_token"]
                                           / 1e12)
    assert bf16["mfu"] == round(bf16["tflops"] / s["matmul_peak_bf16_tflops"], 4) > 0
    assert "goals" in s
    for name in ("gpu_check.json", "steps.log", "train_bf16.log", "train_fp8.log"):
        assert (out / name).is_file(), name
