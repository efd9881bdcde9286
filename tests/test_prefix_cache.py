"""The prefix cache that survives the request (optimized/engine/radix.py).

Three levels. The tree alone, on real pools without a model: every position's K/V slot is
written with a hash of the tokens up to it, so a borrower that reads a wrong page, or a sliding
key that is no longer resident, shows as a wrong value. The engine: a later request reuses a
finished one's pages and still gets the reference's greedy tokens, the cache gives pages back
under pressure, and nothing leaks. The oracle: the warm-prefix built-in holds tap parity on the
three test architectures, and reusing past the resident window is caught.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from optimized.engine import SamplingParams
from optimized.engine.radix import RadixCache
from optimized.memory import KVCache, OutOfPages, shared_prefix_len, swa_pages_per_request
from reference.presets import PRESETS
from reference.window import first_visible_key

from tests.engine_helpers import engine as _engine, prompts as _prompts, reference_greedy

CFG = PRESETS["tiny"]  # layers 0-3 and 5-8 sliding (W = 5), 4 and 9 full; 6-9 KV-shared
FULL_LAYER, SLIDING_LAYER = CFG.layers[4], CFG.layers[0]


# -- the tree alone, on real pools ----------------------------------------------------------------


def _pools(page_size=2, num_pages=24, num_swa_pages=None, requests=3):
    swa = num_swa_pages or requests * swa_pages_per_request(CFG.sliding_window, page_size, 64, 4) + 1
    cache = KVCache(CFG, page_size=page_size, num_pages=num_pages, num_swa_pages=swa, max_requests=requests,
                    max_context=64, dtype=torch.float32, device="cpu", order_seed=3)
    return cache, RadixCache(cache)


def _hashes(tokens):
    """What position p's K/V stands for: a hash of tokens[:p+1] (K/V depend on the whole prefix)."""
    out, h = [], 0
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003  # exact in float32
        out.append(float(h))
    return out


class Pools:
    """Requests played through KVCache and RadixCache as the scheduler and engine do (borrow,
    reserve, hold the window of the prompt's reuse point; per step map the window, write, release
    behind it; insert the prompt after its prefill, and all of it on finish, then free), writing
    each position's hash into the full layer's and the sliding layer's pools and checking every
    key a step's queries can see. All of a request's tokens count as its prompt."""

    def __init__(self, cache: KVCache, tree: RadixCache | None, chunk: int = 4):
        self.cache, self.tree, self.chunk = cache, tree, chunk
        self.live: dict[int, list[int]] = {}  # rid -> its tokens (all written at start)
        self.next_rid = 0

    def slot(self, rid, p, sliding):
        c = self.cache
        s = int(c.req_to_token[c.requests[rid].row, p])
        return int(c.full_to_swa_page[s // c.page_size]) * c.page_size + s % c.page_size if sliding else s

    def value(self, rid, p, sliding):
        k, _ = self.cache.buffers(SLIDING_LAYER if sliding else FULL_LAYER)
        return float(k[self.slot(rid, p, sliding), 0, 0])

    def start(self, tokens, donor=None, borrow=True) -> int | None:
        """Admit and prefill a request, borrowing from the tree (unless not `borrow`) or, given
        a live `donor`, from that running request; None if the pools cannot take it."""
        c, rid = self.cache, self.next_rid
        if donor is not None:
            n = c.add_request(rid, donor, shared_prefix_len(self.live[donor], tokens))
        else:
            lend = self.tree is not None and borrow
            n = c.add_request(rid, cached=self.tree.match(tokens[:-1]) if lend else [])
        try:
            c.reserve(rid, len(tokens))
        except OutOfPages:
            c.free_request(rid)
            return None
        self.next_rid += 1
        reuse_point = (len(tokens) - 1) // c.page_size * c.page_size
        if self.tree is not None:
            c.keep_window(rid, reuse_point)
        want = _hashes(tokens)
        for p in range(n):  # the reused prefix: every full-layer key
            assert self.value(rid, p, False) == want[p], f"reused full-pool slot of position {p} is wrong"
        pos = n
        while pos < len(tokens):
            end = min(pos + self.chunk, len(tokens))
            c.map_window(rid, end)
            for p in range(first_visible_key(pos, c.window), pos):  # keys this step's first query sees
                assert self.value(rid, p, True) == want[p], f"sliding key {p} seen from {pos} is wrong"
            for p in range(pos, end):
                for sliding in (False, True):
                    k, v = c.buffers(SLIDING_LAYER if sliding else FULL_LAYER)
                    k[self.slot(rid, p, sliding)] = want[p]
                    v[self.slot(rid, p, sliding)] = want[p]
            c.release_window(rid, end)
            pos = end
        if self.tree is not None:  # the prompt goes in now, with the window of its reuse point
            req = c.requests[rid]
            assert c.resident_prefix(req.pages[: reuse_point // c.page_size]) == reuse_point
            self.tree.insert(tokens, req.pages, req.swa_released)
            c.keep_window(rid, None)
            c.release_window(rid, len(tokens))
        self.live[rid] = list(tokens)
        return rid

    def finish(self, rid) -> None:
        req = self.cache.requests[rid]
        if self.tree is not None:
            self.tree.insert(self.live.pop(rid), req.pages, req.swa_released)
        self.cache.free_request(rid)


def _check_invariants(cache: KVCache, tree: RadixCache) -> None:
    full, swa = cache.full, cache.swa
    tree_pages = [p for node in tree.nodes() for p in node.pages]
    assert len(tree_pages) == len(set(tree_pages)), "a page sits twice in the tree"
    assert all(full.held(p) for p in tree_pages) and sum(full._held) == len(tree_pages)
    held_swa = [cache.swa_page(p) for node in tree.nodes() for p, h in zip(node.pages, node.swa) if h]
    assert all(held_swa) and sum(swa._held) == len(held_swa)
    assert swa.num_reclaimable == sum(swa.refs(s) == 1 for s in held_swa)
    for node in tree.nodes():
        assert len(node.tokens) == len(node.pages) * cache.page_size and node.pages
    assert full.num_reclaimable == _reclaimable_by_trimming(tree)
    assert full.num_free == full.num_unused + full.num_reclaimable


def _reclaimable_by_trimming(tree) -> int:
    """What evict could free, counted the slow way: trim tree-only last pages of leaves until no
    leaf has one, on a copy of the tree's shape."""
    refs = tree.cache.full.refs
    shape = {id(n): [list(n.pages), [id(c) for c in n.children.values()]] for n in tree.nodes()}
    parent = {id(c): id(n) for n in tree.nodes() for c in n.children.values()}
    freed, changed = 0, True
    while changed:
        changed = False
        for key, (pages, children) in list(shape.items()):
            if not children and pages and refs(pages[-1]) == 1:
                pages.pop()
                freed += 1
                changed = True
                if not pages:
                    del shape[key]
                    if key in parent and parent[key] in shape:
                        shape[parent[key]][1].remove(key)
    return freed


def test_a_finished_requests_whole_pages_are_reused_and_its_partial_page_is_not():
    cache, tree = _pools(page_size=4)
    pools = Pools(cache, tree, chunk=5)
    start = cache.full.num_unused, cache.swa.num_unused
    prompt = list(range(10, 28))  # 18 tokens: pages 0-3 whole, page 4 half written
    pools.finish(pools.start(prompt))
    assert tree.num_pages == 4 and cache.full.num_unused == start[0] - 4  # the partial page went free
    assert cache.full.num_reclaimable == 4 and cache.full.num_free == start[0]
    rid = pools.start(prompt + [99])  # would match 18 tokens: reuses 16, computes 16-18 on its own page
    req = cache.requests[rid]
    assert req.length == 19 and req.pages[:4] == [n.pages for n in tree.nodes()][0]
    assert all(cache.full.refs(p) == 2 for p in req.pages[:4])  # the tree's and the borrower's
    assert cache.full.num_reclaimable == 0  # borrowed: nothing the tree holds may go
    pools.finish(rid)
    _check_invariants(cache, tree)
    tree.clear()
    assert (cache.full.num_unused, cache.swa.num_unused) == start and not cache.full_to_swa_page.any()


def test_reuse_stops_where_the_sliding_window_is_no_longer_resident():
    """tiny's window is 5. A finished 20-token request keeps the SWA pages of its last window
    (positions 15-19 and the page before); a prompt sharing 12 tokens would need keys 8-11,
    released long ago, so it reuses nothing; sharing all 20 it reuses all (its first query at
    20 sees keys 16-19)."""
    cache, tree = _pools(page_size=2)
    pools = Pools(cache, tree, chunk=4)
    donor = list(range(30, 50))
    pools.finish(pools.start(donor))
    assert tree.match(donor[:12] + [1]) == []
    assert len(tree.match(donor)) == 10
    rid = pools.start(donor + [7])  # checks every reused and visible key's value
    assert cache.requests[rid].swa_released == first_visible_key(20, 5) // 2
    pools.finish(rid)
    _check_invariants(cache, tree)


def test_nodes_split_at_page_boundaries_and_each_branch_is_matched():
    cache, tree = _pools(page_size=2)
    pools = Pools(cache, tree, chunk=8)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    b = [1, 2, 3, 4, 50, 60, 70, 80, 90, 100]
    pools.finish(pools.start(a))
    pools.finish(pools.start(b))  # shares pages 0-1 (recomputed: the window at 4 is gone), diverges
    assert [len(n.pages) for n in tree.nodes()] == [2, 3, 3]
    assert len(tree.match(a)) == 5 and len(tree.match(b)) == 5
    assert tree.match([1, 2, 3, 9]) == []  # one page in common, but its window is not resident
    _check_invariants(cache, tree)


def test_eviction_takes_the_least_recently_used_leaf_and_never_a_borrowed_page():
    cache, tree = _pools(page_size=2, num_pages=13)  # 12 usable pages
    pools = Pools(cache, tree, chunk=8)
    a, b, c = list(range(1, 9)), list(range(11, 19)), list(range(21, 29))
    for t in (a, b, c):
        pools.finish(pools.start(t))  # 4 pages each: the pool is all tree
    assert cache.full.num_unused == 0 and cache.full.num_free == 12
    tree.match(a)  # a is now the most recently used; b the least
    held = pools.start(c + [5])  # borrows c's 4 pages, needs 1 more: evicted from b's tail
    assert [len(n.pages) for n in tree.nodes()] == [4, 3, 4]
    assert cache.full.num_free == 4 + 3  # a's and what is left of b; c is borrowed
    with pytest.raises(OutOfPages):
        cache.full.alloc(8)
    tree.match(b)
    tree.match(a)  # now c, the borrowed one, is the least recently used leaf
    pools.start(list(range(40, 54)))  # 7 pages: b, then a go; c stays with its borrower
    assert [n.tokens[:2] for n in tree.nodes()] == [[21, 22], [40, 41]]  # and the new prompt, cached
    assert all(cache.full.refs(p) == 2 for p in cache.requests[held].pages[:4])
    _check_invariants(cache, tree)


def test_the_swa_pool_gets_pages_back_from_the_tree():
    cache, tree = _pools(page_size=2, num_pages=40, num_swa_pages=9)  # 8 SWA pages
    pools = Pools(cache, tree, chunk=2)
    for base in (100, 120, 140):
        pools.finish(pools.start(list(range(base, base + 10))))  # each keeps 3 SWA pages
    assert cache.swa.num_unused < 4 and cache.swa.num_free == 8
    pools.finish(pools.start(list(range(200, 216))))  # needs 4 at once: the oldest ends lose theirs
    assert tree.match(list(range(100, 110))) == []  # evicted window: no longer reusable
    assert len(tree.match(list(range(200, 216)))) == 8
    _check_invariants(cache, tree)


def test_clear_returns_every_page_but_those_a_running_request_borrowed():
    cache, tree = _pools(page_size=2)
    pools = Pools(cache, tree)
    start = cache.full.num_unused, cache.swa.num_unused
    t = list(range(60, 71))
    pools.finish(pools.start(t))
    rid = pools.start(t + [1, 2])
    tree.clear()
    assert tree.num_pages == 0 and cache.full.num_reclaimable == 0
    pools.finish(rid)  # inserts again; the pages it borrowed are now its own to give
    tree.clear()
    assert (cache.full.num_unused, cache.swa.num_unused) == start


def test_pages_above_a_borrowed_continuation_are_not_counted_free():
    """x and y both computed the opening o (admitted together, neither could borrow); x's prompt
    went into the tree first, so y's continuation hangs below x's copy of o, and r borrowed y's
    pages while y ran. Once x is done, x's o is held by the tree alone, yet no trimming of leaves
    reaches it while r holds the continuation below: it must not count as free."""
    cache, tree = _pools(page_size=2, num_pages=40)
    pools = Pools(cache, tree, chunk=4)
    o = list(range(1, 9))
    x = pools.start(o + [20, 21])
    y = pools.start(o + [30, 31, 32, 33], borrow=False)
    r = pools.start(o + [30, 31, 32, 33, 40, 41], donor=y)
    assert cache.requests[r].pages[:6] == cache.requests[y].pages
    pools.finish(x)
    pools.finish(y)
    x_opening = [n for n in tree.nodes()][0].pages
    assert len(x_opening) == 4 and all(cache.full.refs(p) == 1 for p in x_opening)
    _check_invariants(cache, tree)  # x's 4 pages of o are not reclaimable
    assert cache.full.num_reclaimable == 1  # x's own last page only
    _squeeze(cache)  # every page counted free is really there
    assert [n for n in tree.nodes()][0].pages == x_opening
    pools.finish(r)
    _check_invariants(cache, tree)
    assert cache.full.num_reclaimable == tree.num_pages


def _squeeze(cache: KVCache) -> None:
    """Take every page the full pool calls free (evicting what the tree may give), then give
    them back: raises if the tree counted a page it cannot free."""
    for page in cache.full.alloc(cache.full.num_free):
        cache.full.release(page)


OPENINGS = [list(range(1, 13)), list(range(1, 7)) + list(range(40, 46)), list(range(80, 92))]
OPS = ["run", "hold", "copy", "lend", "done", "squeeze"]


@settings(max_examples=80)
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2), st.integers(0, 12),
                              st.lists(st.integers(100, 104), max_size=5)), min_size=1, max_size=14),
       page_size=st.sampled_from([1, 2, 3, 4]), num_pages=st.integers(14, 30), chunk=st.integers(1, 6))
def test_any_mix_of_requests_reads_only_right_keys_and_leaks_nothing(ops, page_size, num_pages, chunk):
    """Requests sharing openings run to completion or stay live while others come and go: some
    borrow from the tree, some compute a copy of what it holds, some borrow from a live request;
    pressure takes every free page at times. Every reused full-pool key and every sliding key a
    query sees holds the value its own prefix would write; the tree's counts stay exact (what it
    calls reclaimable, trimming reaches); at the end, with the live requests done and the tree
    cleared, every page of both pools is back."""
    cache, tree = _pools(page_size=page_size, num_pages=num_pages, requests=3)
    pools = Pools(cache, tree, chunk=chunk)
    start = cache.full.num_unused, cache.swa.num_unused
    for op, which, cut, tail in ops:
        tokens = OPENINGS[which][: max(cut, 1)] + tail
        if op == "done" and pools.live:
            pools.finish(min(pools.live))
        elif op == "squeeze":
            _squeeze(cache)
        elif op in ("run", "hold", "copy") and len(cache.requests) < 3:
            rid = pools.start(tokens, borrow=op != "copy")
            if rid is not None and op == "run":
                pools.finish(rid)
        elif op == "lend" and pools.live and len(cache.requests) < 3:
            donor = max(pools.live)
            pools.start(pools.live[donor] + tail + [which], donor=donor)
        _check_invariants(cache, tree)
    for rid in list(pools.live):
        pools.finish(rid)
    _check_invariants(cache, tree)
    assert cache.full.num_free == start[0] and cache.swa.num_free == start[1]
    tree.clear()
    assert (cache.full.num_unused, cache.swa.num_unused) == start and not cache.full_to_swa_page.any()


# -- the engine -------------------------------------------------------------------------------------

_MODELS: dict = {}


GREEDY = SamplingParams(max_new_tokens=3, ignore_eos=True)


def _cached(engine) -> int:
    return engine.scheduler.prefix_cache.num_pages


def _unused(engine):
    return engine.cache.full.num_unused, engine.cache.swa.num_unused


def test_a_prompt_seen_before_reuses_the_finished_requests_pages():
    """Warm: the same prompt after the first request finished reuses its whole written pages and
    gets the reference's greedy tokens, as a cold engine (no sharing) does."""
    engine = _engine(page_size=4, chunk_size=8, max_context=40)
    start = _unused(engine)
    prompt = _prompts([17], seed=2)[0]
    first = engine.add_request(prompt, GREEDY)
    first_seq = engine.sequence(first)
    while engine.has_work():
        engine.step()
    assert _cached(engine) == 4  # 17 + 2 fed tokens: 4 whole pages
    warm = engine.add_request(prompt, GREEDY)
    warm_seq = engine.sequence(warm)
    events = []
    while engine.has_work():
        events += engine.step()
    assert events[-1].reused_tokens == 16
    assert warm_seq.pages[:4] == first_seq.pages[:4]
    expected = reference_greedy("tiny", prompt, 3)
    assert first_seq.tokens == warm_seq.tokens == expected
    assert _engine(page_size=4, chunk_size=8, max_context=40, share_prefixes=False).generate(
        [prompt], GREEDY)[0].tokens == expected
    engine.scheduler.prefix_cache.clear()
    assert _unused(engine) == start


def test_a_continuation_reuses_the_generated_tokens_too():
    """A follow-up turn sends the first prompt, its answer and more: the generated tokens that
    were fed are cached like the prompt."""
    engine = _engine(page_size=2, chunk_size=6, max_context=40)
    prompt = _prompts([9], seed=3)[0]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    follow = prompt + out.tokens + [11, 12, 13]
    again = engine.generate([follow], GREEDY)[0]
    assert again.reused_tokens == 12  # 9 + 4 fed tokens = 13 written: 6 whole pages of 2
    assert again.tokens == reference_greedy("tiny", follow, 3)


def test_a_shorter_shared_opening_whose_window_is_gone_is_recomputed():
    engine = _engine(page_size=2, chunk_size=32, max_context=40)
    donor = _prompts([20], seed=4)[0]
    engine.generate([donor], GREEDY)
    late = donor[:10] + [5, 6]
    out = engine.generate([late], GREEDY)[0]
    assert out.reused_tokens == 0
    assert out.tokens == reference_greedy("tiny", late, 3)


def test_eviction_under_pressure_serves_everyone():
    """A pool of 3 requests' pages and a stream of 8, half repeating an earlier prompt: the cache
    fills, gives the least recently used pages back as new requests need them, and every request
    gets the reference's tokens; repeats of a still-cached prompt reuse it."""
    engine = _engine(page_size=4, chunk_size=8, max_context=24, num_pages=3 * 6 + 1, max_requests=2)
    start = _unused(engine)
    fresh = _prompts([14, 13, 15, 12], seed=5)
    order = [fresh[0], fresh[1], fresh[0], fresh[2], fresh[3], fresh[0], fresh[3], fresh[1]]
    outs = []
    for p in order:  # one at a time, so each sees what the last left behind
        outs += engine.generate([p], GREEDY)
        assert _cached(engine) <= 18
    for p, o in zip(order, outs):
        assert o.tokens == reference_greedy("tiny", p, 3)
    assert outs[2].reused_tokens > 0 and outs[6].reused_tokens > 0  # repeats of recent prompts
    all_at_once = engine.generate(order, GREEDY)  # and a burst that must evict to fit
    assert [o.tokens for o in all_at_once] == [o.tokens for o in outs]
    assert engine.stats()["free_pages"] == 18 and not engine.has_work()
    engine.scheduler.prefix_cache.clear()
    assert _unused(engine) == start


def test_a_running_borrowers_pages_stay_while_others_must_evict():
    """11 pages. a (15 + 3 tokens) finishes: the tree holds its 4 written pages. The borrower
    (a + [7]) reuses 3 of them and takes 3 of its own; 4 stay unused. The next request needs 5:
    the one page to evict is a's 4th, the only one no running request holds."""
    engine = _engine(page_size=4, chunk_size=8, max_context=24, num_pages=12, max_requests=2)
    a, b = _prompts([15, 16], seed=6)
    first = engine.sequence(engine.add_request(a, GREEDY))
    while engine.has_work():
        engine.step()
    borrower = engine.add_request(a + [7], SamplingParams(max_new_tokens=6, ignore_eos=True))
    got = {}
    for e in engine.step():
        got.setdefault(e.rid, []).append(e.token)
    assert engine.sequence(borrower).reused == 12 and engine.cache.full.num_unused == 4
    other = engine.add_request(b, GREEDY)
    tree = engine.scheduler.prefix_cache
    started = False
    while engine.has_work():
        for e in engine.step():
            got.setdefault(e.rid, []).append(e.token)
        if any(s.rid == other for s in engine.scheduler.running) and not started:
            started = True
            assert first.pages[3] not in tree_pages(tree), "the next request started without evicting"
            assert all(p in tree_pages(tree) for p in first.pages[:3])  # borrowed: kept
    assert started
    assert got[borrower] == reference_greedy("tiny", a + [7], 6)
    assert got[other] == reference_greedy("tiny", b, 3)


def tree_pages(tree):
    return [p for n in tree.nodes() for p in n.pages]


def test_a_request_for_prompt_logprobs_computes_its_whole_prompt():
    """lm-eval scores one context against each choice (echo + logprobs): the second must not
    find its rows missing because the first cached them."""
    engine = _engine(page_size=2, chunk_size=8)
    p = _prompts([11], seed=7)[0]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, prompt_logprobs=1)
    firsts = []
    for _ in range(2):
        rid = engine.add_request(p, params)
        while engine.has_work():
            firsts += [e for e in engine.step() if e.rid == rid and e.prompt_logprobs is not None]
    assert [e.reused_tokens for e in firsts] == [0, 0] and _cached(engine) > 0
    assert firsts[0].prompt_logprobs == firsts[1].prompt_logprobs
    assert all(lp is not None for lp, _ in firsts[1].prompt_logprobs[1:])
    assert engine.generate([p], GREEDY)[0].reused_tokens == 10  # a plain request still reuses


def test_an_aborted_request_is_not_cached_and_the_switch_turns_the_cache_off():
    engine = _engine(page_size=2, chunk_size=4)
    rid = engine.add_request(_prompts([9])[0], GREEDY)
    engine.step()
    engine.abort(rid)
    assert _cached(engine) == 0
    off = _engine(page_size=2, share_prefixes=False)
    p = _prompts([9], seed=1)[0]
    assert [off.generate([p], GREEDY)[0].reused_tokens for _ in range(2)] == [0, 0]
    assert off.scheduler.prefix_cache is None


@settings(max_examples=max(2, settings.default.max_examples // 5))
@given(waves=st.lists(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 14), st.integers(1, 4)),
                               min_size=1, max_size=3), min_size=2, max_size=3),
       page=st.sampled_from([1, 2, 4]), chunk=st.integers(2, 8), seed=st.integers(0, 50))
def test_waves_of_requests_with_shared_openings_get_the_reference_tokens(waves, page, chunk, seed):
    """Waves of requests, each wave after the last finished, sharing openings with earlier ones
    (cut anywhere), in a pool of two requests' pages: whatever was reused or evicted, the tokens
    are the reference's, and the pools come back."""
    engine = _engine(page_size=page, chunk_size=chunk, max_context=24, max_requests=2)
    start = _unused(engine)
    openings = _prompts([14, 14], seed)
    for wave in waves:
        prompts = [openings[o][:cut] + _prompts([own], seed + cut + own)[0] for o, cut, own in wave]
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
        for p, o in zip(prompts, outs):
            assert o.tokens == reference_greedy("tiny", p, 2)
    engine.scheduler.prefix_cache.clear()
    assert _unused(engine) == start


# -- the oracle -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-kv-eq-v", "tiny-moe"])
def test_the_warm_prefix_builtin_holds_parity(preset, device):
    from oracle.run import run_scenario
    from oracle.scenario import builtin

    sc = next(s for s in builtin(preset, device=str(device)) if s.name == "warm-prefix-after-finish")
    run = run_scenario(sc)
    assert run.passed, run.comparison.summary()
    r0, r1 = run.layout["requests"]
    assert [r0["prefix_reused"], r1["prefix_reused"]] == [0, 12]
    assert r1["pages"][:3] == r0["pages"][:3]  # r0's cached pages, after r0 finished
    assert r1["chunks"][0][0] == 12 and r1["chunks"][0][0] > r0["chunks"][-1][0] - 12


def _past_window_scenario(device):
    """r2 shares 6 tokens of a finished r0: the window before position 4 left the SWA pool when
    r0 moved on, so the only correct reuse is none."""
    from oracle.scenario import from_dict

    return from_dict({
        "name": "reuse-past-resident-window", "model": {"source": "tiny", "device": str(device)},
        "engine": {"page_size": 4, "chunk_size": 8, "page_order_seed": 23},
        "requests": [{"id": "r0", "length": 12, "seed": 14, "new_tokens": 1, "chunks": [5, 7]},
                     {"id": "r2", "length": 3, "seed": 16, "new_tokens": 1, "arrival": 3,
                      "prefix_from": {"request": "r0", "length": 6, "finished": True}}]})


def test_reusing_past_the_resident_window_is_caught(monkeypatch, device):
    from oracle.run import run_scenario

    clean = run_scenario(_past_window_scenario(device))
    assert clean.passed and [r["prefix_reused"] for r in clean.layout["requests"]] == [0, 0]
    # The fault: the cache lends whole pages without asking whether their window is resident.
    monkeypatch.setattr(KVCache, "resident_prefix", lambda self, pages: len(pages) * self.page_size)
    run = run_scenario(_past_window_scenario(device))
    assert [r["prefix_reused"] for r in run.layout["requests"]] == [0, 4]
    assert not run.passed
    first = run.comparison.first_divergence
    assert first.request == "r2" and CFG.layers[first.layer].is_sliding, first


# -- the scenario field -----------------------------------------------------------------------------


def _with_r1(**r1):
    from oracle.scenario import from_dict

    return lambda engine=None: from_dict({
        "engine": {"page_size": 4, "chunk_size": 16, **(engine or {})},
        "requests": [{"id": "r0", "length": 12, "new_tokens": 2},  # one chunk, 2 tokens: steps 0-2
                     {"id": "r1", "length": 2, "prefix_from": {"request": "r0", "length": 8, "finished": True},
                      **r1}]})


@pytest.mark.parametrize("r1, engine, message", [
    (dict(arrival=2), None, "requests[1].arrival: 2 is before 'r0' finishes (its last step is 2)"),
    (dict(arrival=3), {"token_budget": 8}, "requests[1].prefix_from.finished: the donor's last step is known"),
    (dict(arrival=3, prefix_from={"request": "r0", "length": 8, "finished": "yes"}), None,
     "requests[1].prefix_from.finished: expected true or false"),
])
def test_a_warm_prefix_that_could_arrive_too_early_is_refused(r1, engine, message):
    from oracle.scenario import ScenarioError

    with pytest.raises(ScenarioError, match=re.escape(message)):
        _with_r1(**r1)(engine)
    assert _with_r1(arrival=3)().requests[1].prefix_from["finished"] is True
