"""The README's main job: examples/quickstart/run_quickstart.sh, the whole pipeline on CPU
(12 pretraining iterations instead of 30, 2 SFT iterations; the launcher tests check the
loss curve of longer runs). Checked against references outside the pipeline: the first loss
is that of a uniform prediction over the vocabulary (a random-init model), the loss then
drops by a margin measured on this script, and the exported HF model's logits (transformers)
equal those of the SFT checkpoint it came from (megatron-core)."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_ITERS = 12
# measured on this script (CPU, fp32): lm loss 11.79 at iteration 1, 10.77 at 12, 9.75 at 30
MIN_DROP = 0.5


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quickstart")
    env = dict(os.environ, PRETRAIN_ITERS=str(PRETRAIN_ITERS), SFT_ITERS="2",
               MP_PYTHON=sys.executable, MEGATRON_PATCH_DATA_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "qs"
    r = subprocess.run(["sh", os.path.join(ROOT, "examples/quickstart/run_quickstart.sh"), str(out)],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    return out, r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart):
    out, rc, log = quickstart
    assert rc == 0, log[-4000:]
    assert "CHECK PASSED" in log
    for step in range(1, 10):
        assert f"=== quickstart {step}/9" in log
    # artefacts really exist and are what the next step read
    assert (out / "mcore" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "data" / "corpus_text_document.bin").stat().st_size > 100_000
    pre = next((out / "pretrain" / "checkpoint").iterdir())
    assert (pre / "latest_checkpointed_iteration.txt").read_text().strip() == str(PRETRAIN_ITERS)
    sft = next((out / "sft" / "checkpoint").iterdir())
    assert (sft / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "loaded pretrained weights from" in log
    n = PRETRAIN_ITERS
    losses = [float(x) for x in re.findall(rf"iteration +\d+/ *{n} .*?lm loss: ([0-9.E+-]+)", log)]
    assert len(losses) == n, losses
    # a random-init model predicts ~uniformly: the first loss is ln(vocabulary size)
    vocab = 128256  # the Llama-3 tokenizer of make_tiny_llama3.py
    assert abs(losses[0] - math.log(vocab)) < 0.1, losses[0]
    assert losses[-1] < losses[0] - MIN_DROP, losses
    # the exported HF model loads and generated text was printed
    assert (out / "hf_sft" / "model.safetensors.index.json").exists() or list((out / "hf_sft").glob("*.safetensors"))
    assert "prompt + 16 greedy tokens:" in log
    assert "(expected: junk. This is a tiny model with random weights" in log
    # step 8: the loss curve of the pretraining run, next to its TensorBoard events
    (png,) = (out / "pretrain" / "tensorboard").glob("*/loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(png.parent.glob("events.out.tfevents*"))
    assert f"loss curve ({PRETRAIN_ITERS} iterations, with validation) ->" in log  # the final evaluation
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
    assert logs and len(re.findall(rf"iteration +\d+/ *{n} ", logs[0].read_text())) == n


@pytest.mark.slow
def test_exported_hf_logits_equal_sft_checkpoint(quickstart, mp1):
    """transformers on the exported HF model against megatron-core on the SFT checkpoint
    (fp32), on a real-text prompt; and the SFT really changed the pretrained weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_patch.checkpoint import load_model_shards
    from megatron_patch.models.llama import LlamaArch
    from megatron_patch.models.llama.config import transformer_config
    from megatron_patch.models.llama.provider import build_llama
    out, rc, log = quickstart
    assert rc == 0, log[-4000:]
    sft = next((out / "sft" / "checkpoint").iterdir())
    pre = next((out / "pretrain" / "checkpoint").iterdir())
    hf_dir = str(out / "hf_sft")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok("Water the houseplant when the top of the soil is dry, and keep it in bright, "
              "indirect light.", return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    arch = LlamaArch.from_hf_config(str(sft))
    models = {}
    for name, ckpt in (("sft", sft), ("pretrain", pre)):
        models[name] = build_llama(arch, transformer_config(arch)).eval()
        load_model_shards(str(ckpt), [models[name]], arch=arch)
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = hf(ids).logits
        got = models["sft"](ids, pos, None)[..., :arch.vocab_size]
        before = models["pretrain"](ids, pos, None)[..., :arch.vocab_size]
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * scale
    assert (before - ref).abs().max().item() > 1e-3 * scale  # SFT moved the model
