"""The HTTP server (optimized/serve/) end to end, through urllib against a live server on port 0.

Token budget: on a CPU the servers here run no Triton (engine_helpers.SERVE_OPS); the tests that
need a slow engine (shutdown with a stream in flight, the request timeout) keep the interpreted
kernels, whose step takes about a second on 2 cores. Requests ask for a few tokens each, and
"what a request gets alone" for greedy decoding is the eager reference's argmax loop
(milliseconds), which the first test ties to the engine (with the kernels) and the server.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

try:
    import tokenizers
except ImportError:  # optional: without it the server takes token ids only
    tokenizers = None

# The server needs the optional `serve` extra (FastAPI, uvicorn); CI installs it, a bare GPU box may not.
pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")

import reference  # noqa: E402
import optimized.serve.app as serve_app  # noqa: E402
from oracle.cli import OPS, build_parser, main  # noqa: E402
from optimized.engine import Engine, Event, SamplingParams
from optimized.kernels import default_device
from tests.engine_helpers import SERVE_OPS
from optimized.serve import (ChatError, ChatTemplate, Tokenizer, build_server, load_chat_template, load_tokenizer,
                             make_server)

P1 = [5, 9, 2, 77, 31, 140]
DEVICE = default_device()  # the machine's: on a GPU the engine serves with compiled kernels
needs_tokenizers = pytest.mark.skipif(tokenizers is None, reason="text input needs the optional `tokenizers` package")

# -- helpers ---------------------------------------------------------------------------------


def call(server, path, body=None, method=None, raw: bytes | None = None, timeout=120):
    """(status, parsed JSON or text) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text, ctype = r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read().decode(), e.headers.get("Content-Type")
    return status, (json.loads(text) if ctype == "application/json" else text)


def events(server, path, body):
    """The parsed `data:` events of a streamed answer, checking it ends with [DONE]."""
    status, text = call(server, path, {**body, "stream": True})
    assert status == 200, text
    datas = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


def raw_request(server, payload: bytes) -> tuple[int, dict]:
    """Send bytes as they are (for what urllib refuses to send) and read the answer."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(payload)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read())


def error_of(reply) -> str:
    assert isinstance(reply, dict) and set(reply) == {"error"}, reply
    return reply["error"]["message"]


@torch.no_grad()
def reference_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor(ids, device=model.device))[-1].argmax()))
    return ids[len(prompt):]


def run_server(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def engine_stats(server):
    """Engine.stats() (queues, free pages, registered requests), read on the engine thread."""
    return server.worker.call(lambda e: e.stats())


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    srv = make_server(Engine("tiny", dtype=torch.float32, device=DEVICE, **SERVE_OPS), model_name="tiny")
    thread = run_server(srv)
    yield srv
    srv.shutdown()
    thread.join(10)
    assert not srv.worker._thread.is_alive(), "shutdown must end the engine thread"


@pytest.fixture(scope="module")
def ref_model():
    # On the server's device: a preset's seeded random weights are drawn by that device's
    # generator (reference/weights.py), so a CPU copy would be another model on a GPU machine.
    return reference.load_model("tiny", dtype=torch.float32, device=DEVICE)


@pytest.fixture(scope="module")
def p1_alone(server):
    """P1's greedy tokens through /generate, alone on the server."""
    status, reply = call(server, "/generate", {"input_ids": P1, "sampling": {"max_new_tokens": 4, "ignore_eos": True}})
    assert status == 200, reply
    return reply


# -- correctness -----------------------------------------------------------------------------


def test_health_and_models(server):
    assert call(server, "/health") == (200, {"status": "ok"})
    status, reply = call(server, "/v1/models")
    assert status == 200 and reply["object"] == "list"
    assert [m["id"] for m in reply["data"]] == ["tiny"] and reply["data"][0]["max_model_len"] == 4096


def test_generate_matches_engine_and_reference(p1_alone, ref_model):
    assert p1_alone["finish_reason"] == "length" and p1_alone["prompt_tokens"] == len(P1)
    assert "text" not in p1_alone  # no tokenizer
    second = Engine("tiny", dtype=torch.float32, device=DEVICE)  # with the kernels, wherever the suite runs
    (out,) = second.generate([P1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert p1_alone["output_ids"] == out.tokens
    assert out.tokens == reference_greedy(ref_model, P1, 4)


def test_stream_yields_the_non_streaming_tokens(server, p1_alone):
    evs = events(server, "/v1/completions", {"prompt": P1, "max_tokens": 4, "ignore_eos": True})
    assert [t for e in evs for t in e["choices"][0]["token_ids"]] == p1_alone["output_ids"]
    assert [e["choices"][0]["finish_reason"] for e in evs] == [None, None, None, "length"]
    assert {e["id"] for e in evs} == {evs[0]["id"]} and evs[0]["object"] == "text_completion"


def test_concurrent_requests_get_what_they_get_alone(server, p1_alone, ref_model):
    sampled = {"prompt": list(range(40, 49)), "max_tokens": 3, "temperature": 1.0, "top_k": 50, "seed": 123,
               "ignore_eos": True}
    status, alone = call(server, "/v1/completions", sampled)
    assert status == 200, alone
    b_prompt = [11, 22, 33]
    jobs = {
        "p1": lambda: call(server, "/generate", {"input_ids": P1, "sampling": {"max_new_tokens": 4, "ignore_eos": True}}),
        "b": lambda: events(server, "/v1/completions", {"prompt": b_prompt, "max_tokens": 3, "ignore_eos": True}),
        "sampled": lambda: call(server, "/v1/completions", sampled),
        "bad": lambda: call(server, "/generate", {"input_ids": [300]}),  # a rejection beside them harms none
    }
    results, gate = {}, threading.Barrier(len(jobs))

    def run(name):
        gate.wait()
        results[name] = jobs[name]()

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["p1"] == (200, p1_alone)
    assert [t for e in results["b"] for t in e["choices"][0]["token_ids"]] == reference_greedy(ref_model, b_prompt, 3)
    status, got = results["sampled"]
    assert status == 200 and got["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]
    assert got["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert results["bad"][0] == 400


def test_generate_returns_logprobs_when_asked(server):
    body = {"input_ids": P1, "sampling": {"max_new_tokens": 2, "ignore_eos": True, "logprobs": 2,
                                          "prompt_logprobs": 1}}
    status, reply = call(server, "/generate", body)
    assert status == 200, reply
    status, openai_shape = call(server, "/v1/completions", {"prompt": P1, "max_tokens": 2, "ignore_eos": True,
                                                            "logprobs": 2, "echo": True})
    lps = openai_shape["choices"][0]["logprobs"]["token_logprobs"]
    assert [e["logprob"] for e in reply["output_logprobs"]] == pytest.approx(lps[len(P1):], abs=1e-5)
    assert [e["token_id"] for e in reply["output_logprobs"]] == reply["output_ids"]
    assert reply["prompt_logprobs"][0] is None
    assert [e["logprob"] for e in reply["prompt_logprobs"][1:]] == pytest.approx(lps[1:len(P1)], abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in reply["output_logprobs"])


def test_extreme_temperatures_and_top_p_are_answered_and_keep_the_engine_up(server, p1_alone):
    # Temperature 10**30, a JSON integer, overflowed the sampler's float tensor inside an engine step:
    # the engine thread died and every later request got 503. 1e-320 (0 in float32) drew token id 0, and
    # top_p 1e-320 cut every id, killing the engine on a gather at index -1.
    greedy = p1_alone["output_ids"][:1]
    for extreme in ({"temperature": 10**30}, {"temperature": 1e-320}, {"temperature": 1.0, "top_p": 1e-320}):
        status, reply = call(server, "/v1/completions", {"prompt": P1, "max_tokens": 1, "seed": 5, **extreme})
        assert status == 200 and len(reply["choices"][0]["token_ids"]) == 1, (extreme, reply)
        if extreme != {"temperature": 10**30}:  # the limit of a vanishing temperature or nucleus: greedy
            assert reply["choices"][0]["token_ids"] == greedy, (extreme, reply)
    status, reply = call(server, "/generate", {"input_ids": P1, "sampling": {"temperature": 10**400}})
    assert status == 400 and "temperature" in error_of(reply)  # past float64: refused, not inf
    assert call(server, "/health") == (200, {"status": "ok"})


def test_client_disconnect_aborts_its_request(server):
    idle = engine_stats(server)
    assert idle["waiting"] == idle["running"] == idle["requests_in_cache"] == 0

    def post(body):
        data = json.dumps(body).encode()
        return f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data

    long = {"prompt": P1, "max_tokens": 200, "ignore_eos": True}
    with socket.create_connection(server.server_address[:2], timeout=60) as sock:  # streaming: gone after a token
        sock.sendall(post({**long, "stream": True}))
        seen = b""
        while b"data:" not in seen:
            seen += sock.recv(4096)
    with socket.create_connection(server.server_address[:2], timeout=60) as sock:  # waiting: gone at once
        sock.sendall(post(long))
    deadline = time.monotonic() + 60
    while engine_stats(server) != idle:
        assert time.monotonic() < deadline, f"pages not given back: {engine_stats(server)} vs idle {idle}"
        time.sleep(0.2)


# -- bad input -------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (method, path, body (dict, or bytes as sent), status, words the message must contain)
    ("POST", "/generate", b"{not json", 400, "not valid JSON"),
    ("POST", "/generate", b"[1, 2]", 400, "JSON object"),
    ("POST", "/generate", b'{"input_ids": [1], "sampling": {"temperature": NaN}}', 400, "NaN"),
    ("POST", "/generate", b"\xff\xfe", 400, "UTF-8"),
    ("POST", "/generate", b"[" * 100_000, 400, "not valid JSON"),  # too deep to parse: refused, not a crash
    ("POST", "/generate", b"", 400, "not valid JSON"),
    # An unpaired surrogate escape is valid JSON but not text: the tokenizer raised TypeError, and an error
    # quoting it (an unknown field's name) could not be encoded as UTF-8. Both were 500s.
    ("POST", "/v1/completions", b'{"prompt": "hi \\ud800"}', 400, "prompt: holds an unpaired UTF-16 surrogate"),
    ("POST", "/generate", b'{"input_ids": [1], "\\udc00": 1}', 400, "body (a field name): holds an unpaired"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": '
     b'"\\ud83d"}]}]}', 400, "messages[0].content[0].text: holds an unpaired"),
    ("POST", "/generate", {"input_ids": [1], "colour": 1}, 400, "colour: unknown field"),
    ("POST", "/generate", {"input_ids": [1], "text": "a"}, 400, "exactly one of input_ids"),
    ("POST", "/generate", {}, 400, "exactly one of input_ids"),
    ("POST", "/generate", {"input_ids": "1 2"}, 400, "input_ids: must be a list"),
    ("POST", "/generate", {"input_ids": [1, True]}, 400, "input_ids: must be a list of integer"),
    ("POST", "/generate", {"input_ids": []}, 400, "input_ids: must not be empty"),
    ("POST", "/generate", {"input_ids": [5, 999]}, 400, "[0, 256)"),
    ("POST", "/generate", {"input_ids": [1], "sampling": {"bogus": 1}}, 400, "bogus"),
    ("POST", "/generate", {"input_ids": [1], "sampling": {"temperature": -1}}, 400, "temperature"),
    ("POST", "/generate", {"input_ids": [1], "sampling": []}, 400, "sampling"),
    ("POST", "/generate", {"input_ids": [1], "sampling": {"max_new_tokens": 5000}}, 400, "max_context"),
    ("POST", "/generate", {"text": "hello"}, 400, "needs a tokenizer"),
    ("POST", "/v1/completions", {"max_tokens": 2}, 400, "prompt: missing"),
    ("POST", "/v1/completions", {"prompt": "hi"}, 400, "needs a tokenizer"),
    ("POST", "/v1/completions", {"prompt": [[1], "a"]}, 400, "all strings or all lists"),
    ("POST", "/v1/completions", {"prompt": [[1], [300]]}, 400, "prompt[1]: token ids must lie in [0, 256)"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "prompt: must be"),
    ("POST", "/v1/completions", {"prompt": 7}, 400, "prompt: must be a string, a list of token ids"),
    ("POST", "/v1/completions", {"prompt": [1], "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": [1], "top_p": 2}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": [1], "seed": "x"}, 400, "seed"),
    ("POST", "/v1/completions", {"prompt": [1], "stop_token_ids": [999]}, 400, "stop_token_ids"),
    # Longer than the vocabulary: refused before anything walks it (millions fit in 8 MB).
    ("POST", "/v1/completions", {"prompt": [1], "stop_token_ids": [3] * 257}, 400,
     "stop_token_ids: at most 256 entries"),
    ("POST", "/generate", {"input_ids": [1], "sampling": {"logit_bias": {str(i): 1 for i in range(300)}}}, 400,
     "sampling.logit_bias: at most 256 entries"),
    # An integer past int()'s 4300 digits got Python's own wording ("Exceeds the limit ... use
    # sys.set_int_max_str_digits()"); it names the field now, or says plainly what is wrong.
    ("POST", "/v1/completions", b'{"prompt": [1], "stop_token_ids": [1, ' + b"9" * 4301 + b"]}", 400,
     "stop_token_ids[1]: a number with more than 4300 digits"),
    ("POST", "/generate", b'{"input_ids": [1], "sampling": {"seed": -' + b"9" * 5000 + b"}}", 400,
     "sampling.seed: a number with more than 4300 digits"),
    ("POST", "/v1/completions", b'{"prompt": [1], "seed": ' + b"9" * 5000 + b", oops}", 400,
     "body: a number in the body has more than 4300 digits"),
    # Errors about max_tokens said max_new_tokens, the engine's name, which the client never sent.
    ("POST", "/v1/completions", {"prompt": [1], "max_tokens": -1}, 400, "max_tokens: must be an integer >= 1"),
    ("POST", "/v1/completions", {"prompt": [1], "max_tokens": 5000}, 400,
     "max_tokens: a prompt of 1 tokens + max_tokens 5000 = 5001 positions exceeds max_context 4096"),
    ("POST", "/v1/completions", {"prompt": [1] * 4090}, 400, "+ the default max_tokens 16 = 4106 positions"),
    ("POST", "/v1/completions", {"prompt": [1], "stream": "yes"}, 400, "stream: must be true or false"),
    ("POST", "/v1/completions", {"prompt": [1], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("POST", "/v1/completions", {"prompt": [1], "n": 0}, 400, "n: must be an integer in [1, 128]"),
    ("POST", "/v1/completions", {"prompt": [[1]] * 3, "n": 50}, 400, "150 choices"),
    ("POST", "/v1/completions", {"prompt": [1], "stop": ["x"]}, 400, "stop: stop strings are matched on text"),
    ("POST", "/v1/completions", {"prompt": [1], "stop": 3}, 400, "stop: must be a string or a list"),
    ("POST", "/v1/completions", {"prompt": [1], "presence_penalty": 5}, 400, "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": [1], "frequency_penalty": "x"}, 400, "frequency_penalty"),
    ("POST", "/v1/completions", {"prompt": [1], "logit_bias": {"999": 1}}, 400, "logit_bias"),
    ("POST", "/v1/completions", {"prompt": [1], "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("POST", "/v1/completions", {"prompt": [1], "min_p": 2}, 400, "min_p"),
    ("POST", "/v1/completions", {"prompt": [1], "echo": "yes"}, 400, "echo: must be true or false"),
    ("POST", "/v1/completions", {"prompt": [1], "logprobs": 21}, 400, "logprobs: must be an integer in [0, 20]"),
    ("POST", "/v1/completions", {"prompt": [1], "logprobs": True}, 400, "logprobs: must be an integer"),
    ("POST", "/v1/completions", {"prompt": [1], "suffix": "x"}, 400, "suffix: not supported"),
    ("POST", "/v1/completions", {"prompt": [1], "best_of": 3}, 400, "best_of: not supported"),
    ("POST", "/tokenize", {"prompt": "hi"}, 400, "needs a tokenizer"),
    ("POST", "/detokenize", {"tokens": [1]}, 400, "needs a tokenizer"),
    ("POST", "/v1/completions", {"prompt": [1], "colour": 1}, 400, "colour: unknown field"),
    ("POST", "/v1/chat/completions", {"messages": [], "tools": [{"type": "function"}]}, 400, "tools: not supported"),
    ("POST", "/v1/completions", {"prompt": [1], "model": "other"}, 404, "'other' is not served"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "no chat template"),
    ("GET", "/nope", None, 404, "/nope: no such endpoint"),
    ("POST", "/v1/nope", {"prompt": [1]}, 404, "no such endpoint"),
    ("GET", "/generate", None, 405, "use POST"),
    ("DELETE", "/health", None, 405, "use GET"),
    ("PUT", "/v1/completions", {"prompt": [1]}, 405, "method not allowed"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS,
                         ids=[f"{m} {p} {w}" for m, p, _, _, w in BAD_REQUESTS])
def test_bad_requests_are_answered_and_named(server, method, path, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, reply = call(server, path, None if raw else body, method=method, raw=raw)
    assert got == status, reply
    assert words in error_of(reply)
    assert "max_str_digits" not in error_of(reply)
    if path.startswith("/v1/"):  # the OpenAI endpoints have no max_new_tokens
        assert "max_new_tokens" not in error_of(reply)


def test_errors_quote_a_long_client_value_by_its_first_characters():
    """An id or count of 4000 digits (valid JSON, under int()'s 4300) or a 5000-character string
    was quoted in full; parsing alone, no server."""
    from optimized.serve import api

    ctx = api.Context("tiny", 64, vocab_size=256)
    huge = 7 * 10**3999 + 1  # 4000 digits
    for parse, body, want in (
            (api.parse_generate, {"input_ids": [1, huge, 300]}, "got [70000000000000000000... (4000 digits), 300]"),
            (api.parse_generate, {"input_ids": [1], "add_special_tokens": huge}, "got 70000000000000000000... "
                                                                                 "(4000 digits)"),
            (api.parse_completion, {"prompt": [1], "n": huge}, "n: must be an integer in [1, 128], "
                                                               "got 70000000000000000000... (4000 digits)"),
            (api.parse_completion, {"prompt": [1], "n": "y" * 5000}, f'got "{"y" * 79}... (5000 characters)'),
            (api.parse_completion, {"prompt": [1], "best_of": huge}, "got 70000000000000000000... (4000 digits)"),
            (api.parse_completion, {"prompt": [1], "model": "m" * 5000}, f"model: '{'m' * 79}... (5000 characters) "
                                                                         "is not served here"),
            (api.parse_completion, {"prompt": [1], "n": -huge}, "got -7000000000000000000... (4000 digits)"),
            # through the engine's own checks (optimized/engine/sampler.py), by the same rule
            (api.parse_generate, {"input_ids": [1], "sampling": {"stop_token_ids": [1, huge, 2]}},
             "sampling: stop_token_ids token ids must lie in [0, 256), got [70000000000000000000... (4000 digits)]"),
            (api.parse_completion, {"prompt": [1], "logit_bias": {str(huge): 1}}, "got [70000000000000000000... "),
            (api.parse_generate, {"input_ids": [1], "sampling": {"y" * 5000: 1}},
             f"unknown sampling parameter(s) '{'y' * 79}... (5000 characters); known: "),
            (api.parse_completion, {"prompt": [1], "n": 129}, "got 129")):  # short: in full
        with pytest.raises(api.ApiError) as e:
            parse(body, ctx)
        quoted = e.value.message.split("; known: ")[0]  # the known names are a fixed list
        assert want in e.value.message and len(quoted) < 250, e.value.message


def test_transport_errors(server):
    status, reply = raw_request(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 9437184\r\n\r\n")
    assert status == 413 and "limit is 8388608" in error_of(reply)
    status, reply = raw_request(server, b"POST /generate HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and "Content-Length" in error_of(reply)
    status, reply = raw_request(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1_0\r\n\r\n")
    assert status == 400 and "Content-Length" in error_of(reply)  # uvicorn's refusal, as our JSON
    status, reply = raw_request(server, b"BREW /generate HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 501 and "error" in reply
    assert call(server, "/health") == (200, {"status": "ok"})  # none of it hurt the server


def test_openai_fields_at_their_defaults_are_accepted(server):
    """Clients (the openai package among them) send fields we do not implement at the value that
    means "not used": those pass, and the answer is the same as without them."""
    plain = {"prompt": P1, "max_tokens": 2, "ignore_eos": True}
    status, want = call(server, "/v1/completions", plain)
    assert status == 200, want
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": None, "n": 1, "echo": False,
                "best_of": 1, "logit_bias": {}, "suffix": None, "user": "u", "stop": None, "model": "tiny"}
    status, got = call(server, "/v1/completions", {**plain, **defaults})
    assert status == 200, got
    assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]


def test_models_by_id_and_version(server):
    status, card = call(server, "/v1/models/tiny")
    assert status == 200 and card["id"] == "tiny" and card["object"] == "model"
    status, reply = call(server, "/v1/models/gpt-4")
    assert status == 404 and "'gpt-4' is not served" in error_of(reply) and reply["error"]["param"] == "model"
    status, reply = call(server, "/version")
    assert status == 200 and reply["model"] == "tiny" and isinstance(reply["version"], str)


class _EchoEngine:
    """An engine whose every step answers each running request with its last prompt id, one token
    per step: instant, so a test of the HTTP layer's concurrency is not a test of the kernels (the
    tiny model under Triton's interpreter takes ~16 s to prefill 64 prompts on 2 cores)."""
    max_context = 64

    def __init__(self):
        self.running, self.next_rid = {}, 0

    def add_request(self, prompt, params):
        self.next_rid += 1
        self.running[self.next_rid] = [prompt[-1], params.max_new_tokens]
        return self.next_rid

    def has_work(self):
        return bool(self.running)

    def step(self):
        events = []
        for rid, state in list(self.running.items()):
            state[1] -= 1
            events.append(Event(rid, state[0], state[1] == 0, "length" if state[1] == 0 else None))
            if state[1] == 0:
                del self.running[rid]
        return events

    def abort(self, rid):
        self.running.pop(rid, None)


def test_many_concurrent_connections_are_all_answered():
    """64 clients at once, each on its own connection and half of them streaming: every one gets
    its own answer."""
    n, results = 64, {}
    srv = make_server(_EchoEngine())
    thread = run_server(srv)
    gate = threading.Barrier(n)

    def run(i):
        gate.wait()
        body = {"prompt": [i], "max_tokens": 3}
        if i % 2:
            results[i] = [t for e in events(srv, "/v1/completions", body) for t in e["choices"][0]["token_ids"]]
        else:
            status, reply = call(srv, "/v1/completions", body, timeout=60)
            results[i] = reply["choices"][0]["token_ids"] if status == 200 else reply

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        srv.shutdown()
        thread.join(10)
    assert results == {i: [i] * 3 for i in range(n)}


def test_shutdown_ends_a_stream_in_flight_properly():
    """Shutdown (what SIGTERM/SIGINT do) stops the engine first: a stream in flight gets an error
    event and [DONE], not a cut connection, and new requests are refused."""
    srv = make_server(Engine("tiny", dtype=torch.float32, device=DEVICE), model_name="tiny")
    thread = run_server(srv)
    data = json.dumps({"prompt": P1, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection(srv.server_address[:2], timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                     + data)
        seen = b""
        while b"data:" not in seen:
            seen += sock.recv(4096)
        stopper = threading.Thread(target=srv.shutdown)
        stopper.start()
        while not seen.endswith(b"0\r\n\r\n"):  # the last chunk of the chunked encoding
            piece = sock.recv(4096)
            assert piece, f"connection cut: {seen[-300:]!r}"
            seen += piece
    stopper.join(60)
    thread.join(10)
    assert b"shutting down" in seen and b"data: [DONE]" in seen
    assert not srv.worker._thread.is_alive()


class _SlowEngine:
    """A real engine whose every step takes at least 0.2 s, so a request outlives a short limit."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        time.sleep(0.2)
        return self.engine.step()


def test_a_request_past_the_timeout_is_aborted_and_answered(monkeypatch):
    # Handlers poll far less often than tokens arrive, as on a GPU (tokens every few ms, polls
    # every 0.25 s): the deadline must hold on a stream that never goes quiet, not only on one that does.
    monkeypatch.setattr(serve_app, "POLL_S", 30.0)
    # 60 tokens at >= 0.2 s a step outlive 3 s by far; 3 s (not 1) so that the stream's first
    # token comes before the deadline on a busy CPU (else the answer is a plain 504, not a stream
    # that ends in an error event: seen in CI with both cores busy).
    srv = make_server(_SlowEngine(Engine("tiny", dtype=torch.float32, device=DEVICE)), model_name="tiny",
                      request_timeout=3.0)
    thread = run_server(srv)
    try:
        free = engine_stats(srv)["free_pages"]
        body = {"prompt": P1, "max_tokens": 60, "ignore_eos": True}
        status, reply = call(srv, "/v1/completions", body)
        assert status == 504 and "--request-timeout" in error_of(reply)
        streamed = events(srv, "/v1/completions", body)  # ends with [DONE] (checked there)
        assert streamed[-1]["error"]["code"] == 504
        deadline = time.time() + 30
        while engine_stats(srv)["running"] or engine_stats(srv)["free_pages"] != free:
            assert time.time() < deadline, engine_stats(srv)
            time.sleep(0.2)
    finally:
        srv.shutdown()
        thread.join(10)


class _BrokenEngine:
    """An engine whose step fails, as a kernel error would."""
    max_context = 64

    def __init__(self):
        self.queued = False

    def add_request(self, prompt, params):
        self.queued = True
        return 0

    def has_work(self):
        return self.queued

    def step(self):
        raise RuntimeError("simulated kernel failure")

    def abort(self, rid):
        raise KeyError(rid)


def test_dead_engine_answers_503_with_its_error():
    srv = make_server(_BrokenEngine())
    thread = run_server(srv)
    try:
        status, reply = call(srv, "/generate", {"input_ids": [1]})
        assert status == 503 and "simulated kernel failure" in error_of(reply)
        for path, body in (("/health", None), ("/generate", {"input_ids": [1]}),
                           ("/v1/completions", {"prompt": [1], "stream": True})):
            status, reply = call(srv, path, body)
            assert status == 503 and "simulated kernel failure" in error_of(reply), (path, reply)
    finally:
        srv.shutdown()
        thread.join(10)


# -- text: tokenizer and chat template -------------------------------------------------------

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<turn>", "<end>"]
WORDS = ["hello", "world", "user", "assistant", "the", "cat", "sat", "on", "mat"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m.role == 'tool' %}{{ raise_exception('tool turns are not supported') }}{% endif %}"
            "<turn>{{ m.role }} {{ m.content }}<end>{% endfor %}"
            "{% if add_generation_prompt %}<turn>assistant {% endif %}")


def write_text_checkpoint(path):
    """The tiny preset's weights plus a word-level tokenizer whose 256 entries cover the vocab,
    a tokenizer_config.json that asks for <bos>, and a chat template."""
    cfg, weights = reference.resolve("tiny", dtype=torch.float32)
    reference.save_checkpoint(path, cfg, weights)
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), cfg.vocab_size)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>", "add_bos_token": True}))
    (path / "chat_template.jinja").write_text(TEMPLATE)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    write_text_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def text_server(text_dir):
    srv = build_server(str(text_dir), port=0, device=str(DEVICE), log_requests=False, **SERVE_OPS)
    thread = run_server(srv)
    yield srv
    srv.shutdown()
    thread.join(10)


@needs_tokenizers
def test_tokenizer_and_template_load(text_dir):
    tok = load_tokenizer(text_dir)
    assert tok.encode("hello world") == [2, 6, 7]  # <bos> from add_bos_token
    assert tok.encode("hello world", add_special_tokens=False) == [6, 7]
    assert tok.decode([2, 6, 7, 1]) == "hello world" and tok.decode([6, 1], skip_special_tokens=False) == "hello <eos>"
    chat = load_chat_template(text_dir)
    assert chat.render([{"role": "user", "content": "hello"}]) == "<bos><turn>user hello<end><turn>assistant "
    assert load_tokenizer("tiny") is None and load_chat_template("tiny") is None


@pytest.mark.parametrize("messages,words", [
    ("hi", "messages: must be a non-empty list"),
    ([], "messages: must be a non-empty list"),
    (["hi"], "messages[0]: must be an object"),
    ([{"content": "hi"}], "messages[0].role: missing"),
    ([{"role": "user", "content": 3}], "messages[0].content: must be a string"),
    ([{"role": "user", "content": "a", "colour": "x"}], "messages[0].colour: unknown field"),
    ([{"role": "user", "content": "a", "name": 3}], "messages[0].name: must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]: only text"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]: a text part"),
    ([{"role": "user", "content": None}], "messages[0].content: must be a string or a list"),
    ([{"role": "tool", "content": "a"}], "rejected the messages: tool turns are not supported"),
])
def test_bad_messages(messages, words):
    with pytest.raises(ChatError) as e:
        ChatTemplate(TEMPLATE, "<bos>", "<eos>").render(messages)
    assert words in str(e.value)


def test_text_parts_and_names_reach_the_template():
    t = ChatTemplate("{% for m in messages %}[{{ m.role }}{{ '/' + m.name if m.name }}] {{ m.content }}{% endfor %}")
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    assert t.render([{"role": "user", "content": parts, "name": "ann"}]) == "[user/ann] hello\nworld"


def test_template_is_sandboxed():
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatError, match="failed to render"):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatError, match="syntax error"):
        ChatTemplate("{% for %}")


@needs_tokenizers
def test_incremental_decoder_holds_back_a_split_character():
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE({"<unk>": 0, "a": 1, "<0xC3>": 2, "<0xA9>": 3}, [],
                                                     unk_token="<unk>", byte_fallback=True))
    bpe.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    stream = Tokenizer(bpe).stream()
    assert [stream.push(t) for t in (1, 2, 3, 1)] == ["a", "", "é", "a"]
    stream.push(2)
    assert stream.flush() == "\ufffd"  # an unfinished character at the end comes out as U+FFFD


@needs_tokenizers
def test_text_completion(text_server, text_dir):
    tok = load_tokenizer(text_dir)
    body = {"prompt": "the cat sat on the mat", "max_tokens": 3, "ignore_eos": True, "model": text_dir.name}
    status, reply = call(text_server, "/v1/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    assert reply["usage"]["prompt_tokens"] == len(tok.encode(body["prompt"])) == 7
    assert len(choice["token_ids"]) == 3 and choice["text"] == tok.decode(choice["token_ids"])
    assert choice["text"]  # the vocab covers every id, so three tokens are never empty text
    status, plain = call(text_server, "/generate", {"text": body["prompt"], "sampling": {"max_new_tokens": 3,
                                                                                         "ignore_eos": True}})
    assert status == 200 and plain["output_ids"] == choice["token_ids"] and plain["text"] == choice["text"]


@needs_tokenizers
def test_chat_completion_and_stream(text_server, text_dir):
    tok = load_tokenizer(text_dir)
    messages = [{"role": "user", "content": "hello world"}]
    status, reply = call(text_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3})
    assert status == 200, reply
    choice = reply["choices"][0]
    prompt = tok.encode("<bos><turn>user hello world<end><turn>assistant ", add_special_tokens=False)
    assert reply["usage"]["prompt_tokens"] == len(prompt) and prompt[0] == 2 and prompt[1] != 2  # one <bos>
    assert reply["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    ids = choice["token_ids"]
    want = tok.decode(ids[:-1] if choice["finish_reason"] == "stop" else ids)
    assert choice["message"]["content"] == want
    evs = events(text_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3,
                                                       "stream_options": {"include_usage": True}})
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert evs[-1]["choices"] == [] and evs[-1]["usage"] == reply["usage"]
    pieces = evs[1:-1]
    assert [t for e in pieces for t in e["choices"][0]["token_ids"]] == ids
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in pieces) == want
    assert pieces[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    status, reply = call(text_server, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and "tool turns are not supported" in error_of(reply)


@needs_tokenizers
def test_text_errors_name_the_field_the_client_sent(text_server):
    # Text that encodes to no tokens got the engine's "the prompt must be a non-empty list of token
    # ids", naming no field; max_completion_tokens errors said max_tokens, which the client never sent.
    status, reply = call(text_server, "/generate", {"text": " ", "add_special_tokens": False})
    assert status == 400 and error_of(reply) == "text: encodes to no tokens" and reply["error"]["param"] == "text"
    for bad_value in (-1, "x", 10**30):
        status, reply = call(text_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                                   "max_completion_tokens": bad_value})
        assert status == 400 and error_of(reply).startswith("max_completion_tokens: "), reply
        assert reply["error"]["param"] == "max_completion_tokens"
    # max_tokens 0 on chat was refused with "0 only with echo: true", a field chat does not have;
    # past the context, the count was called max_new_tokens.
    for key, value, words in (("max_tokens", 0, "max_tokens: must be >= 1 for chat completions, got 0"),
                              ("max_completion_tokens", 0, "max_completion_tokens: must be >= 1 for chat"),
                              ("max_completion_tokens", 5000, "+ max_completion_tokens 5000 = ")):
        status, reply = call(text_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                   key: value})
        assert status == 400 and words in error_of(reply) and reply["error"]["param"] == key, reply
        assert "echo" not in error_of(reply) and "max_new_tokens" not in error_of(reply)


@pytest.mark.parametrize("stops,pieces,want", [
    (["\n\n"], ["a\n", "\nb"], ["a", ""]),  # split over two pieces: the first "\n" is held back
    (["\n\n"], ["a\n", "b"], ["a", "\nb", ""]),  # ...and released when the next piece rules the stop out
    (["end"], ["the e", "n", "d and more"], ["the ", "", ""]),
    (["xyz", "yz!"], ["axy", "z!"], ["a", ""]),  # the earliest match wins
    (["ab"], ["a"], ["", "a"]),  # at the end, what was held back is text after all (the flush)
])
def test_stop_matcher(stops, pieces, want):
    from optimized.serve.text import StopMatcher

    m = StopMatcher(tuple(stops))
    got = [m.push(p) for p in pieces]
    if not m.stopped:
        got.append(m.flush())
    assert got == want  # pieces, then the flush where no stop string was found


def test_the_default_token_budget_interleaves_prefill_and_decode():
    """Eight prompts at once under serve's default budget (chunk + max_requests): first tokens
    arrive over several steps, and running requests keep decoding while later prompts prefill."""
    from optimized.serve.http import default_token_budget

    engine = Engine("tiny", dtype=torch.float32, device=DEVICE, chunk_size=8, max_requests=8,
                    token_budget=default_token_budget(8, 8), **SERVE_OPS)
    rids = [engine.add_request([3 + i] * 12, SamplingParams(max_new_tokens=3, ignore_eos=True)) for i in range(8)]
    first, steps = {}, 0
    decoded_while_prefilling = False
    while engine.has_work():
        prefilling = any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting
        events = engine.step()
        steps += 1
        for e in events:
            first.setdefault(e.rid, steps)
        decoded_while_prefilling |= bool(prefilling) and any(len(engine.sequence(e.rid).tokens) > 1 for e in events
                                                            if not e.finished)
    assert sorted(first) == rids and len(set(first.values())) >= 4  # not all at the end of one long step
    assert decoded_while_prefilling


# -- CLI -------------------------------------------------------------------------------------


def test_cli_serve_parses_and_refuses_a_bad_model(tmp_path, capsys):
    args = build_parser().parse_args(["serve", "tiny", "--host", "0.0.0.0", "--port", "0", "--dtype", "bfloat16",
                                      "--device", "cpu", "--page-size", "8", "--chunk-size", "64", "--num-pages",
                                      "100", "--max-requests", "4", "--token-budget", "256"])
    assert (args.model, args.host, args.port, args.page_size, args.chunk_size, args.num_pages, args.max_requests,
            args.token_budget, args.dtype) == ("tiny", "0.0.0.0", 0, 8, 64, 100, 4, 256, "bfloat16")
    assert build_parser().parse_args(["serve"]).model == "tiny"
    assert build_parser().parse_args(["serve"]).token_budget == "auto"  # chunk size + max requests
    assert build_parser().parse_args(["serve", "--token-budget", "none"]).token_budget is None
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text("{broken")
    assert main(["serve", str(tmp_path)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err  # unreadable, or `tokenizers` missing: both refused


def test_cli_serve_ops_eager_picks_the_torch_ops_and_a_cpu_beside_a_gpu_is_refused_without_it(monkeypatch, capsys):
    import optimized.kernels
    import optimized.model
    import optimized.serve

    monkeypatch.setattr(optimized.kernels, "kernels_run_on", lambda device: device.type != "cpu")  # a GPU box
    monkeypatch.setattr(optimized.kernels, "default_device", lambda: torch.device("cuda"))
    assert main(["serve", "tiny", "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "serving runs the kernels on cpu" in err and "--device cuda, --ops eager or TRITON_INTERPRET=1" in err
    with pytest.raises(ValueError, match="kernels on cpu, .*--ops eager"):  # a library user gets the same message
        optimized.serve.build_engine("tiny", device="cpu", fused=False)
    built = []

    def build_server(model, **options):  # what the server would be built with, then refused as a port
        built.append(options)
        raise OSError("stop here")

    monkeypatch.setattr(optimized.serve, "build_server", build_server)
    assert main(["serve", "tiny", "--device", "cpu", "--port", "0", "--ops", "eager"]) == 2
    assert (built[0]["fused"], built[0]["attention"]) == (False, "eager")  # no Triton (test_engine runs it)
    assert build_parser().parse_args(["serve"]).ops == "kernels"
    assert OPS == tuple(optimized.model.OP_SETS)  # the CLI's names (it starts without torch) are the model's


def test_cli_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "tiny", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install -e '.[serve]'" in err, err
