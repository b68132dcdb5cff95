"""Input files -> chunks of records, each record tagged with its file and line (or row).

Formats, chosen by extension:
  .jsonl/.ndjson  one JSON object per line (blank lines ignored)
  .json           a JSON array of objects, or JSON lines when the file does not start with '['
  .parquet        one record per row (columns as keys)
  .txt            documents are paragraphs separated by blank lines (``txt_mode="paragraph"``),
                  single lines (``"line"``) or the whole file (``"file"``)

JSON lines travel to the workers as raw bytes and are decoded/parsed there (that is where the
time goes); the other formats are read here. ``chunk_records`` turns any chunk into a list of
``(line, record_or_Problem)``.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

from .problems import InputError, Problem

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".txt": "txt", ".text": "txt"}
TXT_MODES = ("paragraph", "line", "file")


@dataclass
class Chunk:
    source: str
    kind: str            # "lines": raw JSONL bytes; "records": already-read records
    first_line: int = 1  # for "lines"
    data: bytes = b""
    records: list = field(default_factory=list)  # for "records": [(line, obj | Problem)]
    nbytes: int = 0      # input bytes this chunk stands for (progress bar)
    unit: str = "line"


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files, directories (their supported files, sorted) and glob patterns, in order."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if os.path.splitext(f)[1].lower() in EXTENSIONS)
            if not found:
                raise InputError(f"{item}: directory has no {'/'.join(EXTENSIONS)} files")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise InputError(f"{item}: no file matches")
            files += found
        else:
            raise InputError(f"{item}: no such file or directory")
    for f in files:
        input_format(f)
    return files


def input_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(f"{path}: unsupported input type {ext or '(no extension)'}; use "
                         + ", ".join(EXTENSIONS))
    return EXTENSIONS[ext]


def iter_chunks(path: str, columns: Optional[Sequence[str]] = None,
                optional_columns: Sequence[str] = (), txt_mode: str = "paragraph",
                txt_key: str = "text", chunk_bytes: int = 1 << 20,
                chunk_records: int = 1024) -> Iterator[Chunk]:
    """Chunks of ``path``. Parquet reads only ``columns`` (all when None), each of which must
    exist unless listed in ``optional_columns``; plain-text documents become records
    ``{txt_key: text}``."""
    fmt = input_format(path)
    if fmt in ("json", "jsonl"):
        if fmt == "json" and _starts_with_bracket(path):
            yield from _json_array_chunks(path, chunk_records)
        else:
            yield from _jsonl_chunks(path, chunk_bytes)
    elif fmt == "parquet":
        yield from _parquet_chunks(path, columns, optional_columns, chunk_records)
    else:
        yield from _txt_chunks(path, txt_mode, txt_key, chunk_records)


# -- JSON lines ------------------------------------------------------------------------------
def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"["


def _jsonl_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    line = 1
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one very long line: keep reading
                rest = block
                continue
            data, rest = block[:cut], block[cut:]
            yield Chunk(path, "lines", first_line=line, data=data, nbytes=len(data))
            line += data.count(b"\n")
    if rest:
        yield Chunk(path, "lines", first_line=line, data=rest, nbytes=len(rest))


def _utf8_problem(path: str, line: int, raw: bytes, exc: UnicodeDecodeError) -> Problem:
    return Problem(path, line, "invalid UTF-8",
                   f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")


def _parse_lines(chunk: Chunk) -> list:
    out = []
    for i, raw in enumerate(chunk.data.split(b"\n")):
        line = chunk.first_line + i
        if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append((line, _utf8_problem(chunk.source, line, raw, exc)))
            continue
        try:
            out.append((line, json.loads(text)))
        except json.JSONDecodeError as exc:
            out.append((line, Problem(chunk.source, line, "malformed JSON",
                                      f"{exc.msg} at column {exc.colno}")))
    return out


def chunk_records(chunk: Chunk) -> list:
    """[(line, record | Problem)] for any chunk."""
    return _parse_lines(chunk) if chunk.kind == "lines" else chunk.records


# -- JSON array ------------------------------------------------------------------------------
def _json_array_chunks(path: str, chunk_records: int) -> Iterator[Chunk]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                         f"{col}); a JSON array cannot be read past it - fix the file or use "
                         "JSON lines, where bad lines are skipped") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    batch: list = []
    size = 0

    def fail(msg: str, at: int):
        ln = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        raise InputError(f"{path}:{ln}: malformed JSON array ({msg} at column {col}); records "
                         "after this point cannot be read - fix the file or use JSON lines")

    n = len(text)
    first = True
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            fail("missing closing ']'", n)
        if text[pos] == "]":
            break
        if not first:
            if text[pos] != ",":
                fail("expected ',' or ']'", pos)
            pos += 1
            while pos < n and text[pos] in " \t\r\n":
                pos += 1
        first = False
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            fail(exc.msg, exc.pos)
        batch.append((line, obj))
        size += end - pos
        pos = end
        if len(batch) >= chunk_records:
            yield Chunk(path, "records", records=batch, nbytes=size)
            batch, size = [], 0
    if text[pos + 1:].strip():
        fail("unexpected data after the closing ']'", pos + 1)
    if batch:
        yield Chunk(path, "records", records=batch, nbytes=size)


# -- parquet ---------------------------------------------------------------------------------
def _parquet_chunks(path: str, columns: Optional[Sequence[str]], optional: Sequence[str],
                    chunk_records: int):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    available = pf.schema_arrow.names
    wanted = None
    if columns is not None:
        missing = [c for c in columns if c not in available and c not in optional]
        if missing:  # a whole column missing is one error, not one skipped record per row
            raise InputError(f"{path}: no column {', '.join(missing)} "
                             f"(columns: {', '.join(available)})")
        wanted = [c for c in columns if c in available]
    total_rows = max(pf.metadata.num_rows, 1)
    file_size = os.path.getsize(path)
    row = 1
    for batch in pf.iter_batches(batch_size=chunk_records, columns=wanted):
        rows = batch.to_pylist()
        recs = [(row + i, {k: v for k, v in r.items() if v is not None})
                for i, r in enumerate(rows)]
        row += len(rows)
        yield Chunk(path, "records", records=recs, unit="row",
                    nbytes=int(file_size * len(rows) / total_rows))


# -- plain text ------------------------------------------------------------------------------
def _txt_chunks(path: str, mode: str, key: str, chunk_records: int) -> Iterator[Chunk]:
    if mode not in TXT_MODES:
        raise InputError(f"txt mode {mode!r}: choose one of {', '.join(TXT_MODES)}")
    batch: list = []
    nbytes = 0
    doc_lines: List[str] = []
    doc_start, doc_problem = 0, None

    def flush():
        nonlocal doc_lines, doc_problem
        if doc_problem is not None:
            batch.append((doc_start, doc_problem))
        elif doc_lines:
            text = "".join(doc_lines)
            # a paragraph or line is its text without the final line break
            batch.append((doc_start, {key: text if mode == "file" else text.rstrip("\r\n")}))
        doc_lines, doc_problem = [], None

    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            nbytes += len(raw)
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            blank = not raw.strip()
            if mode == "paragraph" and blank:
                flush()
                continue
            if mode == "line":
                flush()
                if blank:
                    continue
            if not doc_lines and doc_problem is None:
                doc_start = line_no
            try:
                doc_lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                if doc_problem is None:
                    doc_problem = _utf8_problem(path, line_no, raw, exc)
            if len(batch) >= chunk_records:
                yield Chunk(path, "records", records=batch, nbytes=nbytes)
                batch, nbytes = [], 0
    flush()
    if batch or nbytes:
        yield Chunk(path, "records", records=batch, nbytes=nbytes)
