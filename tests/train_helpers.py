"""Shared material for the training/launcher tests: a small real-text world.

``make_world(dir)`` builds, once per session (a few seconds):
- a LLaMA-2-style sentencepiece tokenizer (512 pieces) trained on the bundled corpus,
- the bundled corpus preprocessed with it (``corpus_text_document``),
- a small HF Llama model (hidden 64, 4 layers, 4 heads / 2 KV heads, vocab 512) and its
  Megatron ``release`` checkpoint (TP=1, PP=1) with config.json and the tokenizer next to
  it — what the converter produces, made here through the same mapping table,
- the bundled alpaca SFT samples as a raw JSON file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = {
    "llama3_1": os.path.join(ROOT, "examples", "llama3_1", "run_mcore_llama3_1.sh"),
    "llama3": os.path.join(ROOT, "examples", "llama3", "run_mcore_llama3.sh"),
    "llama2": os.path.join(ROOT, "examples", "llama2", "run_mcore_llama2.sh"),
    "llama": os.path.join(ROOT, "examples", "llama", "run_mcore_llama1.sh"),
}
VOCAB = 512


class World:
    def __init__(self, root):
        self.root = root
        self.tokenizer = os.path.join(root, "tokenizer")
        self.corpus = os.path.join(root, "corpus_text_document")
        self.release = os.path.join(root, "ckpt-release")
        self.hf = os.path.join(root, "hf")
        self.sft_json = os.path.join(root, "sft_alpaca.json")

    def arch(self):
        from megatron_patch.models.llama import LlamaArch
        return LlamaArch.from_hf_config(self.hf, generation="llama2")


def _small_arch():
    from megatron_patch.models.llama import LlamaArch
    return LlamaArch(hidden_size=64, num_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     ffn_hidden_size=128, vocab_size=VOCAB, max_position_embeddings=512,
                     rope_theta=10000.0, norm_eps=1e-5, generation="llama2")


def write_release_checkpoint(hf_model, arch, dest: str, tokenizer_dir: str = None) -> str:
    """HF model -> Megatron release checkpoint (TP=1, PP=1) + config.json (+ tokenizer)."""
    from megatron_patch import checkpoint as ck
    from megatron_patch.models.llama import mapping
    sd = mapping.hf_to_mcore_state(hf_model.state_dict(), arch, 1, 0,
                                   list(range(arch.num_layers)), True, True)
    os.makedirs(dest, exist_ok=True)
    staging = ck.begin_save(dest, "release")
    state = ck.checkpoint_state([{k: v.contiguous() for k, v in sd.items()}], "release",
                                ck.make_args(arch, 1, 1, "fp32"))
    ck.save_rank_file(ck.checkpoint_file(staging, 0, 0, 1), state)
    ck.commit_save(dest, "release")
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(arch.to_hf_config(), f, indent=2)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), dest)
    return dest


def make_world(root: str) -> World:
    w = World(root)
    if os.path.exists(os.path.join(root, "READY")):
        return w
    os.makedirs(root, exist_ok=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_patch.data.corpus import bundled_corpus_path, bundled_sft_path, corpus_documents
    from megatron_patch.data.pretrain_preprocess import preprocess_pretrain
    from megatron_patch.tokenizer import load_tokenizer, train_sentencepiece_tokenizer

    train_sentencepiece_tokenizer(w.tokenizer, (d["text"] for d in corpus_documents()),
                                  vocab_size=VOCAB, chat_template="llama2")
    tok = load_tokenizer(w.tokenizer)
    assert tok.vocab_size == VOCAB, tok.vocab_size
    preprocess_pretrain(bundled_corpus_path(), tok, os.path.join(root, "corpus"),
                        append_eod=True, quiet=True)
    arch = _small_arch()
    cfg = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(w.hf)
    for name in os.listdir(w.tokenizer):
        shutil.copy(os.path.join(w.tokenizer, name), w.hf)
    write_release_checkpoint(model, arch, w.release, w.tokenizer)
    shutil.copy(bundled_sft_path("alpaca"), w.sft_json)
    open(os.path.join(root, "READY"), "w").close()
    return w


def launcher_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(MP_PYTHON=sys.executable, MEGATRON_PATCH_BACKEND="cpu", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    for k in [k for k in env if k.startswith("MP_") or k in (
            "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        del env[k]  # a process group of the test process must not leak into the launcher
    env["MP_PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_launcher(args, generation="llama2", shell="sh", env=None, timeout=600, cwd=None):
    return subprocess.run([shell, LAUNCHERS[generation]] + [str(a) for a in args],
                          env=env or launcher_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def tb_scalars(tb_dir: str, tag: str = "lm loss") -> dict:
    """{step: value} of one TensorBoard scalar (float32 as written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def model_tensors(iter_dir: str) -> dict:
    """{(rank dir, name): tensor} of every model tensor in a checkpoint iteration dir."""
    out = {}
    for rank in sorted(os.listdir(iter_dir)):
        state = torch.load(os.path.join(iter_dir, rank, "model_optim_rng.pt"),
                           map_location="cpu", weights_only=False)
        for k, v in state["model"].items():
            out[(rank, k)] = v
    return out
