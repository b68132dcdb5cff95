"""Tokenise json/jsonl/parquet/txt documents into megatron bin/idx pretraining data.

    python toolkits/pretrain_data_preprocessing/preprocess_data.py \\
        --input ./dataset/train.parquet \\
        --tokenizer-name-or-path ./model_from_hf/llama-3-8b-hf/ \\
        --output-prefix ./dataset/llama-3-8b-hf/alpaca \\
        --workers 4 --log-interval 1000 --append-eod

writes ./dataset/llama-3-8b-hf/alpaca_text_document.{bin,idx} (one pair per --json-keys key),
the DATASET_PATH the training launcher takes. All the work is in
megatron_patch.data.pretrain_preprocess.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_patch.cli_args import OneLineErrors, check_output_path
from megatron_patch.fsutil import os_error_message


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(
        prog="preprocess_data.py",  # the Pai tool name users know
        description="Documents -> <output-prefix>_<key>_document.{bin,idx} for megatron-core.")
    p.add_argument("--input", required=True, nargs="+",
                   help="json/jsonl/parquet/txt files, directories or glob patterns")
    p.add_argument("--tokenizer-name-or-path", "--tokenizer-model", dest="tokenizer",
                   required=True, help="local HF tokenizer directory (LLaMA-1/2 or Llama-3)")
    p.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"],
                   help="accepted for compatibility; HF tokenizers are the only kind")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="record keys (parquet columns) to tokenise, one dataset each")
    p.add_argument("--handler-name", default="GeneralPretrainHandler",
                   help="GeneralPretrainHandler (text of each --json-keys key) or "
                        "AlpacaPretrainHandler (alpaca records as one text)")
    p.add_argument("--append-eod", action="store_true",
                   help="end every document with the end-of-document id")
    p.add_argument("--no-bos", action="store_true",
                   help="tokenise without the tokenizer's special tokens (no BOS)")
    p.add_argument("--txt-mode", default="paragraph", choices=["paragraph", "line", "file"],
                   help="documents in .txt input: blank-line separated paragraphs, lines, "
                        "or whole files")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="log a progress line every N documents (0: never)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_path(parser, "--output-prefix", args.output_prefix)
    if args.handler_name not in ("GeneralPretrainHandler", "AlpacaPretrainHandler"):
        hint = (" (instruction data for SFT: toolkits/sft_data_preprocessing/"
                "build_idxmap_sft_dataset.py)" if "Instruction" in args.handler_name else "")
        parser.error(f"--handler-name {args.handler_name!r}: choose GeneralPretrainHandler or "
                     f"AlpacaPretrainHandler{hint}")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.log_interval < 0:
        parser.error("--log-interval must be >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from megatron_patch.data.pretrain_preprocess import preprocess_pretrain
    from megatron_patch.data.problems import InputError
    from megatron_patch.tokenizer import TokenizerError

    try:
        result = preprocess_pretrain(
            args.input, args.tokenizer, args.output_prefix, json_keys=args.json_keys,
            handler_name=args.handler_name, append_eod=args.append_eod, workers=args.workers,
            log_interval=args.log_interval, strict=args.strict,
            add_special_tokens=not args.no_bos, txt_mode=args.txt_mode, quiet=args.quiet)
    except (InputError, TokenizerError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a file where a directory must be...
        print(f"{parser.prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; no output written", file=sys.stderr)
        return 130
    secs = max(result.seconds, 1e-9)
    skipped = sum(result.skipped.values())
    print(f"done: {result.documents} documents, {result.tokens} tokens in {result.seconds:.1f} s "
          f"({result.documents / secs:.0f} docs/s, {result.tokens / secs:.0f} tokens/s); "
          f"skipped {skipped}" + (f" ({', '.join(f'{n} {k}' for k, n in result.skipped.items())})"
                                  if skipped else ""))
    for prefix in result.prefixes.values():
        print(f"wrote {prefix}.bin and {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
