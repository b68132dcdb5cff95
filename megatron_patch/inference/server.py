"""OpenAI-compatible HTTP server for a Megatron checkpoint.

    python -m megatron_patch.inference.server --load CKPT [--tokenizer DIR] \
        [--host 127.0.0.1 --port 8000] [--served-model-name NAME] [--api-key KEY]
    torchrun --nproc_per_node 2 -m megatron_patch.inference.server --load CKPT --tp 2

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events), ``GET /v1/models``, ``GET /health``.
Concurrent requests are decoded together in batches of up to ``--max-batch-size``.

Processes: every rank loads its part of the model and runs the decoding loop in its main
thread; rank 0 also runs the HTTP server (uvicorn, in a second thread) and hands each
batch to the other ranks. Ctrl-C / SIGTERM: stop taking connections, finish the requests
in flight, stop every rank, exit 0 (a second Ctrl-C forces it).

Needs the ``serve`` extra: ``pip install -e .[serve]`` (fastapi, uvicorn).
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations
import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import List, Optional

from megatron_patch.inference import openai_protocol as api

log = logging.getLogger("megatron_patch.server")
SHUTDOWN_S = 30


def _require_web():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: the server needs fastapi and uvicorn ({e.name} is missing): "
                         "pip install -e .[serve]") from None


# ---- HTTP app (rank 0) --------------------------------------------------------------------
def build_app(card: api.ModelCard, scheduler, api_key: Optional[str] = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="megatron_patch OpenAI-compatible server")

    def error(e: api.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(api.ApiError)
    async def _api_error(_request, e: api.ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, e: HTTPException):  # 404 / 405 in OpenAI's error shape
        return error(api.ApiError(e.status_code, str(e.detail), kind="invalid_request_error"))

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise api.ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                               kind="authentication_error")

    async def body_of(request: Request):
        check_key(request)
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.ApiError(400, f"the request body is not valid JSON: {e}") from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return api.models(card)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(api.parse_completion(await body_of(request), card))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(api.parse_chat(await body_of(request), card))

    async def serve(req: api.GenRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev, i):  # called from the decoding thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i,) + ev)
            except RuntimeError:  # the HTTP loop has closed (shutdown): nobody to tell
                pass

        for i, prompt in enumerate(req.prompts):
            scheduler.submit(prompt, req.params, req.stop, lambda ev, _i=i: sink(ev, _i))
        if req.stream:
            return StreamingResponse(_sse(req, events), media_type="text/event-stream")
        texts, reasons, n_new = [""] * len(req.prompts), [""] * len(req.prompts), \
            [0] * len(req.prompts)
        for _ in req.prompts:
            while True:
                i, kind, *rest = await events.get()
                if kind == "error":
                    return error(api.ApiError(500, rest[0], kind="server_error"))
                texts[i] += rest[0]
                if kind == "done":
                    reasons[i], n_new[i] = rest[1], rest[2]
                    break
        return api.response(req, texts, reasons, n_new)

    return app


async def _sse(req: api.GenRequest, events: asyncio.Queue):
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    if req.kind == "chat":
        yield data(api.chunk(req, 0, role=True))
    left, n_new = len(req.prompts), 0
    while left:
        i, kind, *rest = await events.get()
        if kind == "error":
            yield data(api.ApiError(500, rest[0], kind="server_error").body())
            break
        if kind == "text":
            yield data(api.chunk(req, i, rest[0]))
            continue
        text, reason, n = rest
        if text:
            yield data(api.chunk(req, i, text))
        yield data(api.chunk(req, i, finish_reason=reason))
        n_new += n
        left -= 1
    if req.include_usage and not left:
        yield data(api.usage_chunk(req, n_new))
    yield "data: [DONE]\n\n"


# ---- process setup -----------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads: a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") \
            from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def generation_defaults(config_dir: Optional[str]) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (as vLLM uses them)."""
    if not config_dir:
        return {}
    with open(os.path.join(config_dir, "generation_config.json")) as f:
        cfg = json.load(f)
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_patch.inference import generate as g

    p = argparse.ArgumentParser(description="OpenAI-compatible server for a Megatron checkpoint.")
    g.add_model_args(p, sampling=False)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the --load folder's name)")
    s.add_argument("--api-key", default=os.environ.get("MEGATRON_PATCH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MEGATRON_PATCH_API_KEY)")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja file to use instead of the tokenizer's chat template")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    _require_web()

    from megatron_patch.inference.loading import CheckpointError
    rank0 = int(os.environ.get("RANK", 0)) == 0
    sock = None
    try:
        if a.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {a.max_batch_size}")
        if not 0 < a.port < 65536:
            raise ValueError(f"--port {a.port}: not a TCP port")
        if rank0:
            sock = _bind(a.host, a.port)
        runner, tok, tok_dir = g.setup_from_args(a)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if sock is not None:
            sock.close()
        return 2
    except KeyboardInterrupt:
        return 130

    from megatron_patch import parallel
    from megatron_patch.inference.chat import build_prompt, chat_template
    from megatron_patch.inference.scheduler import BatchScheduler

    engine = g.engine_from_args(a, runner)
    eos = g.eos_ids_of(tok, runner.config_dir)
    scheduler = BatchScheduler(engine, tok, eos)
    stop = threading.Event()
    server = None
    if rank0:
        logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s: %(message)s")
        template = chat_template(tok, tok_dir, runner.arch.generation, a.chat_template)
        name = a.served_model_name or os.path.basename(os.path.normpath(a.load))
        card = api.ModelCard(
            name=name, max_length=runner.max_length, vocab_size=runner.vocab_size,
            encode=lambda text, special: tok.encode(text, add_special_tokens=special),
            render_chat=lambda messages: build_prompt(tok.hf, messages, template),
            defaults=generation_defaults(runner.config_dir))
        server, http = _start_http(build_app(card, scheduler, a.api_key), sock, a.log_level)
        where = f"http://{a.host}:{sock.getsockname()[1]}/v1"
        log.info("serving %r at %s (TP=%d PP=%d, %s engine, batches of up to %d)", name,
                 where, a.tp, a.pp, a.engine, engine.max_batch_size)
    _install_signals(stop, server)
    try:
        # rank 0 stops once the HTTP thread has ended (after a signal: when the requests
        # in flight are answered); the other ranks stop when rank 0 says so
        scheduler.serve((lambda: not http.is_alive()) if rank0 else (lambda: True))
    finally:
        if rank0:
            log.info("server stopped")
        parallel.destroy()
    return 0 if (not rank0 or stop.is_set()) else 1


def _start_http(app, sock: socket.socket, log_level: str):
    import uvicorn

    # on shutdown, requests in flight get this long to finish before uvicorn cuts them
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_S)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="http", daemon=True)
    thread.start()
    return server, thread


def _install_signals(stop: threading.Event, server) -> None:
    """Rank 0: first signal = graceful stop, a second forces uvicorn to drop connections.
    Other ranks: ignore (torchrun passes the signal on to them); rank 0 tells them to stop."""
    def handle(sig, _frame):
        if server is None:
            return
        if stop.is_set():
            server.force_exit = True
        stop.set()
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


if __name__ == "__main__":
    sys.exit(main())
