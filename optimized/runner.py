"""Runner: the public scripted facade of the optimized path. It prefills prompts in chunks,
decodes (greedy or teacher-forced), and can report taps, for the oracle and for tests.

It has no loop of its own: it sizes an Engine for the run, hands it the run's arguments as
policy (a scheduler Script of chunk splits, arrivals and prefix donors; a TeacherSampler; the tap
sink; the page order seed) and steps it until every request is done. By default every step takes,
for each live request, its next prefill chunk or one decode token, so extend and decode
requests share batches; with `token_budget` or `max_requests` the scheduler decides the chunks of
prompts given no explicit splits (continuous batching). A request is admitted once pages for its
whole length are free (running out of pages queues it); one that could never fit is refused
before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from reference.config import Gemma4Config

from . import parallel
from .engine import Engine, SamplingParams
from .engine.engine import emit_pool_taps
from .engine.sampler import TeacherSampler
from .engine.scheduler import Script
from .kernels import default_device
from .memory import KVCache, ceil_div, swa_pages_per_request
from .model import TapSink, check_attention
from .parallel import TensorParallel


@dataclass
class RequestResult:
    tokens: list[int]  # generated (or teacher-forced) tokens
    logits: torch.Tensor | None = None  # [prompt_len + new, V] in position order
    prefix_reused: int = 0  # leading prompt tokens whose KV came from another request
    pages: list[int] = field(default_factory=list)  # full-pool page of each page index
    steps: list[tuple[int, int]] = field(default_factory=list)  # (first position, tokens) per forward step


@dataclass(frozen=True)
class _Finished:
    """What the pool-tap hook is told about a finishing request."""

    index: int
    length: int  # positions written


class Runner:
    def __init__(self, path_or_preset: str | Path | Gemma4Config = "tiny", dtype: torch.dtype = torch.float32,
                 device=None, page_size: int = 16, chunk_size: int = 512, num_pages: int | None = None,
                 seed: int = 0, page_order_seed: int | None = None, weights: dict | None = None,
                 fused: bool = True, token_budget: int | None = None, max_requests: int | None = None,
                 graphs: bool | str | None = None, tp: TensorParallel | int | None = None,
                 attention: str = "triton"):
        """token_budget, max_requests: let the scheduler decide (the most tokens per step, the
        most requests running at once). graphs: the engine's decode graphs (None: where the
        device can capture them; "static": their padded static batch, run eagerly). tp: tensor
        parallelism (optimized/parallel.py): a TensorParallel or a world size to join; every rank
        makes the same Runner and the same calls; results and taps are the same, unsharded, on
        every rank. fused, attention: the engine's op choices (Engine).

        What the Runner holds (`shard`): this rank's shard of the weights, on its device, which
        every run's engine uses as it is (its KV pools are each run's). From a checkpoint only
        the rank's slices are read; `weights` (whole tensors the caller holds) are cut once here
        and the Runner keeps only the cut (parallel.load_shard)."""
        for name, v in (("page_size", page_size), ("chunk_size", chunk_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 2):
            raise ValueError(f"num_pages must be an integer >= 2 (page 0 is reserved), got {num_pages!r}")
        for name, v in (("token_budget", token_budget), ("max_requests", max_requests)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        check_attention(attention)
        self.tp = parallel.resolve(tp, device)
        if self.tp is not None:
            self.device = self.tp.device
        else:
            self.device = torch.device(device) if device is not None else default_device()
        # What this rank holds, once (parallel.load_shard); every run's engine uses it as it is.
        self.shard = parallel.load_shard(path_or_preset, dtype, self.device, self.tp, seed=seed, weights=weights)
        self.config = self.shard.config
        self.dtype, self.page_size, self.chunk_size = dtype, page_size, chunk_size
        self.num_pages, self.page_order_seed = num_pages, page_order_seed
        self.token_budget, self.max_requests, self.graphs = token_budget, max_requests, graphs
        self.cache: KVCache | None = None
        self.engine: Engine | None = None  # the last run's
        self.fused = fused  # False: the non-attention ops in plain torch (the unfused baseline)
        self.attention = attention

    # -- validation ------------------------------------------------------------------------
    def _validate(self, prompts, max_new_tokens, teacher_tokens, chunk_splits, arrivals, share_prefix_with):
        V = self.config.vocab_size
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token id lists")
        n = len(prompts)
        news = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(news) != n or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in news):
            raise ValueError(f"max_new_tokens must be an int >= 0 or one per prompt, got {max_new_tokens!r}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt {i}: token ids must be ints in [0, {V}), got {bad[:3]}")
        if teacher_tokens is not None:
            if len(teacher_tokens) != n:
                raise ValueError(f"teacher_tokens needs one list per prompt ({n}), got {len(teacher_tokens)}")
            for i, (t, k) in enumerate(zip(teacher_tokens, news)):
                if len(t) < k or any(not isinstance(x, int) or not 0 <= x < V for x in t[:k]):
                    raise ValueError(f"teacher_tokens[{i}]: needs {k} token ids in [0, {V}), got {list(t)[:k + 1]}")
        # Without explicit splits a prompt is cut into chunk_size chunks, unless the scheduler decides.
        scheduler_decides = self.token_budget is not None or self.max_requests is not None
        splits = []
        for i, p in enumerate(prompts):
            s = None if chunk_splits is None else chunk_splits[i]
            if s is None:
                if not scheduler_decides:
                    s = [self.chunk_size] * ceil_div(len(p), self.chunk_size)
                    s[-1] = len(p) - self.chunk_size * (len(s) - 1)
            elif any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in s) or sum(s) != len(p):
                raise ValueError(f"chunk_splits[{i}]: positive chunk lengths summing to {len(p)}, got {s!r}")
            splits.append(None if s is None else list(s))
        if arrivals is not None and (len(arrivals) != n or any(not isinstance(a, int) or a < 0 for a in arrivals)):
            raise ValueError(f"arrivals needs one step >= 0 per prompt, got {arrivals!r}")
        if share_prefix_with is not None:
            if len(share_prefix_with) != n:
                raise ValueError("share_prefix_with needs one entry (None or an earlier index) per prompt")
            for i, d in enumerate(share_prefix_with):
                if d is not None and not (isinstance(d, int) and 0 <= d < i):
                    raise ValueError(f"share_prefix_with[{i}] must be None or an earlier prompt index, got {d!r}")
        totals = [len(p) + k for p, k in zip(prompts, news)]
        need = [ceil_div(t, self.page_size) for t in totals]
        num_pages = self.num_pages or sum(need) + 1
        for i, k in enumerate(need):
            if k > num_pages - 1:
                raise ValueError(f"prompt {i} needs {totals[i]} positions ({k} pages of {self.page_size}); "
                                 f"the pool can ever hold {(num_pages - 1) * self.page_size}")
        return news, splits, totals, num_pages

    def _engine(self, splits, totals, num_pages, script, sampler, taps) -> Engine:
        """An engine sized for this run: a row per request (or max_requests), a full pool of
        every request's pages, an SWA pool by the one sizing rule at each request's longest chunk."""
        W, ps = self.config.sliding_window, self.page_size
        swa = sum(swa_pages_per_request(W, ps, t, max(s) if s else self.chunk_size) for s, t in zip(splits, totals))
        return Engine(self.config, weights=self.shard, dtype=self.dtype, device=self.device, page_size=ps,
                      chunk_size=self.chunk_size, num_pages=num_pages, num_swa_pages=swa + 1,
                      max_requests=self.max_requests or len(totals), max_context=max(totals),
                      token_budget=self.token_budget, fused=self.fused, attention=self.attention,
                      graphs=self.graphs, page_order_seed=self.page_order_seed, script=script, sampler=sampler,
                      taps=taps, feed_last=taps is not None, tp=self.tp)

    # -- the run ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompts, max_new_tokens=0, teacher_tokens=None, return_logits: bool = False,
            chunk_splits=None, arrivals=None, share_prefix_with=None, taps: TapSink | None = None):
        """Prefill and decode every prompt; returns one RequestResult per prompt, in order.

        chunk_splits: per prompt, explicit prefill chunk lengths (None: `chunk_size` chunks, or
          the scheduler's with token_budget / max_requests).
        arrivals: per prompt, the step at which it may start (default 0).
        share_prefix_with: per prompt, None or the index of an earlier prompt whose KV for the
          common prefix (whole pages, still inside the window) this prompt reuses.
        taps: a sink(request_index, name, positions, tensor) that receives every tap, including
          `layers.{l}.k_cache/.v_cache` gathered from the pools when a request finishes.
        """
        news, splits, totals, num_pages = self._validate(prompts, max_new_tokens, teacher_tokens, chunk_splits,
                                                         arrivals, share_prefix_with)
        n = len(prompts)
        script = Script(splits={i: s for i, s in enumerate(splits) if s is not None},
                        arrivals=dict(enumerate(arrivals or [])),
                        donors={i: d for i, d in enumerate(share_prefix_with or []) if d is not None})
        sampler = None if teacher_tokens is None else TeacherSampler(dict(enumerate(teacher_tokens)))
        logits: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]  # per request: position -> row
        sink = _collecting(logits, taps) if return_logits else taps
        engine = self.engine = self._engine(splits, totals, num_pages, script, sampler, sink)
        self.cache = engine.cache
        seqs = [engine.sequence(engine.add_request(list(p), _NO_STOP, max_new_tokens=k))
                for p, k in zip(prompts, news)]
        if taps is not None:
            engine.pool_taps = lambda seq: self._emit_cache(engine.cache, _Finished(seq.rid, len(seq.written)), sink)
        else:
            engine.pool_taps = lambda seq: None  # logits only: no pool taps to gather
        while engine.has_work():
            engine.step()
        results = []
        for i, seq in enumerate(seqs):
            rows = None
            if return_logits:
                # Positions whose KV was reused were computed once, by the donor: share its logits.
                own = logits[i] if not seq.reused else {**{p: logits[script.donors[i]][p] for p in range(seq.reused)},
                                                        **logits[i]}
                rows = torch.stack([own[p] for p in sorted(own)])
            results.append(RequestResult(seq.tokens, rows, seq.reused, seq.pages, seq.steps))
        return results

    def _emit_cache(self, cache: KVCache, r: _Finished, taps: TapSink) -> None:
        """The pool taps of a finishing request (a hook tests use to corrupt the pool first)."""
        if self.tp is not None:  # the pools hold this rank's KV heads: taps in the unsharded layout
            taps = parallel.gathering_sink(taps, self.config, self.tp)
        emit_pool_taps(cache, self.config, r.index, r.length, taps)


def _collecting(logits: list[dict[int, torch.Tensor]], taps: TapSink | None) -> TapSink:
    """A sink that keeps every `logits` row and passes every tap on to `taps`. The engine computes
    every row's logits only with a sink, so returning logits alone needs one too."""
    def sink(i, name, positions, tensor):
        if name == "logits":
            logits[i].update(zip(positions.tolist(), tensor.cpu()))
        if taps is not None:
            taps(i, name, positions, tensor)

    return sink


# Scripted runs stop on length only: teacher-forced tokens may be anything, eos included.
_NO_STOP = SamplingParams(max_new_tokens=1, ignore_eos=True)
