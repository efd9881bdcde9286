"""Scheduler: which requests run in the next forward step, and with how many tokens.

Continuous batching under a per-step token budget. Each step takes, in order:
1. one decode token for every request that has finished its prompt (a request is admitted only
   with budget to spare, and each running one takes at least a token a step, so the running
   requests never outnumber the budget and every decode fits);
2. the next prefill chunk of requests part-way through their prompt (at most `chunk_size`
   tokens, cut to what is left of the budget);
3. new requests, first come first served, while the budget lasts and the pool has pages for a
   request's whole length (prompt + max_new_tokens), reserved at admission: a running request
   never runs out of pages, so nothing is ever preempted. A request that does not fit waits,
   and so do the ones behind it (no overtaking).

With `share_prefixes`, a new request whose prompt starts with tokens a running request has
already written reuses those K/V pages instead of recomputing them: whole pages only, and only
while the sliding window they need is still resident (KVCache.prefix_reusable decides both).
Finished requests give their pages back at once, so only running requests can lend.

A `Script` turns the same loop into the oracle's scripted schedule: per request, explicit chunk
splits, the step before which it may not start, and the one named request it may borrow a prefix
from (no other). Scripted requests still queue for pages and rows like any other; with no token
budget every running request takes its next piece each step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..batch import BatchItem
from ..memory import KVCache, OutOfPages, ceil_div, shared_prefix_len
from .sampler import SamplingParams


@dataclass
class Sequence:
    rid: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    max_new_tokens: int = -1  # -1: params.max_new_tokens; 0 (scripted runs only): prefill only
    tokens: list[int] = field(default_factory=list)
    done_prompt: int = 0  # prompt tokens whose K/V are in the pool
    reused: int = 0  # leading prompt tokens whose K/V came from another request
    finish_reason: str | None = None  # set with the last token (a request that feeds it runs once more)
    fed_last: bool = False  # the last token was fed too, so its K/V are in the pool
    steps: list[tuple[int, int]] = field(default_factory=list)  # (first position, tokens) per forward step
    pages: list[int] = field(default_factory=list)  # full-pool page of each page index, from admission

    def __post_init__(self):
        if self.max_new_tokens < 0:
            self.max_new_tokens = self.params.max_new_tokens

    @property
    def written(self) -> list[int]:
        """The tokens whose K/V are in the pool, in position order (a generated token is fed, and
        written, at the step after it was sampled)."""
        if self.prefilling:
            return self.prompt[: self.done_prompt]
        return self.prompt + (self.tokens if self.fed_last else self.tokens[:-1])

    @property
    def length(self) -> int:  # positions it may ever need
        return len(self.prompt) + self.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.done_prompt < len(self.prompt)


@dataclass
class Scheduled:
    seq: Sequence
    item: BatchItem
    ids: list[int]  # the token ids it feeds this step


@dataclass
class Script:
    """The oracle's scripted schedule, per request id (absent ids: the scheduler decides).

    splits: prefill chunk lengths summing to the prompt; boundaries are absolute, so after a
      reused prefix that ends mid-chunk the rest of that chunk comes first.
    arrivals: the first step (counting every schedule() call, idle ones too) it may start at.
    donors: the one request whose written prefix it may reuse; it waits until that one started.
    """

    splits: dict[int, list[int]] = field(default_factory=dict)
    arrivals: dict[int, int] = field(default_factory=dict)
    donors: dict[int, int] = field(default_factory=dict)

    def next_chunk(self, seq: Sequence) -> int | None:
        splits = self.splits.get(seq.rid)
        if splits is None:
            return None
        boundary = 0
        for s in splits:
            boundary += s
            if boundary > seq.done_prompt:
                return boundary - seq.done_prompt
        raise AssertionError("prompt already consumed")


class Scheduler:
    def __init__(self, cache: KVCache, chunk_size: int, token_budget: int | None, share_prefixes: bool = True,
                 script: Script | None = None):
        self.cache, self.chunk_size, self.token_budget = cache, chunk_size, token_budget
        self.share_prefixes = share_prefixes
        self.script = script
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_count = 0  # schedule() calls so far: the clock scripted arrivals count in

    def schedule(self) -> list[Scheduled]:
        step, self.step_count = self.step_count, self.step_count + 1
        budget = self.token_budget if self.token_budget is not None else float("inf")
        out: list[Scheduled] = []
        for seq in [s for s in self.running if not s.prefilling]:
            if budget < 1:
                break
            position = len(seq.prompt) + len(seq.tokens) - 1
            out.append(Scheduled(seq, BatchItem(seq.rid, position, 1), [seq.tokens[-1]]))
            budget -= 1
        for seq in [s for s in self.running if s.prefilling]:
            if budget < 1:
                break
            budget -= self._add_chunk(out, seq, budget)
        for seq in list(self.waiting):  # first come first served; no overtaking of one that cannot fit
            if not self._may_start(seq, step):
                continue
            if budget < 1 or not self._admit(seq):
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            budget -= self._add_chunk(out, seq, budget)
        return out

    def _may_start(self, seq: Sequence, step: int) -> bool:
        """Scripted requests wait for their arrival step and for their donor to have started."""
        if self.script is None:
            return True
        donor = self.script.donors.get(seq.rid)
        if donor is not None and any(s.rid == donor for s in self.waiting):
            return False
        return self.script.arrivals.get(seq.rid, 0) <= step

    def _add_chunk(self, out: list[Scheduled], seq: Sequence, budget: float) -> int:
        start = seq.done_prompt
        scripted = self.script.next_chunk(seq) if self.script is not None else None
        n = scripted if scripted is not None else int(min(self.chunk_size, len(seq.prompt) - start, budget))
        out.append(Scheduled(seq, BatchItem(seq.rid, start, n), seq.prompt[start:start + n]))
        return n

    def _admit(self, seq: Sequence) -> bool:
        cache = self.cache
        donor, reuse = self._best_donor(seq)
        if ceil_div(seq.length, cache.page_size) - reuse // cache.page_size > cache.full.num_free:
            return False
        try:
            seq.reused = cache.add_request(seq.rid, donor, reuse)
        except OutOfPages:  # every request row in use
            return False
        cache.reserve(seq.rid, seq.length)  # cannot fail: the pages were counted above
        seq.done_prompt = seq.reused
        seq.pages = list(cache.requests[seq.rid].pages)
        return True

    def _best_donor(self, seq: Sequence) -> tuple[int | None, int]:
        """The running request that can lend the most of seq's prompt, and how many tokens (a
        scripted request considers only its named donor)."""
        best: tuple[int | None, int] = (None, 0)
        if self.script is not None:
            named = self.script.donors.get(seq.rid)
            candidates = [d for d in self.running if d.rid == named]
        else:
            candidates = self.running if self.share_prefixes else []
        for d in candidates:
            n = self.cache.prefix_reusable(d.rid, shared_prefix_len(d.written, seq.prompt))
            if n > best[1]:
                best = (d.rid, n)
        return best

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free_request(seq.rid)
