"""Request bodies in, jobs out; generated tokens in, response bodies out. No sockets here.

Three request shapes share one job: /generate (token ids or text plus the engine's own sampling
fields), /v1/completions and /v1/chat/completions (an OpenAI-compatible subset). Every field is
checked before anything reaches the engine, and an error names the field. The OpenAI shapes accept
every field name OpenAI's API has (pydantic models below), but one we do not implement only at the
value that means "not used" (`frequency_penalty: 0`, `logprobs: null`, `n: 1`): a client that asks
for something we do not do (stop strings, penalties, n > 1) must hear so, not get a silently
different answer. Names OpenAI does not have are refused as unknown.

Text in responses is the generated text without the stop token that ended it; the token ids
(`output_ids`, or `token_ids` in the OpenAI shapes) include it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optimized.engine import SamplingParams

from .chat import ChatError, ChatTemplate
from .tokenizer import Tokenizer


class ApiError(Exception):
    """An answer other than 200: status, message, and the OpenAI-style error type."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "method_not_allowed",
             411: "length_required", 413: "request_too_large", 500: "internal_error", 503: "engine_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        err = {"message": self.message, "type": self.TYPES.get(self.status, "error"), "code": self.status}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Context:
    """What request parsing needs to know about the server."""
    model_name: str
    max_context: int
    tokenizer: Tokenizer | None = None
    chat_template: ChatTemplate | None = None
    vocab_size: int | None = None  # token ids are checked here, so the error names the client's field


@dataclass
class Job:
    kind: str  # "generate", "completion" or "chat"
    prompt: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


# -- field checks ----------------------------------------------------------------------------

def _only(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise bad(f"{key}: unknown field; this endpoint takes {', '.join(sorted(allowed))}", key)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{key}: must be true or false, got {v!r}", key)
    return v


def _token_ids(v, key: str, ctx: Context) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad(f"{key}: must be a list of integer token ids", key)
    if not v:
        raise bad(f"{key}: must not be empty", key)
    outside = [t for t in v if ctx.vocab_size is not None and not 0 <= t < ctx.vocab_size]
    if outside:
        raise bad(f"{key}: token ids must lie in [0, {ctx.vocab_size}), got {outside[:3]}", key)
    return v


def _fits(job: Job, ctx: Context, prompt_key: str, new_key: str) -> Job:
    """The request's positions within max_context, said of the field the client can change."""
    total = len(job.prompt) + job.params.max_new_tokens
    if total > ctx.max_context:
        key = prompt_key if len(job.prompt) >= ctx.max_context else new_key
        raise bad(f"{key}: a prompt of {len(job.prompt)} tokens + max_new_tokens {job.params.max_new_tokens} = "
                  f"{total} positions exceeds max_context {ctx.max_context}", key)
    return job


def _need_tokenizer(ctx: Context, key: str) -> Tokenizer:
    if ctx.tokenizer is None:
        raise bad(f"{key}: text input needs a tokenizer, and this server has none (it serves a preset or a "
                  "checkpoint without tokenizer.json); send token ids instead", key)
    return ctx.tokenizer


def _encode(ctx: Context, text, key: str, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(text, str):
        raise bad(f"{key}: must be a string", key)
    return _need_tokenizer(ctx, key).encode(text, add_special_tokens=add_special_tokens)


# -- /generate -------------------------------------------------------------------------------

def parse_generate(body: dict, ctx: Context) -> Job:
    _only(body, {"input_ids", "text", "sampling", "add_special_tokens"})
    if ("input_ids" in body) == ("text" in body):
        raise bad("give exactly one of input_ids (token ids) and text", "input_ids")
    add_special_tokens = _bool(body, "add_special_tokens", True)  # checked even where unused
    if "input_ids" in body:
        prompt = _token_ids(body["input_ids"], "input_ids", ctx)
    else:
        prompt = _encode(ctx, body["text"], "text", add_special_tokens)
    sampling = body.get("sampling", {})
    try:
        params = SamplingParams.from_dict(sampling)
    except ValueError as e:
        raise bad(f"sampling: {e}", "sampling") from None
    prompt_key = "input_ids" if "input_ids" in body else "text"
    return _fits(Job("generate", prompt, params), ctx, prompt_key, "sampling.max_new_tokens")


# -- OpenAI-compatible -----------------------------------------------------------------------

# OpenAI name -> SamplingParams field; top_k, stop_token_ids and ignore_eos are the extensions
# vLLM and SGLang also take.
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "seed": "seed", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos"}


def _off(*values):
    """A field we do not implement, accepted only at the values that mean "not used" (null always)."""
    return Field(default=None, json_schema_extra={"off": list(values)})


class _OpenAIRequest(BaseModel):
    """The fields both OpenAI shapes take. Supported ones are typed Any on purpose: the parse_*
    functions check them, so an error names the field and the engine's own bound."""
    model_config = ConfigDict(extra="forbid")

    model: Any = None
    stream: Any = None
    stream_options: Any = None
    n: Any = None
    user: Any = None
    stop: Any = None
    max_tokens: Any = None
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None
    seed: Any = None
    stop_token_ids: Any = None
    ignore_eos: Any = None
    frequency_penalty: Any = _off(0)
    presence_penalty: Any = _off(0)
    logit_bias: Any = _off({})


class CompletionRequest(_OpenAIRequest):
    prompt: Any = None
    best_of: Any = _off(1)
    echo: Any = _off(False)
    suffix: Any = _off("")
    logprobs: Any = _off()


class ChatRequest(_OpenAIRequest):
    messages: Any = None
    max_completion_tokens: Any = None
    logprobs: Any = _off(False)
    top_logprobs: Any = _off(0)
    tools: Any = _off([])
    tool_choice: Any = _off("none", "auto")  # "auto" with no tools is "none"
    parallel_tool_calls: Any = _off(True, False)
    functions: Any = _off([])
    function_call: Any = _off("none", "auto")
    response_format: Any = _off({"type": "text"})
    metadata: Any = _off({})
    store: Any = _off(False)
    service_tier: Any = _off("auto", "default")
    reasoning_effort: Any = _off()
    modalities: Any = _off(["text"])
    audio: Any = _off()
    prediction: Any = _off()
    web_search_options: Any = _off()


def _same(a, b) -> bool:
    """JSON equality: 0 == 0.0, but false is no 0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    numbers = (int, float)
    return (type(a) in numbers and type(b) in numbers or type(a) is type(b)) and a == b


def _openai_fields(body: dict, shape: type[_OpenAIRequest]) -> None:
    try:
        req = shape.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            names = ", ".join(sorted(shape.model_fields))
            raise bad(f"{key}: unknown field; this endpoint takes {names}", key) from None
        raise bad(f"{key}: {err['msg']}", key) from None
    for key in req.model_fields_set:
        off = (shape.model_fields[key].json_schema_extra or {}).get("off")
        value = getattr(req, key)
        if off is not None and value is not None and not any(_same(value, o) for o in off):
            allowed = " or ".join(["null", *(json.dumps(o) for o in off)])
            raise bad(f"{key}: not supported here; leave it out or send {allowed}, got {json.dumps(value)}", key)


def _openai_common(body: dict, ctx: Context, kind: str, prompt: list[int], default_max: int) -> Job:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model: must be a string", "model")
    if model is not None and model != ctx.model_name:
        raise ApiError(404, f"model: {model!r} is not served here; this server serves {ctx.model_name!r}", "model")
    if body.get("n") not in (None, 1):
        raise bad(f"n: only n = 1 is supported, got {body['n']!r}", "n")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user: must be a string", "user")
    if body.get("stop") not in (None, [], ""):
        raise bad("stop: stop strings are not supported; use stop_token_ids", "stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options: must be an object with only include_usage", "stream_options")
        if not stream:
            raise bad("stream_options: only allowed with stream: true", "stream_options")
        include_usage = _bool(options, "include_usage")
    chosen = {}
    for api_name, name in SAMPLING_FIELDS.items():
        if body.get(api_name) is None:
            continue
        try:  # one field at a time, so the error names the field the client sent
            SamplingParams.from_dict({name: body[api_name]})
        except ValueError as e:
            raise bad(f"{api_name}: {e}", api_name) from None
        chosen[name] = body[api_name]
    chosen.setdefault("max_new_tokens", default_max)
    params = SamplingParams.from_dict(chosen)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    job = Job(kind, prompt, params, stream, include_usage, f"{prefix}-{uuid.uuid4().hex}")
    return _fits(job, ctx, "messages" if kind == "chat" else "prompt", "max_tokens")


def parse_completion(body: dict, ctx: Context) -> Job:
    _openai_fields(body, CompletionRequest)
    if "prompt" not in body:
        raise bad("prompt: missing (a string, or a list of token ids)", "prompt")
    p = body["prompt"]
    if isinstance(p, list) and p and all(isinstance(x, (list, str)) for x in p):
        raise bad("prompt: only one prompt per request is supported", "prompt")
    if isinstance(p, str):
        prompt = _encode(ctx, p, "prompt")
    elif isinstance(p, list):
        prompt = _token_ids(p, "prompt", ctx)
    else:
        raise bad("prompt: must be a string or a list of token ids", "prompt")
    return _openai_common(body, ctx, "completion", prompt, default_max=16)


def parse_chat(body: dict, ctx: Context) -> Job:
    _openai_fields(body, ChatRequest)
    if ctx.chat_template is None:
        raise bad("this checkpoint has no chat template (chat_template.jinja, or chat_template in "
                  "tokenizer_config.json); use /v1/completions", "messages")
    if "messages" not in body:
        raise bad("messages: missing", "messages")
    tokenizer = _need_tokenizer(ctx, "messages")
    try:
        text = ctx.chat_template.render(body["messages"], add_generation_prompt=True)
    except ChatError as e:
        raise bad(str(e), "messages") from None
    # The template writes its own <bos>; encoding must not add a second (as apply_chat_template).
    prompt = tokenizer.encode(text, add_special_tokens=False)
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
        if body.get("max_tokens") is not None:
            raise bad("max_completion_tokens: give it or max_tokens, not both", "max_completion_tokens")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    # No limit given: as much as the context has room for (OpenAI's chat default).
    return _openai_common(body, ctx, "chat", prompt, default_max=max(1, ctx.max_context - len(prompt)))


# -- responses -------------------------------------------------------------------------------

def answer_text(tokenizer: Tokenizer | None, tokens: list[int], finish_reason: str | None) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode(tokens[:-1] if finish_reason == "stop" else tokens)


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt) + completion_tokens}


def response(job: Job, ctx: Context, tokens: list[int], finish_reason: str) -> dict:
    """The whole (non-streaming) answer."""
    text = answer_text(ctx.tokenizer, tokens, finish_reason)
    if job.kind == "generate":
        out = {"output_ids": tokens, "finish_reason": finish_reason, "prompt_tokens": len(job.prompt)}
        if text is not None:
            out["text"] = text
        return out
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    choice.update(finish_reason=finish_reason, token_ids=tokens)
    return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": ctx.model_name, "choices": [choice], "usage": usage(job, len(tokens))}


def chunk(job: Job, ctx: Context, text: str | None, tokens: list[int], finish_reason: str | None,
          first: bool = False) -> dict:
    """One streamed piece: the text and token ids one engine event added."""
    if job.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    choice.update(finish_reason=finish_reason, token_ids=tokens)
    out = {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
           "created": job.created, "model": ctx.model_name, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None  # OpenAI's convention: null on every chunk but the last
    return out


def usage_chunk(job: Job, ctx: Context, completion_tokens: int) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": ctx.model_name, "choices": [], "usage": usage(job, completion_tokens)}
