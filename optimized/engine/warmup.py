"""Engine warm-up: every Triton specialization a serving step can reach, compiled at construction
(design note 34).

Triton compiles a kernel the first time it meets a new combination of constexprs (block sizes,
flags) and, for every int argument it specializes, of "== 1" and "divisible by 16" (and, for
pointers, of 16-byte alignment). Steps whose batch size or token count the process has not seen
yet therefore stop for a compile in the middle of serving: on an H200, waves of 32 streams took
2.8-3.2 s to their first token on a first pass and 0.67 s on the next (docs/measurements.md).
Decode graphs compile their decode steps when they are captured; this runs the rest once before
the first request.

What it covers, and why that is every variant (the arguments the kernels see are functions of
the step's token count N, its batch size B, its sampled-row count and the layer; nothing else
varies from step to step):
- Token counts: an extend step of each N in `counts(limit)`, limit the most tokens a step may run
  (token budget, or max_requests chunks), at most MAX_TOKENS. Row-tiled kernels take a
  power-of-two rows-per-program from next_power_of_2(N), capped, and N or N times a head or
  expert count as ints; `counts` has, in every power-of-two bucket, a count of each 2-adic
  valuation 0-4, so every (bucket, "== 1", "divisible by 16" of N * k) combination a step can
  meet is met here. Past MAX_TOKENS every bucket has saturated (the last to, the MoE kernels'
  rows per expert on 26B-A4B, does at 513 tokens). These steps compute logits for every row, as
  a step with prompt logprobs does; one more step is a single 2-token prefill with its one
  sampled row. The first request of each has a prefix (keys before its new tokens), any other
  none; requests take at most chunk_size tokens each.
- Batch sizes: a mixed step (one request extending 2 tokens after a prefix, the others 1 after
  theirs) of each B in `counts(max_requests)`, B >= 2, that fits the token limit: extend
  attention's BLOCK_B (`attention.extend_block_b`: one bucket up to 64 requests) and the kernels
  over the B sampled rows (final norm, softcap).
- Sliding and full layers: every step is a whole forward, so each layer kind's kernels (head
  size, window) compile in each case above.
- Eager decode, only when the engine has no decode graphs: a decode step of each B in
  `counts(max_requests)` with a one-page table (one split, the FINAL kernel) and a full-width one
  (split over keys, then merged). With graphs, decode steps replay what capture compiled.
What else could vary is specialized away (attention's page-table width, batch and split count
are `do_not_specialize`; build_batch puts positions, which kernels read in place, at an aligned
address) or fixed by the engine (page size, head sizes, pool strides, dtype). Not covered: a
step shape no engine setting can produce (a fault's wider page table), other processes' kernels.

The steps run on no request: every new token's K/V is written to slot 0, every page-table entry
is page 0 (the pools' padding sink, which nothing allocates), and page 0 of every K/V buffer is
put back as it was afterwards. No page, row, table entry or prefix-cache node is touched, so the
pools, free lists and the prefix cache are exactly as before and tokens cannot change.
Time: about 5 steps per power of two up to the token limit and up to max_requests (51 for
`serve`'s defaults, 16 requests and a budget of 528; 61 at 64 requests as bench/serve_bench.py
ran; 10 more decode steps a power of two without graphs),
each a forward of at most MAX_TOKENS tokens, plus the compiles, which the first requests would
otherwise pay mid-serving (Triton's on-disk cache makes them cheap in a later process).
"""

from __future__ import annotations

import time

import torch

from ..batch import BatchItem, ForwardBatch
from ..kernels import INTERPRETING
from ..memory import KVCache, ceil_div

MAX_TOKENS = 1024

_WARM = object()  # the request id of warm-up rows: no such request exists


def compiles_kernels(device: torch.device) -> bool:
    """Whether Triton compiles for `device` (where a warm-up saves anything)."""
    return device.type != "cpu" and not INTERPRETING


def counts(limit: int, start: int = 1) -> list[int]:
    """For each next_power_of_2 bucket (p / 2, p] that holds counts <= limit: its largest count
    of each 2-adic valuation 0, 1, 2, 3 and >= 4 there is; those at least `start`. A count n
    then stands for every n' <= limit with the same bucket and valuation, and for any k, n * k
    is "== 1" or "divisible by 16" (Triton's specializations) exactly when n' * k is."""
    out, p = set(), 1
    while p // 2 < limit:
        top, seen = min(p, limit), set()
        for n in range(top, max(p // 2, top - 16), -1):  # 16 consecutive counts hold every class
            v = min((n & -n).bit_length() - 1, 4)
            if v not in seen:
                seen.add(v)
                out.add(n)
        p *= 2
    return sorted(c for c in out if c >= start)


Step = tuple[list[tuple[int, int]], bool]  # ((prefix_len, extend_len) per request, logits of every row)


def plan(*, max_requests: int, chunk_size: int, token_budget: int | None, max_context: int, page_size: int,
         eager_decode: bool) -> list[Step]:
    """The warm-up steps, as the module says: each the (prefix_len, extend_len) of its requests
    and whether it computes the logits of every row (else of each request's last row only)."""
    chunk = min(chunk_size, max_context)  # the most new tokens one request runs in a step
    limit = min(MAX_TOKENS, token_budget or max_requests * chunk, max_requests * chunk)
    prefix = min(page_size, max_context - 2)
    steps: list[Step] = []
    if chunk >= 2:  # otherwise every step is a decode step
        steps.append(([(prefix, 2)], False))  # one prefill, one sampled row
        for n in counts(limit, 2):
            ext = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
            steps.append(([(min(page_size, max_context - e) if i == 0 else 0, e) for i, e in enumerate(ext)], True))
        for b in counts(max_requests, 2):
            if b + 1 <= limit:
                steps.append(([(prefix, 2)] + [(prefix + 1, 1)] * (b - 1), False))
    if eager_decode:
        for b in counts(max_requests):
            steps.append(([(min(page_size, max_context) - 1, 1)] * b, False))  # one page: a single split
            steps.append(([(max_context - 1, 1)] * b, False))  # the widest table: split and merged
    return steps


def scratch_batch(cache: KVCache, step: list[tuple[int, int]]) -> ForwardBatch:
    """A batch of no request whose new K/V go to slot 0 and whose page tables are all page 0."""
    dev, ps = cache.device, cache.page_size
    B, N = len(step), sum(e for _, e in step)
    i32 = dict(dtype=torch.int32, device=dev)
    lens = torch.tensor([[p, e, p + e] for p, e in step], **i32)
    cu = torch.tensor([0] + [e for _, e in step], **i32).cumsum(0, dtype=torch.int32)
    positions = torch.tensor([q for p, e in step for q in range(p, p + e)], dtype=torch.long, device=dev)
    slots = torch.zeros(N, dtype=torch.long, device=dev)
    table = torch.zeros(B, ceil_div(max(p + e for p, e in step), ps), **i32)
    return ForwardBatch(
        items=[BatchItem(_WARM, p, e) for p, e in step], rows=torch.zeros(B, dtype=torch.long, device=dev),
        prefix_lens=lens[:, 0].contiguous(), extend_lens=lens[:, 1].contiguous(), seq_lens=lens[:, 2].contiguous(),
        cu_seqlens_q=cu, positions=positions, out_slots=slots, swa_out_slots=slots.clone(), page_table=table,
        swa_page_table=table.clone(), page_size=ps)


@torch.no_grad()
def warm_up(model, steps: list[Step]) -> dict:
    """Run `steps` (from `plan`) through the model on scratch batches; page 0 of every K/V buffer
    is restored afterwards. Returns {"steps": n, "seconds": wall time, device work included}."""
    cache: KVCache = model.cache
    ps, t0 = cache.page_size, time.perf_counter()
    buffers = {id(b): b for b in [*cache._k.values(), *cache._v.values()]}.values()
    saved = [(b, b[:ps].clone()) for b in buffers]
    try:
        for step, every_row in steps:
            batch = scratch_batch(cache, step)
            ids = torch.zeros(batch.positions.shape[0], dtype=torch.long, device=cache.device)
            model.forward(ids, batch, logit_rows=None if every_row else batch.cu_seqlens_q[1:].long() - 1)
    finally:
        for b, page0 in saved:
            b[:ps].copy_(page0)
    if cache.device.type != "cpu":
        torch.get_device_module(cache.device).synchronize(cache.device)
    return dict(steps=len(steps), seconds=time.perf_counter() - t0)
