"""Forward metadata: the one place that turns "these requests, these new tokens" into the lengths,
positions, slots and page tables every kernel reads (shared/DESIGN.md "Forward metadata").

Per request: `prefix_len` tokens already in the pool (earlier chunks, a reused prefix),
`extend_len` new tokens (1 for decode), `seq_len = prefix_len + extend_len`, positions
`prefix_len .. seq_len - 1`. New K/V are written before attention, so kernels take `seq_lens` as
the key count and `cu_seqlens_q` over new tokens only. No kernel recomputes any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .memory import KVCache, ceil_div


@dataclass(frozen=True)
class BatchItem:
    rid: object
    prefix_len: int
    extend_len: int

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.extend_len


@dataclass
class ForwardBatch:
    items: list[BatchItem]
    rows: torch.Tensor  # [B] req_to_token rows
    prefix_lens: torch.Tensor  # [B] int32
    extend_lens: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32, keys each request attends over
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, new tokens only
    positions: torch.Tensor  # [N] int64, RoPE position = logical position
    out_slots: torch.Tensor  # [N] int64 full-pool slots of the new tokens
    swa_out_slots: torch.Tensor  # [N] int64 the same slots translated into the SWA pool
    page_table: torch.Tensor  # [B, P] int32 full-pool pages
    swa_page_table: torch.Tensor  # [B, P] int32 SWA pages (0 where evicted)
    page_size: int

    @property
    def is_decode(self) -> bool:
        return all(it.extend_len == 1 for it in self.items)

    def token_ranges(self):
        """(item, start, end) of each request's rows in the packed token axis."""
        start = 0
        for it in self.items:
            yield it, start, start + it.extend_len
            start += it.extend_len


def build_batch(cache: KVCache, items: list[BatchItem]) -> ForwardBatch:
    """Metadata for one forward step. It allocates nothing: full-pool slots for every new token
    must already be reserved (KVCache.reserve) and their SWA pages mapped (KVCache.map_window),
    which the engine does before it builds the batch; this only reads the tables."""
    if not items:
        raise ValueError("a batch needs at least one request")
    dev = cache.device
    ps = cache.page_size
    for it in items:
        if it.extend_len < 1 or it.prefix_len < 0:
            raise ValueError(f"request {it.rid!r}: extend_len must be >= 1 and prefix_len >= 0, got {it}")
        if cache.requests[it.rid].length < it.seq_len:
            raise ValueError(f"request {it.rid!r}: slots reserved up to {cache.requests[it.rid].length}, "
                             f"batch needs {it.seq_len}")
    # Every per-request and per-token integer goes to the device in one copy (from pinned memory
    # on CUDA, so the host does not wait for it): the H200 profile of issue 12 counted ~16 small
    # copies per decode step, about 1 ms of host time, when each field went on its own. The
    # per-token fields are numpy ranges, not Python lists: for an 8192-token prefill the lists
    # took 3.0 ms of host time on this repo's 2-core CPU box while the device sat idle, numpy
    # 0.05 ms (and a 32-request decode batch 79 us against 33).
    B = len(items)
    rows_h = np.array([cache.requests[it.rid].row for it in items], dtype=np.int64)
    prefix_h = np.array([it.prefix_len for it in items], dtype=np.int64)
    extend_h = np.array([it.extend_len for it in items], dtype=np.int64)
    cu_h = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(extend_h, out=cu_h[1:])
    N = int(cu_h[-1])
    # Positions come first: kernels read them in place, and Triton specializes a kernel on whether
    # each pointer is 16-byte aligned, so a view at an offset of 5B + 1 int64s (as when they came
    # after the per-request fields) compiled one more variant of each such kernel for odd B.
    positions_h = np.arange(N, dtype=np.int64) + np.repeat(prefix_h - cu_h[:-1], extend_h)  # prefix_len .. seq_len - 1
    packed = to_device(np.concatenate([positions_h, np.repeat(rows_h, extend_h), rows_h, prefix_h, extend_h,
                                       prefix_h + extend_h, cu_h]), dev)
    positions, token_rows, rows, prefix, extend, seq, cu = packed.split([N, N, B, B, B, B, B + 1])
    out_slots = cache.req_to_token[token_rows, positions].long()
    swa_out = cache.full_to_swa_page[out_slots // ps].long() * ps + out_slots % ps
    max_pages = ceil_div(max(it.seq_len for it in items), ps)
    page_table = cache.page_table(rows, max_pages)
    return ForwardBatch(
        items=list(items), rows=rows, prefix_lens=prefix.to(torch.int32), extend_lens=extend.to(torch.int32),
        seq_lens=seq.to(torch.int32), cu_seqlens_q=cu.to(torch.int32), positions=positions,
        out_slots=out_slots, swa_out_slots=swa_out, page_table=page_table,
        swa_page_table=cache.swa_page_table(page_table).to(torch.int32), page_size=ps,
    )


def to_device(values, device: torch.device) -> torch.Tensor:
    """int64 values (a list or a numpy array) on `device` in one copy that never waits for the
    device (see `host_to_device`). Through numpy: it reads a list of 8192 ints in 0.38 ms where
    torch.tensor took 0.99 (this repo's CPU box)."""
    return host_to_device(torch.from_numpy(np.asarray(values, dtype=np.int64)), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied from pinned memory and asynchronously where the device
    has pinned memory: a pageable copy waits for every kernel queued before it (torch synchronizes
    the stream after it), which would stall the host behind the step in flight (design note 32).
    Each call pins a fresh buffer from torch's pinned-memory cache, which records the copy's
    stream and hands the block out again only after the copy has run, so nothing is overwritten
    early (callers never reuse the pinned buffer themselves). On the CPU the tensor itself.
    Every small index copy of a step goes through here: build_batch's, the sampler's, and
    KVCache.reserve/map_window's (optimized/memory.py)."""
    if device.type == "cpu":
        return host
    if not pinnable(device):
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


_PINNABLE: dict[str, bool] = {}


def pinnable(device: torch.device) -> bool:
    """Whether host memory can be pinned for `device` (tried once per device type)."""
    if device.type not in _PINNABLE:
        ok = device.type != "cpu"
        if ok:
            try:
                ok = (torch.accelerator.current_accelerator().type == device.type
                      and torch.empty(1).pin_memory().is_pinned())
            except (RuntimeError, AttributeError):
                ok = False
        _PINNABLE[device.type] = ok
    return _PINNABLE[device.type]
