"""The training data of a run: pretraining GPTDatasets or SFT datasets, and the tokenizer
they need (found next to the checkpoint, from MP_TOKENIZER, or from the SFT idxmap)."""
from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from megatron_patch.training.arguments import parse_blend
from megatron_patch.training.config import ConfigError, TrainConfig


def tokenizer_dir(cfg: TrainConfig) -> Optional[str]:
    """MP_TOKENIZER, else tokenizer files next to PRETRAIN_CHECKPOINT_PATH (or above it),
    else the tokenizer an SFT idxmap was built with."""
    cands = [cfg.data.tokenizer]
    if cfg.checkpoint.load:
        cands += [cfg.checkpoint.load, os.path.dirname(os.path.normpath(cfg.checkpoint.load))]
    if cfg.data.sft and cfg.data.dataset_type == "idxmap":
        import json
        meta = f"{cfg.data.train_paths[0]}_sft_meta.json"
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                cands.append(json.load(f).get("tokenizer"))
    for c in cands:
        if c and os.path.isdir(c) and any(os.path.isfile(os.path.join(c, n)) for n in
                                          ("tokenizer.json", "tokenizer.model",
                                           "tokenizer_config.json")):
            return c
    if cfg.data.tokenizer:
        raise ConfigError(f"MP_TOKENIZER={cfg.data.tokenizer!r} is not valid: not a tokenizer "
                          "directory (tokenizer.json / tokenizer.model)")
    return None


def build_data(cfg: TrainConfig, arch, note=print):
    """(train dataset stream, valid dataset or None, item -> sample fn, sequence length)."""
    from megatron_patch.training import batches
    if cfg.data.sft:
        from megatron_patch.data.sft_dataset import SFTDataset
        from megatron_patch.tokenizer import load_tokenizer
        tdir = tokenizer_dir(cfg)
        if tdir is None:
            raise ConfigError("SFT needs the tokenizer: put its files next to "
                              "PRETRAIN_CHECKPOINT_PATH or set MP_TOKENIZER=<HF tokenizer dir>")
        tok = load_tokenizer(tdir)
        if tok.vocab_size > arch.vocab_size:
            raise ConfigError(f"tokenizer {tdir} has {tok.vocab_size} tokens, the model's "
                              f"vocabulary {arch.vocab_size}")
        verbose = dist.get_rank() == 0
        d = cfg.data

        def sft_dataset(path):
            return SFTDataset(path, tok, d.pad_len, d.dataset_type, cfg.model.generation,
                              d.sft_packing, verbose=verbose)
        train = sft_dataset(d.train_paths[0])
        valid = sft_dataset(d.valid_paths[0]) if d.valid_paths else None
        train_stream = batches.CyclicShuffled(train, cfg.seed)
        valid_stream = batches.CyclicShuffled(valid, cfg.seed, shuffle=False) if valid else None
        return train_stream, valid_stream, batches.sft_sample, cfg.data.pad_len
    from megatron_patch.data.pretrain import build_pretrain_datasets, default_eod
    tpaths, tweights = parse_blend(cfg.data.train_paths)
    vpaths, vweights = parse_blend(cfg.data.valid_paths) if cfg.data.valid_paths else (None, None)
    n_train = cfg.optim.train_iters * cfg.data.global_batch_size
    n_valid = max(cfg.eval_iters, 1) * cfg.data.global_batch_size
    train, valid = build_pretrain_datasets(
        tpaths, tweights, vpaths, vweights, cfg.data.seq_len, cfg.seed, (n_train, n_valid),
        arch.vocab_size, default_eod(cfg.model.generation), cfg.data.split,
        cache_dir=os.path.join(cfg.checkpoint.output_base, "data_cache"), note=note)
    return train, valid, batches.pretrain_sample, cfg.data.seq_len
