"""Known bug classes, injected into the optimized path on demand (shared/DESIGN.md "Faults").

    from oracle.faults import FAULTS, inject
    fault = FAULTS["window-one-short"]
    with inject(fault.name):  # or run_scenario(..., faults=[fault.name])
        run = run_scenario(fault.scenario())
    assert run.comparison.first_divergence.tap == fault.expect

Each fault reproduces a bug that the seed PR (shared/seed/) or SGLang's history
(shared/background/sglang_gemma4.md) names, by swapping module or class attributes of
`optimized/` for wrappers while a `with` block runs and putting the originals back when it ends,
exceptions included. Nothing in the optimized path asks whether a fault is on, so faults cost
nothing when off. Patches are process-wide: do not run a clean path beside an injected one in
another thread of the same process.

Every fault carries the scenario that exposes it and `expect`, the tap where the oracle must
report the first divergence when that scenario runs on the `tiny` preset, in float32 and in
bfloat16 (tests/test_faults.py, tests/test_replay.py). `expect` is the first tap the bug can be seen at, which is
not always the tensor the bug is in: the pool taps (`layers.{l}.k_cache`, gathered when a request
finishes) sit before `layers.{l}.o` in dataflow order, and `layers.{l}.k` on the optimized path is
read back from the pool.

Some faults point kernels at slots or pages that the correct path never would. Under Triton's
CPU interpreter a read outside a tensor is undefined, so those faults check that their wrong ids
stay inside the pools and raise FaultScenarioError (a ValueError) when a scenario would take
them outside; their scenarios are sized so that they do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

import optimized.engine.engine
import optimized.fused_ops
import optimized.model
import optimized.ops
import optimized.parallel
import reference.model
from optimized.engine.graphs import DecodeGraphs
from optimized.memory import KVCache, ceil_div
from optimized.model import PagedGemma4
from reference.weights import Part

from .scenario import Scenario, from_dict

# Both op sets the paged model can run (`fused=True`: Triton kernels; False: plain torch).
_OP_SETS = (optimized.fused_ops, optimized.ops)


class UnknownFault(ValueError):
    """A fault name that is not in the registry; the message lists the known ones."""


class FaultScenarioError(ValueError):
    """The scenario would make an injected fault read or write outside a pool."""


@dataclass(frozen=True)
class Patch:
    """While injected, `owner.attr` (a module or class attribute) is `wrap(original)`."""

    owner: Any
    attr: str
    wrap: Callable[[Any], Any]


@dataclass(frozen=True)
class Fault:
    name: str
    summary: str  # one line
    description: str  # the real bug it reproduces, and why `expect` is where it first shows
    expect: str  # first divergent tap on `tiny` (float32) under `scenario()`
    patches: tuple[Patch, ...]
    scenario_spec: dict  # scenario JSON without "model"
    model: str = "tiny"  # the preset `expect` holds for (MOE_FAULTS: "tiny-moe")

    def scenario(self, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                 seed: int = 0) -> Scenario:
        """The scenario that exposes this fault (`expect` holds for `self.model`, the default)."""
        model = self.model if model is None else model
        return from_dict({**self.scenario_spec,
                          "model": {"source": model, "seed": seed, "dtype": dtype, "device": device}})


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------


def get(name: str) -> Fault:
    """A fault of FAULTS or MOE_FAULTS by name."""
    try:
        return FAULTS[name] if name in FAULTS else MOE_FAULTS[name]
    except KeyError:
        raise UnknownFault(f"unknown fault {name!r}; known: {', '.join([*FAULTS, *MOE_FAULTS])}") from None


@contextlib.contextmanager
def inject(name: str) -> Iterator[Fault]:
    """Apply one fault for the duration of the block; the originals come back on exit."""
    fault = get(name)
    applied: list[tuple[Any, str, Any]] = []
    try:
        for p in fault.patches:
            original = vars(p.owner)[p.attr]
            setattr(p.owner, p.attr, p.wrap(getattr(p.owner, p.attr)))
            applied.append((p.owner, p.attr, original))
        yield fault
    finally:
        for owner, attr, original in reversed(applied):
            setattr(owner, attr, original)


@contextlib.contextmanager
def inject_all(names: Iterable[str]) -> Iterator[list[Fault]]:
    """Apply several faults at once (unknown names fail before any is applied)."""
    faults = [get(n) for n in names]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(inject(f.name)) for f in faults]


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def _with_arguments(change: Callable[[dict], None]) -> Callable[[Callable], Callable]:
    """A wrap that calls the original with its bound arguments edited in place by `change`."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            change(call.arguments)
            return fn(*call.args, **call.kwargs)

        return wrapper

    return wrap


def _on_batch(change: Callable[[KVCache, Any], dict]) -> Callable[[Callable], Callable]:
    """A wrap of build_batch: the batch with the fields `change(cache, batch)` returns replaced."""

    def wrap(build: Callable) -> Callable:
        @functools.wraps(build)
        def build_batch(cache, items):
            batch = build(cache, items)
            return dataclasses.replace(batch, **change(cache, batch))

        return build_batch

    return wrap


def _must_fit(ids: torch.Tensor, limit: int, what: str) -> None:
    if ids.numel() and int(ids.max()) >= limit:
        raise FaultScenarioError(f"{what} reaches {int(ids.max())}, past the pool's {limit}: the fault would "
                                 "touch memory outside the pool; use its own scenario or a larger pool")


def _double_key_count(a: dict) -> None:
    # The doubled range runs past the request's pages. Pad its page table with page 0 (the zeroed
    # padding sink), as a real engine's context-wide table is past the end, so those keys read zeros
    # from inside the pool.
    seq_lens, table, page_size = a["seq_lens"], a["page_table"], a["page_size"]
    pages = ceil_div(2 * int(seq_lens.max()), page_size)
    a["seq_lens"] = seq_lens * 2
    a["page_table"] = torch.nn.functional.pad(table, (0, max(0, pages - table.shape[1]))).contiguous()


def _window_one_short(a: dict) -> None:
    if a.get("window") is not None:
        a["window"] -= 1


def _no_window(a: dict) -> None:
    a["window"] = None


def _full_pages_on_sliding_reads(cache: KVCache, batch) -> dict:
    _must_fit(batch.page_table, cache.swa.num_pages, "a full-pool page id read on a sliding layer")
    return {"swa_page_table": batch.page_table}


def _full_slots_on_sliding_writes(cache: KVCache, batch) -> dict:
    _must_fit(batch.out_slots, cache.swa.num_pages * cache.page_size, "a full-pool slot written on a sliding layer")
    return {"swa_out_slots": batch.out_slots}


def _token_table(_page_table: Callable) -> Callable:
    def page_table(self: KVCache, rows: torch.Tensor, num_pages: int) -> torch.Tensor:
        table = self.req_to_token[rows, : num_pages * self.page_size].contiguous()
        _must_fit(table, self.full.num_pages, "a slot id used as a page id")
        return table

    return page_table


def _store_into_copy(epilogue: Callable) -> Callable:
    def qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps, positions, inv_freq, k_pool, v_pool, out_slots):
        if k is not None:  # what `pool.reshape(...)` gives for a non-contiguous pool view: a fresh copy
            k_pool, v_pool = k_pool.clone(), v_pool.clone()
        return epilogue(q, k, v, q_weight, k_weight, eps, positions, inv_freq, k_pool, v_pool, out_slots)

    return qkv_norm_rope_store


def _positions_per_chunk(attention: Callable) -> Callable:
    def wrapper(self, spec, h, batch, emit):
        prefix = torch.repeat_interleave(batch.prefix_lens.long(), batch.extend_lens.long())
        # Only RoPE sees the restarted positions: taps keep the batch's own (emit is bound to it).
        return attention(self, spec, h, dataclasses.replace(batch, positions=batch.positions - prefix), emit)

    return wrapper


def _one_plus_w(epilogue: Callable) -> Callable:
    def qkv_norm_rope_store(q, k, v, q_weight, k_weight, *rest):
        return epilogue(q, k, v, 1 + q_weight, None if k_weight is None else 1 + k_weight, *rest)

    return qkv_norm_rope_store


def _source_one_back(buffers: Callable) -> Callable:
    def wrapper(self: KVCache, spec):
        if spec.kv_shared:
            earlier = [s.index for s in self.cfg.layers
                       if not s.kv_shared and s.type == spec.type and s.index < spec.kv_source]
            spec = dataclasses.replace(spec, kv_source=max(earlier, default=spec.kv_source))
        return buffers(self, spec)

    return wrapper


def _reusable_whole_pages(_prefix_reusable: Callable) -> Callable:
    def prefix_reusable(self: KVCache, donor_rid, prefix_len: int) -> int:
        donor = self.requests[donor_rid]
        return min(prefix_len, donor.length) // self.page_size * self.page_size  # no window check

    return prefix_reusable


def _release_one_page_early(release: Callable) -> Callable:
    def release_window(self: KVCache, rid, next_query_pos: int) -> int:
        return release(self, rid, next_query_pos + self.page_size)

    return release_window


def _stale_padding_slots(reset: Callable) -> Callable:
    """DecodeGraphs._reset_padding leaving the padding rows' K/V write slots as the real rows last
    there left them (the rest of the padding, tokens, positions and page tables, is reset)."""
    def _reset_padding(self: DecodeGraphs, start: int) -> None:
        slots, swa_slots = self.out_slots[start:].clone(), self.swa_out_slots[start:].clone()
        reset(self, start)
        self.out_slots[start:] = slots
        self.swa_out_slots[start:] = swa_slots

    return _reset_padding


def _no_softcap(_softcap: Callable) -> Callable:
    return lambda logits, cap: logits


def _last_rank_o_proj_one_head_late(shard_part: Callable) -> Callable:
    """The last rank's o_proj columns start one query head late (wrapping past the last head):
    heads r*n+1 .. Hq-1, then head 0. Patched into the rule itself, so shards cut in memory and
    shards read from a checkpoint both carry it."""
    def wrapper(config, name, rank, world):
        if rank != world - 1 or not name.endswith("self_attn.o_proj.weight"):
            return shard_part(config, name, rank, world)
        Hq = config.num_attention_heads
        first = rank * (Hq // world) + 1
        hd = config.layers[int(name.split(".")[1])].head_dim
        return Part(1, (range(first * hd, Hq * hd), range(0, hd)))

    return wrapper


def _on_op_sets(attr: str, wrap: Callable) -> tuple[Patch, ...]:
    return tuple(Patch(ops, attr, wrap) for ops in _OP_SETS)


def _on_attention(change: Callable[[dict], None], kernels=("extend_attention", "decode_attention")):
    return tuple(Patch(optimized.model, name, _with_arguments(change)) for name in kernels)


# --------------------------------------------------------------------------------------------
# Scenarios (model filled in by Fault.scenario). tiny: layers 0-3 and 5-8 sliding (W = 5),
# 4 and 9 full; 6-9 are KV-shared (sources 5 and 4).
# --------------------------------------------------------------------------------------------

# Two prefill chunks over pages of 2 handed out in order, in a pool large enough that a slot id
# misread as a page id still lands inside it.
CHUNKED = {
    "name": "fault-chunked-prefill",
    "engine": {"page_size": 2, "chunk_size": 4, "num_pages": 16},
    "requests": [{"id": "r0", "length": 8, "seed": 21, "new_tokens": 1}],
}

# A 4-token prompt, then decode until the window has moved (positions 4-6, W = 5), over shuffled
# pages so full-pool and SWA-pool ids differ; both pools have the same number of pages.
PAST_WINDOW = {
    "name": "fault-decode-past-window",
    "engine": {"page_size": 2, "chunk_size": 4, "page_order_seed": 5},
    "requests": [{"id": "r0", "length": 4, "seed": 22, "new_tokens": 3}],
}

# r1 shares r0's first 6 tokens but arrives after r0's window has moved past positions 2-3,
# which r1's first query (position 6, window 2..6) still needs.
REUSE_AFTER_EVICTION = {
    "name": "fault-prefix-reuse-after-eviction",
    "engine": {"page_size": 2, "chunk_size": 8},
    "requests": [{"id": "r0", "length": 8, "seed": 23, "new_tokens": 2},
                 {"id": "r1", "length": 3, "seed": 24, "new_tokens": 1, "arrival": 1,
                  "prefix_from": {"request": "r0", "length": 6}}],
}


# Four requests decode together at one graph size (4), then r0 finishes first: the next steps run 3
# real rows in the size-4 graph, and the padding row is the one r3 held a step before.
GRAPH_PADDING = {
    "name": "fault-graph-padding",
    "engine": {"page_size": 2, "chunk_size": 8, "max_requests": 4, "decode": "graphs"},
    "requests": [{"id": "r0", "length": 5, "seed": 31, "new_tokens": 2},
                 {"id": "r1", "length": 6, "seed": 32, "new_tokens": 5},
                 {"id": "r2", "length": 7, "seed": 33, "new_tokens": 5},
                 {"id": "r3", "length": 4, "seed": 34, "new_tokens": 5}],
}


def _registry(*faults: Fault) -> dict[str, Fault]:
    return {f.name: f for f in faults}


FAULTS: dict[str, Fault] = _registry(
    Fault(
        "doubled-key-length",
        "attention kernels get seq_lens = 2 x the keys in the pool",
        "Seed section 3 (sgl-kernel-xpu PR #191): cumulative totals passed as cu_seqlens_k_new were "
        "added to cache_seqlens, which already counted every key, so the kernel attended over twice "
        "the keys, past the valid region (31B GSM8K -5.2 pp with chunked prefill on). Here both "
        "kernels get 2 x seq_lens; the extra keys read page 0 (zeros) and the queries land at the "
        "wrong bottom-right-aligned positions. Layer 0's attention output is the first tensor hit.",
        "layers.0.o",
        _on_attention(_double_key_count),
        CHUNKED,
    ),
    Fault(
        "swa-read-untranslated",
        "sliding layers read through the full-pool page table",
        "Seed item 2: the hybrid pool's page table was not translated to the SWA sub-pool, so "
        "sliding layers read SWA pages at full-pool page ids (SGLang #24394, #24617 and #33517 are "
        "the same class). Writes stay right, so q/k/v and the pool taps hold; layer 0's attention "
        "output is wrong from the first step. Invisible wherever the two ids happen to agree (one "
        "request, pages in order): the scenario shuffles pages.",
        "layers.0.o",
        (Patch(optimized.engine.engine, "build_batch", _on_batch(_full_pages_on_sliding_reads)),),
        PAST_WINDOW,
    ),
    Fault(
        "swa-write-untranslated",
        "sliding layers write K/V at full-pool slots",
        "Background 3.5: SGLang's fused RoPE + KV-store kernel writes at full-pool ids and cannot "
        "translate them, which is why it is barred from SWA pools; CUDA-graph padding writing into "
        "live SWA slots (#24743) is a relative. The layer reads its `k`/`v` taps back at the same "
        "wrong slots, so they look right; the pool gathered through the translated table does not, "
        "and `k_cache` precedes `o` in dataflow order.",
        "layers.0.k_cache",
        (Patch(optimized.engine.engine, "build_batch", _on_batch(_full_slots_on_sliding_writes)),),
        PAST_WINDOW,
    ),
    Fault(
        "token-granular-page-table",
        "kernels get the token table (req_to_token) where a page table is expected",
        "Seed item 8 (ckvermaAI/sglang #23757): with page_size > 1 the block table must be "
        "req_to_token strided by the page size and divided by it; left token-granular, each slot id "
        "is read as a page id and keys come from the wrong slots. Both tables are hit (the SWA one "
        "is translated from it), so layer 0's attention output is wrong. Identical to the right "
        "table at page_size 1, so only paged scenarios can show it.",
        "layers.0.o",
        (Patch(KVCache, "page_table", _token_table),),
        CHUNKED,
    ),
    Fault(
        "store-through-copy",
        "the K/V store writes into a temporary copy; the pool keeps stale values",
        "DESIGN.md's \"store through a reshaped non-contiguous view\": reshape() of a non-contiguous "
        "view returns a copy, so a store through it never reaches the pool (the seed's store_cache_xpu "
        "fix, a .view() of non-contiguous K/V corrupting chunked prefill, is the same family). Every "
        "K/V write is lost. The optimized `layers.{l}.k` tap is read back from the pool at the "
        "layer's own slots, so the oracle names layer 0's k, before attention reads the stale keys.",
        "layers.0.k",
        _on_op_sets("qkv_norm_rope_store", _store_into_copy),
        CHUNKED,
    ),
    Fault(
        "window-one-short",
        "sliding layers see W - 1 keys instead of W",
        "Background 2.3: SGLang's Triton decode keeps W - 1 keys (#32087), and Gemma 4 layers passed "
        "the wrong window until #26147. Here both kernels get window - 1, so a query at position "
        ">= W - 1 misses its oldest key. The scenario's 4-token prompt fits in W - 1 keys, so prefill "
        "is clean and the first wrong output is a decode step's, in layer 0.",
        "layers.0.o",
        _on_attention(_window_one_short),
        PAST_WINDOW,
    ),
    Fault(
        "window-ignored-in-extend",
        "sliding layers attend without their window on extend steps",
        "SGLang #26513: FlashInfer's prefix-plus-new path ran the cached-prefix half without the "
        "window mask, so queries saw out-of-window (possibly evicted) keys. Here the extend kernel "
        "gets window=None on sliding layers, so a prefill query past position W - 1 sees keys it "
        "must not; decode is untouched, so a prompt shorter than W hides it.",
        "layers.0.o",
        _on_attention(_no_window, kernels=("extend_attention",)),
        CHUNKED,
    ),
    Fault(
        "rope-restarts-per-chunk",
        "RoPE positions count from 0 in every chunk (positions - prefix_len)",
        "DESIGN.md \"Positions\": a token at position p has RoPE position p in every chunk and decode "
        "step. Here RoPE gets positions - prefix_len, so every chunk after the first and every decode "
        "token (rotated as position 0) is rotated wrongly; taps keep the true positions. The first "
        "chunk is right: layer 0's q diverges at the second chunk's first token.",
        "layers.0.q",
        (Patch(PagedGemma4, "attention", _positions_per_chunk),),
        CHUNKED,
    ),
    Fault(
        "one-plus-w-norm",
        "q_norm and k_norm scale by (1 + w), Gemma 2/3 style",
        "Background 3.2: Gemma 4 norms multiply by w, Gemma 1-3's GemmaRMSNorm by (1 + w); SGLang "
        "keeps both behind Gemma4RMSNorm's scale_shift, used by q_norm/k_norm, and its fused QKV "
        "kernel is eligible only with scale_shift == 0. This fault hits that family (the q/k "
        "norms of qkv_norm_rope_store, the op the paged model calls for them, in both op sets), so "
        "layer 0's q is the first tap after it. (Applied to every weighted norm instead, "
        "the PLE projection norm would make `ple` the first divergence.)",
        "layers.0.q",
        _on_op_sets("qkv_norm_rope_store", _one_plus_w),
        CHUNKED,
    ),
    Fault(
        "shared-layer-wrong-source",
        "KV-shared sliding layers read the previous sliding layer's pool",
        "Background 1.7 and tpu-inference #3406: a KV-shared layer reads the last non-shared layer "
        "of its type (tiny: 5 for sliding layers 6-8, 4 for full layer 9). Here the shared sliding "
        "layers read the sliding layer before their source (3); the shared full layer has no earlier "
        "full layer and keeps its own. A shared layer's `k` tap is the keys it attends with, read "
        "from the pool it uses, so the oracle names layer 6's k.",
        "layers.6.k",
        (Patch(KVCache, "buffers", _source_one_back),),
        CHUNKED,
    ),
    Fault(
        "prefix-reuse-after-eviction",
        "a shared prefix is reused after the window it needs was evicted",
        "Background 1.6 and 5.3 (SWARadixCache tombstones; #34683): a prefix is reusable only while "
        "the sliding keys its first new query needs are resident. Here KVCache.prefix_reusable skips "
        "that check, so r1 reuses 6 tokens of r0 although positions 2-3 already left the SWA pool, "
        "and r1's sliding layers read them as page 0 (zeros). r0 is unaffected; the first wrong "
        "tensor is r1's layer 0 attention output.",
        "layers.0.o",
        (Patch(KVCache, "prefix_reusable", _reusable_whole_pages),),
        REUSE_AFTER_EVICTION,
    ),
    Fault(
        "swa-evicted-one-page-early",
        "the SWA eviction frontier runs one page ahead of the window",
        "Background 1.6 and 5.4 (eviction boundary #22470, page cleanup #27779): an SWA page is freed "
        "once no later query can see it. Here every release frees one page more, so the oldest "
        "in-window keys read as page 0. Attention is wrong in the next decode step, but the pool "
        "gather at the end covers the last W positions, freed ones included, and `k_cache` precedes "
        "`o` in dataflow order.",
        "layers.0.k_cache",
        (Patch(KVCache, "release_window", _release_one_page_early),),
        PAST_WINDOW,
    ),
    Fault(
        "graph-padding-stale-slots",
        "decode graphs' padding rows write K/V at the slots the last real rows there used",
        "Background 3.5 (SGLang #24743): a captured decode step runs at a fixed batch size, the rows "
        "past the real batch padded; their write locations must point at the padding sink. SGLang's "
        "translated SWA write buffer was not zeroed past the batch, so padded tokens wrote into live "
        "requests' slots. Here the padding rows keep the slots (full and SWA) the real rows last "
        "there used: once r0 finishes, the padding row writes token 0's K/V over r3's previous key "
        "in every layer. The pool gathered when r3 finishes shows it, and `k_cache` precedes `o` "
        "in dataflow order.",
        "layers.0.k_cache",
        (Patch(DecodeGraphs, "_reset_padding", _stale_padding_slots),),
        GRAPH_PADDING,
    ),
    Fault(
        "missing-softcap",
        "the final logit softcap, 30 tanh(x / 30), is skipped",
        "Background 2.6: Gemma 4 softcaps the final logits at 30. Everything before the logits is "
        "untouched, so the oracle must name the logits. Random init scales the final norm so that "
        "logits reach the cap's range; with unit-scale logits the error would be only tanh's cubic "
        "term (about x^3 / 2700), under one bfloat16 ULP. In bfloat16 the local judgement catches it.",
        "logits",
        _on_op_sets("softcap", _no_softcap),
        CHUNKED,
    ),
    Fault(
        "tp-o-proj-shard-one-head-late",
        "the last tensor-parallel rank's o_proj shard starts one head late",
        "Issue 14: a row-parallel shard is a slice of the input axis at rank x its share; computed "
        "wrongly (a head count off by one, a replicated KV head's offset used for the query heads) "
        "the rank multiplies its heads' attention output by another head's columns. Here the last "
        "rank's o_proj columns start one head late, wrapping past the last head "
        "(optimized/parallel.shard_part, the rule both the in-memory cut and the checkpoint reader "
        "use); the other ranks' shards are right. Each rank's own "
        "q/k/v/o hold, and the all-reduced attention output is wrong from layer 0 on. Without tensor "
        "parallelism the one rank is the last: the whole o_proj is one head off, at the same tap.",
        "layers.0.attn_out",
        (Patch(optimized.parallel, "shard_part", _last_rank_o_proj_one_head_late),),
        CHUNKED,
    ),
)


# --------------------------------------------------------------------------------------------
# Precision faults: an accumulator, an angle, a scale or an activation in the wrong precision or
# formula (issue 9). Each is caught in float32 and in bfloat16 at the same tap; in bfloat16 most of
# them sit far inside the reference's own L2 noise and are caught by the sharp checks of
# oracle/tolerance.py (paired drift, rounding resolution). Their wrappers replace an op outright
# with an eager version that computes what the buggy kernel would.
# --------------------------------------------------------------------------------------------

_LOW = torch.bfloat16  # the 16-bit type these bugs hard-code (a float32 run keeps it too)
_ACC_BLOCK = 16  # keys per block: the attention kernels' BLOCK_N at tiny's head sizes


def _attend_lowp_acc(q, k_pool, v_pool, page_table, page_size, cu, lens, window, out):
    """Flash attention whose running output sum is rounded to _LOW after every key block (an
    accumulator declared in the storage type): scores, max and denominator stay float32."""
    import math

    from reference.window import first_visible_key

    g = q.shape[1] // k_pool.shape[1]
    for b in range(len(lens)):
        n, seq = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        qb = q[cu[b]:cu[b + 1]].float().transpose(0, 1)  # [Hq, n, D]
        q_pos = torch.arange(seq - n, seq, device=q.device)
        k_pos = torch.arange(first_visible_key(seq - n, window), seq, device=q.device)
        slots = page_table[b][k_pos // page_size].long() * page_size + k_pos % page_size
        k = k_pool[slots].float().repeat_interleave(g, 1).transpose(0, 1)
        v = v_pool[slots].float().repeat_interleave(g, 1).transpose(0, 1)
        m = torch.full(qb.shape[:2], -math.inf, device=q.device)
        l = torch.zeros(qb.shape[:2], device=q.device)
        acc = torch.zeros_like(qb)
        for s0 in range(0, k_pos.numel(), _ACC_BLOCK):
            kp = k_pos[s0:s0 + _ACC_BLOCK]
            vis = kp[None, :] <= q_pos[:, None]
            if window is not None:
                vis = vis & (q_pos[:, None] - kp[None, :] < window)
            s = torch.einsum("hnd,hsd->hns", qb, k[:, s0:s0 + _ACC_BLOCK]).masked_fill(~vis, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_ref = torch.where(m_new == -math.inf, 0.0, m_new)
            p = torch.exp(s - m_ref[..., None])
            alpha = torch.exp(m - m_ref)
            l, m = l * alpha + p.sum(-1), m_new
            acc = (acc * alpha[..., None] + torch.einsum("hns,hsd->hnd", p, v[:, s0:s0 + _ACC_BLOCK])).to(_LOW).float()
        out[cu[b]:cu[b + 1]] = (acc / torch.where(l == 0, 1.0, l)[..., None]).transpose(0, 1).to(out.dtype)
    return out


def _lowp_accumulator(decode: bool) -> Callable[[Callable], Callable]:
    def wrap(kernel: Callable) -> Callable:
        signature = inspect.signature(kernel)

        @functools.wraps(kernel)
        def attention(*args, **kwargs):
            a = signature.bind(*args, **kwargs)
            a.apply_defaults()
            a = a.arguments
            q = a["q"]
            lens = a["seq_lens"].tolist()
            cu = list(range(len(lens) + 1)) if decode else a["cu_seqlens_q"].tolist()
            out = a.get("out")
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
            return _attend_lowp_acc(q, a["k_pool"], a["v_pool"], a["page_table"], a["page_size"], cu, lens,
                                    a.get("window"), out)

        return attention

    return wrap


def _rope_lowp_angles(x, positions, inv_freq):
    """apply_rope with the angles pos * inv_freq rounded to _LOW before cos/sin."""
    freqs = (positions[:, None].to(inv_freq.dtype) * inv_freq).to(_LOW).to(inv_freq.dtype)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _lowp_angles(_epilogue: Callable) -> Callable:
    def qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps, positions, inv_freq, k_pool, v_pool, out_slots):
        q, k, v = optimized.ops.qkv_norm(q, k, v, q_weight, k_weight, eps)
        if k is not None:
            k_pool[out_slots] = _rope_lowp_angles(k, positions, inv_freq)
            v_pool[out_slots] = v
        return _rope_lowp_angles(q, positions, inv_freq)

    return qkv_norm_rope_store


def _scale_other_precision(_scaled_embedding: Callable) -> Callable:
    def scaled_embedding(table: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
        if table.element_size() < 4:  # a 16-bit model: the float scale, not its rounding to the dtype
            return table[ids] * width ** 0.5
        # a float32 model: a scale rounded to bfloat16 (a constant taken from a bf16 checkpoint)
        return table[ids] * torch.tensor(width ** 0.5).to(_LOW).item()

    return scaled_embedding


def _erf_gelu_mul(_gelu_tanh_mul: Callable) -> Callable:
    return lambda gate, up: torch.nn.functional.gelu(gate) * up


def _erf_linear_gelu_mul(_linear_gelu_mul: Callable) -> Callable:
    """The projection + activation op (one GEMV kernel at decode on the fused path), with erf GELU."""
    def linear_gelu_mul(x, w, up=None, *, return_gate_up=False):
        gelu = torch.nn.functional.gelu
        if up is not None:
            return gelu(torch.nn.functional.linear(x, w)) * up
        gate_up = torch.nn.functional.linear(x, w)
        inter = w.shape[0] // 2
        act = gelu(gate_up[:, :inter]) * gate_up[:, inter:]
        return (act, gate_up) if return_gate_up else act

    return linear_gelu_mul


def _erf_gelu(_gelu_tanh: Callable) -> Callable:
    return lambda x: torch.nn.functional.gelu(x)


# A prompt deep enough for precision errors that grow with position (RoPE angles) or with the
# number of key blocks (accumulators): 96 tokens in chunks of 32 over pages of 16, then a decode step.
DEEP_PROMPT = {
    "name": "fault-deep-prompt",
    "engine": {"page_size": 16, "chunk_size": 32},
    "requests": [{"id": "r0", "length": 96, "seed": 25, "new_tokens": 1}],
}

# RoPE angle errors grow with position: 160 tokens put layer 0's q past its budget in bfloat16.
DEEPER_PROMPT = {
    "name": "fault-deeper-prompt",
    "engine": {"page_size": 16, "chunk_size": 64},
    "requests": [{"id": "r0", "length": 160, "seed": 26, "new_tokens": 1}],
}

# Enough elements for the statistical checks at `embed` and `mlp_act` (a sign test, a share of
# elements far from an op sequence): 32 tokens in two chunks, then a decode step.
SHORT_PROMPT = {
    "name": "fault-short-prompt",
    "engine": {"page_size": 8, "chunk_size": 16},
    "requests": [{"id": "r0", "length": 32, "seed": 27, "new_tokens": 1}],
}

PRECISION_FAULTS = _registry(
    Fault(
        "attention-accumulator-bf16",
        "the attention kernels keep their running output sum in bfloat16",
        "An accumulator declared in the storage type (`acc = tl.zeros([M, D], tl.bfloat16)`, e.g. to "
        "save registers at head size 512) rounds the softmax-weighted sum of V once per key block, so "
        "its error grows with the number of blocks. Scores, running max and denominator stay float32. "
        "In bfloat16 the reference's own noise at `o` is larger (it rounds scores and probabilities), "
        "so the L2 budget does not see it; the rounding-resolution check of the local judgement does "
        "(a float32 accumulator is within 1.0x of the correctly rounded output, this one 1.4x from "
        "one block on). Layer 0's attention output is the first tensor hit.",
        "layers.0.o",
        (Patch(optimized.model, "extend_attention", _lowp_accumulator(False)),
         Patch(optimized.model, "decode_attention", _lowp_accumulator(True))),
        DEEP_PROMPT,
    ),
    Fault(
        "rope-angles-bf16",
        "RoPE angles pos * inv_freq are rounded to bfloat16 before cos/sin",
        "GEMMA4_SPEC.md 3.4 and 8.5: the angles are float32 (transformers' `model.to(bfloat16)` casting "
        "the inv_freq buffer reproduced a q/k drift). Rounded to bfloat16 the angle at position p is "
        "off by up to p * 2**-9 radians, so the error grows with position. q and k are rotated in one "
        "op (qkv_norm_rope_store, both op sets) and q's tap comes first, so layer 0's q is the first tap.",
        "layers.0.q",
        _on_op_sets("qkv_norm_rope_store", _lowp_angles),
        DEEPER_PROMPT,
    ),
    Fault(
        "embed-scale-precision",
        "the embedding scale sqrt(width) is not the model dtype's rounding of it",
        "GEMMA4_SPEC.md 3.2: transformers casts sqrt(H) (and sqrt(P) for the per-layer table) to the "
        "weight dtype before the multiply (39.25 for E2B in bf16). Here a 16-bit model multiplies by "
        "the unrounded float and a float32 model by a bfloat16-rounded constant. tiny's H = 72 has an "
        "inexact root (8.485, 8.5 in bf16), as every real model's, so `embed` is the first tap. In "
        "float32 the 0.2% scale error is far over the L2 budget; in bfloat16 it is under the noise "
        "(the candidate is closer to the truth than the reference), but a fifth to a half of the "
        "elements change, all toward zero: the paired drift check catches it.",
        "embed",
        _on_op_sets("scaled_embedding", _scale_other_precision),
        SHORT_PROMPT,
    ),
    Fault(
        "gelu-erf",
        "the MLP and PLE gate use exact (erf) GELU instead of the tanh approximation",
        "GEMMA4_SPEC.md: hidden_activation is gelu_pytorch_tanh; reading `hidden_act` or calling "
        "F.gelu without approximate='tanh' gives the erf form, which differs by up to 4.7e-4 "
        "(2e-4 relative L2 for unit inputs). Layer 0's activation tap `mlp_act` is the first tensor "
        "hit. In bfloat16 the shift is under the L2 noise; the op-sequence check (the candidate vs "
        "the reference's ops in bf16 on the candidate's own gate/up) sees ~1% of elements over 4 ULPs.",
        "layers.0.mlp_act",
        _on_op_sets("gelu_tanh_mul", _erf_gelu_mul) + _on_op_sets("gelu_tanh", _erf_gelu)
        + _on_op_sets("linear_gelu_mul", _erf_linear_gelu_mul),
        SHORT_PROMPT,
    ),
)

# Precision faults not (yet) caught in bfloat16 on the tiny presets, kept out of FAULTS
# (tests/test_faults.py and tests/test_replay.py hold every registered fault to its tap in both
# dtypes); bench/calibrate_bf16.py reports their catch ratios. None at present.
UNCAUGHT_PRECISION_FAULTS: dict[str, Fault] = _registry()
FAULTS.update(PRECISION_FAULTS)


# --------------------------------------------------------------------------------------------
# MoE faults: bugs only a model with experts has, so they are held to their tap on `tiny-moe`
# (Fault.model) and kept out of FAULTS, whose faults the tests hold to their taps on `tiny`.
# get() / inject() / run_scenario(faults=...) know them; `check tiny-moe --inject NAME` runs one.
# --------------------------------------------------------------------------------------------


def _scale_before_topk(_route: Callable) -> Callable:
    def route(r, scale, proj_w, per_expert_scale, top_k: int, eps: float):
        z = reference.model.moe_router_input(r, scale, eps)
        wide = torch.float64 if r.dtype == torch.float64 else torch.float32
        probs = torch.softmax(torch.nn.functional.linear(z, proj_w), dim=-1, dtype=wide)
        top_i = torch.topk(probs * per_expert_scale, k=top_k, dim=-1).indices  # the bug: scaled, then chosen
        top_w = probs.gather(-1, top_i)
        return top_w / top_w.sum(-1, keepdim=True) * per_expert_scale[top_i], top_i

    return route


MOE_FAULTS: dict[str, Fault] = _registry(
    Fault(
        "moe-route-scaled-before-topk",
        "the MoE router picks its top-k experts by probability x per_expert_scale",
        "GEMMA4_SPEC.md 3.5: the router chooses the top-k experts by softmax probability, then "
        "renormalizes their weights and multiplies by per_expert_scale. Folding the per-expert scale "
        "in before the top-k (one fused multiply moved up a line) chooses other experts wherever the "
        "scale reorders the k-th and (k+1)-th: a routing bug. The global judgement cannot see it "
        "against routed truths (the candidate's truth follows the candidate's wrong choice, "
        "docs/design_notes.md note 35); the local judgement, which recomputes the choice in float64 "
        "from the candidate's own input, catches it at layer 0's mlp_out in both dtypes.",
        "layers.0.mlp_out",
        _on_op_sets("route", _scale_before_topk),
        CHUNKED,
        model="tiny-moe",
    ),
)
