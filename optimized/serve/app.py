"""The HTTP endpoints: a FastAPI app over one EngineWorker (worker.py owns the engine).

    GET  /health                 {"status": "ok"} (503 with the error once the engine has died)
    GET  /version                the package version and the served model
    GET  /v1/models[/{id}]       the one served model, OpenAI-style
    POST /generate               token ids or text in, token ids (and text) out
    POST /v1/completions         OpenAI-compatible subset, streaming as Server-Sent Events
    POST /v1/chat/completions    the same, through the checkpoint's chat template

Every error is JSON {"error": {"message", "type", "code"[, "param"]}}, Starlette's own 404/405
included. Bodies are read and parsed here rather than by FastAPI's body models, so that malformed
JSON, NaN and size limits get our messages and api.py can name the offending field.

A request whose client goes away is aborted, so a disconnect never leaves pages held: a waiting
handler asks uvicorn between engine messages (`request.is_disconnected()`); a stream is cancelled
by Starlette's StreamingResponse, and its generator's `finally` aborts.
"""

from __future__ import annotations

import json
import sys
import traceback
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import api
from .api import ApiError
from .worker import EngineDead, EngineWorker

POLL_S = 0.25  # how often a waiting handler looks whether its client is still there
ROUTES = ["/health", "/version", "/v1/models", "/v1/models/{id}", "/generate", "/v1/completions",
          "/v1/chat/completions"]
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""


def _version() -> str:
    try:
        return metadata.version("gemma4-testbed")
    except metadata.PackageNotFoundError:  # run from a checkout without `pip install -e`
        return "unknown"


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def _error(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(obj) -> bytes:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return b"data: " + payload + b"\n\n"


def create_app(ctx: api.Context, worker: EngineWorker, max_body_bytes: int, created: int) -> FastAPI:
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
            return _error(ApiError(501, f"{method}: not an HTTP method this server implements"))
        if e.status_code == 405:
            allow = (e.headers or {}).get("Allow", "")
            return _error(ApiError(405, f"{method} {path}: method not allowed; use {allow}"), {"Allow": allow})
        if e.status_code == 404:
            return _error(ApiError(404, f"{path}: no such endpoint (there are {', '.join(ROUTES)})"))
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
            raise ApiError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}")
        return body

    async def next_message(request: Request, ticket):
        while True:
            msg = await worker.next(ticket, POLL_S)
            if msg is not None:
                return msg
            if await request.is_disconnected():
                raise ClientGone()

    async def stream(job: api.Job, ticket):
        """The SSE body. Cancelled by Starlette when the client leaves; `finally` frees the pages."""
        try:
            decoder = ctx.tokenizer.stream() if ctx.tokenizer is not None else None
            if job.kind == "chat":
                yield _sse(api.chunk(job, ctx, "", [], None, first=True))
            count, finished = 0, False
            while not finished:
                msg = await worker.next(ticket, POLL_S)
                if msg is None:
                    continue
                kind, arg = msg
                if kind == "dead":  # engine failure or shutdown: say so, then end the stream properly
                    yield _sse(ApiError(503, f"the engine stopped during the request: {arg}").body())
                    break
                count, finished = count + 1, arg.finished
                text = None
                if decoder is not None:
                    # The stop token is not part of the text; whatever the decoder held back is.
                    text = "" if arg.finish_reason == "stop" else decoder.push(arg.token)
                    text += decoder.flush() if finished else ""
                yield _sse(api.chunk(job, ctx, text, [arg.token], arg.finish_reason))
            if job.include_usage:
                yield _sse(api.usage_chunk(job, ctx, count))
            yield _sse(b"[DONE]")
        finally:
            worker.abort(ticket)  # harmless when it finished

    async def run(request: Request, parse) -> Response:
        try:
            job = parse(await read_json(request), ctx)
            try:
                ticket = worker.submit(job.prompt, job.params)
            except EngineDead as e:
                raise ApiError(503, f"the engine is not running: {e}") from None
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        streaming = False
        try:
            kind, arg = await next_message(request, ticket)
            if kind == "rejected":
                raise ApiError(400, arg)
            if kind == "dead":
                raise ApiError(503, f"the engine is not running: {arg}")
            if job.stream:
                streaming = True  # the stream owns the ticket from here
                return StreamingResponse(stream(job, ticket), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            tokens = []
            while True:
                kind, arg = await next_message(request, ticket)
                if kind == "dead":
                    raise ApiError(503, f"the engine stopped during the request: {arg}")
                tokens.append(arg.token)
                if arg.finished:
                    return JSONResponse(api.response(job, ctx, tokens, arg.finish_reason))
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:  # client gone, a failure of ours, or done (then harmless): free the pages
                worker.abort(ticket)

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != ctx.model_name:
            raise ApiError(404, f"model: {model_id!r} is not served here; this server serves {ctx.model_name!r}",
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
