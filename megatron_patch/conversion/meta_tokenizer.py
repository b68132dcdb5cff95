"""The tokenizer of a Meta checkpoint folder, written as an HF tokenizer directory.

``tokenizer.model`` is a sentencepiece model in LLaMA-1/2 folders and, in Llama-3 ones,
tiktoken's BPE file: one ``<base64 token bytes> <rank>`` line per token, 128000 lines, the
256 special tokens (ids 128000-128255) implied by Meta's tokenizer code. The tiktoken file
becomes a ``tokenizer.json`` through transformers' TikTokenConverter (ranks read here, so the
``tiktoken`` package is not needed) plus the special tokens under the names of Meta's
tokenizer code; the directory is then finished like the packaged Llama-3 tokenizer
(``megatron_patch.tokenizer.write_llama3_tokenizer_dir``: config, special-token map, BOS
post-processor, ``original/tokenizer.model``). Base-model settings are written (eos
``<|end_of_text|>``): a params.json does not say whether the weights are the instruct ones.
"""
from __future__ import annotations

import base64
import os
import shutil
import tempfile

_RESERVED = None  # marks a "<|reserved_special_token_N|>" slot, numbered in order
_LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", _RESERVED, _RESERVED, _RESERVED,
                   _RESERVED, "<|start_header_id|>", "<|end_header_id|>", _RESERVED,
                   "<|eot_id|>"]
_LLAMA3_1_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", _RESERVED, _RESERVED,
                     "<|finetune_right_pad_id|>", _RESERVED, "<|start_header_id|>",
                     "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def is_tiktoken_file(path: str) -> bool:
    """A tiktoken BPE file starts with a base64 token, a space and its rank."""
    with open(path, "rb") as f:
        head = f.readline(200).split()
    if len(head) != 2 or not head[1].isdigit():
        return False
    try:
        base64.b64decode(head[0], validate=True)
    except ValueError:
        return False
    return True


def load_tiktoken_ranks(path: str) -> dict:
    """{token bytes: rank} of a tiktoken BPE file."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def special_tokens(generation: str, count: int = 256) -> list:
    """The names of Meta's special tokens (ids after the BPE ranks), ``count`` of them."""
    names = list(_LLAMA3_1_SPECIAL if generation == "llama3_1" else _LLAMA3_SPECIAL)
    n = 0
    for i, name in enumerate(names):
        if name is _RESERVED:
            names[i], n = f"<|reserved_special_token_{n}|>", n + 1
    while len(names) < count:
        names.append(f"<|reserved_special_token_{n}|>")
        n += 1
    return names


def tiktoken_to_tokenizer_json(path: str, out_file: str, generation: str) -> None:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(load_tiktoken_ranks)

    tok = _Converter(vocab_file=path, extra_special_tokens=special_tokens(generation)).converted()
    tok.save(out_file)


def write_hf_tokenizer(meta_dir: str, dest: str, arch) -> list:
    """Write the HF tokenizer files for the Meta folder's tokenizer.model into ``dest``;
    returns the names written (nothing when the folder has no tokenizer.model)."""
    src = os.path.join(meta_dir, "tokenizer.model")
    if not os.path.isfile(src):
        return []
    before = set(os.listdir(dest))
    if is_tiktoken_file(src):
        from megatron_patch.tokenizer import write_llama3_tokenizer_dir
        with tempfile.TemporaryDirectory() as tmp:
            tiktoken_to_tokenizer_json(src, os.path.join(tmp, "tokenizer.json"), arch.generation)
            shutil.copyfile(src, os.path.join(tmp, "tokenizer.model"))
            write_llama3_tokenizer_dir(dest, instruct=False,
                                       model_max_length=arch.max_position_embeddings,
                                       source_dir=tmp)
        with open(os.path.join(dest, "NOTICE.txt"), "w", encoding="utf-8") as f:
            f.write("original/tokenizer.model is the tokenizer file of the Meta checkpoint "
                    f"{os.path.abspath(meta_dir)}; tokenizer.json and the configuration files "
                    "were generated from it by megatron_patch's converter.\n")
    else:
        from megatron_patch.tokenizer.sentencepiece_train import write_llama_spm_hf_files
        shutil.copyfile(src, os.path.join(dest, "tokenizer.model"))
        write_llama_spm_hf_files(dest, arch.max_position_embeddings)
    return sorted(set(os.listdir(dest)) - before)
