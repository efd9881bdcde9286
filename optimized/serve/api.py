"""Request bodies in, jobs out; engine events in, response bodies out. No sockets here.

Three request shapes share one job: /generate (token ids or text plus the engine's own sampling
fields), /v1/completions and /v1/chat/completions (OpenAI-compatible). Every field is checked
before anything reaches the engine, and an error names the field. The OpenAI shapes accept every
field name OpenAI's API has (pydantic models below), but one we do not implement only at the value
that means "not used" (`suffix: ""`, `tools: []`, `best_of: 1`): a client that asks for something
we do not do must hear so, not get a silently different answer. Names OpenAI does not have are
refused as unknown, except the sampling extensions vLLM and SGLang also take (top_k, min_p,
stop_token_ids, ignore_eos).

One job may run several engine requests, its choices: `n` per prompt, and /v1/completions takes a
list of prompts; choice i answers prompt i // n (OpenAI's order). A choice's text goes through its
ChoiceState: incremental detokenization, then stop strings (text.py); the text never includes
the stop string or the stop token that ended it, while the token ids (`output_ids`, or
`token_ids` in the OpenAI shapes) include every token generated.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optimized.engine import SamplingParams
from optimized.engine.sampler import MAX_LOGPROBS
from optimized.quoting import shown, shown_ids

from .chat import ChatError, ChatTemplate
from .text import StopMatcher
from .tokenizer import Tokenizer

MAX_CHOICES = 128  # prompts x n of one request
MAX_STOPS = 16


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
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice; choice i answers prompts[i // n]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    stop: tuple[str, ...] = ()
    echo: bool = False  # the prompt's text (and logprobs) lead each choice
    logprobs: int | None = None  # None: no logprobs in the answer; k: the chosen token's and the top k
    prompt_texts: list[str | None] = field(default_factory=list)  # what echo shows of each prompt
    drop_tokens: bool = False  # max_tokens 0 (with echo): the one token drawn is not part of the answer

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]


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
        raise bad(f"{key}: must be true or false, got {shown(v, repr)}", key)
    return v


_SURROGATE = re.compile("[\ud800-\udfff]")


def _fields(body):
    """(field path, value) of every value in a parsed JSON body, depth first in document order, and
    ("<object's path> (a field name)", key) for each object's keys before its values. Iterative:
    a body json accepted may nest deeper than this stack has room for."""
    stack = [("", body)]
    while stack:
        where, v = stack.pop()
        yield where or "body", v
        if isinstance(v, dict):
            for k in v:
                yield f"{where or 'body'} (a field name)", k
            stack.extend((f"{where}.{k}" if where else k, x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{where or 'body'}[{i}]", v[i]) for i in reversed(range(len(v))))


def unpaired_surrogate(body) -> str | None:
    """Where a parsed JSON body holds an unpaired UTF-16 surrogate ("\\ud800" alone: valid JSON, not
    Unicode text), as a field path ("messages[0].content"), or None. The tokenizer refuses such a
    string, and an answer or error that quoted it could not be encoded as UTF-8 (both were 500s)."""
    return next((where for where, v in _fields(body) if isinstance(v, str) and _SURROGATE.search(v)), None)


def find_value(body, target) -> str | None:
    """The field path ("stop_token_ids[3]") of the first place that holds the object `target`
    (by identity), or None."""
    return next((where for where, v in _fields(body) if v is target), None)


def _token_ids(v, key: str, ctx: Context) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad(f"{key}: must be a list of integer token ids", key)
    if not v:
        raise bad(f"{key}: must not be empty", key)
    outside = [t for t in v if ctx.vocab_size is not None and not 0 <= t < ctx.vocab_size]
    if outside:
        raise bad(f"{key}: token ids must lie in [0, {ctx.vocab_size}), got {shown_ids(outside[:3])}", key)
    return v


def _fits(job: Job, ctx: Context, prompt_key: str, new_key: str, new_label: str | None = None) -> Job:
    """Each prompt's positions within max_context, said of the field the client can change.
    new_label: how the message names the token count (the client's field; default new_key)."""
    new = job.params[0].max_new_tokens
    for i, prompt in enumerate(job.prompts):
        total = len(prompt) + new
        if total > ctx.max_context:
            key = prompt_key if len(prompt) >= ctx.max_context else new_key
            if key == prompt_key and len(job.prompts) > 1:
                key = f"{prompt_key}[{i}]"
            raise bad(f"{key}: a prompt of {len(prompt)} tokens + {new_label or new_key} {new} = "
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
        if not prompt:  # was the engine's rejection, which names no field
            raise bad("text: encodes to no tokens", "text")
    sampling = body.get("sampling", {})
    if isinstance(sampling, dict):
        for name in ID_LISTS:
            _at_most_vocab(sampling.get(name), f"sampling.{name}", ctx)
    try:
        params = SamplingParams.from_dict(sampling)
    except ValueError as e:
        raise bad(f"sampling: {e}", "sampling") from None
    _check_vocab(params, ctx, "sampling")
    prompt_key = "input_ids" if "input_ids" in body else "text"
    return _fits(Job("generate", [prompt], [params]), ctx, prompt_key, "sampling.max_new_tokens", "max_new_tokens")


def _check_vocab(params: SamplingParams, ctx: Context, where: str | None = None) -> None:
    if ctx.vocab_size is None:
        return
    try:
        params.check_vocab(ctx.vocab_size)
    except ValueError as e:
        key = where or str(e).split(" ")[0]
        raise bad(f"{key}: {str(e).removeprefix(f'{key} ')}", key) from None


ID_LISTS = ("stop_token_ids", "logit_bias")  # fields that hold token ids, each at most once


def _at_most_vocab(v, key: str, ctx: Context) -> None:
    """A list of stop ids, or logit_bias, longer than the vocabulary: refused before anything walks
    it (a body of 8 MB holds millions of ids, and checking them blocked the server for seconds)."""
    if ctx.vocab_size is not None and isinstance(v, (list, dict)) and len(v) > ctx.vocab_size:
        raise bad(f"{key}: at most {ctx.vocab_size} entries (the vocabulary's size; each id counts once), "
                  f"got {len(v)}", key)


# -- OpenAI-compatible -----------------------------------------------------------------------

# OpenAI name -> SamplingParams field; top_k, min_p, stop_token_ids and ignore_eos are the
# extensions vLLM and SGLang also take.
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop_token_ids": "stop_token_ids",
                   "ignore_eos": "ignore_eos", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias"}


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
    min_p: Any = None
    seed: Any = None
    stop_token_ids: Any = None
    ignore_eos: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None


class CompletionRequest(_OpenAIRequest):
    prompt: Any = None
    best_of: Any = _off(1)
    echo: Any = None
    suffix: Any = _off("")
    logprobs: Any = None


class ChatRequest(_OpenAIRequest):
    messages: Any = None
    max_completion_tokens: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
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
            raise bad(f"{key}: not supported here; leave it out or send {allowed}, got {shown(value)}", key)


def _int_in(body: dict, key: str, low: int, high: int, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise bad(f"{key}: must be an integer in [{low}, {high}], got {shown(v)}", key)
    return v


def _stops(body: dict, ctx: Context) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise bad("stop: must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
    stops = [x for x in stops if x]
    if stops and ctx.tokenizer is None:
        raise bad("stop: stop strings are matched on text, and this server has no tokenizer; use stop_token_ids",
                  "stop")
    return tuple(stops)


def _openai_common(body: dict, ctx: Context, kind: str, prompts: list[list[int]], default_max: int,
                   prompt_key: str, logprobs: int | None = None, echo: bool = False,
                   max_key: str = "max_tokens") -> Job:
    """max_key: what the client called body["max_tokens"] (chat: max_completion_tokens, maybe), so
    every message about it names that field."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model: must be a string", "model")
    if model is not None and model != ctx.model_name:
        raise ApiError(404, f"model: {shown(model, repr)} is not served here; this server serves {ctx.model_name!r}",
                       "model")
    n = _int_in(body, "n", 1, MAX_CHOICES, 1)
    if n * len(prompts) > MAX_CHOICES:
        raise bad(f"n: {len(prompts)} prompts x n = {n} is {n * len(prompts)} choices; the limit is {MAX_CHOICES}",
                  "n")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user: must be a string", "user")
    stop = _stops(body, ctx)
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
    drop_tokens = False
    if body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool):
        if kind == "chat":
            raise bad(f"{max_key}: must be >= 1 for chat completions, got 0", max_key)
        if not echo:
            raise bad("max_tokens: must be >= 1 (0 only with echo: true, to score the prompt)", "max_tokens")
        body, drop_tokens = {**body, "max_tokens": 1}, True
    for api_name, name in SAMPLING_FIELDS.items():
        if body.get(api_name) is None:
            continue
        key = max_key if api_name == "max_tokens" else api_name
        if name in ID_LISTS:
            _at_most_vocab(body[api_name], key, ctx)
        try:  # one field at a time, so the error names the field the client sent
            one = SamplingParams.from_dict({name: body[api_name]})
        except ValueError as e:
            # "max_new_tokens must be ..." named the engine's field, one the client never sent
            message = str(e).removeprefix(f"{name} ")
            raise bad(f"{key}: {message}", key) from None
        _check_vocab(one, ctx, key)
        chosen[name] = getattr(one, name)  # checked and normalized once (stop ids deduplicated), not per choice
    given = "max_new_tokens" in chosen
    chosen.setdefault("max_new_tokens", default_max)
    if logprobs is not None:
        chosen["logprobs"] = logprobs
        if echo:
            chosen["prompt_logprobs"] = logprobs
    seed = chosen.pop("seed", None)
    base = SamplingParams.from_dict({**chosen, "seed": seed})  # checked once, not once per choice
    params = [base.with_seed(None if seed is None else (seed + i) % 2 ** 63)
              for i in range(n * len(prompts))]  # n > 1: distinct seeds, choice 0 keeps the one given
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    job = Job(kind, prompts, params, n, stream, include_usage, f"{prefix}-{uuid.uuid4().hex}", stop=stop,
              echo=echo, logprobs=logprobs, drop_tokens=drop_tokens)
    return _fits(job, ctx, prompt_key, max_key, max_key if given else f"the default {max_key}")


def _completion_prompts(body: dict, ctx: Context) -> tuple[list[list[int]], list[str | None]]:
    """The prompts of /v1/completions: a string, token ids, or a list of either (a batch)."""
    p = body["prompt"]
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
        p, key = [p], lambda i: "prompt"
    else:
        key = lambda i: f"prompt[{i}]"  # noqa: E731
        if not isinstance(p, list) or not p:
            raise bad("prompt: must be a string, a list of token ids, or a non-empty list of either", "prompt")
        if not (all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p)):
            raise bad("prompt: a list of prompts must be all strings or all lists of token ids", "prompt")
    prompts, texts = [], []
    for i, x in enumerate(p):
        if isinstance(x, str):
            ids = _encode(ctx, x, key(i))
            if not ids:
                raise bad(f"{key(i)}: encodes to no tokens", key(i))
            prompts.append(ids)
            texts.append(x)
        else:
            prompts.append(_token_ids(x, key(i), ctx))
            texts.append(ctx.tokenizer.decode(x) if ctx.tokenizer is not None else None)
    return prompts, texts


def parse_completion(body: dict, ctx: Context) -> Job:
    _openai_fields(body, CompletionRequest)
    if "prompt" not in body:
        raise bad("prompt: missing (a string, a list of token ids, or a list of either)", "prompt")
    prompts, texts = _completion_prompts(body, ctx)
    echo = _bool(body, "echo")
    logprobs = _int_in(body, "logprobs", 0, MAX_LOGPROBS)
    job = _openai_common(body, ctx, "completion", prompts, 16, "prompt", logprobs, echo)
    job.prompt_texts = texts
    return job


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
    max_key = "max_tokens"
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
        if body.get("max_tokens") is not None:
            raise bad("max_completion_tokens: give it or max_tokens, not both", "max_completion_tokens")
        body, max_key = {**body, "max_tokens": body["max_completion_tokens"]}, "max_completion_tokens"
    want = _bool(body, "logprobs")
    top = _int_in(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs: needs logprobs: true", "top_logprobs")
    # No limit given: as much as the context has room for (OpenAI's chat default). Errors about
    # the limit name the field the client sent.
    return _openai_common(body, ctx, "chat", [prompt], max(1, ctx.max_context - len(prompt)), "messages",
                          (top or 0) if want else None, max_key=max_key)


# -- tokenizer endpoints ---------------------------------------------------------------------

def parse_tokenize(body: dict, ctx: Context) -> dict:
    """/tokenize (vLLM's shape): {"prompt": text[, "add_special_tokens": true]} or {"messages": [...]}."""
    _only(body, {"prompt", "messages", "add_special_tokens", "add_generation_prompt", "model"})
    tokenizer = _need_tokenizer(ctx, "prompt" if "prompt" in body else "messages")
    if ("prompt" in body) == ("messages" in body):
        raise bad("give exactly one of prompt (text) and messages (a chat)", "prompt")
    if "messages" in body:
        if ctx.chat_template is None:
            raise bad("messages: this checkpoint has no chat template", "messages")
        try:
            text = ctx.chat_template.render(body["messages"], _bool(body, "add_generation_prompt", True))
        except ChatError as e:
            raise bad(str(e), "messages") from None
        ids = tokenizer.encode(text, add_special_tokens=_bool(body, "add_special_tokens", False))
    else:
        ids = _encode(ctx, body["prompt"], "prompt", _bool(body, "add_special_tokens", True))
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_context}


def parse_detokenize(body: dict, ctx: Context) -> dict:
    _only(body, {"tokens", "model", "skip_special_tokens"})
    tokenizer = _need_tokenizer(ctx, "tokens")
    if "tokens" not in body:
        raise bad("tokens: missing (a list of token ids)", "tokens")
    ids = body["tokens"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("tokens: must be a list of integer token ids", "tokens")
    limit = ctx.vocab_size if ctx.vocab_size is not None else tokenizer.vocab_size
    outside = [t for t in ids if not 0 <= t < limit]
    if outside:
        raise bad(f"tokens: token ids must lie in [0, {limit}), got {shown_ids(outside[:3])}", "tokens")
    return {"prompt": tokenizer.decode(ids, skip_special_tokens=_bool(body, "skip_special_tokens", True))}


def tokenizer_info(ctx: Context) -> dict:
    tok = _need_tokenizer(ctx, "tokenizer")
    return {"tokenizer_class": "tokenizers.Tokenizer", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": None, "model_max_length": ctx.max_context,
            "chat_template": ctx.chat_template.source if ctx.chat_template is not None else None}


# -- answers ---------------------------------------------------------------------------------

@dataclass
class Piece:
    """What one engine event added to a choice."""
    text: str | None  # None without a tokenizer
    tokens: list[int]
    logprobs: list[tuple]  # (token id, logprob, top ((id, logprob), ...)) of tokens
    finish_reason: str | None
    stopped_by_string: bool = False  # the engine request must be aborted: the answer is complete


class ChoiceState:
    """One choice as its events arrive: tokens, text (detokenized, then cut at stop strings),
    logprobs, and the finish reason."""

    def __init__(self, job: Job, ctx: Context, index: int):
        self.job, self.index = job, index
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[tuple] = []
        self.prompt_logprobs: tuple | None = None
        self.finish_reason: str | None = None
        self.decoder = ctx.tokenizer.stream() if ctx.tokenizer is not None else None
        self.stop = StopMatcher(job.stop)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        return "".join(self.texts) if self.decoder is not None else None

    def push(self, event) -> Piece | None:
        """The piece an engine event adds; None once the choice has finished (events after a stop
        string, before the abort lands)."""
        if self.finished:
            return None
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if self.job.drop_tokens:  # max_tokens 0: the prompt only
            self.finish_reason = "length"
            return Piece("" if self.decoder is not None else None, [], [], "length", not event.finished)
        self.tokens.append(event.token)
        lps = [] if event.logprob is None else [(event.token, event.logprob, event.top_logprobs)]
        self.logprobs += lps
        text = None
        if self.decoder is not None:
            # The stop token is not part of the text; whatever the decoder held back is.
            raw = "" if event.finish_reason == "stop" else self.decoder.push(event.token)
            raw += self.decoder.flush() if event.finished else ""
            text = self.stop.push(raw)
            if event.finished and not self.stop.stopped:
                text += self.stop.flush()
            self.texts.append(text)
        if self.stop.stopped:
            self.finish_reason = "stop"
            return Piece(text, [event.token], lps, "stop", not event.finished)
        self.finish_reason = event.finish_reason if event.finished else None
        return Piece(text, [event.token], lps, self.finish_reason)

    def echo_entries(self) -> list[tuple]:
        """(token id, logprob, top) of the prompt tokens; the first has no logprob."""
        prompt = self.job.prompt_of(self.index)
        lps = self.prompt_logprobs or [(None, None)] * len(prompt)
        if self.job.logprobs is not None and any(lp is None for lp, _ in lps[1:]):
            # The engine lent this prompt a prefix whose rows it therefore never computed: say
            # so rather than answer nulls a client would sum.
            raise ApiError(503, "logprobs: the prompt's logprobs are incomplete (the engine reused a cached "
                                "prefix of it); retry", "logprobs")
        return [(t, lp, top) for t, (lp, top) in zip(prompt, lps)]


def _token_str(ctx: Context, token: int) -> str:
    return ctx.tokenizer.token_text(token) if ctx.tokenizer is not None else f"token_id:{token}"


def completion_logprobs(ctx: Context, entries: list[tuple], offset: int = 0) -> dict:
    """OpenAI's completions shape: parallel lists over the tokens."""
    tokens = [_token_str(ctx, t) for t, _, _ in entries]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {_token_str(ctx, i): v for i, v in top}
                             for _, _, top in entries],
            "text_offset": offsets}


def chat_logprobs(ctx: Context, entries: list[tuple]) -> dict:
    """OpenAI's chat shape: one object per token, with its bytes and its top alternatives."""
    def one(t, lp):
        s = _token_str(ctx, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top or ()]} for t, lp, top in entries],
            "refusal": None}


def _choice_logprobs(job: Job, ctx: Context, state: ChoiceState, entries: list[tuple], echo: bool):
    if job.logprobs is None:
        return None
    if job.kind == "chat":
        return chat_logprobs(ctx, entries)
    lead = state.echo_entries() if echo else []
    return completion_logprobs(ctx, lead + entries)


def usage(job: Job, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in job.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _echo_text(job: Job, state: ChoiceState) -> str:
    if not (job.echo and job.prompt_texts):
        return ""
    return job.prompt_texts[state.index // job.n] or ""


def response(job: Job, ctx: Context, states: list[ChoiceState]) -> dict:
    """The whole (non-streaming) answer."""
    if job.kind == "generate":
        (st,) = states
        out = {"output_ids": st.tokens, "finish_reason": st.finish_reason, "prompt_tokens": len(job.prompt)}
        if st.text is not None:
            out["text"] = st.text
        if st.logprobs:
            out["output_logprobs"] = [{"token_id": t, "logprob": lp, "top_logprobs": [list(x) for x in top]}
                                      for t, lp, top in st.logprobs]
        if st.prompt_logprobs is not None:
            out["prompt_logprobs"] = [None if lp is None else {"logprob": lp, "top_logprobs": [list(x) for x in top]}
                                      for lp, top in st.prompt_logprobs]
        return out
    choices = []
    for st in states:
        lp = _choice_logprobs(job, ctx, st, st.logprobs, job.echo)
        if job.kind == "chat":
            choice = {"index": st.index, "message": {"role": "assistant", "content": st.text}, "logprobs": lp}
        else:
            choice = {"index": st.index, "text": _echo_text(job, st) + (st.text or ""), "logprobs": lp}
        choice.update(finish_reason=st.finish_reason, token_ids=st.tokens)
        choices.append(choice)
    return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": ctx.model_name, "choices": choices,
            "usage": usage(job, sum(len(st.tokens) for st in states))}


def _chunk(job: Job, ctx: Context, choice: dict) -> dict:
    out = {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
           "created": job.created, "model": ctx.model_name, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None  # OpenAI's convention: null on every chunk but the last
    return out


def role_chunk(job: Job, ctx: Context, index: int) -> dict:
    """A chat stream's first chunk of a choice: the role."""
    return _chunk(job, ctx, {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None, "token_ids": []})


def echo_chunk(job: Job, ctx: Context, state: ChoiceState) -> dict:
    """A completions stream with echo: the prompt's text (and logprobs) before the first token."""
    lp = completion_logprobs(ctx, state.echo_entries()) if job.logprobs is not None else None
    return _chunk(job, ctx, {"index": state.index, "text": _echo_text(job, state), "logprobs": lp,
                             "finish_reason": None, "token_ids": []})


def chunk(job: Job, ctx: Context, state: ChoiceState, piece: Piece) -> dict:
    """One streamed piece: the text and token ids one engine event added to a choice."""
    lp = _choice_logprobs(job, ctx, state, piece.logprobs, False)
    if job.kind == "chat":
        choice = {"index": state.index, "delta": {"content": piece.text} if piece.text else {}, "logprobs": lp}
    else:
        choice = {"index": state.index, "text": piece.text if piece.text is not None else "", "logprobs": lp}
    choice.update(finish_reason=piece.finish_reason, token_ids=piece.tokens)
    return _chunk(job, ctx, choice)


def usage_chunk(job: Job, ctx: Context, completion_tokens: int) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": ctx.model_name, "choices": [], "usage": usage(job, completion_tokens)}
