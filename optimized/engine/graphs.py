"""Decode steps replayed from device graphs.

An eager decode step of a real model is hundreds of small launches, each costing host time
(docs/measurements.md: an E2B step took 30-60 ms against a 1.5 ms bandwidth floor). A device graph
records the step's launches once and replays them with one call. A graph replays fixed shapes and
fixed buffers, so each captured batch size gets static inputs, and a step's real batch is copied
into the smallest captured size that holds it, the rest padded:

  padding rows feed token 0 at position 0, write their K/V into slot 0 (the pools' reserved
  padding sink) and attend to one key there; their logits are dropped.

The page tables are captured at full width (max_context / page_size pages), so the attention
kernels' launch shapes do not depend on the step. Graphs are used for decode-only steps; prefill
chunks and mixed steps run eagerly.

Under the oracle (taps on) a replayed step is still judged: after the replay, the identical
static padded forward runs eagerly with taps on the same static buffers (rewriting the same K/V
slots with the same values), and the two must give bitwise-equal logits, else GraphMismatch.
The taps then describe exactly the computation the graph replayed.

`capture=False` runs the same padded static batch eagerly: it is how the CPU tests (and the
oracle on a CPU, Engine(graphs="static")) check the padding and the buffer copies, which are the
parts a graph cannot make wrong on its own.
"""

from __future__ import annotations


import torch

from ..batch import BatchItem, ForwardBatch
from ..kernels import capture_graph
from ..model import PagedGemma4, TapSink


class GraphMismatch(RuntimeError):
    """A replayed decode graph and the same step run eagerly gave different logits."""


_PAD = object()  # the request id of padding rows: their taps are dropped


def batch_sizes(max_requests: int) -> list[int]:
    """The captured batch sizes: powers of two up to max_requests, and max_requests itself."""
    sizes, b = [], 1
    while b < max_requests:
        sizes.append(b)
        b *= 2
    return sizes + [max_requests]


class DecodeGraphs:
    def __init__(self, model: PagedGemma4, max_requests: int, max_pages: int, capture: bool = True):
        cache, dev = model.cache, model.device
        self.model, self.capture = model, capture
        B = max_requests
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.out_slots = torch.zeros(B, dtype=torch.long, device=dev)
        self.swa_out_slots = torch.zeros(B, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.page_table = torch.zeros(B, max_pages, dtype=torch.int32, device=dev)
        self.swa_page_table = torch.zeros(B, max_pages, dtype=torch.int32, device=dev)
        self.page_size = cache.page_size
        self.sizes = batch_sizes(max_requests)
        self._graphs: dict[int, tuple[object, torch.Tensor]] = {}
        if capture:
            module = torch.get_device_module(dev)
            pool = module.graph_pool_handle()
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
                # Warm-up outside the capture, on a side stream as the device's graph docs ask:
                # compiles every kernel for this shape and lets lazy library state (cuBLAS
                # workspaces) initialise. Warmed on the default stream, the first capture in a
                # fresh process failed on an H200 now and then.
                side = module.Stream()
                side.wait_stream(module.current_stream())
                with module.stream(side):
                    self.forward(b)
                module.current_stream().wait_stream(side)
                module.synchronize()
                self._graphs[b] = capture_graph(dev, lambda: self.forward(b), pool)
            self._reset_padding(max_requests)

    def _static_batch(self, b: int, items: list[BatchItem] | None = None) -> ForwardBatch:
        # rows, prefix_lens and extend_lens are bookkeeping the forward does not read; items name
        # the requests taps are reported for (padding rows by default).
        return ForwardBatch(
            items=items or [BatchItem(_PAD, 0, 1) for _ in range(b)], rows=self.positions[:b],
            prefix_lens=self.seq_lens[:b], extend_lens=self.seq_lens[:b], seq_lens=self.seq_lens[:b], cu_seqlens_q=self.cu[:b + 1],
            positions=self.positions[:b], out_slots=self.out_slots[:b], swa_out_slots=self.swa_out_slots[:b],
            page_table=self.page_table[:b], swa_page_table=self.swa_page_table[:b], page_size=self.page_size)

    def forward(self, b: int, items: list[BatchItem] | None = None, taps: TapSink | None = None) -> torch.Tensor:
        """The model on the first b static rows (what a graph of size b records)."""
        return self.model.forward(self.ids[:b], self._static_batch(b, items), taps=taps)

    def _reset_padding(self, start: int) -> None:
        for t in (self.ids, self.positions, self.out_slots, self.swa_out_slots, self.page_table, self.swa_page_table):
            t[start:] = 0
        self.seq_lens[start:] = 1

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether a decode batch fits the static buffers (requests and page-table width)."""
        width = max(batch.page_table.shape[1], batch.swa_page_table.shape[1])
        return len(batch.items) <= self.sizes[-1] and width <= self.page_table.shape[1]

    def run(self, ids: torch.Tensor, batch: ForwardBatch, taps: TapSink | None = None) -> torch.Tensor:
        """Logits [b, V] of a decode batch of b <= max_requests requests; with taps, the step's
        taps too (the real rows' only), checked against the replay as the module says."""
        b = len(batch.items)
        size = next(s for s in self.sizes if s >= b)
        width = batch.page_table.shape[1]
        self.ids[:b] = ids
        self.positions[:b] = batch.positions
        self.out_slots[:b] = batch.out_slots
        self.swa_out_slots[:b] = batch.swa_out_slots
        self.seq_lens[:b] = batch.seq_lens
        self.page_table[:b, :width] = batch.page_table
        self.page_table[:b, width:] = 0
        self.swa_page_table[:b, :width] = batch.swa_page_table
        self.swa_page_table[:b, width:] = 0
        self._reset_padding(b)
        items = None
        if taps is not None:
            items = list(batch.items) + [BatchItem(_PAD, 0, 1)] * (size - b)
            taps = _real_rows(taps)
        if not self.capture:
            return self.forward(size, items, taps)[:b]
        graph, logits = self._graphs[size]
        graph.replay()
        if taps is None:
            return logits[:b]
        replayed = logits[:b].clone()  # the graph's output buffer, before anything reuses its memory
        eager = self.forward(size, items, taps)[:b]
        if not torch.equal(replayed, eager):
            diff = (replayed.float() - eager.float()).abs().max().item()
            raise GraphMismatch(f"decode graph of size {size} and the same step run eagerly disagree "
                                f"(max |logit difference| {diff:.3g}) for requests {[it.rid for it in batch.items]}")
        return replayed


def _real_rows(taps: TapSink) -> TapSink:
    """The sink without padding rows. Positions are cloned: they are views of the static buffer,
    which the next step overwrites."""
    def sink(rid, name, positions, tensor):
        if rid is not _PAD:
            taps(rid, name, positions.clone(), tensor)

    return sink
