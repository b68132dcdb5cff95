"""A tiny random Llama checkpoint in HF format with a small byte-level BPE tokenizer, for
CPU smoke runs of evaluation, generation and chat (tests and the quickstart).

    python -m megatron_patch.evaluation.tiny_model /tmp/tiny-llama-hf

The tokenizer is trained here on a few sentences (no download); it has Llama-3-style special
tokens and a Llama-3-style chat template, so the chat path is exercised end to end. Scores
of this model are near chance by construction.
"""
from __future__ import annotations

import argparse
import glob
import os

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
VOCAB_SIZE = 512


def _corpus() -> list:
    from megatron_patch.evaluation.task_data import BUNDLED_DIR  # the bundled task's CSVs
    lines = []
    paths = sorted(glob.glob(os.path.join(BUNDLED_DIR, "*", "*.csv")))
    if not paths:
        raise FileNotFoundError(f"{BUNDLED_DIR}: the bundled task's CSV files are missing")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines += f.read().splitlines()
    lines += [
        "The following are multiple choice questions (with answers) about general science.",
        "Answer: A. B. C. D.",
        "Hello! How are you today? I am a small language model.",
        "Tell me about the weather, the sea, the mountains and the stars.",
        "user assistant system You are a helpful assistant.",
        "0 1 2 3 4 5 6 7 8 9 10 100 the a an of to in is it and or not",
    ]
    return lines * 4


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_hf(out_dir: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, ffn: int = 176,
                  initializer_range: float = 0.1, max_position_embeddings: int = 512) -> str:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer()
    tok.save_pretrained(out_dir)
    bos, eos, eot = (tok.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT))
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=ffn,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, initializer_range=initializer_range, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[eos, eot])
    model.save_pretrained(out_dir)
    return out_dir


def write_tiny_set(root: str, tp: int = 2, pp: int = 1, seed: int = 0) -> dict:
    """The quickstart/test trio under ``root``: ``hf`` (the random HF model), ``mcore`` (it
    converted to a Megatron checkpoint at TP x PP) and ``hf_back`` (that checkpoint converted
    back to HF with mg2hf, as users do before ``--model hf``). Uses the converter CLI."""
    from megatron_patch.conversion.cli import main as convert

    paths = {k: os.path.join(root, k) for k in ("hf", "mcore", "hf_back")}
    write_tiny_hf(paths["hf"], seed=seed)
    env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        for argv in (["auto", paths["hf"], paths["mcore"], str(tp), str(pp), "false", "false",
                      "false", "fp32"],
                     ["auto", paths["mcore"], paths["hf_back"], "1", "1", "true", "false",
                      "false", "fp32", paths["hf"]]):
            rc = convert(argv)
            if rc:
                raise RuntimeError(f"converter failed (exit {rc}): {' '.join(argv)}")
    finally:
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-mcore", action="store_true",
                   help="also write <out>/mcore (TP=2 Megatron checkpoint) and <out>/hf_back; "
                        "the HF model goes to <out>/hf")
    a = p.parse_args(argv)
    if a.with_mcore:
        for k, v in write_tiny_set(a.out_dir, seed=a.seed).items():
            print(f"{k}: {v}")
    else:
        print(write_tiny_hf(a.out_dir, seed=a.seed))


if __name__ == "__main__":
    main()
