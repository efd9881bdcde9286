"""Prefix cache: K/V pages kept past their request in a radix tree over token ids, so that a later
request with the same opening reuses them instead of recomputing (docs/design_notes.md note 29).

What is cached, and when. The scheduler inserts a request's prompt once its prefill is done (the
request still runs and keeps its own references), and everything it wrote (`Sequence.written`:
prompt and fed tokens) when it finishes; an aborted request is dropped, not cached. Whole pages
only: a borrower's first own write lands at its reuse point, and a shared page is never written
(the live sharing of KVCache.prefix_reusable cuts to whole pages for the same reason), so a
partial last page goes free with its request. KV-shared layers own no buffers (KVCache.buffers):
nothing of theirs is cached, they read their source layer's pages, which are.

The tree. Edges are labelled by whole pages of tokens; a child is found by the tokens of its first
page; nodes split at page boundaries only. Each node holds one cache reference (PageAllocator
`hold`) on each of its full-pool pages, so they outlive their request. Where a request wrote a
copy of an opening the tree already holds, the tree keeps its own pages for that part; the copy
goes free with the request, and the request's continuation hangs below the tree's opening.

Sliding windows. Full layers keep every cached page, but a borrower's sliding layers at its reuse
point n need keys first_visible_key(n) .. n-1 (reference/window.py), and the SWA pool keeps only
windows. The rule: at each insertion the tree takes the SWA pages the request still holds on the
inserted pages (its current window), and a match is reusable only up to the largest page
boundary whose window lies on resident SWA pages (KVCache.resident_prefix). Two windows matter
and are kept: at a prompt's reuse point (the last page boundary before its last token; the
scheduler holds it back from release with KVCache.keep_window until the insertion), so the same
prompt is reusable however long the request then generates, and at the end of what a finished
request wrote, so a follow-up turn reuses the answer too. A prompt that leaves a cached sequence
elsewhere reuses nothing on any layer: keeping every window of every request costs the SWA pool
what it exists to save.

Eviction. A page is reclaimable when only the tree holds it and no page held by anyone else
hangs below it (`reclaimable`; PageAllocator counts these as free); pages a running request
borrowed carry its references and are never evicted. When the full pool runs short, `alloc` asks
the tree: it trims pages off the tail of the least recently used leaf (last use: the last insert
or match through the node) until enough are free, removing leaves it empties. When the SWA pool
runs short, the tree drops the SWA references of its least recently used nodes (their full pages
stay; those ends stop being reusable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..memory import KVCache


@dataclass(eq=False)
class _Node:
    tokens: list[int]  # whole pages of token ids: len(tokens) == len(pages) * page_size
    pages: list[int]  # full-pool pages, each held by the tree
    swa: list[bool]  # per page: the tree holds a reference on its SWA page too
    parent: _Node | None = None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    last_used: int = 0


class RadixCache:
    """The tree over one KVCache's pages. It lends both pools its `reclaimable` and `reclaim`."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.page_size = cache.page_size
        self.root = _Node([], [], [])
        self._clock = 0  # ticks on every insert and match: the LRU order
        self._shape = 0  # ticks on every change of which pages the tree holds
        self._counts: dict[str, tuple[tuple[int, int], int]] = {}  # pool -> (versions, count)
        cache.full.reclaimable, cache.full.reclaim = self.reclaimable, self.evict
        cache.swa.reclaimable, cache.swa.reclaim = self.reclaimable_swa, self.evict_swa

    # -- lookups ----------------------------------------------------------------------------
    def match(self, tokens: list[int]) -> list[int]:
        """The cached pages a request whose prompt opens with `tokens` may reuse: the longest
        run of whole pages the tree holds for them, cut back to where the sliding window is
        resident. The nodes it reuses count as used now. The caller passes what it may reuse
        (a prompt without its last token, whose logits it must compute)."""
        ps = self.page_size
        node, i, pages, path = self.root, 0, [], []
        while i < len(tokens) // ps:
            child = node.children.get(self._key(tokens, i))
            if child is None:
                break
            m = self._common_pages(child, tokens, i)
            pages += child.pages[:m]
            path.append(child)
            i += m
            if m < len(child.pages):
                break
            node = child
        k = self.cache.resident_prefix(pages) // ps
        self._clock += 1
        covered = 0
        for n in path:
            if covered >= k:
                break
            n.last_used = self._clock
            covered += len(n.pages)
        return pages[:k]

    # -- insertion --------------------------------------------------------------------------
    def insert(self, tokens: list[int], pages: list[int], swa_from: int) -> None:
        """Cache a request's whole written pages: its prompt while it runs, or all it wrote as it
        leaves. `tokens` are the written tokens, `pages` its full-pool pages by page index,
        `swa_from` the first page index whose SWA page it still holds (KVCache's swa_released).
        The tree takes its own references; the request keeps, or later frees, its own."""
        ps = self.page_size
        k = min(len(tokens) // ps, len(pages))
        if k == 0:
            return
        self._clock += 1
        path: list[tuple[_Node, int]] = []  # per page index: the node and offset holding it
        node, i = self.root, 0
        while i < k:
            key = self._key(tokens, i)
            child = node.children.get(key)
            if child is None:
                child = _Node(list(tokens[i * ps: k * ps]), list(pages[i:k]), [False] * (k - i), node)
                for page in child.pages:
                    self.cache.full.hold(page)
                self._shape += 1
                node.children[key] = child
                m = k - i
            else:
                m = min(self._common_pages(child, tokens, i), k - i)
                if m < len(child.pages):
                    child = self._split(child, m)
            child.last_used = self._clock
            path += [(child, j) for j in range(m)]
            node, i = child, i + m
        for t in range(max(swa_from, 0), len(path)):  # keep the window the request still held
            node, j = path[t]
            if node.pages[j] == pages[t] and not node.swa[j] and self.cache.swa_resident(pages[t]):
                self.cache.hold_swa(pages[t])
                node.swa[j] = True
                self._shape += 1

    def _split(self, node: _Node, m: int) -> _Node:
        """Cut `node` after its first m pages; returns the new upper part (the lower keeps its
        children, and its age)."""
        ps = self.page_size
        upper = _Node(node.tokens[: m * ps], node.pages[:m], node.swa[:m], node.parent,
                      last_used=node.last_used)
        node.tokens, node.pages, node.swa = node.tokens[m * ps:], node.pages[m:], node.swa[m:]
        upper.children[self._key(node.tokens, 0)] = node
        node.parent.children[self._key(upper.tokens, 0)] = upper
        node.parent = upper
        self._shape += 1
        return upper

    # -- eviction ---------------------------------------------------------------------------
    def reclaimable(self) -> int:
        """Full-pool pages `evict` could free now: pages only the tree holds with no page held
        by anyone else below them (a node's tail behind its last borrowed page, where no child
        has a borrowed page). Usually every tree-only page; not when a running request borrowed
        the continuation of another request's copy of the opening the tree holds."""
        return self._remembered("full", self.cache.full.version, self._count_reclaimable)

    def reclaimable_swa(self) -> int:
        """SWA pages `evict_swa` could free now: those only the tree holds."""
        swa = self.cache.swa
        return self._remembered("swa", swa.version, lambda: sum(
            swa.refs(self.cache.swa_page(p)) == 1 for x in self.nodes() for p, h in zip(x.pages, x.swa) if h))

    def _remembered(self, pool: str, version: int, count) -> int:
        key = (version, self._shape)
        if pool not in self._counts or self._counts[pool][0] != key:
            self._counts[pool] = key, count()
        return self._counts[pool][1]

    def _count_reclaimable(self) -> int:
        """Children before parents (no recursion: a long conversation is a deep chain): per
        subtree, its reclaimable pages and whether anything in it is borrowed."""
        refs = self.cache.full.refs
        sub: dict[int, tuple[int, bool]] = {}
        for node in reversed([self.root, *self.nodes()]):
            below = [sub.pop(id(c)) for c in node.children.values()]
            total, borrowed = sum(n for n, _ in below), any(b for _, b in below)
            tail = 0
            while not borrowed and tail < len(node.pages) and refs(node.pages[-1 - tail]) == 1:
                tail += 1
            sub[id(node)] = total + tail, borrowed or tail < len(node.pages)
        return sub[id(self.root)][0]

    def evict(self, n: int) -> int:
        """Free at least n full-pool pages that only the tree holds, least recently used leaves
        first, trimming each from its tail; returns how many were freed (fewer only if the tree
        has no more such pages)."""
        full, freed = self.cache.full, 0
        while freed < n:
            leaves = [x for x in self.nodes() if not x.children and full.refs(x.pages[-1]) == 1]
            if not leaves:
                break
            leaf = min(leaves, key=lambda x: x.last_used)
            key = self._key(leaf.tokens, 0)
            while freed < n and leaf.pages and full.refs(leaf.pages[-1]) == 1:
                self._drop_last_page(leaf)
                freed += 1
            if not leaf.pages:
                del leaf.parent.children[key]
        return freed

    def evict_swa(self, n: int) -> int:
        """Free at least n SWA pages by dropping the tree's SWA references, least recently used
        nodes first (their full pages stay cached); returns how many were freed."""
        freed = 0
        for node in sorted((x for x in self.nodes() if any(x.swa)), key=lambda x: x.last_used):
            if freed >= n:
                break
            for j, held in enumerate(node.swa):
                if held:
                    node.swa[j] = False
                    freed += self.cache.unhold_swa(node.pages[j])
            self._shape += 1
        return freed

    def clear(self) -> None:
        """Drop every reference the tree holds (pages running requests borrowed stay theirs)."""
        for node in list(self.nodes()):
            for page, held in zip(node.pages, node.swa):
                if held:
                    self.cache.unhold_swa(page)
                self.cache.full.unhold(page)
        self.root = _Node([], [], [])
        self._shape += 1

    def _drop_last_page(self, node: _Node) -> None:
        self._shape += 1
        page = node.pages.pop()
        if node.swa.pop():
            self.cache.unhold_swa(page)
        self.cache.full.unhold(page)
        del node.tokens[len(node.pages) * self.page_size:]

    # -- inspection ---------------------------------------------------------------------------
    def nodes(self) -> Iterator[_Node]:
        """Every node but the root, parents before children, in insertion order."""
        stack = list(reversed(self.root.children.values()))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children.values()))

    @property
    def num_pages(self) -> int:
        """Full-pool pages the tree holds."""
        return sum(len(x.pages) for x in self.nodes())

    def _key(self, tokens: list[int], page: int) -> tuple[int, ...]:
        return tuple(tokens[page * self.page_size: (page + 1) * self.page_size])

    def _common_pages(self, node: _Node, tokens: list[int], start_page: int) -> int:
        """How many of node's pages the tokens from `start_page` on repeat, page by page."""
        ps, m = self.page_size, 0
        while m < len(node.pages) and (start_page + m + 1) * ps <= len(tokens) and \
                node.tokens[m * ps:(m + 1) * ps] == tokens[(start_page + m) * ps:(start_page + m + 1) * ps]:
            m += 1
        return m
