"""Sampling: per-request parameters and the choice of the next token from one row of logits.

Each request that samples gets its own torch.Generator seeded from its `seed`, so its tokens do
not depend on which other requests share its batches: a served request replays exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy (argmax; ties to the lowest id)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # None: a seed drawn from the engine's own generator
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos ids
    ignore_eos: bool = False  # True: only stop_token_ids and max_new_tokens end the request

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not is_num(self.temperature) or not 0 <= self.temperature < float("inf"):
            bad("temperature", "a finite number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            bad("seed", "null or an integer in [0, 2^63)")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        if not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits [V]. Greedy is argmax; otherwise float32
    softmax(logits / temperature) restricted to the top_k most likely ids and to the smallest set
    whose probability reaches top_p (the most likely id always stays), drawn with `generator`."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1:
        probs, order = torch.sort(torch.softmax(x, dim=-1), descending=True)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely ids
        cut = order[before >= params.top_p]
        x[cut] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TeacherSampler:
    """Forces given tokens: request `rid`'s n-th sampled token is `tokens[rid][n]`, whatever its
    logits say (the oracle feeds the reference's tokens so both paths see one sequence). The
    engine still hands it the row it selected, and reports that row at the `logits` tap."""

    def __init__(self, tokens: dict[int, list[int]]):
        self.tokens = tokens

    def __call__(self, seq, row: torch.Tensor) -> int:
        return self.tokens[seq.rid][len(seq.tokens)]
