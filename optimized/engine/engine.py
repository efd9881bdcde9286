"""Engine: the optimized path as a generation service. Requests come in as token ids with their
sampling parameters; each `step()` runs one forward over the batch the scheduler picks and
returns the tokens it produced. Not thread-safe: one thread owns an Engine (the HTTP server
runs it in its own thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reference.config import Gemma4Config
from reference.weights import resolve

from ..batch import build_batch
from ..kernels import default_device, graphs_supported
from ..memory import KVCache, ceil_div
from ..model import PagedGemma4, fuse_projections
from .graphs import DecodeGraphs
from .sampler import SamplingParams, sample
from .scheduler import Scheduler, Sequence


@dataclass(frozen=True)
class Event:
    rid: int
    token: int
    finished: bool
    finish_reason: str | None  # "stop" (an eos or stop id, kept as the last token) or "length"
    reused_tokens: int = 0  # prompt tokens whose K/V came from another request (prefix sharing)


@dataclass
class Output:
    rid: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str
    reused_tokens: int = 0


class Engine:
    def __init__(self, path_or_preset: str | Path | Gemma4Config = "tiny", dtype: torch.dtype = torch.float32,
                 device=None, *, page_size: int = 16, chunk_size: int = 512, num_pages: int | None = None,
                 max_requests: int = 16, max_context: int | None = None, token_budget: int | None = None,
                 fused: bool = True, seed: int = 0, weights: dict[str, torch.Tensor] | None = None,
                 graphs: bool | None = None, share_prefixes: bool = True):
        """max_context: the most positions one request may use (default: the model's limit, at
        most 4096). num_pages: the full pool's size in pages (default: max_requests requests of
        max_context each). token_budget: the most tokens one step may run (default: no limit
        beyond chunk_size per prefilling request). weights: tensors to use as they are, with
        path_or_preset then the Gemma4Config they belong to (tests share them with the reference).
        graphs: replay decode steps from device graphs (default: where the device can).
        share_prefixes: a new request reuses the K/V of a running request's identical prefix."""
        for name, v, low in (("page_size", page_size, 1), ("chunk_size", chunk_size, 1),
                             ("max_requests", max_requests, 1), ("num_pages", num_pages, 2),
                             ("max_context", max_context, 1), ("token_budget", token_budget, 1),
                             ("seed", seed, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self.device = torch.device(device) if device is not None else default_device()
        if weights is not None:
            self.config = path_or_preset
            weights = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        else:
            self.config, weights = resolve(path_or_preset, dtype, self.device, seed)
        cfg = self.config
        self.max_context = max_context or min(cfg.max_position_embeddings, 4096)
        if self.max_context > cfg.max_position_embeddings:
            raise ValueError(f"max_context {self.max_context} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        pages_per_request = ceil_div(self.max_context, page_size)
        num_pages = num_pages or max_requests * pages_per_request + 1
        # A sliding layer holds per request the window behind a chunk plus the chunk itself.
        swa_per_request = min(pages_per_request, ceil_div(cfg.sliding_window - 1 + chunk_size, page_size) + 2)
        self.cache = KVCache(cfg, page_size=page_size, num_pages=num_pages,
                             num_swa_pages=max_requests * swa_per_request + 1, max_requests=max_requests,
                             max_context=self.max_context, dtype=dtype, device=self.device)
        self.model = PagedGemma4(cfg, weights, self.cache, fused, fuse_projections(cfg, weights))
        self.scheduler = Scheduler(self.cache, chunk_size, token_budget, share_prefixes)
        self.decode_graphs, self.graphs_off_because = self._decode_graphs(graphs, max_requests, pages_per_request)
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for requests that give none
        self._next_rid = 0
        self._sequences: dict[int, Sequence] = {}

    def _decode_graphs(self, graphs: bool | None, max_requests: int, max_pages: int
                       ) -> tuple[DecodeGraphs | None, str | None]:
        """The decode graphs, or None and why not. graphs=True insists (a device or a step that
        cannot be captured is an error); None captures where it can."""
        if graphs is False:
            return None, "graphs=False"
        if not graphs_supported(self.device):
            if graphs:
                raise ValueError(f"graphs=True needs a device that can capture graphs; {self.device} cannot")
            return None, f"{self.device} cannot capture graphs"
        try:
            return DecodeGraphs(self.model, max_requests, max_pages), None
        except RuntimeError as e:  # an op in the step syncs with the host (the torch ops' MoE loop does)
            if graphs:
                raise ValueError(f"cannot capture a decode step in a device graph: {e}") from e
            return None, f"capture failed: {e}"

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError, naming the problem, for input
        that could never run (the engine is unchanged then)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        V = self.config.vocab_size
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("the prompt must be a non-empty list of token ids")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {V}), got {bad[:3]}")
        if any(t >= V for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must lie in [0, {V}), got {list(params.stop_token_ids)}")
        length = len(prompt) + params.max_new_tokens
        if length > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {length} "
                             f"exceeds max_context {self.max_context}")
        if ceil_div(length, self.cache.page_size) > self.cache.full.num_pages - 1:
            raise ValueError(f"the request needs {length} positions; the pool holds "
                             f"{(self.cache.full.num_pages - 1) * self.cache.page_size}")
        seed = params.seed if params.seed is not None else int(torch.randint(2 ** 62, (1,), generator=self._seeds))
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        rid = self._next_rid
        self._next_rid += 1
        seq = Sequence(rid, list(prompt), params, generator)
        self._sequences[rid] = seq
        self.scheduler.waiting.append(seq)
        return rid

    def abort(self, rid: int) -> None:
        """Drop a waiting or running request and free its pages. Unknown ids raise KeyError."""
        seq = self._sequences.pop(rid)
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
        else:
            self.scheduler.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def stats(self) -> dict:
        """Queue and pool occupancy: what a server reports and what a leak check compares."""
        c = self.cache
        return dict(waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                    free_pages=c.full.num_free, free_swa_pages=c.swa.num_free, requests_in_cache=len(c.requests))

    # -- the loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """One forward step over the scheduled batch; one Event per request that produced a token."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        batch = build_batch(self.cache, [s.item for s in plan])
        ids = torch.tensor([t for s in plan for t in s.ids], dtype=torch.long, device=self.device)
        if self.decode_graphs is not None and batch.is_decode:
            logits = self.decode_graphs.run(ids, batch)
        else:
            logits = self.model.forward(ids, batch, logit_rows=batch.cu_seqlens_q[1:].long() - 1)
        greedy = logits.argmax(dim=-1).tolist()  # one sync for every greedy request
        events = []
        for i, s in enumerate(plan):
            seq, item = s.seq, s.item
            if seq.prefilling:
                seq.done_prompt += item.extend_len
                if seq.prefilling:
                    self.cache.release_window(seq.rid, item.seq_len)
                    continue
            token = greedy[i] if seq.params.greedy else sample(logits[i], seq.params, seq.generator)
            seq.tokens.append(token)
            reason = self._finish_reason(seq, token)
            events.append(Event(seq.rid, token, reason is not None, reason, seq.reused))
            if reason is None:
                self.cache.release_window(seq.rid, item.seq_len)
            else:
                self.scheduler.finish(seq)
                del self._sequences[seq.rid]
        return events

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.config.eos_token_id):
            return "stop"
        if len(seq.tokens) >= p.max_new_tokens:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Output]:
        """Run the prompts to completion (alongside any requests already queued); outputs in order."""
        if not isinstance(params, (list, tuple)):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params needs one entry per prompt ({len(prompts)}), got {len(params)}")
        rids = []
        try:
            for p, sp in zip(prompts, params):
                rids.append(self.add_request(p, sp))
        except ValueError:
            for rid in rids:
                self.abort(rid)
            raise
        outputs = {rid: Output(rid, list(p), [], "") for rid, p in zip(rids, prompts)}
        pending = set(rids)
        while pending:
            for e in self.step():
                if e.rid in outputs:
                    outputs[e.rid].tokens.append(e.token)
                    if e.finished:
                        outputs[e.rid].finish_reason = e.finish_reason
                        outputs[e.rid].reused_tokens = e.reused_tokens
                        pending.discard(e.rid)
        return [outputs[rid] for rid in rids]
