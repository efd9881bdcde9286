"""The HTTP server: standard library only (ThreadingHTTPServer), one thread per connection, the
engine in its own thread (worker.py).

    GET  /health                 {"status": "ok"} (503 with the error once the engine has died)
    GET  /v1/models              the one served model, OpenAI-style
    POST /generate               token ids or text in, token ids (and text) out
    POST /v1/completions         OpenAI-compatible subset, streaming as Server-Sent Events
    POST /v1/chat/completions    the same, through the checkpoint's chat template

Every error is JSON {"error": {"message", "type", "code"[, "param"]}}. A handler whose client went
away (a failed write while streaming, or EOF seen while it waits) aborts its request, so a
disconnect never leaves pages held. Responses are HTTP/1.1 with keep-alive; streams use chunked
transfer encoding.
"""

from __future__ import annotations

import json
import select
import socket
import socketserver
import sys
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from optimized.engine import Engine

from . import api
from .api import ApiError
from .chat import ChatTemplate, load_chat_template
from .tokenizer import Tokenizer, load_tokenizer
from .worker import EngineDead, EngineWorker

MAX_BODY_BYTES = 8 * 2**20
POLL_S = 0.1  # how often a waiting handler looks whether its client is still there


class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds a socket read or write may stall (idle keep-alive, slow bodies)
    server: Server

    ROUTES = {"/health": {"GET": "health"}, "/v1/models": {"GET": "models"},
              "/generate": {"POST": "generate"}, "/v1/completions": {"POST": "completions"},
              "/v1/chat/completions": {"POST": "chat"}}

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    # -- plumbing ------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._body_pending = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        self._streaming = False
        path = urlsplit(self.path).path
        allow = None
        try:
            routes = self.ROUTES.get(path)
            if routes is None:
                raise ApiError(404, f"{path}: no such endpoint (there are {', '.join(self.ROUTES)})")
            if method not in routes:
                allow = ", ".join(routes)
                raise ApiError(405, f"{method} {path}: method not allowed; use {allow}")
            getattr(self, "_" + routes[method])()
        except ApiError as e:
            self._send_json(e.status, e.body(), {"Allow": allow} if allow else None)
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 (a bug here must not take the server down)
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self._streaming:
                self._send_json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body())

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if self._body_pending:  # we answer without reading the body: the connection cannot be reused
            self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left before its answer; nothing more to do
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (bad request line, oversized headers, unknown method)
        as JSON, like ours."""
        self.close_connection = True
        self._body_pending = False
        err = ApiError(code, message or HTTPStatus(code).phrase).body()
        data = json.dumps(err).encode("utf-8")
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(data)
        except OSError:
            pass

    def handle_expect_100(self):
        # Refuse an oversized body before the client sends it, rather than after.
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            self._body_pending = True
            self._send_json(413, self._too_large(int(length)).body())
            return False
        return super().handle_expect_100()

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)

    def _too_large(self, n: int) -> ApiError:
        return ApiError(413, f"request body is {n} bytes; the limit is {self.server.max_body_bytes}")

    def _read_json(self) -> dict:
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length: missing (a POST needs a JSON body)")
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, f"Content-Length: not a byte count: {length!r}")
        n = int(length)
        if n > self.server.max_body_bytes:
            raise self._too_large(n)
        data = self.rfile.read(n)
        if len(data) < n:
            raise ClientGone()
        self._body_pending = False
        try:
            body = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError:
            raise ApiError(400, "body: not UTF-8 text") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ApiError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}")
        return body

    def _client_gone(self) -> bool:
        """EOF (or a reset) on the socket while we have not answered: the client closed it.
        Pipelined bytes of a next request read as data, not EOF, so they do not count."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next(self, ticket):
        while True:
            msg = self.server.worker.next(ticket, POLL_S)
            if msg is not None:
                return msg
            if self._client_gone():
                raise ClientGone()

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:  # broken pipe, reset, timeout
            raise ClientGone() from None

    def _sse(self, obj) -> None:
        payload = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._write_chunk(b"data: " + payload + b"\n\n")

    # -- endpoints -----------------------------------------------------------------------
    def _health(self):
        worker = self.server.worker
        if not worker.alive:
            raise ApiError(503, f"the engine is not running: {worker.error or 'shutting down'}")
        self._send_json(200, {"status": "ok"})

    def _models(self):
        ctx = self.server.ctx
        self._send_json(200, {"object": "list", "data": [{
            "id": ctx.model_name, "object": "model", "created": self.server.created, "owned_by": "gemma4-testbed",
            "max_model_len": ctx.max_context}]})

    def _generate(self):
        self._run(api.parse_generate(self._read_json(), self.server.ctx))

    def _completions(self):
        self._run(api.parse_completion(self._read_json(), self.server.ctx))

    def _chat(self):
        self._run(api.parse_chat(self._read_json(), self.server.ctx))

    def _run(self, job: api.Job) -> None:
        worker = self.server.worker
        try:
            ticket = worker.submit(job.prompt, job.params)
        except EngineDead as e:
            raise ApiError(503, f"the engine is not running: {e}") from None
        done = False
        try:
            kind, arg = self._next(ticket)
            if kind == "rejected":
                done = True
                raise ApiError(400, arg)
            if kind == "dead":
                done = True
                raise ApiError(503, f"the engine is not running: {arg}")
            done = self._stream(job, ticket) if job.stream else self._collect(job, ticket)
        finally:
            if not done:  # client gone, or a failure of ours: free the request's pages
                worker.abort(ticket)

    def _collect(self, job: api.Job, ticket) -> bool:
        tokens = []
        while True:
            kind, arg = self._next(ticket)
            if kind == "dead":
                raise ApiError(503, f"the engine stopped during the request: {arg}")
            tokens.append(arg.token)
            if arg.finished:
                self._send_json(200, api.response(job, self.server.ctx, tokens, arg.finish_reason))
                return True

    def _stream(self, job: api.Job, ticket) -> bool:
        ctx = self.server.ctx
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        decoder = ctx.tokenizer.stream() if ctx.tokenizer is not None else None
        if job.kind == "chat":
            self._sse(api.chunk(job, ctx, "", [], None, first=True))
        count, finished = 0, False
        while not finished:
            kind, arg = self._next(ticket)
            if kind == "dead":
                self._sse(ApiError(503, f"the engine stopped during the request: {arg}").body())
                break
            count, finished = count + 1, arg.finished
            text = None
            if decoder is not None:
                # The stop token is not part of the text; whatever the decoder held back is.
                text = "" if arg.finish_reason == "stop" else decoder.push(arg.token)
                text += decoder.flush() if finished else ""
            self._sse(api.chunk(job, ctx, text, [arg.token], arg.finish_reason))
        if job.include_usage:
            self._sse(api.usage_chunk(job, ctx, count))
        self._sse(b"[DONE]")
        self._write_chunk(b"")  # the last chunk of the chunked encoding
        return True


class Server(ThreadingHTTPServer):
    daemon_threads = True  # open keep-alive connections must not hold up exit

    def __init__(self, address, ctx: api.Context, max_body_bytes: int, log_requests: bool):
        self.ctx, self.max_body_bytes, self.log_requests = ctx, max_body_bytes, log_requests
        self.worker: EngineWorker | None = None
        self.created = 0
        self._serving = False
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's FQDN, which stalls where DNS is unreachable.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop accepting, stop the engine thread (waiting requests get a 503), close the socket."""
        if self._serving:  # BaseServer.shutdown waits forever if serve_forever never ran
            super().shutdown()
        if self.worker is not None:
            self.worker.stop()
        self.server_close()


def make_server(engine, tokenizer: Tokenizer | None = None, chat_template: ChatTemplate | str | None = None,
                host: str = "127.0.0.1", port: int = 0, model_name: str = "gemma4",
                max_body_bytes: int = MAX_BODY_BYTES, log_requests: bool = False) -> Server:
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
    server = Server((host, port), ctx, max_body_bytes, log_requests)
    server.created = int(time.time())
    server.worker = EngineWorker(engine)
    return server


def build_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype="float32", device=None,
                 page_size: int = 16, chunk_size: int = 512, num_pages: int | None = None, max_requests: int = 16,
                 token_budget: int | None = None, max_context: int | None = None, seed: int = 0,
                 log_requests: bool = True) -> Server:
    """An Engine for MODEL (a preset name or a checkpoint directory) with the checkpoint's tokenizer
    and chat template where it has them, behind a bound server. Bad input raises (CheckpointError,
    ConfigError, TokenizerError, ChatError: all ValueErrors; OSError for the address)."""
    tokenizer = load_tokenizer(model)  # cheap checks first: a broken tokenizer fails before weights load
    chat_template = load_chat_template(model)  # bos/eos texts from the same tokenizer_config.json
    engine = Engine(model, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, device=device,
                    page_size=page_size, chunk_size=chunk_size, num_pages=num_pages, max_requests=max_requests,
                    token_budget=token_budget, max_context=max_context, seed=seed)
    name = Path(model).name if Path(model).is_dir() else str(model)
    return make_server(engine, tokenizer, chat_template, host, port, name, log_requests=log_requests)


def run_until_interrupted(server: Server) -> None:
    """serve_forever until Ctrl-C, then a clean shutdown."""
    has = [w for w, v in (("tokenizer", server.ctx.tokenizer), ("chat template", server.ctx.chat_template)) if v]
    print(f"serving {server.ctx.model_name} at {server.url} (max context {server.ctx.max_context}; "
          f"{' and '.join(has) if has else 'no tokenizer: token ids only'}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        server.shutdown()


def serve(model: str, **kw) -> None:
    """Build the server for MODEL (see build_server for the options) and serve until Ctrl-C."""
    run_until_interrupted(build_server(model, **kw))
