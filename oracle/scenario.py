"""Scenarios: what to run, as JSON (shared/DESIGN.md "Scenarios").

    {
      "name": "chunked-prefill",
      "model": {"source": "tiny", "seed": 0, "dtype": "float32", "device": "cpu"},
      "engine": {"page_size": 4, "chunk_size": 5, "num_pages": null, "page_order_seed": 7},
      "requests": [
        {"id": "r0", "length": 13, "seed": 1, "new_tokens": 2},
        {"id": "r1", "tokens": [5, 9, 2], "new_tokens": 1, "arrival": 2, "chunks": [1, 2],
         "prefix_from": {"request": "r0", "length": 8}}
      ]
    }

A request's prompt is its explicit `tokens`, or `length` tokens drawn from `seed`; with
`prefix_from` the prompt starts with that many tokens of an earlier request's prompt (a shared
prefix), and the optimized path reuses that request's KV for it when the pool still holds it:
from the donor while it runs, or from the prefix cache once it has finished. `"finished": true`
in `prefix_from` says the request arrives after its donor finished (a warm prefix); its
`arrival` must then lie past the donor's last step, which from_dict checks.
Running a scenario is deterministic: the same JSON gives the same tokens, pages and numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from reference.fileio import parse_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ScenarioError(ValueError):
    """A scenario file or dict that cannot be run; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    source: str = "tiny"  # preset name or checkpoint directory
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class EngineSpec:
    page_size: int = 16
    chunk_size: int = 512
    num_pages: int | None = None
    page_order_seed: int | None = None
    # Either lets the scheduler decide: the chunks of requests without explicit `chunks` are cut
    # by continuous batching under this per-step token budget / running-request limit.
    token_budget: int | None = None
    max_requests: int | None = None
    # How decode steps run (DECODE_MODES): "auto" replays device graphs where the device can
    # capture them and runs eagerly elsewhere; "graphs" is the path that serves as closely as the
    # device allows: captured graphs, or on a device without them the same padded static batches
    # run eagerly; "static" always the padded static batches; "eager" never.
    decode: str = "auto"


DECODE_MODES = ("auto", "graphs", "static", "eager")


@dataclass(frozen=True)
class RequestSpec:
    id: str
    length: int | None = None
    seed: int = 0
    tokens: tuple[int, ...] | None = None
    new_tokens: int = 0
    arrival: int = 0
    chunks: tuple[int, ...] | None = None
    prefix_from: dict | None = None  # {"request": id, "length": n, optionally "finished": true}


@dataclass(frozen=True)
class Scenario:
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    requests: tuple[RequestSpec, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.model.dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        for r in d["requests"]:
            for k in ("tokens", "chunks"):
                if r[k] is not None:
                    r[k] = list(r[k])
        return d

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """Every request's prompt token ids, deterministically."""
        out: dict[str, list[int]] = {}
        for r in self.requests:
            if r.tokens is not None:
                own = list(r.tokens)
            else:
                g = torch.Generator().manual_seed(r.seed)
                own = torch.randint(0, vocab_size, (r.length,), generator=g).tolist()
            if r.prefix_from is not None:
                own = out[r.prefix_from["request"]][: r.prefix_from["length"]] + own
            bad = [t for t in own if not 0 <= t < vocab_size]
            if bad:
                raise ScenarioError(f"requests[{r.id!r}].tokens: ids {bad[:3]} outside the vocabulary [0, {vocab_size})")
            out[r.id] = own
        return [out[r.id] for r in self.requests]

    def with_model(self, **changes) -> Scenario:
        return Scenario(self.name, ModelSpec(**{**asdict(self.model), **changes}), self.engine, self.requests)


# --------------------------------------------------------------------------------------
# Parsing with errors that name the field
# --------------------------------------------------------------------------------------


# A request's seed seeds a torch.Generator, which takes at most a uint64.
MAX_SEED = 2**64 - 1


def _int(where: str, v: Any, minimum: int, optional: bool = False, maximum: int | None = None):
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ScenarioError(f"{where}: expected an integer >= {minimum}, got {v!r}")
    if maximum is not None and v > maximum:
        raise ScenarioError(f"{where}: expected an integer <= {maximum}, got {v!r}")
    return v


def _only(where: str, d: Any, allowed: set[str]) -> dict:
    if not isinstance(d, dict):
        raise ScenarioError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return d


def from_dict(d: Any) -> Scenario:
    d = _only("scenario", d, {"name", "model", "engine", "requests"})
    name = d.get("name", "scenario")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"name: expected a non-empty string, got {name!r}")
    m = _only("model", d.get("model", {}), {"source", "seed", "dtype", "device"})
    source = m.get("source", "tiny")
    if not isinstance(source, str) or not source:  # "" is the current directory, null was 'None'
        raise ScenarioError(f"model.source: expected a preset name or checkpoint directory, got {source!r}")
    model = ModelSpec(
        source=source, seed=_int("model.seed", m.get("seed", 0), 0),
        dtype=m.get("dtype", "float32"), device=str(m.get("device", "cpu")))
    if not isinstance(model.dtype, str) or model.dtype not in DTYPES:
        raise ScenarioError(f"model.dtype: {model.dtype!r} is not one of {sorted(DTYPES)}")
    e = _only("engine", d.get("engine", {}), {"page_size", "chunk_size", "num_pages", "page_order_seed",
                                              "token_budget", "max_requests", "decode"})
    engine = EngineSpec(
        page_size=_int("engine.page_size", e.get("page_size", 16), 1),
        chunk_size=_int("engine.chunk_size", e.get("chunk_size", 512), 1),
        num_pages=_int("engine.num_pages", e.get("num_pages"), 2, optional=True),
        page_order_seed=_int("engine.page_order_seed", e.get("page_order_seed"), 0, optional=True),
        token_budget=_int("engine.token_budget", e.get("token_budget"), 1, optional=True),
        max_requests=_int("engine.max_requests", e.get("max_requests"), 1, optional=True),
        decode=e.get("decode", "auto"))
    if not isinstance(engine.decode, str) or engine.decode not in DECODE_MODES:
        raise ScenarioError(f"engine.decode: {engine.decode!r} is not one of {list(DECODE_MODES)}")
    reqs = d.get("requests")
    if not isinstance(reqs, list) or not reqs:
        raise ScenarioError("requests: expected a non-empty list")
    parsed: list[RequestSpec] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(reqs):
        where = f"requests[{i}]"
        r = _only(where, r, {"id", "length", "seed", "tokens", "new_tokens", "arrival", "chunks", "prefix_from"})
        rid = r.get("id", f"r{i}")
        if not isinstance(rid, str) or not rid or rid in seen:
            raise ScenarioError(f"{where}.id: expected a unique non-empty string, got {rid!r}")
        tokens = r.get("tokens")
        length = r.get("length")
        if (tokens is None) == (length is None):
            raise ScenarioError(f"{where}: give exactly one of 'tokens' or 'length'")
        if tokens is not None:
            if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
                raise ScenarioError(f"{where}.tokens: expected a list of integer token ids")
            tokens = tuple(tokens)
        else:
            _int(f"{where}.length", length, 0)
        prefix = r.get("prefix_from")
        prefix_len = 0
        if prefix is not None:
            prefix = _only(f"{where}.prefix_from", prefix, {"request", "length", "finished"})
            if not isinstance(prefix.get("request"), str) or prefix["request"] not in seen:
                raise ScenarioError(f"{where}.prefix_from.request: {prefix.get('request')!r} is not an earlier request")
            prefix_len = _int(f"{where}.prefix_from.length", prefix.get("length"), 1)
            donor = parsed[seen[prefix["request"]]]
            donor_len = _prompt_len(donor, parsed, seen)
            if prefix_len > donor_len:
                raise ScenarioError(f"{where}.prefix_from.length: {prefix_len} exceeds the prompt of "
                                    f"{prefix['request']!r} ({donor_len} tokens)")
        own = len(tokens) if tokens is not None else length
        if own + prefix_len < 1:
            raise ScenarioError(f"{where}: the prompt is empty")
        chunks = r.get("chunks")
        if chunks is not None:
            if not isinstance(chunks, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                   for c in chunks) or sum(chunks) != own + prefix_len:
                raise ScenarioError(f"{where}.chunks: positive lengths summing to the prompt length "
                                    f"{own + prefix_len}, got {chunks!r}")
            chunks = tuple(chunks)
        parsed.append(RequestSpec(
            id=rid, length=length, seed=_int(f"{where}.seed", r.get("seed", 0), 0, maximum=MAX_SEED), tokens=tokens,
            new_tokens=_int(f"{where}.new_tokens", r.get("new_tokens", 0), 0),
            arrival=_int(f"{where}.arrival", r.get("arrival", 0), 0), chunks=chunks, prefix_from=prefix))
        seen[rid] = i
        if prefix is not None and prefix.get("finished", False) is not False:
            _check_after_finish(where, parsed, seen, engine)
    return Scenario(name, model, engine, tuple(parsed))


def _check_after_finish(where: str, parsed: list[RequestSpec], seen: dict[str, int], engine: EngineSpec) -> None:
    """A request whose prefix_from says "finished": its arrival must lie past the donor's last
    step. Counted as the scripted engine runs a scenario (taps on, so a request's last token is
    fed too): a donor starts at its arrival, or with its own donor if that one starts later,
    takes one step per prefill chunk and one per new token, and finishes in the last of them.
    Nothing waiting for pages or request rows is assumed (the runner sizes both for every
    request unless engine.num_pages is given), so a scheduler that decides the chunks
    (token_budget, max_requests) cannot be counted on."""
    r = parsed[-1]
    if r.prefix_from["finished"] is not True:
        raise ScenarioError(f"{where}.prefix_from.finished: expected true or false, got {r.prefix_from['finished']!r}")
    if engine.token_budget is not None or engine.max_requests is not None:
        raise ScenarioError(f"{where}.prefix_from.finished: the donor's last step is known only in a scripted "
                            f"schedule; this one sets engine.token_budget or engine.max_requests")
    donor = parsed[seen[r.prefix_from["request"]]]
    earliest = _start_step(donor, parsed, seen) + _steps(donor, engine)
    if r.arrival < earliest:
        raise ScenarioError(f"{where}.arrival: {r.arrival} is before {donor.id!r} finishes (its last step is "
                            f"{earliest - 1}); with prefix_from.finished give an arrival >= {earliest}")


def _start_step(r: RequestSpec, parsed: list[RequestSpec], seen: dict[str, int]) -> int:
    """The step a scripted request starts at when nothing waits for pages: its arrival, or its
    donor's start if later (a borrower waits until its donor has started)."""
    if r.prefix_from is None:
        return r.arrival
    return max(r.arrival, _start_step(parsed[seen[r.prefix_from["request"]]], parsed, seen))


def _steps(r: RequestSpec, engine: EngineSpec) -> int:
    """Forward steps a scripted request runs: one per prefill chunk (explicit, else chunk_size
    pieces), then one per new token (the first comes with the last chunk; the last is fed)."""
    chunks = len(r.chunks) if r.chunks is not None else -(-_prompt_len(r) // engine.chunk_size)
    return chunks + r.new_tokens


def _prompt_len(r: RequestSpec, parsed: list[RequestSpec] | None = None, seen: dict[str, int] | None = None) -> int:
    own = len(r.tokens) if r.tokens is not None else r.length
    return own + (r.prefix_from["length"] if r.prefix_from else 0)


def check_fits(scenario: Scenario, config) -> None:
    """Raise ScenarioError, naming the field, where a parsed scenario asks more than the model
    (a Gemma4Config) or its own engine settings allow: what from_dict cannot know without the
    model. Cheap, so callers run it before any work (a request past the model's positions would
    otherwise run for minutes, or fail allocating its masks)."""
    limit = config.max_position_embeddings
    e = scenario.engine
    if e.page_size > limit:  # the pool is sized in pages: a huge one fails allocating it, minutes in
        raise ScenarioError(f"engine.page_size: {e.page_size} is past the model's max_position_embeddings {limit}")
    for i, r in enumerate(scenario.requests):
        prompt = _prompt_len(r)  # lengths before any prompt is drawn: a huge one is refused unbuilt
        total = prompt + r.new_tokens
        where = f"requests[{i}]"
        if total > limit:
            field = "length" if prompt > limit else "new_tokens"
            raise ScenarioError(f"{where}.{field}: a prompt of {prompt} plus {r.new_tokens} new tokens is {total} "
                                f"positions, past the model's max_position_embeddings {limit}")
        if e.num_pages is not None and -(-total // e.page_size) > e.num_pages - 1:
            raise ScenarioError(f"engine.num_pages: {e.num_pages} pages of {e.page_size} (page 0 reserved) hold "
                                f"{(e.num_pages - 1) * e.page_size} positions; {where} ({r.id!r}) needs {total}")
    scenario.prompts(config.vocab_size)  # token ids outside the vocabulary


def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = parse_json(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise ScenarioError(f"{path}: cannot read the scenario file ({e.strerror if isinstance(e, OSError) else e})") \
            from None
    except ValueError as e:  # parse_json's: not valid JSON (why)
        raise ScenarioError(f"{path}: {e}") from None
    try:
        return from_dict(raw)
    except ScenarioError as e:
        raise ScenarioError(f"{path}: {e}") from None


def save(scenario: Scenario, path: str | Path) -> None:
    Path(path).write_text(json.dumps(scenario.to_dict(), indent=2) + "\n")


# --------------------------------------------------------------------------------------
# The built-in set `gemma4-testbed check` runs
# --------------------------------------------------------------------------------------


# The test architectures the main job covers: E2B-like (PLE, KV sharing), 31B-like (K=V) and
# 26B-A4B-like (MoE); see reference/presets.py.
TEST_MODELS = ("tiny", "tiny-kv-eq-v", "tiny-moe")


def builtin(source: str = "tiny", dtype: str = "float32", device: str = "cpu", seed: int = 0) -> list[Scenario]:
    """Small scenarios that together cover one-shot and chunked prefill, decode past the sliding
    window, page sizes 1 to 16, shuffled pages, mixed extend/decode batches, prefix reuse (whole
    pages and mid-page, from a running request and from the prefix cache after it finished),
    attention over several key tiles, deep positions and the engine's own continuous batching
    with the decode path that serves. Lengths are in units of the tiny
    models' windows (4 to 6 tokens) and their kernels' 16-key tiles."""
    model = {"source": source, "seed": seed, "dtype": dtype, "device": device}
    raw = [
        {"name": "one-shot-prefill", "model": model, "engine": {"page_size": 16, "chunk_size": 64},
         "requests": [{"id": "r0", "length": 12, "seed": 1, "new_tokens": 2}]},
        {"name": "chunked-prefill-shuffled-pages", "model": model,
         "engine": {"page_size": 4, "chunk_size": 5, "page_order_seed": 11},
         "requests": [{"id": "r0", "length": 13, "seed": 2, "new_tokens": 1},
                      {"id": "r1", "length": 6, "seed": 3, "new_tokens": 1, "chunks": [1, 2, 3]}]},
        {"name": "decode-past-window", "model": model, "engine": {"page_size": 2, "chunk_size": 4, "page_order_seed": 5},
         "requests": [{"id": "r0", "length": 3, "seed": 4, "new_tokens": 9}]},
        {"name": "mixed-batch-prefix-reuse", "model": model,
         "engine": {"page_size": 1, "chunk_size": 4, "page_order_seed": 3},
         "requests": [{"id": "r0", "length": 9, "seed": 5, "new_tokens": 4},
                      {"id": "r1", "length": 3, "seed": 6, "new_tokens": 2, "arrival": 1,
                       "prefix_from": {"request": "r0", "length": 6}}]},
        # r0's 40 keys span three 16-key tiles on full layers. r1 arrives when r0 has written 10
        # tokens: the shared opening ends mid-page (page 4), so r1 reuses the 8 tokens of whole
        # pages and recomputes the rest of the page, in the same step as r0's second chunk.
        {"name": "prefix-mid-page-over-key-tiles", "model": model,
         "engine": {"page_size": 4, "chunk_size": 64, "page_order_seed": 13},
         "requests": [{"id": "r0", "length": 40, "seed": 7, "new_tokens": 3, "chunks": [10, 30]},
                      {"id": "r1", "length": 5, "seed": 8, "new_tokens": 2, "arrival": 1,
                       "prefix_from": {"request": "r0", "length": 22}}]},
        # The scheduler decides: a 16-token budget and 3 running requests cut prompts into chunks
        # beside other requests' decodes, the 4th request waits for a slot, and decode runs as it
        # serves (device graphs; on a CPU the same padded static batches, eagerly).
        {"name": "engine-continuous-batching", "model": model,
         "engine": {"page_size": 2, "chunk_size": 8, "page_order_seed": 17, "token_budget": 16,
                    "max_requests": 3, "decode": "graphs"},
         "requests": [{"id": "r0", "length": 12, "seed": 9, "new_tokens": 4},
                      {"id": "r1", "length": 19, "seed": 10, "new_tokens": 3},
                      {"id": "r2", "length": 5, "seed": 11, "new_tokens": 4, "arrival": 1},
                      {"id": "r3", "length": 9, "seed": 12, "new_tokens": 3, "arrival": 2}]},
        # Positions deep enough that RoPE angles rounded to a low precision show (an angle error
        # grows with the position): thousands on a GPU, what 2 CPU cores run in seconds here.
        {"name": "deep-positions", "model": model,
         "engine": {"page_size": 16, "chunk_size": 1024 if device != "cpu" else 100, "page_order_seed": 19},
         "requests": [{"id": "r0", "length": DEEP_POSITIONS[device != "cpu"], "seed": 13, "new_tokens": 2}]},
        # A warm prefix: r0 finishes in step 2 (its last token fed) and its 3 whole pages stay in
        # the prefix cache with the SWA pages of its last window (keys 7-11 and on: every test
        # model's window before position 12). r1 arrives after that, reuses all 12 prompt tokens
        # and computes from position 12, past the window, on the cached sliding keys.
        {"name": "warm-prefix-after-finish", "model": model,
         "engine": {"page_size": 4, "chunk_size": 8, "page_order_seed": 23},
         "requests": [{"id": "r0", "length": 12, "seed": 14, "new_tokens": 1, "chunks": [5, 7]},
                      {"id": "r1", "length": 3, "seed": 15, "new_tokens": 2, "arrival": 3,
                       "prefix_from": {"request": "r0", "length": 12, "finished": True}}]},
    ]
    return [from_dict(r) for r in raw]


# Prompt length of `deep-positions` (on a CPU, on an accelerator).
DEEP_POSITIONS = (200, 4096)

# What the main job runs on the architectures other than `tiny`: the scenarios where their
# differences (K=V full layers, MoE routing, no PLE or KV sharing) meet paging, chunking, prefix
# reuse and the engine. `tiny` runs the whole built-in set.
OTHER_MODEL_SCENARIOS = ("prefix-mid-page-over-key-tiles", "engine-continuous-batching")


def default_suite(dtype: str = "float32", device: str = "cpu", seed: int = 0) -> list[Scenario]:
    """The main job (`gemma4-testbed check` with no MODEL): every built-in scenario on `tiny`, and
    OTHER_MODEL_SCENARIOS on the other test architectures, named "<model>/<scenario>"."""
    out = builtin(TEST_MODELS[0], dtype, device, seed)
    for source in TEST_MODELS[1:]:
        out += [replace(s, name=f"{source}/{s.name}") for s in builtin(source, dtype, device, seed)
                if s.name in OTHER_MODEL_SCENARIOS]
    return out
