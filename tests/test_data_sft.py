"""SFT: chat templates, labels, idxmap builder vs raw-JSON dataset, converter."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_fixtures import (llama3_tokenizer, llama3_tokenizer_dir, spm_tokenizer,  # noqa: F401
                           spm_tokenizer_dir, write_jsonl)

from megatron_patch.data.alpaca_convert import convert_alpaca_file
from megatron_patch.data.corpus import bundled_sft_path
from megatron_patch.data.problems import InputError
from megatron_patch.data.sft_build import build_idxmap_sft_dataset, idxmap_paths
from megatron_patch.data.sft_dataset import SFTDataset
from megatron_patch.data.sft_encode import SFTEncoder
from megatron_patch.data.sft_records import alpaca_to_conversation, record_to_messages
from megatron_patch.tokenizer.chat_templates import BY_GENERATION

ROOT = pathlib.Path(__file__).resolve().parents[1]
SFT_DIR = ROOT / "toolkits" / "sft_data_preprocessing"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Name a fruit.\n"},
     {"role": "assistant", "content": "Apple.\n\n"},
     {"role": "user", "content": "Another one, with (parentheses)?"},
     {"role": "assistant", "content": "(Pear) - a pome. 日本語 too 🙂"}],
    [{"role": "user", "content": "List:\n- a\n- b"},
     {"role": "assistant", "content": "\n1. first\n2. second"}],
]


def _tok(name, llama3_tokenizer, spm_tokenizer):
    return llama3_tokenizer if name.startswith("llama3") else spm_tokenizer


@pytest.mark.parametrize("generation", ["llama3_1", "llama3", "llama2", "llama"])
def test_template_equals_apply_chat_template(generation, llama3_tokenizer, spm_tokenizer):
    tok = _tok(generation, llama3_tokenizer, spm_tokenizer)
    enc = SFTEncoder(tok, generation)
    # the llama3 tokenizer dir carries the template itself; others are passed explicitly
    template = None if generation.startswith("llama3") else BY_GENERATION[generation]
    for messages, (ids, labels) in zip(CONVERSATIONS, enc.encode_messages(CONVERSATIONS)):
        text = tok.hf.apply_chat_template(messages, tokenize=False, chat_template=template)
        assert enc.render(messages)[0] == text
        ref = tok.hf.apply_chat_template(messages, tokenize=True, chat_template=template)
        assert ids.tolist() == ref["input_ids"]
        assert ids.dtype == labels.dtype == np.int32


def test_llama3_labels_are_exactly_the_answers(llama3_tokenizer):
    tok = llama3_tokenizer
    (ids, labels), = SFTEncoder(tok, "llama3_1").encode_messages([CONVERSATIONS[1]])
    # independent reconstruction: after each assistant header comes encode(answer) + <|eot_id|>
    header = [128006, tok.token_id("assistant"), 128007, tok.encode("\n\n", False)[0]]
    answers = [m["content"].strip() for m in CONVERSATIONS[1] if m["role"] == "assistant"]
    expected = np.full(len(ids), -100)
    ids_l, k = ids.tolist(), 0
    for i in range(len(ids_l) - 3):
        if ids_l[i:i + 4] == header:
            span = tok.encode(answers[k], False) + [128009]
            assert ids_l[i + 4:i + 4 + len(span)] == span
            expected[i + 4:i + 4 + len(span)] = span
            k += 1
    assert k == 2 and labels.tolist() == expected.tolist()


def test_llama2_labels_cover_answers_and_eos(spm_tokenizer):
    tok = spm_tokenizer
    messages = CONVERSATIONS[1]
    (ids, labels), = SFTEncoder(tok, "llama2").encode_messages([messages])
    train = labels != -100
    assert (labels[train] == ids[train]).all()
    # contiguous runs of answer tokens, one per assistant turn, each ending with </s>
    edges = np.flatnonzero(np.diff(np.concatenate([[0], train.astype(int), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for (a, b), answer in zip(runs, answers):
        assert ids[b - 1] == tok.eos_id
        assert tok.decode(ids[a:b - 1]).strip() == answer
        assert tok.decode(ids[:a]).rstrip().endswith("[/INST]")  # the prompt stops right there


@pytest.mark.parametrize("generation", ["llama3_1", "llama2", "llama"])
def test_alpaca_record_equals_its_converted_conversation(generation, llama3_tokenizer,
                                                         spm_tokenizer):
    enc = SFTEncoder(_tok(generation, llama3_tokenizer, spm_tokenizer), generation)
    records = json.load(open(bundled_sft_path("alpaca")))[:6]
    direct = enc.encode_messages([record_to_messages(r) for r in records])
    converted = enc.encode_messages([record_to_messages(alpaca_to_conversation(r, i))
                                     for i, r in enumerate(records)])
    for (a, la), (b, lb) in zip(direct, converted):
        assert a.tolist() == b.tolist() and la.tolist() == lb.tolist()


def test_converter_layouts(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Give a tip.", "input": "", "output": "Sleep well."},
        {"instruction": "Sum.", "input": "1 2", "output": "3"},
        {"instruction": "no output"}])
    out = tmp_path / "conv.json"
    with pytest.raises(InputError, match=r"a\.jsonl:3: missing key 'output'"):
        convert_alpaca_file(src, str(out), "alpaca", strict=True)
    assert not out.exists()
    r = convert_alpaca_file(src, str(out), "alpaca")
    assert r == {"records": 2, "skipped": 1}
    conv = json.load(open(out))
    assert conv[1]["id"] == "2"
    assert [t["from"] for t in conv[1]["conversations"]] == ["human", "gpt"]
    human = conv[1]["conversations"][0]["value"]
    assert human.startswith("Below is an instruction that describes a task.")
    assert human.endswith("### Instruction:\nSum.\n\n### Input:\n1 2\n\n### Response:")
    convert_alpaca_file(src, str(tmp_path / "plain.jsonl"), "plain")
    plain = [json.loads(x) for x in open(tmp_path / "plain.jsonl")]
    assert plain[1]["conversations"][0]["value"] == "Sum.\n\n1 2"


def _write_mixed(tmp_path):
    alpaca = json.load(open(bundled_sft_path("alpaca")))
    conv = json.load(open(bundled_sft_path("conversation")))
    recs = alpaca[:10] + conv + alpaca[10:]
    return write_jsonl(tmp_path / "mixed.jsonl", recs), len(recs)


@pytest.mark.parametrize("packing", [False, True])
def test_idxmap_and_raw_give_identical_items(tmp_path, llama3_tokenizer, packing):
    src, n = _write_mixed(tmp_path)
    seq_len = 64  # short: some samples are truncated, some lose every answer token
    prefix = str(tmp_path / "sft")
    r = build_idxmap_sft_dataset(src, llama3_tokenizer, prefix, seq_len, packing=packing,
                                 workers=2, quiet=True)
    assert r.truncated > 0 and r.skipped.get("no answer token within seq_len", 0) > 0
    idx = SFTDataset(prefix, llama3_tokenizer, seq_len, packing=packing, verbose=False)
    raw = SFTDataset(src, llama3_tokenizer, seq_len, kind="raw", packing=packing, verbose=False)
    assert len(idx) == len(raw) == r.sequences and raw.skipped == r.skipped
    assert idx.skipped == {}  # the builder already dropped (and reported) those
    assert r.samples + sum(r.skipped.values()) == n
    for i in range(len(raw)):
        a, b = idx[i], raw[i]
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert a["labels"].tolist() == b["labels"].tolist()
    if packing:
        assert len(raw) < r.samples
    import pickle  # DataLoader workers under spawn receive pickled datasets
    again = pickle.loads(pickle.dumps(idx))
    assert again[len(idx) - 1]["labels"].tolist() == idx[len(idx) - 1]["labels"].tolist()
    # a fresh dataset over the unpacked idxmap, packed at load time, is the same again
    if not packing:
        packed_raw = SFTDataset(src, llama3_tokenizer, seq_len, kind="raw", packing=True,
                                verbose=False)
        packed_idx = SFTDataset(prefix, llama3_tokenizer, seq_len, packing=True, verbose=False)
        assert [x["labels"].tolist() for x in packed_raw] == \
            [x["labels"].tolist() for x in packed_idx]


def test_item_is_next_token_shifted(tmp_path, llama3_tokenizer):
    path = bundled_sft_path("conversation")
    ds = SFTDataset(path, llama3_tokenizer, 256, kind="raw", verbose=False)
    for i in range(len(ds)):
        ids, token_labels = ds.sample(i)
        item = ds[i]
        x, y = item["input_ids"], item["labels"]
        assert x.shape == y.shape == (256,)
        assert x.dtype == y.dtype == torch.int64
        n = len(ids)
        assert x[:n].tolist() == ids.tolist() and (x[n:] == llama3_tokenizer.pad_id).all()
        assert y[:n - 1].tolist() == token_labels[1:].tolist() and (y[n - 1:] == -100).all()
        on = (y != -100).nonzero().flatten()
        assert len(on) > 0 and (x[on + 1] == y[on]).all()  # target = the next input token
        assert y[on[-1]] == 128009  # every answer closes with <|eot_id|>


def test_idxmap_stores_int32_and_checks_tokenizer(tmp_path, llama3_tokenizer, spm_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    prefix = str(tmp_path / "s")
    build_idxmap_sft_dataset(bundled_sft_path("alpaca"), llama3_tokenizer, prefix, 512, quiet=True)
    paths = idxmap_paths(prefix)
    ids, labels = IndexedDataset(paths["input_ids"]), IndexedDataset(paths["labels"])
    assert ids.index.dtype == labels.index.dtype == np.int32
    first = ids[0]
    assert first[0] == 128000 and first.max() > 65535 and labels[0].min() == -100
    assert json.load(open(paths["meta"]))["generation"] == "llama3_1"
    with pytest.raises(InputError, match="128256-token vocabulary"):
        SFTDataset(prefix, spm_tokenizer, 512, generation="llama2")
    with pytest.raises(InputError, match="built with the llama3_1 chat template"):
        SFTDataset(prefix, llama3_tokenizer, 512, generation="llama2")


BAD_SFT = [
    {"instruction": "ok", "output": "fine"},
    {"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
    {"instruction": "missing output"},
    {"conversations": [{"from": "human", "value": "q"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    {"something": "else"},
]


def test_bad_sft_records(tmp_path, llama3_tokenizer, spm_tokenizer, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_SFT)
    with open(src, "a") as f:
        f.write('{"instruction": \n')
    prefix = str(tmp_path / "o")
    r = build_idxmap_sft_dataset(src, llama3_tokenizer, prefix, 128, quiet=True)
    err = capsys.readouterr().err
    for line, what in [(2, "turns must alternate user/assistant"), (3, "unknown speaker 'robot'"),
                       (4, "missing key 'output'"), (5, "conversation ends without an answer"),
                       (6, "empty message"), (7, "unknown SFT record"), (8, "malformed JSON")]:
        assert f"{src}:{line}: {what}" in err
    assert r.samples == 1 and sum(r.skipped.values()) == 7
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InputError, match=r"bad\.jsonl:2: turns must alternate"):
        build_idxmap_sft_dataset(src, llama3_tokenizer, str(tmp_path / "strict"), 128,
                                 strict=True, quiet=True)
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(ValueError, match="needs a Llama-3 tokenizer"):
        SFTEncoder(spm_tokenizer, "llama3_1")


@pytest.mark.slow
def test_sft_wrapper_from_another_directory(tmp_path, llama3_tokenizer_dir, llama3_tokenizer):
    conv = tmp_path / "conv.json"
    convert_alpaca_file(bundled_sft_path("alpaca"), str(conv))
    env = dict(os.environ, MP_PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    script = str(SFT_DIR / "run_build_idxmap_sft_dataset.sh")
    bad = subprocess.run(["sh", script, str(conv), "LLama3Tokenizer", "12x", "out",
                          llama3_tokenizer_dir],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: SEQ_LEN must be a positive integer, got '12x'"
    p = subprocess.run(["sh", script, "conv.json", "LLama3Tokenizer", "256", "sft",
                        llama3_tokenizer_dir, "true", "2"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert "DATASET_PATH=sft" in p.stdout
    idx = SFTDataset(str(tmp_path / "sft"), llama3_tokenizer, 256, packing=False, verbose=False)
    raw = SFTDataset(bundled_sft_path("alpaca"), llama3_tokenizer, 256, kind="raw",
                     packing=True, verbose=False)
    assert [x["labels"].tolist() for x in idx] == [x["labels"].tolist() for x in raw]


def test_build_cli_accepts_pai_spelling(tmp_path, spm_tokenizer_dir, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_sft_script",
                                                  SFT_DIR / "build_idxmap_sft_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--input", bundled_sft_path("conversation"), "--load", spm_tokenizer_dir,
            "--output-prefix", str(tmp_path / "s"), "--seq-length", "128", "--quiet"]
    assert mod.main(args + ["--patch-tokenizer-type", "LLama2Tokenizer",
                            "--sequence-packing", "--partitions", "1"]) == 0
    meta = json.load(open(idxmap_paths(str(tmp_path / "s"))["meta"]))
    assert (meta["generation"], meta["packing"], meta["samples"]) == ("llama2", True, 8)
    with pytest.raises(SystemExit) as exc:
        mod.main(args + ["--patch-tokenizer-type", "GPT2Tokenizer"])
    assert exc.value.code == 2 and "LLama3Tokenizer" in capsys.readouterr().err


def test_samples_are_kept_exactly_when_their_training_item_has_a_target():
    """encode_sft_chunk keeps a sample iff has_loss: that must hold exactly when the item the
    trainer builds from it (make_item, the next-token shift) has a target, including an
    answer token that is the window's very last target (token seq_len) or just past it."""
    from megatron_patch.data.sft_encode import IGNORE_INDEX, has_loss, make_item
    seq_len, rng = 8, np.random.default_rng(0)
    cases = [np.full(12, IGNORE_INDEX) for _ in range(3)]
    cases[0][seq_len] = 5       # the last target of the window: learned
    cases[1][seq_len + 1] = 5   # one past the window: nothing learned
    cases[2][0] = 5             # token 0 is never a target
    for _ in range(200):
        labels = np.where(rng.random(12) < 0.1, 7, IGNORE_INDEX)
        cases.append(labels)
    for labels in cases:
        ids = np.arange(len(labels))
        _, item_labels = make_item(ids, labels.astype(np.int32), seq_len, pad_id=0)
        assert has_loss(labels, seq_len) == bool((item_labels != IGNORE_INDEX).any()), labels
    assert has_loss(cases[0], seq_len) and not has_loss(cases[1], seq_len) \
        and not has_loss(cases[2], seq_len)
