"""Launcher runs for the parallel-layout tests: an 8-layer model small enough that 8 gloo
processes train it in a second, and the 25-argument command for any TP/PP/DP/VP/SP/DO.

The model (hidden 64, 8 layers, 8 heads / 4 KV heads, FFN 128, vocab 512) divides by TP=4
(KV heads, FFN), by PP=2 x VP=2, and by PP=4 with MP_PP0_LAYERS=5 (5,1,1,1). It is an HF
Llama written as a release checkpoint next to the shared world's tokenizer and corpus.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import time

import torch

from train_helpers import (LAUNCHERS, launcher_env, make_world, tb_scalars,
                           write_release_checkpoint)

GBS, MBS, SEQ = 4, 1, 32
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([\d.E+-]+) \|")


class LayoutWorld:
    def __init__(self, root, world):
        self.root, self.world = root, world
        self.release = os.path.join(root, "ckpt-release")

    @property
    def corpus(self):
        return self.world.corpus

    def arch(self):
        from megatron_patch.models.llama import LlamaArch
        return LlamaArch.from_hf_config(os.path.join(self.release, "config.json"),
                                        generation="llama2")


def make_layout_world(basetemp) -> LayoutWorld:
    world = make_world(os.path.join(str(basetemp), "train_world"))
    lw = LayoutWorld(os.path.join(str(basetemp), "layout_world"), world)
    if os.path.exists(os.path.join(lw.root, "READY")):
        return lw
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_patch.models.llama import LlamaArch
    arch = LlamaArch(hidden_size=64, num_layers=8, num_attention_heads=8, num_key_value_heads=4,
                     ffn_hidden_size=128, vocab_size=512, max_position_embeddings=512,
                     rope_theta=10000.0, norm_eps=1e-5, generation="llama2")
    cfg = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    torch.manual_seed(1)
    write_release_checkpoint(LlamaForCausalLM(cfg).float(), arch, lw.release, world.tokenizer)
    open(os.path.join(lw.root, "READY"), "w").close()
    return lw


def args(lw: LayoutWorld, out: str, tp=1, pp=1, do=False, sp=False, iters=4, save=1000,
         env_name="dsw") -> list:
    tokens = iters * GBS * SEQ
    return [env_name, "auto", MBS, GBS, "1e-3", "1e-4", SEQ, SEQ, "fp32", tp, pp, 1,
            str(sp).lower(), str(do).lower(), "true", "false", "false", "false", save,
            lw.corpus, lw.corpus, lw.release, tokens, 0, out]


def env(nproc: int, **extra) -> dict:
    return launcher_env(MP_NPROC=nproc, MP_EVAL_ITERS=0, **extra)


def popen(cmd_args, environ, log_path, cwd, new_session=False):
    """Start the llama2 launcher with output to ``log_path``."""
    f = open(log_path, "w")
    try:
        return subprocess.Popen(["sh", LAUNCHERS["llama2"]] + [str(a) for a in cmd_args],
                                env=environ, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=new_session)
    finally:
        f.close()


def run(cmd_args, environ, log_path, cwd, timeout=600):
    """Run the launcher to the end; returns (exit status, its output, seconds)."""
    t = time.monotonic()
    p = popen(cmd_args, environ, log_path, cwd)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    return rc, open(log_path).read(), time.monotonic() - t


def losses(text: str) -> dict:
    return {int(m.group(1)): float(m.group(2)) for m in LOSS_RE.finditer(text)}


def grad_norms(out: str) -> dict:
    """{iteration: gradient norm} from the run's TensorBoard (float32 as written)."""
    (tb,) = glob.glob(os.path.join(out, "tensorboard", "*"))
    return tb_scalars(tb, "grad-norm")


def checkpoint_dir(out: str) -> str:
    (d,) = glob.glob(os.path.join(out, "checkpoint", "*"))
    return d


def full_weights(ckdir: str, arch, iteration=None) -> dict:
    """Every model tensor of a checkpoint merged to TP=1/PP=1 (the converter's reader)."""
    from megatron_patch.checkpoint import load_model_state
    (sd,) = load_model_state(ckdir, tp=1, pp=1, arch=arch, iteration=iteration)
    return sd
