"""Alpaca or conversation records (json/jsonl/parquet) -> idxmap SFT dataset.

    python toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py \\
        --input /mnt/llama3-datasets/alpaca_zh-train.json \\
        --tokenizer-name-or-path /mnt/llama3-ckpts/Meta-Llama-3.1-8B \\
        --output-prefix /mnt/llama3-datasets/alpaca_zh-sft \\
        --seq-length 2048 --generation llama3_1 [--packing] [--workers 4]

Pai-Megatron-Patch's spelling works too: --load DIR --patch-tokenizer-type LLama3Tokenizer
--sequence-packing --partitions 1.

writes <prefix>_input_ids_document.{bin,idx}, <prefix>_labels_document.{bin,idx} and
<prefix>_sft_meta.json; pass <prefix> as DATASET_PATH with SFT=true. All the work is in
megatron_patch.data.sft_build.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_patch.cli_args import OneLineErrors, check_output_path
from megatron_patch.fsutil import os_error_message


GENERATION_CHOICES = ["llama", "llama1", "llama2", "llama3", "llama3_1"]
# Pai-Megatron-Patch's --patch-tokenizer-type names -> chat template generation
PATCH_TOKENIZER_TYPES = {"llamatokenizer": "llama", "llama2tokenizer": "llama2",
                         "llama3tokenizer": "llama3_1"}


def generation_of_tokenizer_type(name: str) -> str:
    key = name.lower()
    if key in PATCH_TOKENIZER_TYPES:
        return PATCH_TOKENIZER_TYPES[key]
    if key in GENERATION_CHOICES:
        return key
    raise ValueError(f"--patch-tokenizer-type {name!r}: choose LLamaTokenizer, LLama2Tokenizer, "
                     "LLama3Tokenizer or a generation name")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(
        prog="build_idxmap_sft_dataset.py",  # the Pai tool name users know
        description="SFT records -> idxmap (token ids + labels).")
    p.add_argument("--input", required=True, nargs="+",
                   help="json/jsonl/parquet files, directories or glob patterns")
    p.add_argument("--tokenizer-name-or-path", "--load", dest="tokenizer", required=True,
                   help="local HF tokenizer (or HF checkpoint) directory")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--seq-length", type=int, required=True,
                   help="training SEQ_LEN; samples are cut to seq-length + 1 tokens")
    p.add_argument("--generation", choices=GENERATION_CHOICES,
                   help="chat template: llama3/llama3_1 headers, llama2 [INST], "
                        "llama/llama1 alpaca style (default llama3_1)")
    p.add_argument("--patch-tokenizer-type",
                   help="Pai-Megatron-Patch spelling of the generation: LLamaTokenizer, "
                        "LLama2Tokenizer or LLama3Tokenizer (used when --generation is absent)")
    p.add_argument("--packing", "--sequence-packing", dest="packing", action="store_true",
                   help="pack consecutive samples into sequences of up to seq-length + 1 tokens")
    p.add_argument("--partitions", type=int, default=1, choices=[1],
                   help="accepted for compatibility; output is always one partition")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record instead of skipping it")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_path(parser, "--output-prefix", args.output_prefix)
    if args.seq_length < 2:
        parser.error("--seq-length must be >= 2")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.log_interval < 0:
        parser.error("--log-interval must be >= 0")
    generation = args.generation or "llama3_1"
    if args.generation is None and args.patch_tokenizer_type:
        try:
            generation = generation_of_tokenizer_type(args.patch_tokenizer_type)
        except ValueError as exc:
            parser.error(str(exc))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from megatron_patch.data.problems import InputError
    from megatron_patch.data.sft_build import build_idxmap_sft_dataset, idxmap_paths
    from megatron_patch.tokenizer import TokenizerError

    try:
        r = build_idxmap_sft_dataset(args.input, args.tokenizer, args.output_prefix,
                                     args.seq_length, generation=generation,
                                     packing=args.packing, workers=args.workers,
                                     strict=args.strict, log_interval=args.log_interval,
                                     quiet=args.quiet)
    except (InputError, TokenizerError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a file where a directory must be...
        print(f"{parser.prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; no output written", file=sys.stderr)
        return 130
    skipped = sum(r.skipped.values())
    print(f"done: {r.samples} samples in {r.sequences} sequences, {r.tokens} tokens, "
          f"{r.truncated} truncated, skipped {skipped}"
          + (f" ({', '.join(f'{n} {k}' for k, n in r.skipped.items())})" if skipped else "")
          + f" in {r.seconds:.1f} s")
    paths = idxmap_paths(args.output_prefix)
    print(f"wrote {paths['input_ids']}.bin/.idx, {paths['labels']}.bin/.idx, {paths['meta']}")
    print(f"DATASET_PATH={args.output_prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
