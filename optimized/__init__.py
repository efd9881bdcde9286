"""The fast path: paged KV pools, forward metadata, Triton kernels, the paged model and its runner."""

from .runner import RequestResult, Runner

__all__ = ["Runner", "RequestResult"]
