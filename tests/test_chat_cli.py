"""The chat CLI: driven through stdin, two turns, clean exit; its prompts are the
tokenizer's chat template over the conversation, and its replies are transformers' greedy
continuations of those prompts. Plus the loop's edge cases on a stub model (end of input,
``clear``, a conversation longer than the context)."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

TURNS = ["What is 2 + 3?", "Tell me about the stars."]
MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_patch.evaluation.tiny_model import write_tiny_set
    return write_tiny_set(str(tmp_path_factory.mktemp("tiny_chat")), tp=2)


def _hf_reply(hf, tok, prompt_text):
    ids = tok.encode(prompt_text, add_special_tokens=False)
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                      max_new_tokens=MAX_NEW, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_chat_cli_two_turns(tiny):
    from transformers import AutoTokenizer, LlamaForCausalLM

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    p = subprocess.run(
        [sys.executable, "-m", "megatron_patch.inference.chat", "--load", tiny["mcore"],
         "--max-new-tokens", str(MAX_NEW), "--show-prompt"],
        input="\n".join(TURNS + ["exit"]) + "\n", capture_output=True, text=True, env=env,
        timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert out.count("You >> ") == 3 and out.count("Assistant >> ") == 2
    assert out.rstrip().endswith("bye")
    prompts = [json.loads(line) for line in p.stderr.splitlines() if line.startswith('"')]
    assert len(prompts) == 2

    tok = AutoTokenizer.from_pretrained(tiny["hf_back"])
    hf = LlamaForCausalLM.from_pretrained(tiny["hf_back"], dtype=torch.float32).eval()
    history = [{"role": "user", "content": TURNS[0]}]
    for i, turn_prompt in enumerate(prompts):
        expected = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert turn_prompt == expected, f"turn {i + 1}"
        ids = tok.apply_chat_template(history, tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
        assert tok.encode(turn_prompt, add_special_tokens=False) == list(ids)
        answer = _hf_reply(hf, tok, turn_prompt)
        shown = out.split("Assistant >> ")[i + 1].split("\n\nYou >> ")[0]
        assert shown.strip() == answer, f"turn {i + 1}: {shown!r} != {answer!r}"
        history += [{"role": "assistant", "content": answer}]
        if i + 1 < len(TURNS):
            history.append({"role": "user", "content": TURNS[i + 1]})


class _StubRunner:
    """Stands in for ModelRunner: always predicts token ``nxt`` (single process)."""

    def __init__(self, nxt, max_length=64, vocab=512):
        self.nxt, self.max_length, self.vocab, self.device = nxt, max_length, vocab, "cpu"
        self.arch = None

    def logits(self, tokens):
        out = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab)
        out[..., self.nxt] = 1.0
        return out

    def share(self, value, shape, dtype):
        return value


def test_chat_loop_edge_cases(tiny):
    from megatron_patch.inference.chat import Chat
    from megatron_patch.inference.engine import RecomputeEngine
    from megatron_patch.inference.generate import SamplingParams
    from megatron_patch.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny["hf"])
    word = tok.encode(" stars", add_special_tokens=False)[0]
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(RecomputeEngine(_StubRunner(word, max_length=64)), tok, [tok.eos_id],
                SamplingParams(max_new_tokens=3), out=out, err=err)
    # end of input without "exit"; "clear" forgets the conversation
    turns = chat.loop(io.StringIO("hi\nclear\nhello\n"))
    assert turns == 2 and out.getvalue().rstrip().endswith("bye")
    assert [m["content"] for m in chat.history] == ["hello", tok.decode([word] * 3).strip()]
    # a conversation longer than the context forgets its oldest exchanges
    for _ in range(6):
        chat.reply("What is 2 + 3? " * 2)
    assert "forgot the oldest turn" in err.getvalue()
    assert len(chat.history) < 12
    # a single message that cannot fit is refused, the chat goes on
    n = chat.loop(io.StringIO("word " * 200 + "\nexit\n"))
    assert n == 0 and "[error]" in err.getvalue()
