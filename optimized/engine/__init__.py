"""The engine: continuous batching over the paged model, with sampling (optimized/engine/)."""

from .engine import Engine, Event, Output
from .sampler import SamplingParams, sample

__all__ = ["Engine", "Event", "Output", "SamplingParams", "sample"]
