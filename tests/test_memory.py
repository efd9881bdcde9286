"""Pools, the page allocator, forward metadata, and the KV memory plan."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optimized.batch import BatchItem, build_batch
from optimized.memory import KVCache, OutOfPages, PageAllocator, plan_kv_bytes, swa_pages_per_request
from reference.presets import PRESETS
from reference.window import first_visible_key


def _cache(page_size=4, num_pages=16, num_swa_pages=8, preset="tiny", seed=None, requests=4, context=64):
    return KVCache(PRESETS[preset], page_size=page_size, num_pages=num_pages, num_swa_pages=num_swa_pages,
                   max_requests=requests, max_context=context, dtype=torch.float32, device="cpu",
                   order_seed=seed)


def test_allocator_reserves_page_zero_and_counts_references():
    a = PageAllocator(5, order_seed=3)
    pages = a.alloc(4)
    assert sorted(pages) == [1, 2, 3, 4] and pages != [1, 2, 3, 4]  # shuffled order
    with pytest.raises(OutOfPages):
        a.alloc(1)
    a.share(pages[0])
    a.release(pages[0])
    assert a.num_free == 0  # still referenced once
    a.release(pages[0])
    assert a.alloc(1) == [pages[0]]
    with pytest.raises(ValueError):
        a.release(0)


def test_pages_the_prefix_cache_would_give_up_count_as_free():
    """hold/unhold is the prefix cache's one reference; what it says it could reclaim counts as
    free, and alloc asks it to reclaim before running out (and only when short)."""
    a = PageAllocator(5)
    p, q, r = a.alloc(3)
    a.hold(p)
    a.release(p)  # its request is gone: only the cache holds p
    with pytest.raises(ValueError, match="already held"):
        a.hold(p)
    assert (a.num_unused, a.num_free) == (1, 1)  # no cache lent its count yet
    calls = []

    def reclaim(n):
        calls.append(n)
        return a.unhold(p)

    a.reclaimable, a.reclaim = (lambda: 1 if a.held(p) else 0), reclaim
    assert a.num_free == 2 and a.alloc(1) and calls == []  # one unused page: nothing reclaimed
    got = a.alloc(1)
    assert calls == [1] and got == [p] and a.num_free == 0
    with pytest.raises(OutOfPages):
        a.alloc(1)
    version = a.version
    a.hold(q)
    a.share(q)
    assert a.version > version and a.refs(q) == 3 and a.unhold(q) is False
    with pytest.raises(ValueError, match="not held"):
        a.unhold(q)


def test_a_cache_that_frees_less_than_it_counted_is_a_bug_not_pressure():
    a = PageAllocator(3)
    a.alloc(2)
    a.reclaimable, a.reclaim = (lambda: 1), (lambda n: 0)
    with pytest.raises(RuntimeError, match="freed too few"):
        a.alloc(1)


def test_resident_prefix_and_keep_window():
    """tiny's window is 5, pages of 2. A request wrote 12 positions holding the window of
    position 8 back (keep_window): after releasing behind 12 it keeps SWA pages 2-5 (keys 4 on),
    so its pages are reusable up to 12 (keys 8-11) and up to 8 (keys 4-7). Without the hold, it
    keeps pages 4-5 only: still 12, but 10 (keys 6-9) and anything shorter are not."""
    c = _cache(page_size=2, num_pages=20, num_swa_pages=12)
    c.add_request("a")
    c.reserve("a", 12)
    c.map_window("a", 12)
    c.keep_window("a", 8)  # keys 4-11: pages 2-5
    c.release_window("a", 12)
    assert c.requests["a"].swa_released == 2
    pages = c.requests["a"].pages
    assert c.resident_prefix(pages) == 12 and c.resident_prefix(pages[:4]) == 8
    c.keep_window("a", None)
    c.release_window("a", 12)
    assert c.requests["a"].swa_released == 4  # first_visible_key(12) = 8: page 4
    assert c.resident_prefix(pages) == 12 and c.resident_prefix(pages[:5]) == 0
    assert c.add_request("b", cached=pages) == 12
    assert c.requests["b"].swa_released == 4 and c.swa.refs(c.swa_page(pages[4])) == 2


def test_out_of_pages_changes_nothing():
    c = _cache(num_pages=4)
    c.add_request("a")
    c.reserve("a", 8)  # 2 pages
    before = c.req_to_token.clone(), c.full.num_free
    c.add_request("b")
    with pytest.raises(OutOfPages):
        c.reserve("b", 12)  # needs 3, 1 free
    assert torch.equal(c.req_to_token, before[0]) and c.full.num_free == before[1]
    with pytest.raises(OutOfPages):
        c.reserve("a", 10_000)


@given(page_size=st.sampled_from([1, 2, 4, 16]), length=st.integers(1, 60), seed=st.integers(0, 100))
def test_page_table_is_the_token_table_strided_and_divided(page_size, length, seed):
    c = _cache(page_size=page_size, num_pages=70, num_swa_pages=70, seed=seed)
    c.add_request("r")
    c.reserve("r", length)
    row = c.requests["r"].row
    tokens = c.req_to_token[row, :length].long()
    assert (tokens > 0).all() and (tokens // page_size > 0).all()  # page 0 is never handed out
    pos = torch.arange(length)
    assert torch.equal(tokens % page_size, pos % page_size)  # the in-page offset invariant
    table = c.page_table(torch.tensor([row]), -(-length // page_size))[0].long()
    assert torch.equal(table[pos // page_size] * page_size + pos % page_size, tokens)


def test_sliding_pages_leave_with_the_window_and_translation_follows():
    cfg = PRESETS["tiny"]  # window 5
    c = _cache(page_size=2, num_pages=20, num_swa_pages=6)
    c.add_request("r")
    c.reserve("r", 30)
    for seq_len in range(1, 31):
        c.map_window("r", seq_len)  # the engine's allocation step; build_batch only reads tables
        b = build_batch(c, [BatchItem("r", seq_len - 1, 1)])
        # The new token's SWA slot is the translation of its full slot.
        full_slot = int(b.out_slots[0])
        assert int(b.swa_out_slots[0]) == int(c.full_to_swa_page[full_slot // 2]) * 2 + full_slot % 2
        # Every key a query at seq_len - 1 can see is mapped; nothing more than the window (+ page slack).
        lo = first_visible_key(seq_len - 1, cfg.sliding_window)
        assert (b.swa_page_table[0, lo // 2: -(-seq_len // 2)] > 0).all()
        c.release_window("r", seq_len)
        assert c.swa.num_pages - 1 - c.swa.num_free <= swa_pages_per_request(cfg.sliding_window, 2, 30)
    assert int((c.full_to_swa_page > 0).sum()) == c.swa.num_pages - 1 - c.swa.num_free
    c.free_request("r")
    assert c.full.num_free == 19 and c.swa.num_free == 5 and not c.full_to_swa_page.any()


def test_shared_layers_own_no_buffers():
    c = _cache()
    cfg = PRESETS["tiny"]
    for spec in cfg.layers:
        k, v = c.buffers(spec)
        src_k, _ = c.buffers(cfg.layers[spec.kv_source])
        assert k is src_k
    assert len(c._k) == cfg.first_shared_layer


def test_prefix_sharing_refcounts_and_refuses_an_evicted_window():
    c = _cache(page_size=2, num_pages=20, num_swa_pages=12)
    c.add_request("a")
    c.reserve("a", 10)
    c.map_window("a", 10)
    assert c.prefix_reusable("a", 7) == 6  # whole pages only
    assert c.add_request("b", share_prefix_of="a", prefix_len=7) == 6
    row_a, row_b = c.requests["a"].row, c.requests["b"].row
    assert torch.equal(c.req_to_token[row_b, :6], c.req_to_token[row_a, :6])
    c.free_request("a")  # b still holds the shared pages
    assert c.full.num_free == 19 - 3
    c.free_request("b")
    assert c.full.num_free == 19 and c.swa.num_free == 11
    # Once the donor's window has moved past the prefix, reuse would read evicted keys.
    c.add_request("a")
    c.reserve("a", 20)
    c.map_window("a", 20)
    c.release_window("a", 20)
    assert c.prefix_reusable("a", 6) == 0


def test_batch_metadata_for_a_mixed_batch():
    c = _cache(page_size=4)
    for rid, n in (("x", 9), ("y", 6)):
        c.add_request(rid)
        c.reserve(rid, n)
    free = c.full.num_free, c.swa.num_free
    b = build_batch(c, [BatchItem("x", 5, 4), BatchItem("y", 5, 1)])
    assert (c.full.num_free, c.swa.num_free) == free  # metadata only: nothing allocated
    assert b.seq_lens.tolist() == [9, 6] and b.cu_seqlens_q.tolist() == [0, 4, 5]
    assert b.positions.tolist() == [5, 6, 7, 8, 5] and not b.is_decode
    assert b.prefix_lens.tolist() == [5, 5] and b.extend_lens.tolist() == [4, 1]
    rows = [c.requests[rid].row for rid in "xy"]
    assert b.rows.tolist() == rows and rows[0] != rows[1]
    assert b.out_slots.tolist() == [int(c.req_to_token[rows[0], p]) for p in range(5, 9)] + [int(c.req_to_token[rows[1], 5])]
    assert b.page_table.shape == (2, 3)
    with pytest.raises(ValueError, match="reserved"):
        build_batch(c, [BatchItem("y", 6, 1)])


@given(spans=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 9)), min_size=1, max_size=4))
def test_batch_metadata_of_any_mixed_batch_is_each_request_s_in_order(spans):
    """Any mix of prefixes and extends (decodes, chunks, whole prompts): each request's rows are
    positions prefix_len .. seq_len - 1, written to its own reserved slots, in batch order."""
    c = _cache(page_size=4, num_pages=40, requests=4, context=32)
    items = []
    for i, (prefix, extend) in enumerate(spans):
        c.add_request(i)
        c.reserve(i, prefix + extend)
        items.append(BatchItem(i, prefix, extend))
    b = build_batch(c, items)
    want = [(c.requests[it.rid].row, p) for it in items for p in range(it.prefix_len, it.seq_len)]
    assert b.positions.tolist() == [p for _, p in want]
    assert b.out_slots.tolist() == [int(c.req_to_token[row, p]) for row, p in want]
    assert b.cu_seqlens_q.tolist() == [0] + list(itertools.accumulate(e for _, e in spans))
    assert b.seq_lens.tolist() == [p + e for p, e in spans] and b.prefix_lens.tolist() == [p for p, _ in spans]
    assert b.rows.tolist() == [c.requests[i].row for i in range(len(spans))]


@given(window=st.integers(1, 9), page_size=st.sampled_from([1, 2, 3, 4]), chunk=st.integers(1, 7),
       length=st.integers(1, 40), start=st.integers(0, 40))
def test_one_swa_sizing_rule_bounds_what_a_step_holds(window, page_size, chunk, length, start):
    """Pages a step at positions start .. start+chunk-1 holds on a sliding layer (those from its
    first visible key's page on, released behind it) never exceed the one sizing rule."""
    end = min(start + chunk, length)
    start = min(start, end - 1)
    held = -(-end // page_size) - first_visible_key(start, window) // page_size
    assert held <= swa_pages_per_request(window, page_size, length, chunk)


def test_kv_plan_e2b_32k_is_about_6_8x_smaller():
    plan = plan_kv_bytes(PRESETS["e2b"], 32768, page_size=16)
    assert (plan.full_layers, plan.sliding_layers, plan.shared_layers) == (3, 12, 20)
    assert 6.7 < plan.saving < 6.9


def _tables_follow_the_host(c):
    """req_to_token holds each request's page slots, full_to_swa_page the host's SWA map."""
    ps = c.page_size
    for req in c.requests.values():
        want = torch.tensor([p * ps + i for p in req.pages for i in range(ps)], dtype=torch.int32)
        assert torch.equal(c.req_to_token[req.row, :len(want)].cpu(), want)
    assert c.full_to_swa_page.cpu().tolist() == c._swa_of


def _index_copies(c, monkeypatch) -> list:
    """Run reserve, map_window and a borrow of cached pages, recording every tensor that went
    through batch.host_to_device (the pinned, asynchronous copy) on the way."""
    import optimized.batch

    seen, real = [], optimized.batch.host_to_device
    monkeypatch.setattr(optimized.batch, "host_to_device", lambda host, device: seen.append(host.clone()) or real(host, device))
    c.add_request("a")
    c.reserve("a", 7)  # pages 0-3 of 2
    c.map_window("a", 7)
    c.reserve("a", 9)  # one page more
    c.map_window("a", 9)
    c.release_window("a", 9)
    c.add_request("b", cached=c.requests["a"].pages[:4])  # 8 tokens borrowed: slots copied
    return seen


def test_reserve_and_map_window_copy_through_the_asynchronous_helper(monkeypatch):
    """Design note 32: a pageable host-to-device copy synchronizes the stream, which would make
    the overlapped engine's host wait for the step in flight whenever a step maps a new page.
    reserve, map_window and the borrowing of cached pages must send their indices through
    batch.host_to_device, one copy per call that changes a table, with the tables as before."""
    c = _cache(page_size=2, num_pages=20, num_swa_pages=12, seed=5)
    seen = _index_copies(c, monkeypatch)
    a = c.requests["a"]
    assert len(seen) == 5  # reserve x2, map_window x2, the borrow
    ps = 2
    assert seen[0].tolist() == [p * ps + i for p in a.pages[:4] for i in range(ps)]
    assert seen[2].tolist() == [p * ps + i for p in a.pages[4:] for i in range(ps)]
    # map_window: the full pages and their new SWA pages, packed in one copy.
    assert seen[1].tolist()[:4] == a.pages[:4] and seen[3].tolist() == [a.pages[4], c.swa_page(a.pages[4])]
    _tables_follow_the_host(c)
    c.free_request("b")
    c.free_request("a")
    assert not c.full_to_swa_page.any() and not c.req_to_token.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a stream sync only exists on a GPU (CPU copies never wait)")
def test_reserve_and_map_window_never_synchronize(monkeypatch):
    """The same calls on the GPU with torch's sync debug mode raising on any synchronizing call
    (a pageable copy syncs the stream), with a kernel queued ahead so there is something to wait for."""
    c = KVCache(PRESETS["tiny"], page_size=2, num_pages=20, num_swa_pages=12, max_requests=4, max_context=64,
                dtype=torch.float32, device="cuda", order_seed=5)
    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    _ = x @ x
    torch.cuda.set_sync_debug_mode("error")
    try:
        _index_copies(c, monkeypatch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    _tables_follow_the_host(c)
