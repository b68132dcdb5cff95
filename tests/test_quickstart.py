"""The README's main job: examples/quickstart/run_quickstart.sh, the whole pipeline on CPU
(shortened iteration counts; the launcher tests check the loss curve of longer runs)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    env = dict(os.environ, PRETRAIN_ITERS="6", SFT_ITERS="2", MP_PYTHON=sys.executable,
               MEGATRON_PATCH_DATA_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "qs"
    r = subprocess.run(["sh", os.path.join(ROOT, "examples/quickstart/run_quickstart.sh"), str(out)],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "CHECK PASSED" in log
    for step in range(1, 10):
        assert f"=== quickstart {step}/9" in log
    # artefacts really exist and are what the next step read
    assert (out / "mcore" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "data" / "corpus_text_document.bin").stat().st_size > 100_000
    pre = next((out / "pretrain" / "checkpoint").iterdir())
    assert (pre / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    sft = next((out / "sft" / "checkpoint").iterdir())
    assert (sft / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "loaded pretrained weights from" in log
    losses = [float(x) for x in re.findall(r"iteration +\d+/6 .*?lm loss: ([0-9.E+-]+)", log)]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    # the exported HF model loads and generated text was printed
    assert (out / "hf_sft" / "model.safetensors.index.json").exists() or list((out / "hf_sft").glob("*.safetensors"))
    assert "prompt + 16 greedy tokens:" in log
    assert "(expected: junk. This is a tiny model with random weights" in log
    # step 8: the loss curve of the pretraining run, next to its TensorBoard events
    (png,) = (out / "pretrain" / "tensorboard").glob("*/loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(png.parent.glob("events.out.tfevents*"))
    assert "loss curve (6 iterations, with validation) ->" in log  # the final evaluation
    # step 9: lm-eval on the exported HF model, the bundled task, 4 questions per subject
    import json
    (results,) = (out / "eval").rglob("results_*.json")
    res = json.loads(results.read_text())
    assert res["config"]["model_args"] == {"pretrained": str(out / "hf_sft")}
    assert res["config"]["limit"] == 4
    for sub in ("mp_tiny_mmlu_arithmetic", "mp_tiny_mmlu_general_science"):
        assert 0.0 <= res["results"][sub]["acc,none"] <= 1.0
        assert res["n-samples"][sub]["effective"] == 4
    assert "|mp_tiny_mmlu" in log  # lm-eval's table was printed
    # every logged iteration wrote a log file line too
    logs = list((out / "pretrain" / "log").glob("*.log"))
    assert logs and len(re.findall(r"iteration +\d+/6 ", logs[0].read_text())) == 6
