"""Paged KV memory: a page allocator, the full pool, the sliding-window (SWA) pool, and the
token table that ties requests to slots (shared/DESIGN.md "Pools").

- `req_to_token[row, p]` is the full-pool slot of request `row`'s token at position p. Slots come
  in pages of `page_size`; position p sits at in-page offset p % page_size, so a request's page
  table is `req_to_token[row, ::page_size] // page_size`.
- Full-attention layers keep every token in the full pool.
- Sliding layers keep only the window in the SWA pool. Each full-pool page maps to at most one
  SWA page (`full_to_swa_page`); a batch translates its page table once. A page that falls out
  of every user's window is freed; its mapping returns to 0.
- KV-shared layers own no buffers: `buffers(layer)` hands out their source layer's.
- Page 0 of each pool is a padding sink: never allocated, so a zero entry never aliases live data.
- Running out of pages raises OutOfPages before anything is changed; callers can ask first.
- A prefix cache (optimized/engine/radix.py) may hold one reference of a page after its request
  is gone (`hold`/`unhold`). Pages it could let go of count as free (`num_free`), and `alloc`
  asks it (`reclaim`) before it would raise. Pages a running request holds are never among them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from reference.config import Gemma4Config, LayerSpec
from reference.window import first_visible_key


class OutOfPages(RuntimeError):
    """Not enough free pages; nothing was allocated."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def swa_pages_per_request(window: int, page_size: int, length: int, chunk: int = 1) -> int:
    """The one sliding-window sizing rule: the most SWA pages one request of `length` positions
    holds at once when it runs steps of at most `chunk` new tokens.

    A step at positions s .. s+chunk-1 needs keys from first_visible_key(s) = s - window + 1 on:
    window - 1 + chunk positions. Pages behind that were released after the previous step, so the
    request holds exactly the pages those positions touch: at most ceil((window + chunk - 2) /
    page_size) + 1 (one partial page at each end), and never more pages than its whole length.
    A borrowed prefix adds none: reuse from a running request is refused unless the donor's
    frontier is the borrower's, and a prefix from the cache brings exactly the SWA pages of the
    window its first new query sees."""
    return min(ceil_div(length, page_size), ceil_div(window + chunk - 2, page_size) + 1)


def shared_prefix_len(written: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` match tokens whose K/V another request has written,
    leaving the prompt's last token to compute (its logits give the first new token)."""
    n = 0
    for a, b in zip(written, prompt[: len(prompt) - 1]):
        if a != b:
            break
        n += 1
    return n


class PageAllocator:
    """Reference-counted pages 1..num_pages-1 (0 is reserved). `order_seed` shuffles the order in
    which pages are handed out, so tests exercise fragmented, non-monotonic page tables.

    A prefix cache may hold one reference of a page (`hold`, `unhold`) and lend the allocator two
    callables: `reclaimable()`, how many pages it could free now (pages only it holds, and that
    nothing it must keep depends on), and `reclaim(n)`, free at least n of them. `num_free`
    counts those pages, because `alloc` gets them back before it would run out; `num_unused` is
    the free list alone. `version` ticks whenever a held page's references change, so the cache
    can remember its count between changes."""

    def __init__(self, num_pages: int, order_seed: int | None = None):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        free = list(range(1, num_pages))
        if order_seed is not None:
            random.Random(order_seed).shuffle(free)
        self._free = free[::-1]  # pop() from the end hands pages out in `free` order
        self._refs = [0] * num_pages
        self._held = [False] * num_pages  # one of the page's references is the prefix cache's
        self.version = 0
        self.reclaimable: Callable[[], int] | None = None
        self.reclaim: Callable[[int], int] | None = None

    @property
    def num_free(self) -> int:
        """Pages `alloc` can hand out now: unused ones and those the prefix cache would give up."""
        return len(self._free) + self.num_reclaimable

    @property
    def num_unused(self) -> int:
        """Pages nobody holds, not even the prefix cache."""
        return len(self._free)

    @property
    def num_reclaimable(self) -> int:
        return self.reclaimable() if self.reclaimable is not None else 0

    def refs(self, page: int) -> int:
        return self._refs[page]

    def held(self, page: int) -> bool:
        return self._held[page]

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            if n > self.num_free:
                raise OutOfPages(f"need {n} pages, {self.num_free} free of {self.num_pages - 1}")
            self.reclaim(n - len(self._free))
            if n > len(self._free):  # the cache counted pages it could not free: a bug, not pressure
                raise RuntimeError(f"the prefix cache freed too few pages: {len(self._free)} of {n} needed")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, page: int) -> None:
        if self._refs[page] < 1:
            raise ValueError(f"page {page} is not allocated")
        self._refs[page] += 1
        self.version += self._held[page]

    def release(self, page: int) -> bool:
        """Drop one reference; True when that was the last and the page is free again."""
        if page == 0 or self._refs[page] < 1:
            raise ValueError(f"page {page} is not allocated")
        self._refs[page] -= 1
        self.version += self._held[page]
        if self._refs[page] == 0:
            self._free.append(page)
            return True
        return False

    def hold(self, page: int) -> None:
        """The prefix cache takes a reference (at most one per page)."""
        if self._held[page]:
            raise ValueError(f"page {page} is already held by the prefix cache")
        self.share(page)
        self._held[page] = True
        self.version += 1

    def unhold(self, page: int) -> bool:
        """The prefix cache drops its reference; True when the page is free again."""
        if not self._held[page]:
            raise ValueError(f"page {page} is not held by the prefix cache")
        self._held[page] = False
        self.version += 1
        return self.release(page)


@dataclass
class _Request:
    row: int
    length: int = 0  # positions with a slot (written or about to be)
    pages: list[int] = field(default_factory=list)  # full-pool pages, by page index
    swa_released: int = 0  # page indices below this no longer hold an SWA page for this request
    swa_floor: int | None = None  # release_window keeps SWA pages from this page index on (keep_window)


class KVCache:
    """The pools of one model plus the bookkeeping of which request owns which slots."""

    def __init__(self, cfg: Gemma4Config, *, page_size: int, num_pages: int, num_swa_pages: int,
                 max_requests: int, max_context: int, dtype: torch.dtype, device, order_seed: int | None = None):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.cfg, self.page_size, self.dtype, self.device = cfg, page_size, dtype, torch.device(device)
        self.max_context = ceil_div(max_context, page_size) * page_size
        self.window = cfg.sliding_window
        self.full = PageAllocator(num_pages, order_seed)
        self.swa = PageAllocator(num_swa_pages, None if order_seed is None else order_seed + 1)
        self.req_to_token = torch.zeros(max_requests, self.max_context, dtype=torch.int32, device=self.device)
        self.full_to_swa_page = torch.zeros(num_pages, dtype=torch.int32, device=self.device)
        self._swa_of = [0] * num_pages  # host copy of full_to_swa_page
        self._free_rows = list(range(max_requests))[::-1]
        self.requests: dict[object, _Request] = {}
        # One K and one V buffer per layer that computes K/V; shared layers borrow their source's.
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        for spec in cfg.layers:
            if spec.kv_shared:
                continue
            pages = num_swa_pages if spec.is_sliding else num_pages
            shape = (pages * page_size, spec.num_kv_heads, spec.head_dim)
            self._k[spec.index] = torch.zeros(shape, dtype=dtype, device=self.device)
            self._v[spec.index] = torch.zeros(shape, dtype=dtype, device=self.device)

    # -- buffers ------------------------------------------------------------------------
    def buffers(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[spec.kv_source], self._v[spec.kv_source]

    # -- requests -----------------------------------------------------------------------
    def add_request(self, rid, share_prefix_of=None, prefix_len: int = 0, *, cached: list[int] | None = None) -> int:
        """Register a request; optionally reuse the KV of the first `prefix_len` tokens of a live
        request (tokens it has already written), or of `cached` full-pool pages a prefix cache
        holds (whole pages, checked by `resident_prefix`). Returns the number of tokens reused."""
        if rid in self.requests:
            raise ValueError(f"request {rid!r} already exists")
        if not self._free_rows:
            raise OutOfPages(f"all {self.req_to_token.shape[0]} request rows are in use")
        n = self.prefix_reusable(share_prefix_of, prefix_len) if share_prefix_of is not None else 0
        req = _Request(self._free_rows.pop())
        self.requests[rid] = req
        if cached:
            return self._borrow_cached(req, cached)
        if n:
            donor = self.requests[share_prefix_of]
            for i, page in enumerate(donor.pages[: n // self.page_size]):
                self.full.share(page)
                if i >= donor.swa_released and self._swa_of[page]:  # the window part only
                    self.swa.share(self._swa_of[page])
            req.pages = donor.pages[: n // self.page_size]
            req.length = n
            req.swa_released = donor.swa_released
            self.req_to_token[req.row, :n] = self.req_to_token[donor.row, :n]
        return n

    def _borrow_cached(self, req: _Request, pages: list[int]) -> int:
        """Take references on cached pages: every full page, and the SWA pages of the window the
        first new query (at position n) sees. Pages below that window need no SWA page."""
        ps = self.page_size
        n = len(pages) * ps
        first = first_visible_key(n, self.window) // ps
        for i, page in enumerate(pages):
            self.full.share(page)
            if i >= first and self._swa_of[page]:  # resident_prefix made sure all of these are
                self.swa.share(self._swa_of[page])
        req.pages = list(pages)
        req.length = n
        req.swa_released = first
        self.req_to_token[req.row, :n] = self._slots_on_device(pages)
        return n

    def resident_prefix(self, pages: list[int]) -> int:
        """How many leading tokens of cached whole `pages` a new request may reuse: n = k pages
        for the largest k whose sliding window before n (keys first_visible_key(n) .. n-1, what
        the first new query at position n sees) lies on pages with a resident SWA page. Full
        layers keep every page, so only the window decides; a shorter k needs older keys, which
        may or may not be resident, so each k is checked."""
        ps, best, last_gone = self.page_size, 0, -1
        for k in range(1, len(pages) + 1):
            if not self._swa_of[pages[k - 1]]:
                last_gone = k - 1
            if first_visible_key(k * ps, self.window) // ps > last_gone:
                best = k
        return best * ps

    def hold_swa(self, full_page: int) -> None:
        """The prefix cache takes a reference on the SWA page mapped to `full_page`."""
        self.swa.hold(self._swa_of[full_page])

    def unhold_swa(self, full_page: int) -> bool:
        """The prefix cache drops its SWA reference of `full_page`; True when that freed it."""
        swa = self._swa_of[full_page]
        if self.swa.unhold(swa):
            self._swa_of[full_page] = 0
            # fill_ on a one-element view: a kernel with the value as its argument; an item
            # assignment copies a CPU scalar to the device, which waits for the stream.
            self.full_to_swa_page.narrow(0, full_page, 1).fill_(0)
            return True
        return False

    def swa_resident(self, full_page: int) -> bool:
        return bool(self._swa_of[full_page])

    def swa_page(self, full_page: int) -> int:
        """The SWA page mapped to a full-pool page (0: none)."""
        return self._swa_of[full_page]

    def prefix_reusable(self, donor_rid, prefix_len: int) -> int:
        """How many of a donor's first `prefix_len` tokens a new request may reuse: whole pages
        only (the new request must never write into a page it shares), and only while the sliding
        keys its first query needs are still resident; otherwise none (a shorter prefix needs
        even older keys, which are gone too)."""
        donor = self.requests[donor_rid]
        n = min(prefix_len, donor.length) // self.page_size * self.page_size
        if n and first_visible_key(n, self.window) // self.page_size < donor.swa_released:
            return 0
        return n

    def reserve(self, rid, new_length: int) -> None:
        """Give request `rid` full-pool slots for positions up to new_length - 1 (all or nothing).
        SWA pages come later, step by step, from `map_window`."""
        req = self.requests[rid]
        if new_length > self.max_context:
            raise OutOfPages(f"request {rid!r} needs {new_length} positions; rows hold {self.max_context}")
        n_pages = ceil_div(new_length, self.page_size)
        first_new = len(req.pages)
        if n_pages > first_new:
            pages = self.full.alloc(n_pages - first_new)  # raises before changing anything
            ps = self.page_size
            self.req_to_token[req.row, first_new * ps: n_pages * ps] = self._slots_on_device(pages)
            req.pages.extend(pages)
        req.length = max(req.length, new_length)

    def map_window(self, rid, seq_len: int) -> None:
        """Give SWA pages to the request's pages up to position seq_len - 1 (the keys a step is
        about to write). Raises OutOfPages, changing nothing, if the SWA pool is short."""
        req = self.requests[rid]
        if seq_len > req.length:
            raise ValueError(f"request {rid!r}: positions up to {seq_len} not reserved (have {req.length})")
        todo = [page for page in req.pages[req.swa_released: ceil_div(seq_len, self.page_size)]
                if not self._swa_of[page]]
        swa_pages = self.swa.alloc(len(todo))
        for page, swa in zip(todo, swa_pages):
            self._swa_of[page] = swa
        if todo:  # page numbers and their SWA pages in one copy that does not wait (_slots_on_device)
            packed = _host_to_device(torch.tensor(todo + swa_pages, dtype=torch.int64), self.device)
            self.full_to_swa_page[packed[: len(todo)]] = packed[len(todo):].to(torch.int32)

    def release_window(self, rid, next_query_pos: int) -> int:
        """Free the SWA pages of `rid` that no query at or after `next_query_pos` can see (and
        that no keep_window holds back). Returns how many pages this request let go."""
        req = self.requests[rid]
        dead_below = first_visible_key(next_query_pos, self.window) // self.page_size
        if req.swa_floor is not None:
            dead_below = min(dead_below, req.swa_floor)
        released = 0
        for i in range(req.swa_released, min(dead_below, len(req.pages))):
            self._drop_swa(req.pages[i])
            released += 1
        req.swa_released = max(req.swa_released, dead_below)
        return released

    def keep_window(self, rid, position: int | None) -> None:
        """Hold back the SWA pages a query at `position` sees from release_window (None: stop).
        The prefix cache asks for it at a prompt's reuse point until it has taken those pages:
        the release after the prompt's last chunk may pass them by a page."""
        req = self.requests[rid]
        req.swa_floor = None if position is None else first_visible_key(position, self.window) // self.page_size

    def _drop_swa(self, full_page: int) -> None:
        swa = self._swa_of[full_page]
        if not swa:
            return
        if self.swa.release(swa):
            self._swa_of[full_page] = 0
            # fill_ on a one-element view: a kernel with the value as its argument; an item
            # assignment copies a CPU scalar to the device, which waits for the stream.
            self.full_to_swa_page.narrow(0, full_page, 1).fill_(0)

    def free_request(self, rid) -> None:
        req = self.requests.pop(rid)
        for i, page in enumerate(req.pages):
            if i >= req.swa_released:
                self._drop_swa(page)
            self.full.release(page)
        self.req_to_token[req.row].zero_()
        self._free_rows.append(req.row)

    def _slots_on_device(self, pages: list[int]) -> torch.Tensor:
        """The full-pool slots of `pages`, in order (int32), on the device. The copy goes through
        batch.host_to_device (pinned, asynchronous where the device can pin): reserve, map_window
        and the borrowing of cached pages run while the overlapped engine's previous step is in
        flight (design note 32), and a pageable copy would make the host wait for that step."""
        ps = self.page_size
        new = torch.tensor(pages, dtype=torch.int32)
        slots = (new[:, None] * ps + torch.arange(ps, dtype=torch.int32)[None, :]).reshape(-1)
        return _host_to_device(slots, self.device)

    # -- tables ---------------------------------------------------------------------------
    def page_table(self, rows: torch.Tensor, num_pages: int) -> torch.Tensor:
        """Full-pool page table [B, num_pages]: the token table strided by the page size."""
        ps = self.page_size
        return (self.req_to_token[rows, : num_pages * ps: ps] // ps).contiguous()

    def swa_page_table(self, full_page_table: torch.Tensor) -> torch.Tensor:
        """The one full-to-SWA translation of a batch. Evicted pages come out as 0."""
        return self.full_to_swa_page[full_page_table.long()]


def _host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """batch.host_to_device, looked up at each call (batch.py imports this module; tests patch it)."""
    from . import batch

    return batch.host_to_device(host, device)


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVPlan:
    context: int
    page_size: int
    full_layers: int  # layers whose K/V live in the full pool (non-shared full layers)
    sliding_layers: int  # non-shared sliding layers
    shared_layers: int
    paged_bytes: int  # this layout: full pool for `context` tokens, SWA pool for the window
    naive_bytes: int  # every layer keeps its own full-length cache

    @property
    def saving(self) -> float:
        return self.naive_bytes / self.paged_bytes


def plan_kv_bytes(cfg: Gemma4Config, context: int, page_size: int = 16, dtype=torch.bfloat16,
                  batch: int = 1) -> KVPlan:
    """KV bytes of the hybrid paged layout against one full-length cache per layer."""
    item = torch.empty((), dtype=dtype).element_size()
    per_token = {s.index: 2 * s.num_kv_heads * s.head_dim * item for s in cfg.layers}
    full_pages = ceil_div(context, page_size)
    swa_pages = swa_pages_per_request(cfg.sliding_window, page_size, context)  # decode steps
    paged = naive = 0
    counts = {"full": 0, "sliding": 0, "shared": 0}
    for s in cfg.layers:
        naive += per_token[s.index] * context
        if s.kv_shared:
            counts["shared"] += 1
            continue
        counts["sliding" if s.is_sliding else "full"] += 1
        pages = swa_pages if s.is_sliding else full_pages
        paged += per_token[s.index] * pages * page_size
    return KVPlan(context, page_size, counts["full"], counts["sliding"], counts["shared"],
                  paged * batch, naive * batch)
