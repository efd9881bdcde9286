"""The HTTP endpoints: a FastAPI app over one EngineWorker (worker.py owns the engine).

    GET  /health                 {"status": "ok"} (503 with the error once the engine has died)
    GET  /version                the package version and the served model
    GET  /v1/models[/{id}]       the one served model, OpenAI-style
    GET  /metrics                Prometheus text format (metrics.py)
    POST /generate               token ids or text in, token ids (and text) out
    POST /v1/completions         OpenAI-compatible, streaming as Server-Sent Events
    POST /v1/chat/completions    the same, through the checkpoint's chat template
    POST /tokenize, /detokenize  text <-> token ids (vLLM's shapes); GET /tokenizer_info

Every error is JSON {"error": {"message", "type", "code"[, "param"]}}, Starlette's own 404/405
included. Bodies are read and parsed here rather than by FastAPI's body models, so that malformed
JSON, NaN and size limits get our messages and api.py can name the offending field.

A request whose client goes away is aborted, so a disconnect never leaves pages held: a waiting
handler asks uvicorn between engine messages (`request.is_disconnected()`); a stream is cancelled
by Starlette's StreamingResponse, and its generator's `finally` aborts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..quoting import shown
from . import api
from .api import ApiError
from .worker import EngineDead, EngineWorker

POLL_S = 0.25  # how often a waiting handler looks whether its client is still there
ROUTES = ["/health", "/version", "/metrics", "/v1/models", "/v1/models/{id}", "/generate", "/v1/completions",
          "/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info"]
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""


def _version() -> str:
    try:
        return metadata.version("gemma4-testbed")
    except metadata.PackageNotFoundError:  # run from a checkout without `pip install -e`
        return "unknown"


class _Constant(ValueError):
    """NaN, Infinity or -Infinity in a body: json.loads takes them, JSON does not."""


def _no_constants(name):
    raise _Constant(f"{name} is not valid JSON")


class _Huge:
    """Where json.loads met an integer past Python's int max_str_digits limit (int() refuses it)."""


def _huge_number(data: bytes) -> ApiError:
    """The 400 for a body with an integer of more digits than int() takes (4300 by default), naming
    its field where a second parse, which keeps such numbers as markers, finds it."""
    limit = sys.get_int_max_str_digits()
    huge = _Huge()

    def parse_int(text: str):
        return huge if len(text.lstrip("-")) > limit else int(text)

    where = None
    try:
        where = api.find_value(json.loads(data.decode("utf-8"), parse_int=parse_int,
                                          parse_constant=_no_constants), huge)
    except (ValueError, RecursionError):  # the body is also broken elsewhere: say what is certain
        pass
    if where is None:
        return ApiError(400, f"body: a number in the body has more than {limit} digits")
    where = where.encode("utf-8", "backslashreplace").decode("utf-8")  # a key may hold a lone surrogate
    return ApiError(400, f"{where}: a number with more than {limit} digits", where.split(" ")[0])


def _error(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(obj) -> bytes:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return b"data: " + payload + b"\n\n"


def create_app(ctx: api.Context, worker: EngineWorker, max_body_bytes: int, created: int,
               request_timeout: float | None = None) -> FastAPI:
    """request_timeout: seconds a request may take from its arrival to its last token (None: no
    limit); past it the request is aborted, and answered 504 or, streaming, with an error event
    and [DONE]."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.draining = False  # set at shutdown: new requests are refused, in-flight ones end

    # -- errors ----------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, e: StarletteHTTPException):
        method, path = request.method, request.url.path
        if e.status_code == 405 and method not in HTTP_METHODS:
            return _error(ApiError(501, f"{shown(method, str)}: not an HTTP method this server implements"))
        if e.status_code == 405:
            allow = (e.headers or {}).get("Allow", "")
            return _error(ApiError(405, f"{method} {shown(path, str)}: method not allowed; use {allow}"),
                          {"Allow": allow})
        if e.status_code == 404:
            return _error(ApiError(404, f"{shown(path, str)}: no such endpoint (there are {', '.join(ROUTES)})"))
        return _error(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug here must not take the server down
        traceback.print_exception(e, file=sys.stderr)
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    # -- reading and answering -------------------------------------------------------------
    async def read_json(request: Request) -> dict:
        if app.state.draining:
            raise ApiError(503, "the server is shutting down")
        if "transfer-encoding" in request.headers:
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        length = request.headers.get("content-length")  # uvicorn has refused one that is no number
        if length is None:
            raise ApiError(411, "Content-Length: missing (a POST needs a JSON body)")
        if int(length) > max_body_bytes:  # refused before the client sends it, not after
            raise ApiError(413, f"request body is {length} bytes; the limit is {max_body_bytes}")
        try:
            data = await request.body()
        except ClientDisconnect:
            raise ClientGone() from None
        try:
            body = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError:
            raise ApiError(400, "body: not UTF-8 text") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            if type(e) is ValueError and sys.get_int_max_str_digits() > 0:
                raise _huge_number(data) from None  # int() refused one (its wording names Python's limit)
            raise ApiError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}")
        if b"\\u" in data and (where := api.unpaired_surrogate(body)) is not None:  # only an escape makes one
            raise ApiError(400, f"{where}: holds an unpaired UTF-16 surrogate (an escape in \\ud800-\\udfff "
                                f"without its pair), which is not Unicode text", where.split(" ")[0])
        return body

    def timed_out(started: float) -> ApiError | None:
        if request_timeout is not None and time.perf_counter() - started > request_timeout:
            return ApiError(504, f"the request took longer than the server's {request_timeout:g} s limit "
                                 f"(--request-timeout); it was aborted")
        return None

    async def next_message(request: Request, box, started: float):
        """The next (choice index, message) of a job's tickets, ClientGone, or the timeout's ApiError."""
        while True:
            msg = await worker.next(box, POLL_S)
            # The limit is checked on every wake-up: a request whose tokens keep arriving faster than
            # POLL_S must still stop at its deadline (a GPU's steady stream never goes quiet).
            if (late := timed_out(started)) is not None:
                raise late
            if msg is not None:
                return msg
            if await request.is_disconnected():
                raise ClientGone()

    def abort_all(tickets) -> None:
        for t in tickets:
            worker.abort(t)  # harmless when it finished

    class Choices:
        """A job's choices as their events arrive: state, first-token timing, aborts of choices a
        stop string finished."""

        def __init__(self, job: api.Job, tickets, started: float):
            self.job, self.tickets, self.started = job, tickets, started
            self.states = [api.ChoiceState(job, ctx, i) for i in range(len(tickets))]

        @property
        def done(self) -> bool:
            return all(s.finished for s in self.states)

        def push(self, index: int, event) -> api.Piece | None:
            state = self.states[index]
            if not state.tokens and not state.finished:
                worker.metrics.first_token(time.perf_counter() - self.started)
            piece = state.push(event)
            if piece is not None and piece.stopped_by_string:
                worker.abort(self.tickets[index])  # the answer is complete: free its pages now
            return piece

    async def stream(job: api.Job, tickets, choices: Choices, early: list):
        """The SSE body. Cancelled by Starlette when the client leaves; `finally` frees the pages."""
        try:
            if job.kind == "chat":
                for i in range(len(tickets)):
                    yield _sse(api.role_chunk(job, ctx, i))
            while not choices.done:
                msg = early.pop(0) if early else await worker.next(tickets[0], POLL_S)
                if (late := timed_out(choices.started)) is not None:  # on every wake-up, as above
                    yield _sse(late.body())  # in band; `finally` aborts, [DONE] follows
                    break
                if msg is None:
                    continue
                index, (kind, arg) = msg
                if kind == "dead":  # engine failure or shutdown: say so, then end the stream properly
                    yield _sse(ApiError(503, f"the engine stopped during the request: {arg}").body())
                    break
                if kind != "event":
                    continue
                state = choices.states[index]
                first = job.echo and job.kind == "completion" and not state.tokens and not state.finished
                piece = choices.push(index, arg)
                if first:
                    try:
                        echoed = api.echo_chunk(job, ctx, state)
                    except ApiError as e:
                        yield _sse(e.body())
                        break
                    yield _sse(echoed)
                if piece is not None:
                    yield _sse(api.chunk(job, ctx, state, piece))
            if job.include_usage:
                yield _sse(api.usage_chunk(job, ctx, sum(len(s.tokens) for s in choices.states)))
            yield _sse(b"[DONE]")
        finally:
            abort_all(tickets)

    async def run(request: Request, parse) -> Response:
        started = time.perf_counter()
        try:
            job = parse(await read_json(request), ctx)
            try:
                tickets = worker.submit_many([(job.prompt_of(i), p) for i, p in enumerate(job.params)])
            except EngineDead as e:
                raise ApiError(503, f"the engine is not running: {e}") from None
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        streaming = False
        try:
            choices, early, waiting = Choices(job, tickets, started), [], set(range(len(tickets)))
            while waiting:  # every choice admitted (or one refused: then none runs)
                index, (kind, arg) = await next_message(request, tickets[0], started)
                if kind == "rejected":
                    raise ApiError(400, arg)
                if kind == "dead":
                    raise ApiError(503, f"the engine is not running: {arg}")
                if kind == "accepted":
                    waiting.discard(index)
                else:
                    early.append((index, (kind, arg)))
            if job.stream:
                streaming = True  # the stream owns the tickets from here
                return StreamingResponse(stream(job, tickets, choices, early), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            while not choices.done:
                index, (kind, arg) = early.pop(0) if early else await next_message(request, tickets[0], started)
                if kind == "dead":
                    raise ApiError(503, f"the engine stopped during the request: {arg}")
                if kind == "event":
                    choices.push(index, arg)
            return JSONResponse(api.response(job, ctx, choices.states))
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:  # client gone, a failure of ours, or done (then harmless): free the pages
                abort_all(tickets)

    # -- endpoints -------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": ctx.model_name, "object": "model", "created": created, "owned_by": "gemma4-testbed",
                "max_model_len": ctx.max_context}

    @app.get("/health")
    async def health():
        if not worker.alive:
            raise ApiError(503, f"the engine is not running: {worker.error or 'shutting down'}")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": _version(), "model": ctx.model_name}

    @app.get("/metrics")
    async def metrics():
        if worker.alive:
            try:  # fresh queue and pool gauges, read between steps
                worker.metrics.set_gauges(await asyncio.to_thread(worker.gauges))
            except Exception:  # noqa: BLE001 (a busy or dead engine: the last step's gauges stand)
                pass
        return PlainTextResponse(worker.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return api.tokenizer_info(ctx)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return api.parse_tokenize(await read_json(request), ctx)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return api.parse_detokenize(await read_json(request), ctx)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != ctx.model_name:
            raise ApiError(404, f"model: {shown(model_id, repr)} is not served here; this server serves "
                                f"{ctx.model_name!r}",
                           "model")
        return model_card()

    @app.post("/generate")
    async def generate(request: Request):
        return await run(request, api.parse_generate)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, api.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, api.parse_chat)

    return app
