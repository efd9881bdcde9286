"""The sliding-window rule, defined once (shared/DESIGN.md "Sliding window").

Key j is visible to query i iff j <= i and i - j < W: W keys counting the query itself.
Full-attention layers pass window=None (plain causal). Masks, key ranges, eviction bounds and
prefix-reuse checks all go through these two functions.
"""

from __future__ import annotations

import torch


def first_visible_key(query_pos: int, window: int | None) -> int:
    """The smallest key position a query at `query_pos` sees."""
    if window is None:
        return 0
    return max(0, query_pos - window + 1)


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask, broadcast over the two position tensors: may the query see the key?"""
    ok = key_pos <= query_pos
    if window is not None:
        ok = ok & (query_pos - key_pos < window)
    return ok
