"""Streaming detokenisation with stop strings (inference.text_stream), on the tiny byte-level
BPE tokenizer (multi-byte characters split over tokens) and, for the leading-space rule,
a sentencepiece tokenizer. The reference is one plain ``decode`` of all tokens."""
import pytest

TEXT = "Hello! How are you today? Ünïcödé 日本語 🙂 and the stars."


@pytest.fixture(scope="module")
def tok():
    from megatron_patch.evaluation.tiny_model import build_tokenizer
    return build_tokenizer()


def _run(tok, ids, **kw):
    from megatron_patch.inference.text_stream import TextStream

    s = TextStream(tok, **kw)
    parts = [s.push(t) for t in ids]
    parts.append(s.close())
    return s, parts


def test_deltas_join_to_the_plain_decode(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.encode()) // 4  # multi-byte characters span tokens
    s, parts = _run(tok, ids)
    assert "".join(parts) == tok.decode(ids) == TEXT == s.text
    assert not any("\ufffd" in p for p in parts)  # never half a character
    assert s.finish_reason is None and s.num_tokens == len(ids)
    # cut inside a character: the end shows what decode shows (U+FFFD), not less
    cut = next(n for n in range(len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    _, parts = _run(tok, ids[:cut])
    assert "".join(parts) == tok.decode(ids[:cut])


def test_stop_strings(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    cases = ((["are you"], "Hello! How "), (["xyz", "本語"], "Hello! How are you today? Ünïcödé 日"),
             (["?"], "Hello! How are you today"))
    for stop, want in cases:
        s, parts = _run(tok, ids, stop=stop)
        assert "".join(parts) == want and s.finish_reason == "stop", stop
        assert s.num_tokens < len(ids)  # noticed as soon as the stop string was complete
    # text that could still become a stop string is held back, and released once it cannot
    stop = "How are we"
    s, parts = _run(tok, ids, stop=[stop])
    assert "".join(parts) == TEXT and s.finish_reason is None
    shown = ""
    for p in parts[:-1]:
        shown += p
        assert not any(shown.endswith(stop[:k]) for k in range(1, len(stop))), shown
    assert "".join(parts[:-1]).startswith("Hello! How are you")


def test_eos_ends_and_is_not_shown(tok):
    ids = tok.encode("Hello! How", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|eot_id|>")
    s, parts = _run(tok, ids + [eos] + ids, eos_ids=[eos])
    assert "".join(parts) == "Hello! How" and s.finish_reason == "stop"
    assert s.num_tokens == len(ids) + 1


def test_prompt_context_keeps_a_leading_space(tmp_path):
    """sentencepiece drops the leading space of a text decoded alone; with the prompt's last
    tokens as context the completion keeps it (as a completion client expects)."""
    from megatron_patch.tokenizer import train_sentencepiece_tokenizer

    from megatron_patch.tokenizer import load_tokenizer

    d = train_sentencepiece_tokenizer(str(tmp_path / "sp"), [TEXT * 3, "the capital of France "
                                      "is Paris, the capital of Italy is Rome"] * 50,
                                      vocab_size=300)
    tok = load_tokenizer(d).hf
    prompt = tok.encode("the capital of France is")
    whole = tok.encode("the capital of France is Paris", add_special_tokens=True)
    assert whole[:len(prompt)] == prompt
    new = whole[len(prompt):]
    assert not tok.decode(new).startswith(" ")
    _, parts = _run(tok, new, prompt=prompt)
    assert "".join(parts) == " Paris"
