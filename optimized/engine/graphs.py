"""Decode steps replayed from device graphs.

An eager decode step of a real model is hundreds of small launches, each costing host time
(docs/measurements.md: an E2B step took 30-60 ms against a 1.5 ms bandwidth floor). A device graph
records the step's launches once and replays them with one call. A graph replays fixed shapes and
fixed buffers, so each captured batch size gets static inputs, and a step's real batch is copied
into the smallest captured size that holds it, the rest padded:

  padding rows feed token 0 at position 0, write their K/V into slot 0 (the pools' reserved
  padding sink) and attend to one key there; their logits are dropped.

The page tables are captured at full width (max_context / page_size pages), so the attention
kernels' launch shapes do not depend on the step. Graphs are used for decode-only steps without
taps; prefill chunks and mixed steps run eagerly.

`capture=False` runs the same padded static batch eagerly: it is how the CPU tests check the
padding and the buffer copies, which are the parts a graph cannot make wrong on its own.
"""

from __future__ import annotations

import torch

from ..batch import BatchItem, ForwardBatch
from ..model import PagedGemma4


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
                self.forward(b)  # warm-up: compile every kernel for this shape outside the capture
                module.synchronize()
                graph = module.CUDAGraph()
                with module.graph(graph, pool=pool):
                    logits = self.forward(b)
                self._graphs[b] = (graph, logits)
            self._reset_padding(max_requests)

    def _static_batch(self, b: int) -> ForwardBatch:
        # rows, prefix_lens and extend_lens are bookkeeping the forward does not read.
        return ForwardBatch(
            items=[BatchItem(i, 0, 1) for i in range(b)], rows=self.positions[:b], prefix_lens=self.seq_lens[:b],
            extend_lens=self.seq_lens[:b], seq_lens=self.seq_lens[:b], cu_seqlens_q=self.cu[:b + 1],
            positions=self.positions[:b], out_slots=self.out_slots[:b], swa_out_slots=self.swa_out_slots[:b],
            page_table=self.page_table[:b], swa_page_table=self.swa_page_table[:b], page_size=self.page_size)

    def forward(self, b: int) -> torch.Tensor:
        """The model on the first b static rows (what a graph of size b records)."""
        return self.model.forward(self.ids[:b], self._static_batch(b))

    def _reset_padding(self, start: int) -> None:
        for t in (self.ids, self.positions, self.out_slots, self.swa_out_slots, self.page_table, self.swa_page_table):
            t[start:] = 0
        self.seq_lens[start:] = 1

    def run(self, ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [b, V] of a decode batch of b <= max_requests requests."""
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
        if self.capture:
            graph, logits = self._graphs[size]
            graph.replay()
        else:
            logits = self.forward(size)
        return logits[:b]
