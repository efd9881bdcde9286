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
    tokens: list[int] = field(default_factory=list)
    done_prompt: int = 0  # prompt tokens whose K/V are in the pool
    reused: int = 0  # leading prompt tokens whose K/V came from another request

    @property
    def written(self) -> list[int]:
        """The tokens whose K/V are in the pool, in position order (the last generated token is fed
        at the next step)."""
        return self.prompt[: self.done_prompt] + (self.tokens[:-1] if not self.prefilling else [])

    @property
    def length(self) -> int:  # positions it may ever need
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.done_prompt < len(self.prompt)


@dataclass
class Scheduled:
    seq: Sequence
    item: BatchItem
    ids: list[int]  # the token ids it feeds this step


class Scheduler:
    def __init__(self, cache: KVCache, chunk_size: int, token_budget: int | None, share_prefixes: bool = True):
        self.cache, self.chunk_size, self.token_budget = cache, chunk_size, token_budget
        self.share_prefixes = share_prefixes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def pages_needed(self, seq: Sequence) -> int:
        return ceil_div(seq.length, self.cache.page_size)

    def schedule(self) -> list[Scheduled]:
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
        while self.waiting and budget >= 1 and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self.running.append(seq)
            budget -= self._add_chunk(out, seq, budget)
        return out

    def _add_chunk(self, out: list[Scheduled], seq: Sequence, budget: float) -> int:
        start = seq.done_prompt
        n = int(min(self.chunk_size, len(seq.prompt) - start, budget))
        out.append(Scheduled(seq, BatchItem(seq.rid, start, n), seq.prompt[start:start + n]))
        return n

    def _admit(self, seq: Sequence) -> bool:
        cache = self.cache
        donor, reuse = self._best_donor(seq)
        if self.pages_needed(seq) - reuse // cache.page_size > cache.full.num_free:
            return False
        try:
            seq.reused = cache.add_request(seq.rid, donor, reuse)
        except OutOfPages:  # every request row in use
            return False
        cache.reserve(seq.rid, seq.length)  # cannot fail: the pages were counted above
        seq.done_prompt = seq.reused
        return True

    def _best_donor(self, seq: Sequence) -> tuple[int | None, int]:
        """The running request that can lend the most of seq's prompt, and how many tokens."""
        best: tuple[int | None, int] = (None, 0)
        if self.share_prefixes:
            for d in self.running:
                n = self.cache.prefix_reusable(d.rid, shared_prefix_len(d.written, seq.prompt))
                if n > best[1]:
                    best = (d.rid, n)
        return best

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free_request(seq.rid)
