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

With `share_prefixes`, a new request whose prompt starts with tokens another request has
already written reuses those K/V pages instead of recomputing them: whole pages only, and only
while the sliding window they need is still resident. The lender is a running request
(KVCache.prefix_reusable decides) or the prefix cache (radix.RadixCache), which gets each prompt
once it is prefilled and everything a request wrote once it finishes, and keeps those pages until
the pools need them; whichever lends more wins. Admission counts pages the cache could give up
as free: reserving them evicts them.

A `Script` turns the same loop into the oracle's scripted schedule: per request, explicit chunk
splits, the step before which it may not start, and the one named request it may borrow a prefix
from (no other): while it runs, from it; once it has finished (its arrival step lies past the
donor's last step), from the cache, no further than the tokens that donor wrote (so scripted
runs cache requests as they finish, not their prompts after prefill). Scripted requests still
queue for pages and rows like any other; with no token budget every running request takes its
next piece each step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..batch import BatchItem
from ..memory import KVCache, OutOfPages, ceil_div, shared_prefix_len
from .radix import RadixCache
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
    prompt_cached: bool = False  # its prompt's pages are in the prefix cache

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
    arrivals: the first step it may start at (steps count every schedule() call, idle ones too; a
      run with nothing to do until the next arrival skips straight to it, as if counted).
    donors: the one request whose written prefix it may reuse; it waits until that one started.
      A donor that has finished lends through the prefix cache, up to the tokens it wrote.
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
        self.prefix_cache = RadixCache(cache) if share_prefixes else None
        # A scripted request borrows from the cache only what its finished donor wrote, so scripted
        # runs cache at finish only: a prompt cached while its request runs would pin SWA pages
        # that a fault releasing a window early must be seen to lose.
        self._cache_running_prompts = share_prefixes and script is None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_count = 0  # schedule() calls so far: the clock scripted arrivals count in
        self._finished_written: dict[int, list[int]] = {}  # scripted runs: what finished donors wrote

    def schedule(self) -> list[Scheduled]:
        step = self._next_step()
        self.step_count = step + 1
        budget = self.token_budget if self.token_budget is not None else float("inf")
        out: list[Scheduled] = []
        self._cache_prompts()
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

    def _next_step(self) -> int:
        """The step this schedule() call runs: the next one, or, when a scripted run is idle (nothing
        running, no waiting request may start yet), the first later arrival. Every step skipped
        would have scheduled nothing, as the waiting requests and their donors stay as they are
        until one starts, so the schedule is the same as counting them one by one; a request
        that arrives at step 10**9 then costs no 10**9 idle calls."""
        step = self.step_count
        if self.script is None or self.running or not self.waiting:
            return step
        if any(self._may_start(seq, step) for seq in self.waiting):
            return step
        later = [a for seq in self.waiting if (a := self.script.arrivals.get(seq.rid, 0)) > step]
        # None later: every waiting request waits for a donor that waits too, which cannot be (a
        # donor comes first and, with none of its own, starts at its arrival); count on as before.
        return min(later) if later else step

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
        donor, cached, reuse = self._best_source(seq)
        if ceil_div(seq.length, cache.page_size) - reuse // cache.page_size > cache.full.num_free:
            return False
        try:
            seq.reused = cache.add_request(seq.rid, donor, reuse, cached=cached)
        except OutOfPages:  # every request row in use
            return False
        try:  # evicts cached pages if it must; the ones just borrowed are held, so they stay
            cache.reserve(seq.rid, seq.length)
        except OutOfPages:  # the free count included the borrowed cached pages themselves
            cache.free_request(seq.rid)
            seq.reused = 0
            return False
        seq.done_prompt = seq.reused
        seq.pages = list(cache.requests[seq.rid].pages)
        if self._cache_running_prompts:  # until _cache_prompts takes the window of the reuse point
            cache.keep_window(seq.rid, self._reuse_point(seq.prompt))
        return True

    def _reuse_point(self, prompt: list[int]) -> int:
        """Where a later request with the same prompt would start computing: the last whole page
        boundary before the prompt's last token."""
        return (len(prompt) - 1) // self.cache.page_size * self.cache.page_size

    def _cache_prompts(self) -> None:
        """Put the prompts that finished prefilling in the last step into the prefix cache, with
        the SWA pages of the window at their reuse point (held back by keep_window until now), so
        the same prompt stays reusable after the request's window has moved on."""
        for seq in self.running:
            if seq.prefilling or seq.prompt_cached or not self._cache_running_prompts:
                continue
            req = self.cache.requests[seq.rid]
            self.prefix_cache.insert(seq.prompt, req.pages, req.swa_released)
            self.cache.keep_window(seq.rid, None)
            self.cache.release_window(seq.rid, len(seq.prompt) + len(seq.tokens) - 1)  # the next query's position
            seq.prompt_cached = True

    def _best_source(self, seq: Sequence) -> tuple[int | None, list[int] | None, int]:
        """Where seq's prompt prefix comes from: (a running donor, None, tokens), (None, cached
        pages, tokens) or (None, None, 0). A scripted request considers only its named donor:
        running, or finished and then through the cache no further than what it wrote. One that
        asks for its prompt's logprobs reuses nothing: reused rows have no logits."""
        best: tuple[int | None, int] = (None, 0)
        if seq.params.prompt_logprobs is not None:  # it needs the logits of every prompt row
            return None, None, 0
        limit = len(seq.prompt) - 1  # the last prompt token is always computed
        if self.script is not None:
            named = self.script.donors.get(seq.rid)
            candidates = [d for d in self.running if d.rid == named]
            written = self._finished_written.get(named)
            limit = 0 if written is None else shared_prefix_len(written, seq.prompt)
        else:
            candidates = self.running if self.share_prefixes else []
        for d in candidates:
            n = self.cache.prefix_reusable(d.rid, shared_prefix_len(d.written, seq.prompt))
            if n > best[1]:
                best = (d.rid, n)
        ps = self.cache.page_size
        if self.prefix_cache is not None and limit // ps * ps > best[1]:
            pages = self.prefix_cache.match(seq.prompt[:limit])
            if len(pages) * ps > best[1]:
                return None, pages, len(pages) * ps
        return best[0], None, best[1]

    def finish(self, seq: Sequence) -> None:
        """A request is done: its whole written pages go to the prefix cache, then it is freed."""
        self.running.remove(seq)
        if self.prefix_cache is not None:
            req = self.cache.requests[seq.rid]
            self.prefix_cache.insert(seq.written, req.pages, req.swa_released)
        if self.script is not None:
            self._finished_written[seq.rid] = seq.written
        self.cache.free_request(seq.rid)

    def drop(self, seq: Sequence) -> None:
        """An aborted request: freed, not cached (a dropped client's pages are given back)."""
        self.running.remove(seq)
        self.cache.free_request(seq.rid)
