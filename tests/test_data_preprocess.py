"""preprocess_data.py: documents -> megatron bin/idx, checked against the tokenizer's own ids."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from data_fixtures import (llama3_tokenizer, llama3_tokenizer_dir, read_indexed,  # noqa: F401
                           sample_texts, spm_tokenizer, spm_tokenizer_dir, write_docs,
                           write_jsonl, write_parquet)

from megatron_patch.data.pretrain_preprocess import preprocess_pretrain
from megatron_patch.data.problems import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "toolkits" / "pretrain_data_preprocessing" / "preprocess_data.py"


def _files(path):
    return sorted(os.listdir(path))


def _bytes(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.fixture(params=["llama3", "spm"])
def tok(request, llama3_tokenizer, spm_tokenizer):
    return llama3_tokenizer if request.param == "llama3" else spm_tokenizer


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_round_trip(tmp_path, tok, fmt, workers):
    texts = sample_texts(10)
    src = write_docs(tmp_path, fmt, texts)
    out = tmp_path / "out"
    out.mkdir()
    eod = workers == 2  # both settings are covered for every format and tokenizer
    r = preprocess_pretrain(src, tok, str(out / "corpus"), append_eod=eod, workers=workers,
                            quiet=True, chunk_bytes=256)
    assert r.prefixes == {"text": str(out / "corpus_text_document")}
    ds, docs = read_indexed(r.prefixes["text"])
    expected = [tok.hf(t)["input_ids"] + ([tok.eod_id] if eod else []) for t in texts]
    assert docs == expected
    assert ds.index.dtype == (np.int32 if tok.vocab_size > 65500 else np.uint16)
    assert (r.documents, r.tokens, r.skipped) == (len(texts), sum(map(len, expected)), {})
    assert _files(out) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_output_identical_for_any_worker_count(tmp_path, llama3_tokenizer):
    from megatron_patch.data.corpus import corpus_documents
    docs = corpus_documents()[:60]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    outputs = []
    for workers in (1, 2, 3):
        r = preprocess_pretrain(src, llama3_tokenizer, str(tmp_path / f"w{workers}"),
                                append_eod=True, workers=workers, quiet=True, chunk_bytes=4096)
        outputs.append(_bytes(r.prefixes["text"]))
    assert outputs[0] == outputs[1] == outputs[2]
    _, got = read_indexed(str(tmp_path / "w2_text_document"))
    assert got == [llama3_tokenizer.encode(d["text"]) + [128001] for d in docs]  # input order


def test_no_bos_and_several_keys(tmp_path, spm_tokenizer):
    recs = [{"title": f"Title {i}", "text": f"Body number {i} of the document."} for i in range(5)]
    recs.insert(2, {"title": "only a title"})  # skipped for both datasets: they stay aligned
    src = write_parquet(tmp_path / "d.parquet", recs)
    r = preprocess_pretrain(src, spm_tokenizer, str(tmp_path / "o"), json_keys=["text", "title"],
                            add_special_tokens=False, quiet=True)
    assert r.skipped == {"missing key 'text'": 1}
    for key in ("text", "title"):
        _, got = read_indexed(r.prefixes[key])
        want = [r_[key] for r_ in recs if "text" in r_]
        assert got == [spm_tokenizer.hf(t, add_special_tokens=False)["input_ids"] for t in want]


def test_alpaca_pretrain_handler(tmp_path, llama3_tokenizer):
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    src = write_jsonl(tmp_path / "a.jsonl", recs)
    r = preprocess_pretrain(src, llama3_tokenizer, str(tmp_path / "o"),
                            handler_name="AlpacaPretrainHandler", append_eod=True, quiet=True)
    pre = ("Below is an instruction that describes a task. Write a response that appropriately "
           "completes the request.\n\n### Instruction:\n")
    texts = [pre + "Name a colour.\n\n### Response:\nBlue.",
             pre + "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5"]
    _, got = read_indexed(r.prefixes["text"])
    assert got == [llama3_tokenizer.encode(t) + [128001] for t in texts]


BAD_JSONL = (b'{"text": "good one"}\n'
             b'{"text": "unterminated\n'
             b'\n'
             b'{"body": "no text key"}\n'
             b'{"text": "   "}\n'
             b'{"text": "bad byte \xff here"}\n'
             b'["not", "an", "object"]\n'
             b'{"text": 42}\n'
             b'{"text": "good two"}\n')


def test_bad_records_are_reported_and_skipped(tmp_path, llama3_tokenizer, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(BAD_JSONL)
    r = preprocess_pretrain(str(src), llama3_tokenizer, str(tmp_path / "o"), quiet=True)
    err = capsys.readouterr().err
    for line, what in [(2, "malformed JSON"), (4, "missing key 'text'"), (5, "empty document"),
                       (6, "invalid UTF-8 (byte 0xff at column 20)"),
                       (7, "record is not a JSON object (list)"),
                       (8, "key 'text' is not a string")]:
        assert f"{src}:{line}: {what}" in err
    assert sum(r.skipped.values()) == 6 and r.documents == 2
    _, got = read_indexed(r.prefixes["text"])
    assert got == [llama3_tokenizer.encode("good one"), llama3_tokenizer.encode("good two")]


def test_strict_stops_and_keeps_previous_output(tmp_path, llama3_tokenizer):
    good = [{"text": f"document {i} " * 20} for i in range(200)]
    src = tmp_path / "in.jsonl"
    write_jsonl(src, good)
    prefix = str(tmp_path / "out" / "o")
    os.makedirs(tmp_path / "out")
    preprocess_pretrain(str(src), llama3_tokenizer, prefix, quiet=True)
    before = _bytes(prefix + "_text_document")
    with open(src, "ab") as f:  # a bad record far past the first chunks
        f.write(b'{"text": oops}\n')
    with pytest.raises(InputError, match=rf"in\.jsonl:201: malformed JSON.*--strict"):
        preprocess_pretrain(str(src), llama3_tokenizer, prefix, strict=True, workers=2,
                            quiet=True, chunk_bytes=2048)
    assert _files(tmp_path / "out") == ["o_text_document.bin", "o_text_document.idx"]
    assert _bytes(prefix + "_text_document") == before


def test_unreadable_inputs_are_hard_errors(tmp_path, llama3_tokenizer):
    arr = tmp_path / "a.json"
    arr.write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n')
    with pytest.raises(InputError, match=r"a\.json:4: malformed JSON array"):
        preprocess_pretrain(str(arr), llama3_tokenizer, str(tmp_path / "o"), quiet=True)
    arr.write_bytes(b'[\n {"text": "a"},\n {"text": "\xc3("}\n]\n')
    with pytest.raises(InputError, match=r"a\.json:3: invalid UTF-8"):
        preprocess_pretrain(str(arr), llama3_tokenizer, str(tmp_path / "o"), quiet=True)
    pq = write_parquet(tmp_path / "p.parquet", [{"content": "x"}])
    with pytest.raises(InputError, match=r"p\.parquet: no column text \(columns: content\)"):
        preprocess_pretrain(pq, llama3_tokenizer, str(tmp_path / "o"), quiet=True)
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(InputError, match="no documents"):
        preprocess_pretrain(str(empty), llama3_tokenizer, str(tmp_path / "o"), quiet=True)
    with pytest.raises(InputError, match="no such file"):
        preprocess_pretrain(str(tmp_path / "missing.jsonl"), llama3_tokenizer,
                            str(tmp_path / "o"), quiet=True)
    assert not any(n.startswith("o") for n in os.listdir(tmp_path))


def test_parquet_nulls_and_txt_bad_bytes(tmp_path, llama3_tokenizer, capsys):
    pq = write_parquet(tmp_path / "p.parquet", [{"text": "one"}, {"text": None}, {"text": "two"}])
    r = preprocess_pretrain(pq, llama3_tokenizer, str(tmp_path / "p"), quiet=True)
    assert r.documents == 2 and f"{pq}: row 2: missing key 'text'" in capsys.readouterr().err
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"first paragraph\nstill first\n\nbad \xfe para\n\nlast one\n")
    r = preprocess_pretrain(str(txt), llama3_tokenizer, str(tmp_path / "t"), quiet=True)
    assert f"{txt}:4: invalid UTF-8" in capsys.readouterr().err
    _, got = read_indexed(r.prefixes["text"])
    assert got == [llama3_tokenizer.encode(t) for t in ("first paragraph\nstill first", "last one")]


def _load_script():
    spec = importlib.util.spec_from_file_location("preprocess_data_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_errors_are_one_line(tmp_path, llama3_tokenizer_dir, capsys):
    main = _load_script().main
    rc = main(["--input", str(tmp_path / "nope.jsonl"), "--tokenizer-name-or-path",
               llama3_tokenizer_dir, "--output-prefix", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"preprocess_data.py: error: {tmp_path / 'nope.jsonl'}: "
                               "no such file or directory"]
    # argparse errors exit before megatron_patch is even imported
    p = subprocess.run([sys.executable, str(SCRIPT), "--input", "x.jsonl",
                        "--tokenizer-name-or-path", "t", "--output-prefix", "o", "--workers", "0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "preprocess_data.py: error: --workers must be >= 1 (see --help)"]


@pytest.mark.slow
def test_cli_from_another_directory(tmp_path, llama3_tokenizer_dir, llama3_tokenizer):
    # the seed's command line, run from an unrelated cwd, as a user would
    texts = sample_texts(6)
    src = write_jsonl(tmp_path / "in.jsonl", texts, key="content")
    with open(src, "a") as f:
        f.write("{broken\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    os.makedirs(tmp_path / "data")
    p = subprocess.run([sys.executable, str(SCRIPT), "--input", src, "--tokenizer-name-or-path",
                        llama3_tokenizer_dir, "--output-prefix", "data/alpaca",
                        "--json-keys", "content", "--workers", "2", "--log-interval", "2",
                        "--append-eod", "--tokenizer-type", "PretrainedFromHF"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert f"{src}:{len(texts) + 1}: malformed JSON" in p.stderr
    assert re.search(r"processed \d+ documents, \d+ tokens \(.* docs/s, .* tokens/s", p.stderr)
    assert f"done: {len(texts)} documents" in p.stdout and "skipped 1" in p.stdout
    _, got = read_indexed(str(tmp_path / "data" / "alpaca_content_document"))
    assert got == [llama3_tokenizer.encode(t) + [128001] for t in texts]
