"""Runner: the public entry of the optimized path. It prefills prompts in chunks, decodes (greedy or
teacher-forced), and can report taps, for the oracle and the engine to build on.

Scheduling is deliberately simple and deterministic: every step takes, for each live request,
its next prefill chunk or one decode token, so extend and decode requests share batches. A
request is admitted once pages for its whole length are free (running out of pages queues it);
one that could never fit is refused before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from reference.config import Gemma4Config
from reference.weights import resolve

from .batch import BatchItem, build_batch
from .kernels import default_device
from .memory import KVCache, OutOfPages, ceil_div, shared_prefix_len
from .model import PagedGemma4, TapSink, fuse_projections


@dataclass
class RequestResult:
    tokens: list[int]  # generated (or teacher-forced) tokens
    logits: torch.Tensor | None = None  # [prompt_len + new, V] in position order
    prefix_reused: int = 0  # leading prompt tokens whose KV came from another request
    pages: list[int] = field(default_factory=list)  # full-pool page of each page index
    steps: list[tuple[int, int]] = field(default_factory=list)  # (first position, tokens) per forward step


@dataclass
class _Live:
    index: int
    prompt: list[int]
    new: int
    splits: list[int]
    teacher: list[int] | None
    done_prompt: int = 0
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    reused: int = 0
    pages: list[int] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.prompt) + self.new


class Runner:
    def __init__(self, path_or_preset: str | Path | Gemma4Config = "tiny", dtype: torch.dtype = torch.float32,
                 device=None, page_size: int = 16, chunk_size: int = 512, num_pages: int | None = None,
                 seed: int = 0, page_order_seed: int | None = None, weights: dict | None = None,
                 fused: bool = True):
        for name, v in (("page_size", page_size), ("chunk_size", chunk_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 2):
            raise ValueError(f"num_pages must be an integer >= 2 (page 0 is reserved), got {num_pages!r}")
        self.device = torch.device(device) if device is not None else default_device()
        if weights is not None:
            self.config = path_or_preset
            self.weights = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        else:
            self.config, self.weights = resolve(path_or_preset, dtype, self.device, seed)
        self.dtype, self.page_size, self.chunk_size = dtype, page_size, chunk_size
        self.num_pages, self.page_order_seed = num_pages, page_order_seed
        self.cache: KVCache | None = None
        self.fused = fused  # False: the non-attention ops in plain torch (the unfused baseline)
        self.fused_weights = fuse_projections(self.config, self.weights)

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
        splits = []
        for i, p in enumerate(prompts):
            s = None if chunk_splits is None else chunk_splits[i]
            if s is None:
                s = [self.chunk_size] * ceil_div(len(p), self.chunk_size)
                s[-1] = len(p) - self.chunk_size * (len(s) - 1)
            elif any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in s) or sum(s) != len(p):
                raise ValueError(f"chunk_splits[{i}]: positive chunk lengths summing to {len(p)}, got {s!r}")
            splits.append(list(s))
        if arrivals is not None and (len(arrivals) != n or any(not isinstance(a, int) or a < 0 for a in arrivals)):
            raise ValueError(f"arrivals needs one step >= 0 per prompt, got {arrivals!r}")
        if share_prefix_with is not None:
            if len(share_prefix_with) != n:
                raise ValueError("share_prefix_with needs one entry (None or an earlier index) per prompt")
            for i, d in enumerate(share_prefix_with):
                if d is not None and not (isinstance(d, int) and 0 <= d < i):
                    raise ValueError(f"share_prefix_with[{i}] must be None or an earlier prompt index, got {d!r}")
        return news, splits

    def _make_cache(self, lives: list[_Live]) -> KVCache:
        ps, W = self.page_size, self.config.sliding_window
        need = [ceil_div(r.total, ps) for r in lives]
        num_pages = self.num_pages or sum(need) + 1
        too_long = [i for i, k in enumerate(need) if k > num_pages - 1]
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {i} needs {lives[i].total} positions ({need[i]} pages of {ps}); "
                             f"the pool can ever hold {(num_pages - 1) * ps}")
        # A sliding layer holds, per request, the window behind its chunk plus the chunk itself.
        swa_need = [min(k, ceil_div(W - 1 + max(r.splits), ps) + 2) for k, r in zip(need, lives)]
        return KVCache(self.config, page_size=ps, num_pages=num_pages, num_swa_pages=sum(swa_need) + 1,
                       max_requests=len(lives), max_context=max(r.total for r in lives), dtype=self.dtype,
                       device=self.device, order_seed=self.page_order_seed)

    # -- the loop --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompts, max_new_tokens=0, teacher_tokens=None, return_logits: bool = False,
            chunk_splits=None, arrivals=None, share_prefix_with=None, taps: TapSink | None = None):
        """Prefill and decode every prompt; returns one RequestResult per prompt, in order.

        chunk_splits: per prompt, explicit prefill chunk lengths (None: `chunk_size` chunks).
        arrivals: per prompt, the step at which it may start (default 0).
        share_prefix_with: per prompt, None or the index of an earlier prompt whose KV for the
          common prefix (whole pages, still inside the window) this prompt reuses.
        taps: a sink(request_index, name, positions, tensor) that receives every tap, including
          `layers.{l}.k_cache/.v_cache` gathered from the pools when a request finishes.
        """
        news, splits = self._validate(prompts, max_new_tokens, teacher_tokens, chunk_splits, arrivals,
                                      share_prefix_with)
        lives = [_Live(i, list(p), k, s, None if teacher_tokens is None else list(teacher_tokens[i]))
                 for i, (p, k, s) in enumerate(zip(prompts, news, splits))]
        cache = self.cache = self._make_cache(lives)
        model = PagedGemma4(self.config, self.weights, cache, self.fused, self.fused_weights)
        # Every row's logits when they are returned or captured (taps `final_norm`, `logits`), and
        # then the last generated token is fed too, so both cover prompt + new positions.
        all_rows = feed_last = return_logits or taps is not None
        waiting = list(lives)
        running: list[_Live] = []
        results: dict[int, RequestResult] = {}
        step = 0
        while waiting or running:
            for r in list(waiting):
                if arrivals is not None and arrivals[r.index] > step:
                    continue
                donor = None if share_prefix_with is None else share_prefix_with[r.index]
                if donor is not None and donor not in results and lives[donor] not in running:
                    continue  # the donor has not started: wait for its KV
                if not self._admit(cache, r, lives, donor, running):
                    break  # out of pages: keep arrival order, wait for a request to finish
                waiting.remove(r)
                running.append(r)
            if not running:
                step += 1
                if step > 10_000_000:
                    raise RuntimeError("scheduler made no progress")
                continue
            items, ids = [], []
            for r in running:
                if r.done_prompt < len(r.prompt):
                    start = r.done_prompt
                    chunk = _next_chunk(r.splits, start)
                    items.append(BatchItem(r.index, start, chunk))
                    ids.extend(r.prompt[start:start + chunk])
                else:
                    items.append(BatchItem(r.index, len(r.prompt) + len(r.tokens) - 1, 1))
                    ids.append(r.tokens[-1])
            batch = build_batch(cache, items)
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
            last_rows = None if all_rows else batch.cu_seqlens_q[1:].long() - 1
            logits = model.forward(ids_t, batch, taps=taps, logit_rows=last_rows)
            finished = []
            for i, (r, (item, start, end)) in enumerate(zip(running, batch.token_ranges())):
                n = end - start
                r.steps.append((item.prefix_len, n))
                rows = logits[start:end] if all_rows else logits[i:i + 1]
                if return_logits:
                    r.logits.append(rows.cpu())
                if r.done_prompt < len(r.prompt):
                    r.done_prompt += n
                    if r.done_prompt < len(r.prompt):
                        cache.release_window(r.index, item.seq_len)
                        continue
                if len(r.tokens) < r.new:
                    pred = int(rows[-1].argmax())
                    r.tokens.append(pred if r.teacher is None else r.teacher[len(r.tokens)])
                    if len(r.tokens) < r.new or feed_last:
                        cache.release_window(r.index, item.seq_len)
                        continue
                finished.append(r)
            for r in finished:
                if taps is not None:
                    self._emit_cache(cache, r, taps)
                results[r.index] = RequestResult(
                    r.tokens, torch.cat(r.logits) if return_logits else None, r.reused, r.pages, r.steps)
                running.remove(r)
                cache.free_request(r.index)
            step += 1
        return [results[i] for i in range(len(lives))]

    def _admit(self, cache: KVCache, r: _Live, lives, donor, running) -> bool:
        ps = self.page_size
        reuse = 0
        if donor is not None and lives[donor] in running:
            d = lives[donor]
            reuse = cache.prefix_reusable(donor, shared_prefix_len(d.prompt[: d.done_prompt], r.prompt))
        if ceil_div(r.total, ps) - reuse // ps > cache.full.num_free:
            return False
        try:
            r.reused = cache.add_request(r.index, donor if reuse else None, reuse)
            cache.reserve(r.index, r.total)
        except OutOfPages:
            if r.index in cache.requests:
                cache.free_request(r.index)
            r.reused = 0
            return False
        r.done_prompt = r.reused
        r.pages = list(cache.requests[r.index].pages)
        if r.reused and lives[donor].logits:
            # Positions whose KV was reused were computed once, by the donor: share its logits.
            r.logits.append(torch.cat(lives[donor].logits)[: r.reused])
        return True

    def _emit_cache(self, cache: KVCache, r: _Live, taps: TapSink) -> None:
        """Pool contents read back through the page tables: every position on full layers, the
        last W on sliding layers (the ones a next query would need, plus the one it drops)."""
        length = len(r.prompt) + len(r.tokens)
        row = cache.requests[r.index].row
        ps = self.page_size
        for spec in self.config.layers:
            if spec.kv_shared:
                continue
            lo = 0 if spec.window is None else max(0, length - spec.window)
            pos = torch.arange(lo, length, device=self.device)
            slots = cache.req_to_token[row, pos].long()
            if spec.is_sliding:
                slots = cache.full_to_swa_page[slots // ps].long() * ps + slots % ps
            k, v = cache.buffers(spec)
            taps(r.index, f"layers.{spec.index}.k_cache", pos, k[slots].clone())
            taps(r.index, f"layers.{spec.index}.v_cache", pos, v[slots].clone())


def _next_chunk(splits: list[int], start: int) -> int:
    """Length of the chunk that starts at prompt position `start`. Chunk boundaries are absolute:
    after a reused prefix that ends mid-chunk, the rest of that chunk comes first."""
    boundary = 0
    for s in splits:
        boundary += s
        if boundary > start:
            return boundary - start
    raise AssertionError("prompt already consumed")
