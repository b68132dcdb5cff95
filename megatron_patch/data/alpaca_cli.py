"""Alpaca {instruction, input, output} records -> conversation records.

    python toolkits/sft_data_preprocessing/alpaca_converter.py \
        --data_path /path/alpaca_data.json --output_path /path/alpaca-data-conversation.json

Output: [{"id": "1", "conversations": [{"from": "human", "value": ...},
                                        {"from": "gpt", "value": ...}]}, ...]
--prompt-style plain (default): the human turn is the instruction (+ "\n\n" + input);
build_idxmap_sft_dataset.py / MP_DATASET_TYPE=raw add the generation's chat template.
--prompt-style alpaca: the human turn carries the classic alpaca prompt ("Below is an
instruction ... ### Response:"), the file layout FastChat/MindFormers pipelines expect.
"""
from __future__ import annotations

import os
import sys

from megatron_patch.cli_args import OneLineErrors, check_output_path
from megatron_patch.fsutil import os_error_message


def main(argv=None) -> int:
    p = OneLineErrors(
        prog="alpaca_converter.py",  # the Pai tool name users know
        description="alpaca json/jsonl/parquet -> conversation json")
    p.add_argument("--data_path", "--data-path", dest="data_path", required=True, nargs="+")
    p.add_argument("--output_path", "--output-path", dest="output_path", required=True,
                   help=".json (array) or .jsonl")
    p.add_argument("--prompt-style", default="plain", choices=["plain", "alpaca"])
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record instead of skipping it")
    args = p.parse_args(argv)
    check_output_path(p, "--output_path", args.output_path)
    if not args.output_path.endswith((".json", ".jsonl")):
        p.error(f"--output_path {args.output_path}: give a .json (one array) or .jsonl file name")
    same = [d for d in args.data_path if os.path.isfile(d) and os.path.exists(args.output_path)
            and os.path.samefile(d, args.output_path)]
    if same:
        p.error(f"--output_path {args.output_path} is also the input: it would be overwritten; "
                "choose another file name")

    from megatron_patch.data.alpaca_convert import convert_alpaca_file
    from megatron_patch.data.problems import InputError

    try:
        r = convert_alpaca_file(args.data_path, args.output_path, args.prompt_style, args.strict)
    except (InputError, ValueError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a file where a directory must be...
        print(f"{p.prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {r['records']} conversations to {args.output_path}; skipped {r['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
