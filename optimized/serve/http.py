"""The HTTP server: the FastAPI app of app.py under uvicorn, on a socket bound here (so port 0's
port is known before serving, and a bad address fails in make_server), with the engine in its own
thread (worker.py).

Shutdown (SIGINT/SIGTERM through uvicorn's own handling, or `Server.shutdown()`): stop admitting,
stop the engine, which answers every in-flight request (a stream ends with an error event and
[DONE], not a cut connection), then let uvicorn close the connections.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from optimized.engine import Engine
from optimized.engine.engine import engine_device
from optimized.kernels import kernels_refusal

from . import api
from .api import ApiError
from .app import create_app
from .chat import ChatTemplate, load_chat_template
from .replicated import LeadEngine
from .tokenizer import Tokenizer, load_tokenizer
from .worker import EngineWorker

MAX_BODY_BYTES = 8 * 2**20
BACKLOG = 2048  # pending connections the kernel queues: hundreds of clients connecting at once
GRACE_S = 30  # how long shutdown waits for in-flight answers to be written


class _JsonErrorsH11(H11Protocol):
    """uvicorn's answer to a request it cannot parse (bad request line, headers or Content-Length),
    as JSON like every other error rather than its plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(ApiError(400, "malformed HTTP request (request line, headers or Content-Length); "
                                   "it was not read").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets=None):
        # Before uvicorn waits for open connections to finish: end the engine, so in-flight requests
        # are answered (a step takes at most seconds) instead of being waited on or cut.
        await asyncio.to_thread(self._drain)
        await super().shutdown(sockets)


class Server:
    """A bound server. `serve_forever()` (the main thread: signals stop it; or a thread, for tests),
    then `shutdown()` from another thread, or a signal."""

    def __init__(self, sock: socket.socket, ctx: api.Context, worker: EngineWorker, max_body_bytes: int,
                 log_requests: bool, request_timeout: float | None = None):
        self.socket, self.ctx, self.worker = sock, ctx, worker
        self.server_address = sock.getsockname()
        self.created = int(time.time())
        self.app = create_app(ctx, worker, max_body_bytes, self.created, request_timeout)
        config = uvicorn.Config(self.app, http=_JsonErrorsH11, lifespan="off", backlog=BACKLOG,
                                timeout_graceful_shutdown=GRACE_S, access_log=log_requests,
                                log_level="info" if log_requests else "error")
        self._uvicorn = _Uvicorn(config, self._drain)
        self._started, self._ended = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        self._started.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._ended.set()

    def _drain(self) -> None:
        self.app.state.draining = True
        self.worker.stop()

    def shutdown(self) -> None:
        """Stop accepting, answer what is in flight, stop the engine thread, close the socket."""
        if self._started.is_set():
            self._uvicorn.should_exit = True
            self._ended.wait()
        self._drain()  # also where serve_forever never ran (harmless twice)
        self.socket.close()


def make_server(engine, tokenizer: Tokenizer | None = None, chat_template: ChatTemplate | str | None = None,
                host: str = "127.0.0.1", port: int = 0, model_name: str = "gemma4",
                max_body_bytes: int = MAX_BODY_BYTES, log_requests: bool = False,
                request_timeout: float | None = None) -> Server:
    """A bound server (port 0: any free port; see `.server_address` / `.url`) with its engine
    thread running. Call `serve_forever()` (in a thread, for tests), then `shutdown()`."""
    if isinstance(chat_template, str):
        chat_template = ChatTemplate(chat_template, getattr(tokenizer, "bos_token", None),
                                     getattr(tokenizer, "eos_token", None))
    # Checked here, not by bind(): its OverflowError for 99999 is no OSError and would escape callers.
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: a TCP port is an integer in 0..65535 (0: any free port), got {port!r}")
    vocab_size = getattr(getattr(engine, "config", None), "vocab_size", None)
    ctx = api.Context(model_name, engine.max_context, tokenizer, chat_template, vocab_size)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=BACKLOG)
    return Server(sock, ctx, EngineWorker(engine), max_body_bytes, log_requests, request_timeout)


def default_token_budget(chunk_size: int, max_requests: int) -> int:
    """The serving default: a step runs every running request's decode token plus at most one
    prefill chunk's worth of prompt tokens (chunk_size + max_requests).

    Without a budget a burst of prompts is prefilled in one long step, so every first token
    arrives together at its end and running streams stall for all of it. Under this budget
    waiting prompts are prefilled chunk by chunk, first come first served, while decodes go on
    every step: the first request's time to first token is one chunk's step, not the whole
    burst's, and a step never takes much longer than one chunk. Decodes come first in a step and
    there are at most max_requests of them, so they always fit."""
    return chunk_size + max_requests


def build_engine(model: str, *, dtype="float32", device=None, page_size: int = 16, chunk_size: int = 512,
                 num_pages: int | None = None, max_requests: int = 16, token_budget: int | str | None = "auto",
                 max_context: int | None = None, seed: int = 0, tp=None, fused: bool = True,
                 attention: str = "triton") -> Engine:
    """The Engine a server for MODEL runs (every rank builds the same one under tensor parallelism,
    `tp`); token_budget "auto" is default_token_budget's policy, None no limit."""
    if token_budget == "auto":
        token_budget = default_token_budget(chunk_size, max_requests)
    uses_triton = fused or attention == "triton"
    refusal = (kernels_refusal(engine_device(tp, device), "serving runs the kernels on", ("--ops eager",))
               if uses_triton else None)
    if refusal:  # before any weight loads: served, every request's first kernel would fail (common.check_float)
        raise ValueError(refusal)
    return Engine(model, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, device=device,
                  page_size=page_size, chunk_size=chunk_size, num_pages=num_pages, max_requests=max_requests,
                  token_budget=token_budget, max_context=max_context, seed=seed, tp=tp, fused=fused,
                  attention=attention)


def build_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, log_requests: bool = True,
                 request_timeout: float | None = None, tp=None, **engine_options) -> Server:
    """An Engine for MODEL (a preset name or a checkpoint directory; build_engine's options) with
    the checkpoint's tokenizer and chat template where it has them, behind a bound server. Under
    tensor parallelism (`tp`, on rank 0) the engine is a LeadEngine: the other ranks run
    `replicated.follow` on engines built alike. Bad input raises (CheckpointError, ConfigError,
    TokenizerError, ChatError: all ValueErrors; OSError for the address)."""
    tokenizer = load_tokenizer(model)  # cheap checks first: a broken tokenizer fails before weights load
    chat_template = load_chat_template(model)  # bos/eos texts from the same tokenizer_config.json
    engine = build_engine(model, tp=tp, **engine_options)
    if tp is not None:
        engine = LeadEngine(engine, tp)
    name = Path(model).name if Path(model).is_dir() else str(model)
    return make_server(engine, tokenizer, chat_template, host, port, name, log_requests=log_requests,
                       request_timeout=request_timeout)


class _Terminated(Exception):
    """SIGTERM, re-raised by uvicorn once it has shut down gracefully (see run_until_interrupted)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def run_until_interrupted(server: Server) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn catches them and shuts down gracefully), then return.

    uvicorn re-raises the signal it handled once it has shut down, through the handler that was in
    place before it ran. For SIGTERM that was the default one, which killed the process there: its
    caller's code after serving never ran, so under `serve --tp` rank 0 died without telling the
    other ranks, which then failed with gloo's "Connection closed by peer" traceback. A handler of
    ours, in place while serving, turns the re-raised SIGTERM into an exception caught here."""
    has = [w for w, v in (("tokenizer", server.ctx.tokenizer), ("chat template", server.ctx.chat_template)) if v]
    print(f"serving {server.ctx.model_name} at {server.url} (max context {server.ctx.max_context}; "
          f"{' and '.join(has) if has else 'no tokenizer: token ids only'}); Ctrl-C stops", flush=True)
    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Terminated):
        print("shut down", file=sys.stderr)
    finally:
        server.shutdown()
        if main:
            signal.signal(signal.SIGTERM, previous)


def serve(model: str, **kw) -> None:
    """Build the server for MODEL (see build_server for the options) and serve until Ctrl-C."""
    run_until_interrupted(build_server(model, **kw))
