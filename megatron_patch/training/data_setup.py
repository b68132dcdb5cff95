"""The training data of a run: pretraining GPTDatasets or SFT datasets, and the tokenizer
they need (found next to the checkpoint, from MP_TOKENIZER, or from the SFT idxmap)."""
from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from megatron_patch.training.config import ConfigError, TrainConfig, parse_blend


def tokenizer_dir(cfg: TrainConfig) -> Optional[str]:
    """MP_TOKENIZER, else tokenizer files next to PRETRAIN_CHECKPOINT_PATH (or above it),
    else the tokenizer an SFT idxmap was built with."""
    cands = [cfg.tokenizer]
    if cfg.pretrain_checkpoint:
        cands += [cfg.pretrain_checkpoint, os.path.dirname(os.path.normpath(cfg.pretrain_checkpoint))]
    if cfg.sft and cfg.dataset_type == "idxmap":
        import json
        meta = f"{cfg.data_path[0]}_sft_meta.json"
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                cands.append(json.load(f).get("tokenizer"))
    for c in cands:
        if c and os.path.isdir(c) and any(os.path.isfile(os.path.join(c, n)) for n in
                                          ("tokenizer.json", "tokenizer.model",
                                           "tokenizer_config.json")):
            return c
    if cfg.tokenizer:
        raise ConfigError(f"MP_TOKENIZER={cfg.tokenizer!r} is not valid: not a tokenizer "
                          "directory (tokenizer.json / tokenizer.model)")
    return None


def build_data(cfg: TrainConfig, arch, note=print):
    """(train dataset stream, valid dataset or None, item -> sample fn, sequence length)."""
    from megatron_patch.training import batches
    if cfg.sft:
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
        train = SFTDataset(cfg.data_path[0], tok, cfg.pad_len, cfg.dataset_type, cfg.generation,
                           cfg.sft_packing, verbose=verbose)
        valid = None
        if cfg.valid_data_path:
            valid = SFTDataset(cfg.valid_data_path[0], tok, cfg.pad_len, cfg.dataset_type,
                               cfg.generation, cfg.sft_packing, verbose=verbose)
        train_stream = batches.CyclicShuffled(train, cfg.seed)
        valid_stream = batches.CyclicShuffled(valid, cfg.seed, shuffle=False) if valid else None
        return train_stream, valid_stream, batches.sft_sample, cfg.pad_len
    from megatron_patch.data.pretrain import build_pretrain_datasets, default_eod
    tpaths, tweights = parse_blend(cfg.data_path)
    vpaths, vweights = parse_blend(cfg.valid_data_path) if cfg.valid_data_path else (None, None)
    n_train = cfg.train_iters * cfg.global_batch_size
    n_valid = max(cfg.eval_iters, 1) * cfg.global_batch_size
    train, valid = build_pretrain_datasets(
        tpaths, tweights, vpaths, vweights, cfg.seq_len, cfg.seed, (n_train, n_valid),
        arch.vocab_size, default_eod(cfg.generation), cfg.data_split,
        cache_dir=os.path.join(cfg.output_base, "data_cache"), note=note)
    return train, valid, batches.pretrain_sample, cfg.seq_len
