"""Alpaca files -> conversation files ({id, conversations: [{from, value}]}), the layout
FastChat and MindFormers train on (``toolkits/sft_data_preprocessing/alpaca_converter.py``)."""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence, Union

from .indexed_writer import tmp_path
from .problems import InputError, Problem, ProblemLog, RecordError
from .sft_records import alpaca_to_conversation
from .sources import chunk_records, expand_inputs, iter_chunks


def convert_alpaca_file(inputs: Union[str, Sequence[str]], output_path: str,
                        prompt_style: str = "plain", strict: bool = False,
                        log: ProblemLog = None) -> Dict[str, int]:
    """Write ``output_path`` (a JSON array, or JSON lines if it ends in .jsonl); ids count
    from 1 in input order. Returns {"records": n, "skipped": m}."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    files = expand_inputs(inputs)
    log = log or ProblemLog(strict=strict)
    records = []
    for path in files:
        for chunk in iter_chunks(path):
            for line, rec in chunk_records(chunk):
                if isinstance(rec, Problem):
                    log.add(rec)
                    continue
                try:
                    records.append(alpaca_to_conversation(rec, len(records) + 1, prompt_style))
                    log.accept()
                except RecordError as exc:
                    log.add(Problem(chunk.source, line, exc.kind, exc.detail, chunk.unit))
    if not records:
        raise log.nothing_left("alpaca records to convert", files)
    tmp = tmp_path(output_path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            if output_path.endswith(".jsonl"):
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                json.dump(records, f, ensure_ascii=False, indent=2)
                f.write("\n")
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"records": len(records), "skipped": log.total}
