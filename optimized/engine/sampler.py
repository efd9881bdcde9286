"""Sampling: per-request parameters, and the next token of a whole batch of rows at once.

`sample_batch` works on the device over every row of a step: penalties and logit_bias, then
greedy rows take the argmax, sampled rows go through temperature, top_k, top_p and min_p and
draw with the Gumbel-max trick. No per-request loop of tensor ops runs on the host, and nothing
waits for the device: `draw_batch` queues the draw (its host-side parameters reach the device by
pinned asynchronous copies) and returns a `PendingDraw`, whose tokens the engine's next step can
feed on the device before the host reads them (design note 32).

Reproducibility: a sampled row's noise is a hash of (the request's seed, the index of the token
being drawn, the vocabulary id), computed elementwise on the device. It depends on nothing else,
and argmax is exact, so a seeded request draws the same tokens alone or in any batch (the seed
is the one its torch.Generator was seeded with: `Generator.initial_seed()`).

Logprobs are log_softmax, in float32, of the logits after penalties and logit_bias but before
temperature and the top_k/top_p/min_p cuts: what the model (with the request's own biases) says,
the same number for a greedy and a sampled request, and what lm-eval sums for a loglikelihood.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch

from ..batch import host_to_device, pinnable
from ..quoting import shown, shown_ids

MAX_LOGPROBS = 20  # top-n logprobs a request may ask for (OpenAI's chat limit)
# Below it x / temperature may overflow float32 for real logits (|x| up to 1e30 even here): _draw
# checks those rows (only when some row's temperature is this small, so others pay nothing).
TINY_TEMPERATURE = 1e-8


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy (argmax; ties to the lowest id)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # None: a seed drawn from the engine's own generator
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos ids (duplicates dropped; `stop_set`: as a set)
    ignore_eos: bool = False  # True: only stop_token_ids and max_new_tokens end the request
    # OpenAI semantics: subtract presence_penalty once from every id already generated, and
    # frequency_penalty times the number of times it was generated (the prompt does not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); a dict is accepted
    min_p: float = 0.0  # drop ids less likely than min_p times the most likely one (0: no cut)
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's logprob and the n most likely
    prompt_logprobs: int | None = None  # None: none; n >= 0: each prompt token's logprob (after the first) and top n

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {_short(getattr(self, name))}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        # JSON integers arrive as Python ints of any size, and the sampler's tensors take float64 at
        # most (temperature 10**30 overflowed torch.tensor in a step, killing a server's engine).
        numbers = {"temperature": "a finite number >= 0", "top_p": "a number in (0, 1]",
                   "presence_penalty": "a number in [-2, 2]", "frequency_penalty": "a number in [-2, 2]",
                   "min_p": "a number in [0, 1]"}
        for name, want in numbers.items():
            if is_num(getattr(self, name)):
                try:
                    object.__setattr__(self, name, float(getattr(self, name)))
                except OverflowError:
                    bad(name, want)
        if not is_num(self.temperature) or not 0 <= self.temperature < float("inf"):
            bad("temperature", "a finite number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            bad("seed", "null or an integer in [0, 2^63)")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids")
        # Duplicates are dropped (order kept), and the engine checks each generated token against a
        # set built here once: `token in tuple` scanned the whole list per token, and a request with
        # millions of stop ids (they fit the 8 MB body limit) slowed every other request's steps.
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(self.stop_token_ids)))
        object.__setattr__(self, "stop_set", frozenset(self.stop_token_ids))  # not a field: no eq, repr
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"null or an integer in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        if not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        # In the order given, not sorted: a key that is not a string (a Python caller's) made
        # sorted() raise TypeError. A body may hold thousands of names, each of any length.
        unknown = [k for k in d if k not in known]
        if unknown:
            more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
            raise ValueError(f"unknown sampling parameter(s) {', '.join(_short(k) for k in unknown[:3])}{more}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def with_seed(self, seed: int | None) -> "SamplingParams":
        """These parameters under another seed, the rest not checked again (n choices of one
        request: checking a vocabulary-sized logit_bias took most of a second per choice)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise ValueError(f"seed must be null or an integer in [0, 2^63), got {_short(seed)}")
        new = copy.copy(self)
        object.__setattr__(new, "seed", seed)
        return new

    def bias_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (ids, biases) float32 tensors on `device`, built once per request and device
        (rebuilding them from up to a vocabulary of pairs took the host milliseconds every step)."""
        cache = self.__dict__.setdefault("_bias_tensors", {})
        key = str(device)
        if key not in cache:
            ids, biases = zip(*self.logit_bias)
            cache[key] = (_on(device, ids, dtype=torch.long), _on(device, biases, dtype=torch.float32))
        return cache[key]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the parameters name must lie in the vocabulary (ValueError naming the field)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias])):
            # The first three outside, as the server names a prompt's (the three largest ids named
            # in-range ones beside a single bad id).
            outside = [t for t in ids if t >= vocab_size]
            if outside:
                raise ValueError(f"{name} token ids must lie in [0, {vocab_size}), got {shown_ids(outside[:3])}")


def _short(value) -> str:
    """repr(value), shortened as the server quotes a client's value: a rejected list may hold
    millions of entries, and a number thousands of digits."""
    return shown(value, repr)


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """{id: bias} or [(id, bias), ...] -> sorted ((id, bias), ...); ids as ints or digit strings
    (JSON object keys are strings), biases finite numbers in [-100, 100]."""
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple, type({}.items()))):
        raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {_short(value)}")
    out = {}
    for pair in items:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {_short(value)}")
        key, bias = pair
        if isinstance(key, str) and key.isascii() and key.isdigit():  # not "²" (int() refuses) nor "١" (takes)
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {_short(pair[0])}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {_short(bias)} for token {key}")
        out[key] = float(bias)
    return tuple(sorted(out.items()))


# -- the batch -------------------------------------------------------------------------------

@dataclass
class Drawn:
    """What sample_batch chose for each row, with logprobs where the row's params asked."""
    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[tuple[tuple[int, float], ...] | None]


def sample_batch(rows: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
                 generated: list[list[int]], forced: list[int] | None = None) -> Drawn:
    """The next token of every row of `rows` [B, V]. seeds[i], steps[i]: row i's request seed
    and the index of the token being drawn (they key its noise); generated[i]: the tokens it has
    generated so far (for penalties). forced: tokens chosen elsewhere (teacher forcing); only
    their logprobs are computed here."""
    return draw_batch(rows, params, seeds, steps, generated, forced).result()


class PendingDraw:
    """What `draw_batch` chose, still on the device. `start_copy` queues the copies to the host
    right behind the draw (pinned, asynchronous, with an event after them), so that `result`
    later waits for this draw alone, not for work queued after it (the engine's next step:
    design note 32). Without start_copy, `result` reads the device tensors directly."""

    def __init__(self, tokens: torch.Tensor, params: list[SamplingParams], lp_rows: list[int] | None = None,
                 lp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        self.tokens = tokens  # [B] int64 on the device: what the next step may feed
        self.params, self.lp_rows, self.lp = params, lp_rows or [], lp
        self._host: list[torch.Tensor] | None = None
        self._event = None
        self._result: Drawn | None = None

    def start_copy(self) -> PendingDraw:
        tensors = [self.tokens] + (list(self.lp) if self.lp is not None else [])
        device = self.tokens.device
        if device.type == "cpu" or not pinnable(device):
            return self
        self._host = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._host.append(host)
        self._event = torch.get_device_module(device).Event()
        self._event.record()
        return self

    def result(self) -> Drawn:
        """The tokens and logprobs on the host (waits for the draw, once)."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            tensors = self._host if self._host is not None else \
                [self.tokens] + (list(self.lp) if self.lp is not None else [])
            B = len(self.params)
            chosen = tensors[0].tolist()
            lps: list[float | None] = [None] * B
            tops: list[tuple | None] = [None] * B
            if self.lp is not None:
                got = _listed(*tensors[1:])
                for i, (lp, top) in zip(self.lp_rows, got):
                    lps[i], tops[i] = lp, top[:self.params[i].logprobs]
            self._result = Drawn(chosen, lps, tops)
        return self._result


def draw_batch(rows: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
               generated: list[list[int]], forced: list[int] | None = None) -> PendingDraw:
    """`sample_batch` without reading anything back: every op is queued on the device, and
    nothing here waits for it (host values reach the device through pinned asynchronous copies)."""
    want_lp = [p.logprobs is not None for p in params]
    processed = any(p.penalized or p.logit_bias for p in params)
    if forced is None and not processed and all(p.greedy for p in params) and not any(want_lp):
        return PendingDraw(rows.argmax(dim=-1), params)  # the oracle's path: argmax of the rows as they are
    dev = rows.device
    x = rows.to(torch.float32, copy=True)  # penalties write into it; the caller's rows stay as they are
    if processed:
        x = _penalize(x, params, generated)
    if forced is not None:
        tokens = _on(dev, forced, dtype=torch.long)
    else:
        tokens = x.argmax(dim=-1)  # greedy rows keep it (ties to the lowest id)
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        if drawn:
            idx = _on(dev, drawn)
            tokens[idx] = _draw(x[idx], [params[i] for i in drawn], [seeds[i] for i in drawn],
                                [steps[i] for i in drawn])
    if not any(want_lp):
        return PendingDraw(tokens, params)
    rows_lp = [i for i in range(len(params)) if want_lp[i]]
    idx = _on(dev, rows_lp)
    return PendingDraw(tokens, params, rows_lp,
                       _logprob_tensors(x[idx], tokens[idx], max(params[i].logprobs for i in rows_lp)))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, n_top: int
                   ) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """(logprob of targets[i], its n_top most likely (id, logprob)) for each row of logits [R, V],
    from a float32 log_softmax. One host sync."""
    return _listed(*_logprob_tensors(logits, targets, n_top))


def _logprob_tensors(logits: torch.Tensor, targets: torch.Tensor, n_top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device: (logprob of each target [R], the n_top largest logprobs [R, n_top], their ids)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets.long()[:, None])[:, 0]
    top_lp, top_id = lp.topk(n_top, dim=-1)  # n_top == 0: [R, 0]
    return chosen, top_lp, top_id


def _listed(chosen: torch.Tensor, top_lp: torch.Tensor, top_id: torch.Tensor
            ) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen.tolist(), top_id.tolist(), top_lp.tolist())]


def _on(device, values, **kw) -> torch.Tensor:
    """torch.tensor(values, **kw) on `device`, without waiting for the device (batch.host_to_device)."""
    return host_to_device(torch.tensor(values, **kw), torch.device(device))


def _penalize(x: torch.Tensor, params: list[SamplingParams], generated: list[list[int]]) -> torch.Tensor:
    """Penalties over each row's generated tokens, then logit_bias, in place on float32 x."""
    pen = [i for i, p in enumerate(params) if p.penalized and generated[i]]
    if pen:
        r = _on(x.device, [i for i in pen for _ in generated[i]])
        t = _on(x.device, [t for i in pen for t in generated[i]])
        counts = torch.zeros_like(x)
        counts.index_put_((r, t), torch.ones_like(t, dtype=x.dtype), accumulate=True)
        freq = _on(x.device, [p.frequency_penalty for p in params])
        pres = _on(x.device, [p.presence_penalty for p in params])
        x -= freq[:, None] * counts + pres[:, None] * (counts > 0)
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:  # each row's ids are distinct, so one index_put_ adds every bias once
        t, b = zip(*(params[i].bias_tensors(x.device) for i in biased))
        r = torch.cat([torch.full_like(ids, i) for i, ids in zip(biased, t)])
        x.index_put_((r, torch.cat(t)), torch.cat(b).to(x.dtype), accumulate=True)
    return x


def _draw(x: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> torch.Tensor:
    """Sampled rows [S, V]: temperature, top_k, top_p and min_p cuts, then argmax(x + Gumbel noise),
    which draws from softmax of what is left."""
    dev, V = x.device, x.shape[1]
    temperatures = [p.temperature for p in params]
    scaled = x / _on(dev, temperatures)[:, None]
    if min(temperatures) < TINY_TEMPERATURE:
        # A temperature this small (1e-320 is 0 in float32) overflows x / t to infinities and NaN, and
        # argmax then took id 0. Such a row gets the limit t -> 0 instead: its most likely ids, tied.
        limit = torch.where(x == x.max(dim=-1, keepdim=True).values, 0.0, float("-inf"))
        scaled = torch.where(torch.isfinite(scaled).all(dim=-1, keepdim=True), scaled, limit)
    x = scaled
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    ps = [p.top_p for p in params]
    if any(k < V for k in ks) or any(p < 1 for p in ps):
        sv = x.sort(dim=-1, descending=True).values
        k = _on(dev, ks)
        sv = sv.masked_fill(torch.arange(V, device=dev)[None, :] >= k[:, None], float("-inf"))
        probs = torch.softmax(sv, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely ids
        top_p = _on(dev, ps)
        cut = (before >= top_p[:, None]) & (top_p < 1)[:, None]
        # The most likely id always stays: a top_p below float32's range (1e-320) is 0 there and cut
        # it too, and keep - 1 = -1 then failed the gather in an engine step.
        keep = (~cut & (sv > float("-inf"))).sum(dim=-1).clamp_min(1)
        floor = sv.gather(1, (keep - 1)[:, None])
        x = x.masked_fill(x < floor, float("-inf"))
    if any(p.min_p > 0 for p in params):
        log_min_p = _on(dev, [math.log(p.min_p) if p.min_p > 0 else float("-inf") for p in params])
        x = x.masked_fill(x < x.max(dim=-1, keepdim=True).values + log_min_p[:, None], float("-inf"))
    return (x + gumbel_noise(seeds, steps, V, dev)).argmax(dim=-1)


# -- keyed noise -----------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), in halves so no product leaves int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply, with the "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: list[int], steps: list[int], V: int, device) -> torch.Tensor:
    """Standard Gumbel noise [S, V], a pure function of (seeds[i], steps[i], vocabulary id): the
    same request and step get the same noise on any batch (and any device: integer arithmetic)."""
    s = _on(device, seeds, dtype=torch.long)
    key = _mix32(_mix32(_mix32(s & _M32) ^ ((s >> 32) & _M32)) ^ (_on(device, steps) & _M32))
    h = _mix32(_mix32(key[:, None] ^ _mix32(torch.arange(V, device=device)[None, :])) ^ key[:, None])
    u = ((h >> 8).float() + 0.5) * 2.0 ** -24  # 24 random bits: uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits [V] (no penalties: there is no history here), a
    fresh draw keyed by `generator` each call. The engine samples whole batches with sample_batch."""
    key = int(torch.randint(2 ** 62, (1,), generator=generator)) if generator is not None else 0
    return sample_batch(logits[None], [params], [key], [0], [[]]).tokens[0]


class TeacherSampler:
    """Forces given tokens: request `rid`'s n-th sampled token is `tokens[rid][n]`, whatever its
    logits say (the oracle feeds the reference's tokens so both paths see one sequence). The
    engine still hands it the row it selected, and reports that row at the `logits` tap."""

    def __init__(self, tokens: dict[int, list[int]]):
        self.tokens = tokens

    def __call__(self, seq, row: torch.Tensor) -> int:
        return self.tokens[seq.rid][len(seq.tokens)]
