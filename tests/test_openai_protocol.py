"""OpenAI request rules (inference.openai_protocol), without a server: what is accepted, the
4xx for each kind of bad request, defaults, and the prompt ids each request decodes."""
import pytest

from megatron_patch.inference.openai_protocol import (ApiError, ModelCard, parse_chat,
                                                      parse_completion, response)

CTX = 64


@pytest.fixture(scope="module")
def card():
    from megatron_patch.evaluation.tiny_model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    return ModelCard(
        name="tiny", max_length=CTX, vocab_size=len(tok),
        encode=lambda text, special: tok.encode(text, add_special_tokens=special),
        render_chat=lambda m: tok.apply_chat_template(m, tokenize=False,
                                                      add_generation_prompt=True,
                                                      chat_template=CHAT_TEMPLATE)), tok


def _err(fn, body, card, status=400, param=None, text=""):
    with pytest.raises(ApiError) as e:
        fn(body, card)
    assert e.value.status == status, e.value.message
    assert e.value.param == param and text in e.value.message, e.value.message
    return e.value


def test_completion_prompts_and_defaults(card):
    card, tok = card
    r = parse_completion({"model": "tiny", "prompt": "Hello! How"}, card)
    assert r.prompts == [tok.encode("Hello! How")] and r.prompts[0][0] == tok.bos_token_id
    assert r.params.max_new_tokens == 16 and r.params.temperature == 1.0  # OpenAI's defaults
    assert not r.stream and r.stop == [] and r.id.startswith("cmpl-")
    r = parse_completion({"model": "tiny", "prompt": ["a", "b c"], "max_tokens": 5,
                          "temperature": 0, "stop": "\n", "seed": 3, "top_k": -1,
                          "stream": True, "stream_options": {"include_usage": True},
                          "n": 1, "logprobs": None, "user": "me"}, card)
    assert len(r.prompts) == 2 and r.params.max_new_tokens == 5 and r.params.greedy
    assert r.stop == ["\n"] and r.params.seed == 3 and r.params.top_k == 0
    assert r.stream and r.include_usage
    assert parse_completion({"model": "tiny", "prompt": [5, 6, 7]}, card).prompts == [[5, 6, 7]]
    assert parse_completion({"model": "tiny", "prompt": [[5], [6, 7]]}, card).prompts == \
        [[5], [6, 7]]
    # the checkpoint's generation_config.json sets defaults; the request still wins
    card2 = ModelCard(**{**card.__dict__, "defaults": {"temperature": 0.6, "top_p": 0.9}})
    r = parse_completion({"model": "tiny", "prompt": "a", "top_p": 0.5}, card2)
    assert (r.params.temperature, r.params.top_p) == (0.6, 0.5)
    seeds = {parse_completion({"model": "tiny", "prompt": "a"}, card).params.seed
             for _ in range(5)}
    assert len(seeds) > 1  # no seed: a fresh draw per request, as OpenAI


def test_bad_completion_requests(card):
    card, tok = card
    ok = {"model": "tiny", "prompt": "hi"}
    _err(parse_completion, [ok], card, text="JSON object")
    _err(parse_completion, {"prompt": "hi"}, card, param="model")
    _err(parse_completion, {**ok, "model": "gpt-4"}, card, 404, "model", "does not exist")
    _err(parse_completion, {**ok, "foo": 1}, card, param="foo", text="unsupported field")
    _err(parse_completion, {**ok, "messages": []}, card, param="messages")
    _err(parse_completion, {**ok, "n": 2}, card, param="n", text="not supported")
    _err(parse_completion, {**ok, "logprobs": 3}, card, param="logprobs")
    _err(parse_completion, {**ok, "echo": True}, card, param="echo")
    _err(parse_completion, {**ok, "temperature": "hot"}, card, param="temperature")
    _err(parse_completion, {**ok, "top_p": 0}, card, param="top_p")
    _err(parse_completion, {**ok, "max_tokens": 0}, card, param="max_tokens")
    _err(parse_completion, {**ok, "max_tokens": 2.5}, card, param="max_tokens")
    _err(parse_completion, {**ok, "stream": "yes"}, card, param="stream")
    _err(parse_completion, {**ok, "stop": [1]}, card, param="stop")
    _err(parse_completion, {**ok, "presence_penalty": 5}, card, param="presence_penalty")
    _err(parse_completion, {**ok, "prompt": []}, card, param="prompt")
    _err(parse_completion, {**ok, "prompt": [len(tok) + 5]}, card, param="prompt")
    n = len(tok.encode("hi"))
    e = _err(parse_completion, {**ok, "max_tokens": CTX - n + 1}, card, param="max_tokens",
             text=f"maximum context length is {CTX}")
    assert e.body()["error"]["param"] == "max_tokens"
    parse_completion({**ok, "max_tokens": CTX - n}, card)  # exactly fills the context
    _err(parse_completion, {**ok, "prompt": "word " * CTX}, card, param="prompt")


def test_chat_requests(card):
    card, tok = card
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "},
                                         {"type": "text", "text": "2 + 3?"}]}]
    r = parse_chat({"model": "tiny", "messages": msgs, "max_completion_tokens": 7}, card)
    text = card.render_chat([{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2 + 3?"}])
    assert r.prompts == [tok.encode(text, add_special_tokens=False)]
    assert r.prompts[0].count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert r.params.max_new_tokens == 7 and r.id.startswith("chatcmpl-")
    r = parse_chat({"model": "tiny", "messages": msgs[1:]}, card)
    assert r.params.max_new_tokens == CTX - len(r.prompts[0])  # chat default: the rest
    _err(parse_chat, {"model": "tiny", "messages": []}, card, param="messages")
    _err(parse_chat, {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, card,
         param="messages[0]")
    _err(parse_chat, {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, card, param="messages[0]")
    _err(parse_chat, {"model": "tiny", "messages": msgs, "prompt": "x"}, card, param="prompt")
    _err(parse_chat, {"model": "tiny", "messages": msgs, "tools": [{"type": "function"}]},
         card, param="tools")
    _err(parse_chat, {"model": "tiny", "messages": msgs, "max_completion_tokens": CTX},
         card, param="max_completion_tokens")

    def strict(m):
        raise ValueError("Conversation roles must alternate user/assistant")
    _err(parse_chat, {"model": "tiny", "messages": msgs},
         ModelCard(**{**card.__dict__, "render_chat": strict}), param="messages",
         text="roles must alternate")


def test_response_bodies(card):
    card, _ = card
    r = parse_completion({"model": "tiny", "prompt": [[1, 2], [3]]}, card)
    body = response(r, ["x", "yz"], ["length", "stop"], [16, 2])
    assert [c["text"] for c in body["choices"]] == ["x", "yz"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 18, "total_tokens": 21}
    c = parse_chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, card)
    body = response(c, ["hello"], ["stop"], [2])
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
