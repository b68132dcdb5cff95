"""The OpenAI-compatible server, driven by the real ``openai`` client on 127.0.0.1.

A tiny random Llama is converted HF -> Megatron (TP=2 files) -> HF (mg2hf). The server runs
the Megatron checkpoint in a subprocess; every answer is compared with transformers' greedy
``generate`` on the mg2hf output (the reference the chat/generate CLIs are tested against):
completions and chat, streamed and not, 8 concurrent clients (decoded in shared batches),
stop strings; the generate CLI prints the same text; malformed requests get 4xx JSON errors
and the server keeps serving; SIGTERM ends it with exit code 0. The TP=2 server runs under torchrun and stops on Ctrl-C (SIGINT to
the process group).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")

PROMPTS = ["What is 2 + 3?", "Hello! How are you today?", "Which planet is known as the",
           "Tell me about the weather", "The following are multiple choice questions",
           "0 1 2 3 4", "Answer: A. B.", "the sea, the mountains and"]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me about the stars."}]
NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_patch.evaluation.tiny_model import write_tiny_set
    return write_tiny_set(str(tmp_path_factory.mktemp("tiny_serve")), tp=2)


@pytest.fixture(scope="module")
def ref(tiny):
    """transformers' greedy continuation (text, finish_reason, n tokens) of a prompt's ids."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny["hf_back"])
    hf = LlamaForCausalLM.from_pretrained(tiny["hf_back"], dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id

    def greedy(ids, n=NEW):
        x = torch.tensor([ids])
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                          max_new_tokens=n, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        reason = "stop" if out and out[-1] in eos else "length"
        return tok.decode(out, skip_special_tokens=True), reason, len(out)

    def completion(prompt, n=NEW):
        return greedy(tok.encode(prompt), n)

    def chat(messages, n=NEW):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return greedy(tok.encode(text, add_special_tokens=False), n)

    return type("Ref", (), {"completion": staticmethod(completion), "chat": staticmethod(chat)})


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8",
                TOKENIZERS_PARALLELISM="false")


def _wait_ready(url, proc, log_path, timeout=400):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n" + _tail(log_path))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r) == {"status": "ok"}:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("server not ready in time:\n" + _tail(log_path))


def _tail(path, n=4000):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def _start(cmd, log_path):
    log = open(log_path, "w")
    # own session: Ctrl-C can be sent to the whole group, and nothing leaks into pytest's
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from megatron_patch.parallel import free_port

    port = free_port()
    log_path = str(tmp_path_factory.mktemp("serve_log") / "server.log")
    proc = _start([sys.executable, "-m", "megatron_patch.inference.server", "--load",
                   tiny["mcore"], "--port", str(port), "--max-batch-size", "8"], log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)
        yield type("Server", (), {"url": url, "proc": proc, "log": log_path, "client": client})
    finally:
        _stop(proc)


def test_models_list(server):
    assert [m.id for m in server.client.models.list().data] == ["mcore"]


def _stream_text(stream, chat=False):
    text, reasons, usage = {}, {}, None
    for ev in stream:
        if ev.usage is not None:
            usage = ev.usage
        for c in ev.choices:
            piece = c.delta.content if chat else c.text
            text[c.index] = text.get(c.index, "") + (piece or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return text, reasons, usage


def test_completions_greedy(server, ref):
    want = [ref.completion(p) for p in PROMPTS[:2]]
    r = server.client.completions.create(model="mcore", prompt=PROMPTS[:2], max_tokens=NEW,
                                         temperature=0)
    assert [(c.text, c.finish_reason) for c in r.choices] == [(t, f) for t, f, _ in want]
    assert r.usage.completion_tokens == sum(n for _, _, n in want)
    stream = server.client.completions.create(
        model="mcore", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, reasons, usage = _stream_text(stream)
    assert (text[0], reasons[0]) == want[0][:2] and usage.completion_tokens == want[0][2]


def test_chat_greedy_and_stop(server, ref):
    text, reason, n = ref.chat(CHAT)
    r = server.client.chat.completions.create(model="mcore", messages=CHAT, max_tokens=NEW,
                                              temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == n
    s_text, reasons, _ = _stream_text(server.client.chat.completions.create(
        model="mcore", messages=CHAT, max_tokens=NEW, temperature=0, stream=True), chat=True)
    assert (s_text[0], reasons[0]) == (text, reason)
    # a stop string taken from the answer: the text ends just before it
    stop = text[len(text) // 2:][:3]
    assert stop.strip() and text.index(stop) > 0
    r = server.client.chat.completions.create(model="mcore", messages=CHAT, max_tokens=NEW,
                                              temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients(server, ref):
    want = [ref.completion(p, 10) for p in PROMPTS]

    def ask(i):
        if i % 2:
            stream = server.client.completions.create(model="mcore", prompt=PROMPTS[i],
                                                      max_tokens=10, temperature=0, stream=True)
            text, reasons, _ = _stream_text(stream)
            return text[0], reasons[0]
        c = server.client.completions.create(model="mcore", prompt=PROMPTS[i], max_tokens=10,
                                             temperature=0).choices[0]
        return c.text, c.finish_reason

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == [w[:2] for w in want]
    sizes = [int(n) for n in re.findall(r"batch of (\d+) request", _tail(server.log, 10 ** 6))]
    assert max(sizes) > 1, sizes  # the clients were decoded together


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_4xx_and_the_server_goes_on(server, ref):
    status, body = _post(server.url + "/v1/completions", b'{"model": "mcore", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server.url + "/v1/chat/completions", b'["a list"]')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    c = server.client
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        c.completions.create(model="mcore", prompt="hi", max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="'n'=2 is not supported"):
        c.chat.completions.create(model="mcore", messages=CHAT, n=2)
    with pytest.raises(openai.BadRequestError, match="unsupported field 'beam_width'"):
        c.completions.create(model="mcore", prompt="hi", extra_body={"beam_width": 4})
    with pytest.raises(openai.BadRequestError, match="role"):
        c.chat.completions.create(model="mcore", messages=[{"role": "robot", "content": "x"}])
    status, body = _post(server.url + "/v1/nothing", b"{}")
    assert status == 404 and "error" in body
    text, reason, _ = ref.completion(PROMPTS[2])
    r = c.completions.create(model="mcore", prompt=PROMPTS[2], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == text  # still serving, same answers


def test_generate_cli_prints_the_same(server, tiny):
    """The generate CLI (KV engine, its prompts as one batch) prints what the server answers."""
    r = server.client.completions.create(model="mcore", prompt=PROMPTS[:2], max_tokens=NEW,
                                         temperature=0)
    p = subprocess.run([sys.executable, "-m", "megatron_patch.inference.generate", "--load",
                        tiny["mcore"], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                        "--max-new-tokens", str(NEW)], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == "".join(c.text + "\n" for c in r.choices)


def test_sigterm_stops_cleanly(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    log = _tail(server.log, 10 ** 6)
    assert "server stopped" in log and "Traceback" not in log


@pytest.mark.slow
def test_tp2_server_under_torchrun(tiny, ref, tmp_path):
    from megatron_patch.parallel import free_port

    port, log_path = free_port(), str(tmp_path / "tp2.log")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = _start([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "-m", "megatron_patch.inference.server", "--load", tiny["mcore"], "--tp", "2",
                   "--port", str(port), "--served-model-name", "tiny"], log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

        def complete(p):
            return client.completions.create(model="tiny", prompt=p, max_tokens=NEW,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(complete, PROMPTS[:2]))
        assert got == [ref.completion(p)[0] for p in PROMPTS[:2]]
        text, _, _ = _stream_text(client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=NEW, temperature=0, stream=True), chat=True)
        assert text[0] == ref.chat(CHAT)[0]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        proc.wait(timeout=60)
        log = _tail(log_path, 10 ** 6)
        assert "server stopped" in log and "ChildFailedError" not in log, log[-3000:]
        assert "megatron_patch" not in log.split("server stopped")[-1], log[-3000:]
    finally:
        _stop(proc)


def test_bad_command_lines(tmp_path, capsys, monkeypatch):
    """One line on stderr, exit 2, nothing started: a wrong checkpoint, a taken port; and
    without the serve extra, a message saying how to install it."""
    import socket

    from megatron_patch.inference import server
    from megatron_patch.parallel import free_port

    assert server.main(["--load", str(tmp_path / "nope"), "--port", str(free_port())]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert server.main(["--load", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: checkpoint directory not found: {tmp_path / 'nope'}",
                   f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address "
                   "already in use)"], err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"pip install -e \.\[serve\]"):
        server.main(["--load", str(tmp_path)])
