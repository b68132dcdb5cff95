"""The 25-argument launcher end to end under ``sh`` (dash): 30 iterations of pretraining on
the bundled corpus from a converted checkpoint (MODEL_SIZE=auto) — the loss drops clearly,
the log file, TensorBoard scalars and checkpoints are written — then SFT on the bundled
alpaca samples (raw JSON) from that run's checkpoint, under bash."""
from __future__ import annotations

import glob
import math
import os
import re

import pytest

from train_helpers import launcher_env, run_launcher, tb_scalars

pytestmark = pytest.mark.slow  # multi-process / end-to-end

GBS, MBS, SEQ, ITERS = 8, 2, 64, 30
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \| consumed samples:\s+(\d+) \| consumed "
                     r"tokens:\s+(\d+) \| elapsed time per iteration \(ms\): ([\d.]+) \| .*?"
                     r"lm loss: ([\d.E+-]+) \|")


def _args(w, out, sft=False, ckpt=None, data=None, iters=ITERS, warmup=2, save=20):
    n, wu = (iters, warmup) if sft else (iters * GBS * SEQ, warmup * GBS * SEQ)
    data = data or w.corpus
    return ["dsw", "auto", MBS, GBS, "3e-3", "3e-4", SEQ, SEQ, "fp32", 1, 1, 1, "false",
            "false", "true", str(sft).lower(), "false", "false", save, data, data,
            ckpt or w.release, n, wu, out]


def _log_file(out):
    logs = sorted(glob.glob(os.path.join(out, "log", "*.log")))
    assert len(logs) == 1, logs
    return logs[0]


@pytest.fixture(scope="module")
def pretrain(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("e2e") / "output")
    p = run_launcher(_args(world, out), "llama2", shell="sh",
                     env=launcher_env(MP_EVAL_INTERVAL=10, MP_EVAL_ITERS=2),
                     cwd=str(tmp_path_factory.getbasetemp()))
    return out, p


def test_pretrain_under_sh(pretrain):
    out, p = pretrain
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = open(_log_file(out)).read()
    rows = [m.groups() for m in LOSS_RE.finditer(text)]
    assert [int(r[0]) for r in rows] == list(range(1, ITERS + 1)), text[-2000:]
    assert int(rows[-1][2]) == ITERS * GBS and int(rows[-1][3]) == ITERS * GBS * SEQ
    losses = [float(r[5]) for r in rows]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print("loss curve:", " ".join(f"{x:.3f}" for x in losses))
    print("ms/iter:", " ".join(r[4] for r in rows))
    assert last < first - 0.5, losses  # a clear drop, not noise
    assert text.count("validation loss at") == 3  # iterations 10, 20 and the end
    for key in ("tokens per second per device:", "throughput per device (TFLOP/s):",
                "learning rate:", "global batch size:", "loss scale:", "grad norm:",
                "number of skipped iterations:", "number of nan iterations:"):
        assert key in text, key
    # the notes are in the log, not silent
    assert "FL=true" in text and "PAD_LEN=64 is used by SFT only" in text


def test_pretrain_outputs(pretrain):
    out, p = pretrain
    assert p.returncode == 0
    (ckdir,) = glob.glob(os.path.join(out, "checkpoint", "*"))
    name = os.path.basename(ckdir)
    assert name == ("pretrain-mcore-llama2-auto-lr-3e-3-minlr-3e-4-bs-2-gbs-8-seqlen-64-pr-fp32"
                    "-tp-1-pp-1-cp-1-ac-false-do-false-sp-false-ti-30-wi-2")
    assert open(os.path.join(ckdir, "latest_checkpointed_iteration.txt")).read().strip() == "30"
    for it in ("iter_0000020", "iter_0000030"):
        assert os.path.isfile(os.path.join(ckdir, it, "mp_rank_00", "model_optim_rng.pt"))
    assert not [n for n in os.listdir(ckdir) if n.startswith(".staging")]
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(ckdir, f)), f
    (tb,) = glob.glob(os.path.join(out, "tensorboard", name + "_*"))
    loss = tb_scalars(tb, "lm loss")
    assert sorted(loss) == list(range(1, ITERS + 1))
    text = open(_log_file(out)).read()
    logged = {int(m.group(1)): float(m.group(6)) for m in LOSS_RE.finditer(text)}
    assert all(abs(loss[i] - logged[i]) <= 1e-6 * abs(logged[i]) for i in logged)
    for tag in ("learning-rate", "grad-norm", "loss-scale", "lm loss validation",
                "tokens-per-second-per-device", "throughput-tflops-per-device"):
        assert tb_scalars(tb, tag), tag
    import torch
    state = torch.load(os.path.join(ckdir, "iter_0000030", "mp_rank_00", "model_optim_rng.pt"),
                       map_location="cpu", weights_only=False)
    assert state["iteration"] == 30 and state["checkpoint_version"] == 3.0
    assert state["args"].consumed_train_samples == ITERS * GBS
    for key in ("model", "optimizer", "opt_param_scheduler", "rng_state"):
        assert key in state, key
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in state["model"]


def test_sft_from_pretrain_checkpoint_under_bash(world, pretrain, tmp_path):
    """SFT=true (iterations, raw JSON) from the pretraining run's checkpoint directory; its
    config.json and tokenizer were written next to it, so MODEL_SIZE auto just works."""
    out, p = pretrain
    assert p.returncode == 0
    (ckdir,) = glob.glob(os.path.join(out, "checkpoint", "*"))
    sft_out = str(tmp_path / "sft")
    q = run_launcher(_args(world, sft_out, sft=True, ckpt=ckdir, data=world.sft_json, iters=4,
                           warmup=1, save=100), "llama2", shell="bash",
                     env=launcher_env(MP_DATASET_TYPE="raw", MP_EVAL_ITERS=1), cwd=str(tmp_path))
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    text = open(_log_file(sft_out)).read()
    assert "finetune-mcore-llama2-auto-lr-3e-3" in text
    assert "loaded pretrained weights from" in text and "iter_0000030" in text
    losses = [float(m.group(6)) for m in LOSS_RE.finditer(text)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    (sft_ck,) = glob.glob(os.path.join(sft_out, "checkpoint", "finetune-*"))
    assert open(os.path.join(sft_ck, "latest_checkpointed_iteration.txt")).read().strip() == "4"
