"""Engine: the one driver loop of the optimized path. Requests come in as token ids with their
sampling parameters; each `step()` schedules a batch, runs one forward over it and postprocesses
the rows (sampling, window release, finishing), returning the tokens it produced. Not
thread-safe: one thread owns an Engine (the HTTP server runs it in its own thread).

What the oracle needs is policy the same loop takes (docs/design_notes.md, "One engine under the
oracle"): a scheduler `Script` (chunk splits, arrivals, named prefix donors), a sampler (the
teacher, forcing the reference's tokens), a page order seed, and a tap sink. With taps on, every
row's logits are computed and the `logits` tap of a request's last row in a step is the very
row postprocess selected and handed to the sampler, so a wrong row shows at that tap even under
teacher forcing. `optimized.Runner` is a thin facade that fills these in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from reference.config import Gemma4Config

from .. import ops, parallel
from ..batch import BatchItem, ForwardBatch, build_batch, to_device
from ..kernels import check_supported, default_device, graphs_supported
from ..memory import KVCache, ceil_div, swa_pages_per_request
from ..model import PagedGemma4, TapSink, check_attention, fuse_projections
from ..parallel import TensorParallel
from .graphs import DecodeGraphs
from .sampler import PendingDraw, SamplingParams, draw_batch, token_logprobs
from .scheduler import Scheduled, Scheduler, Script, Sequence
from .warmup import compiles_kernels, plan as warm_up_plan, warm_up as run_warm_up

# sampler(sequence, logits row [V]) -> the next token. None: the engine's own (params-driven).
Sampler = Callable[[Sequence, torch.Tensor], int]


@dataclass(frozen=True)
class Event:
    rid: int
    token: int
    finished: bool
    finish_reason: str | None  # "stop" (an eos or stop id, kept as the last token) or "length"
    reused_tokens: int = 0  # prompt tokens whose K/V came from another request (prefix sharing)
    # With params.logprobs: the token's logprob and the n most likely (id, logprob), float32
    # log_softmax of the logits after penalties and logit_bias (sampler.py).
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    # With params.prompt_logprobs, on a request's first event: per prompt token (logprob, top n),
    # (None, None) for the first token and for any whose logits were not computed (a reused prefix).
    prompt_logprobs: tuple[tuple[float | None, tuple | None], ...] | None = None


@dataclass
class Output:
    rid: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str
    reused_tokens: int = 0


def engine_device(tp, device) -> torch.device:
    """The device an Engine runs on: a rank's own under tensor parallelism (a TensorParallel),
    else `device`, else the machine's. serve.build_engine asks it before any weight loads."""
    if isinstance(tp, TensorParallel):
        return tp.device
    return torch.device(device) if device is not None else default_device()


class Engine:
    def __init__(self, path_or_preset: str | Path | Gemma4Config = "tiny", dtype: torch.dtype = torch.float32,
                 device=None, *, page_size: int = 16, chunk_size: int = 512, num_pages: int | None = None,
                 max_requests: int = 16, max_context: int | None = None, token_budget: int | None = None,
                 fused: bool = True, attention: str = "triton", seed: int = 0,
                 weights: dict[str, torch.Tensor] | None = None,
                 graphs: bool | str | None = None, share_prefixes: bool = True,
                 num_swa_pages: int | None = None, page_order_seed: int | None = None,
                 script: Script | None = None, sampler: Sampler | None = None, taps: TapSink | None = None,
                 feed_last: bool | None = None, tp: TensorParallel | int | None = None, overlap: bool = True,
                 warm_up: bool | None = None):
        """max_context: the most positions one request may use (default: the model's limit, at
        most 4096). num_pages: the full pool's size in pages (default: max_requests requests of
        max_context each); num_swa_pages likewise for the sliding pool (default: the sizing rule
        of optimized/memory.py for max_requests such requests). token_budget: the most tokens one
        step may run (default: no limit beyond chunk_size per prefilling request). weights:
        tensors to use as they are, with path_or_preset then the Gemma4Config they belong to
        (tests share them with the reference), or a parallel.Shard (the Runner's). graphs:
        replay decode steps from device graphs (True insists, None where the device can, False
        never, "static": the graphs' padded static batch run eagerly, which is how a CPU
        exercises that path). fused: the Triton kernels for the non-attention ops (False: plain torch);
        attention: "triton", the paged attention kernels, or "eager", their torch twins (with
        fused=False no Triton runs: how CPU tests of the server keep quick). share_prefixes: a new
        request reuses the K/V of an identical prefix, from a running request or from the prefix
        cache of finished ones (optimized/engine/radix.py); False turns both off.

        Policy for the oracle: page_order_seed shuffles the order pages are handed out in;
        script fixes chunks, arrivals and prefix donors; sampler replaces sampling (a
        TeacherSampler forces tokens); taps receives every tap (model taps, `logits` from the
        rows postprocess selects, `layers.{l}.k_cache/.v_cache` from the pools when a request
        finishes); feed_last (default: on with taps) feeds each request's last token too, so
        taps and pools cover every position.

        tp: tensor parallelism (optimized/parallel.py), a TensorParallel or a world size to join
        (under torchrun): every rank builds an engine with the same arguments, holding its shard
        of the weights (parallel.load_shard: from a checkpoint only its slices are read) and of
        the KV pools on the rank's device (tp's, not `device`); taps come out
        in the unsharded layout on every rank. Decode graphs stay off unless graphs=True.

        overlap: in steady decode, launch the next step before reading this one's tokens, feeding
        them on the device (design note 32); tokens, events and stats are those of overlap=False,
        which runs every step synchronously (for A/B measurement).

        warm_up: compile every Triton kernel variant a step can reach before the first request
        (optimized/engine/warmup.py, design note 34), on scratch slots that leave pools, tables and
        the prefix cache as they were. None: where kernels compile (not under Triton's
        interpreter) and no oracle policy is given (taps, script, sampler); True forces it (how a
        CPU test covers it); False never. `warm_up_stats` says what it ran (None: not run)."""
        for name, v, low in (("page_size", page_size, 1), ("chunk_size", chunk_size, 1),
                             ("max_requests", max_requests, 1), ("num_pages", num_pages, 2),
                             ("num_swa_pages", num_swa_pages, 2), ("max_context", max_context, 1),
                             ("token_budget", token_budget, 1), ("seed", seed, 0),
                             ("page_order_seed", page_order_seed, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        check_attention(attention)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        if warm_up not in (True, False, None):
            raise ValueError(f"warm_up must be True, False or None, got {warm_up!r}")
        if graphs not in (True, False, None, "static"):
            raise ValueError(f"graphs must be True, False, None or 'static', got {graphs!r}")
        self.tp = parallel.resolve(tp, device)
        self.device = engine_device(self.tp, device)
        # This rank's shard (the whole model without tp) on the device: read or drawn slice by slice,
        # or cut from `weights` (parallel.load_shard says what a rank holds). check_supported: a head
        # size the kernels cannot run is a ConfigError naming the field, before any weight is read.
        shard = parallel.load_shard(path_or_preset, dtype, self.device, self.tp, seed=seed, weights=weights,
                                    check=check_supported)
        self.config, shard_cfg, weights = shard.config, shard.shard_config, shard.weights
        cfg = self.config
        self.max_context = max_context or min(cfg.max_position_embeddings, 4096)
        if self.max_context > cfg.max_position_embeddings:
            raise ValueError(f"max_context {self.max_context} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        pages_per_request = ceil_div(self.max_context, page_size)
        num_pages = num_pages or max_requests * pages_per_request + 1
        swa = swa_pages_per_request(cfg.sliding_window, page_size, self.max_context, chunk_size)
        self.cache = KVCache(shard_cfg, page_size=page_size, num_pages=num_pages,
                             num_swa_pages=num_swa_pages or max_requests * swa + 1, max_requests=max_requests,
                             max_context=self.max_context, dtype=dtype, device=self.device, order_seed=page_order_seed)
        self.model = PagedGemma4(shard_cfg, weights, self.cache, fused, fuse_projections(shard_cfg, weights), self.tp,
                                 attention)
        self.scheduler = Scheduler(self.cache, chunk_size, token_budget, share_prefixes, script)
        self.sampler = sampler
        self.taps = taps if taps is None or self.tp is None else parallel.gathering_sink(taps, cfg, self.tp)
        self.feed_last = taps is not None if feed_last is None else feed_last
        # Called with each finishing sequence while its pages are still held (taps only).
        self.pool_taps: Callable[[Sequence], None] = self._emit_pool_taps
        if self.tp is not None and graphs is None:  # an all-reduce inside a captured step is untried
            self.decode_graphs, self.graphs_off_because = None, "tensor parallel: no decode graphs unless graphs=True"
        else:
            self.decode_graphs, self.graphs_off_because = self._decode_graphs(graphs, max_requests, pages_per_request)
        if warm_up is None:
            warm_up = compiles_kernels(self.device) and taps is None and script is None and sampler is None
        self.warm_up_stats = None
        if warm_up:  # after capture: graphs compiled the decode steps they replay
            self.warm_up_stats = run_warm_up(self.model, warm_up_plan(
                max_requests=max_requests, chunk_size=chunk_size, token_budget=token_budget,
                max_context=self.max_context, page_size=page_size, eager_decode=self.decode_graphs is None))
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for requests that give none
        self._next_rid = 0
        self._sequences: dict[int, Sequence] = {}
        self._prompt_lps: dict[int, list] = {}  # rid -> prompt logprobs so far (params.prompt_logprobs)
        self._prompt_rows: list = []  # this step's prompt logit rows, from _run to _score_prompts
        self.overlap = overlap
        self._guess: _Guess | None = None  # the next step, launched ahead (overlap)
        self.overlap_stats = dict(launched=0, committed=0, discarded=0)  # guesses (benchmarks read it)

    def _decode_graphs(self, graphs: bool | str | None, max_requests: int, max_pages: int
                       ) -> tuple[DecodeGraphs | None, str | None]:
        """The decode graphs, or None and why not. graphs=True insists (a device or a step that
        cannot be captured is an error); None captures where it can."""
        if graphs is False:
            return None, "graphs=False"
        if graphs == "static":
            return DecodeGraphs(self.model, max_requests, max_pages, capture=False), None
        if not graphs_supported(self.device):
            if graphs:
                raise ValueError(f"graphs=True needs a device that can capture graphs; {self.device} cannot")
            return None, f"{self.device} cannot capture graphs"
        if self.model.attention_kind == "eager":  # its twins read lengths on the host: not tried either
            if graphs:
                raise ValueError("cannot capture a decode step in a device graph: eager attention reads "
                                 "sequence lengths on the host (attention='triton' captures)")
            return None, "eager attention syncs with the host"
        if self.model.ops is ops and self.config.enable_moe_block:  # not tried: a failed capture costs a reset
            if graphs:
                raise ValueError("cannot capture a decode step in a device graph: the torch ops' MoE loop "
                                 "syncs with the host (fused=True captures)")
            return None, "the torch ops' MoE loop syncs with the host"
        try:
            return DecodeGraphs(self.model, max_requests, max_pages), None
        except RuntimeError as e:  # an op in the step syncs with the host (the torch ops' MoE loop does)
            if graphs:
                raise ValueError(f"cannot capture a decode step in a device graph: {e}") from e
            return None, f"capture failed: {e}"

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None, *,
                    max_new_tokens: int | None = None) -> int:
        """Queue a request; returns its id (0, 1, ... in order). Raises ValueError, naming the
        problem, for input that could never run (the engine is unchanged then). max_new_tokens
        overrides params.max_new_tokens and may be 0 (prefill only: the oracle's prompt runs)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        new = params.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(new, bool) or not isinstance(new, int) or new < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {new!r}")
        V = self.config.vocab_size
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("the prompt must be a non-empty list of token ids")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {V}), got {bad[:3]}")
        params.check_vocab(V)  # stop_token_ids, logit_bias
        length = len(prompt) + new
        if length > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({new}) = {length} "
                             f"exceeds max_context {self.max_context}")
        if ceil_div(length, self.cache.page_size) > self.cache.full.num_pages - 1:
            raise ValueError(f"the request needs {length} positions; the pool holds "
                             f"{(self.cache.full.num_pages - 1) * self.cache.page_size}")
        seed = params.seed if params.seed is not None else int(torch.randint(2 ** 62, (1,), generator=self._seeds))
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        rid = self._next_rid
        self._next_rid += 1
        seq = Sequence(rid, list(prompt), params, generator, new)
        self._sequences[rid] = seq
        self.scheduler.waiting.append(seq)
        return rid

    def abort(self, rid: int) -> None:
        """Drop a waiting or running request and free its pages. Unknown ids raise KeyError."""
        seq = self._sequences.pop(rid)
        if seq in self.scheduler.running:
            self.scheduler.drop(seq)  # freed, not kept in the prefix cache
        else:
            self.scheduler.waiting.remove(seq)

    def sequence(self, rid: int) -> Sequence:
        """A queued or running request's state (tokens, steps, pages): hold on to it to read it
        after the request finishes."""
        return self._sequences[rid]

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def stats(self) -> dict:
        """Queue and pool occupancy: what a server reports and what a leak check compares. Free
        pages include those the prefix cache would give up on demand (its size:
        `scheduler.prefix_cache.num_pages`)."""
        c = self.cache
        # The SWA pages a step launched ahead (overlap) mapped early are counted free, as they
        # still are when steps run one at a time: the numbers do not depend on overlap.
        early = self._guess.early_pages(c) if self._guess is not None else 0
        return dict(waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                    free_pages=c.full.num_free, free_swa_pages=c.swa.num_free + early,
                    requests_in_cache=len(c.requests))

    # -- the loop: schedule -> run -> postprocess --------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """One forward step over the scheduled batch; one Event per request that produced a token.

        With overlap, the step after this one may already be on the device when this returns
        (design note 32): launched before this step's tokens were read, on the guess that every
        running request decodes once more. The next call schedules as always and uses that launch
        only when its plan is exactly the guess; otherwise the launch is dropped (its K/V writes
        land in slots the real step writes again, or in pages no one reads) and the step runs
        from scratch. Either way it is the step overlap=False runs."""
        plan = self.scheduler.schedule()
        guess, self._guess = self._guess, None
        if guess is not None and guess.matches(plan):
            self.overlap_stats["committed"] += 1
            launched = guess.launched
        else:
            if guess is not None:
                self.overlap_stats["discarded"] += 1
            if not plan:
                return []
            launched = self._launch(plan)
        if self.overlap:
            self._guess = self._launch_next(launched)
        return self._postprocess(launched)

    def _launch(self, plan: list[Scheduled]) -> _Launched:
        """Queue a scheduled step on the device: its SWA pages, metadata, forward and draw. Taps,
        prompt logprobs and a given sampler read their rows here, on the host."""
        for s in plan:  # the batch's SWA pages: allocation before the (side-effect free) metadata
            self.cache.map_window(s.seq.rid, s.item.seq_len)
        batch = build_batch(self.cache, [s.item for s in plan])
        ids = to_device([t for s in plan for t in s.ids], self.device)
        logits, rows = self._run(ids, batch)
        if self.taps is not None:
            for (item, start, end), row in zip(batch.token_ranges(), rows):
                if end - 1 > start:
                    self.taps(item.rid, "logits", batch.positions[start:end - 1], logits[start:end - 1].clone())
                self.taps(item.rid, "logits", batch.positions[end - 1:end], row[None].clone())
        self._score_prompts()
        return _Launched(plan, *self._choose(plan, rows))

    def _sample_rows(self, batch: ForwardBatch) -> torch.Tensor:
        """Each request's last new token: the row its next token is sampled from."""
        return batch.cu_seqlens_q[1:].long() - 1

    def _run(self, ids: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(every row's logits [N, V], or None without taps; the selected rows [B, V]). Prompt rows
        that requests with prompt_logprobs need are left in self._prompt_rows for _score_prompts."""
        select = self._sample_rows(batch)
        spans, extra = self._prompt_spans(batch)
        self._prompt_rows = []
        if self.taps is None:
            if self._replays(batch):
                return None, self.decode_graphs.run(ids, batch)[select]
            if spans:  # the prompt rows ride along after the sampled ones
                out = self.model.forward(ids, batch, logit_rows=torch.cat([select, extra]))
                self._prompt_rows = list(zip(spans, out[len(select):].split([n for _, _, n in spans])))
                return None, out[:len(select)]
            return None, self.model.forward(ids, batch, logit_rows=select)
        # The model's own `logits` tap is dropped: postprocess reports the rows it selected.
        model_taps = _without_logits(self.taps)
        if self._replays(batch):
            logits = self.decode_graphs.run(ids, batch, taps=model_taps)
        else:
            logits = self.model.forward(ids, batch, taps=model_taps)
        if spans:
            self._prompt_rows = list(zip(spans, logits[extra].split([n for _, _, n in spans])))
        return logits, logits[select]

    def _prompt_spans(self, batch: ForwardBatch) -> tuple[list[tuple[int, int, int]], torch.Tensor | None]:
        """Prompt rows whose logits requests with prompt_logprobs need this step: [(rid, first
        position, rows)] and their packed row indices. A row at position p scores prompt token p + 1."""
        spans, idx = [], []
        for item, start, end in batch.token_ranges():
            seq = self._sequences.get(item.rid)
            if seq is None or seq.params.prompt_logprobs is None:
                continue
            n = min(end - start, len(seq.prompt) - 1 - item.prefix_len)  # the last prompt row samples
            if n > 0:
                spans.append((item.rid, item.prefix_len, n))
                idx.extend(range(start, start + n))
        return spans, (to_device(idx, self.device) if idx else None)

    def _replays(self, batch: ForwardBatch) -> bool:
        """Whether this step runs on the decode graphs' static buffers: decode-only steps that fit
        them (an injected fault's wider page table does not, and runs eagerly)."""
        return self.decode_graphs is not None and batch.is_decode and self.decode_graphs.fits(batch)

    def _postprocess(self, launched: _Launched) -> list[Event]:
        """Read a launched step's tokens (waiting for its draw alone) and apply them: finishes,
        window releases, events."""
        plan = launched.plan
        drawn = launched.drawn()
        events = []
        for i, s in enumerate(plan):
            seq, item = s.seq, s.item
            seq.steps.append((item.prefix_len, item.extend_len))
            if seq.prefilling:
                seq.done_prompt += item.extend_len
                if seq.prefilling:
                    self.cache.release_window(seq.rid, item.seq_len)
                    continue
            if seq.finish_reason is not None or seq.max_new_tokens == 0:  # the last token fed, or none wanted
                seq.fed_last = seq.finish_reason is not None
                seq.finish_reason = seq.finish_reason or "length"
                self._finish(seq)
                continue
            token, logprob, top = drawn[i]
            seq.tokens.append(token)
            reason = self._finish_reason(seq, token)
            events.append(Event(seq.rid, token, reason is not None, reason, seq.reused, logprob, top,
                                self._pop_prompt_logprobs(seq)))
            seq.finish_reason = reason
            if reason is None or self.feed_last:
                self.cache.release_window(seq.rid, item.seq_len)
            else:
                self._finish(seq)
        return events

    def _choose(self, plan, rows: torch.Tensor) -> tuple[list[int], list[int] | None, PendingDraw | None]:
        """Which plan indices produce a token this step (prompt done, not finished, tokens wanted),
        and their draw: the given sampler's tokens (host), and/or the whole batch drawn on the
        device (sampler.draw_batch: the tokens, or only the forced tokens' logprobs), with its
        copy to the host already queued."""
        which = [i for i, s in enumerate(plan)
                 if not (s.seq.prefilling and s.seq.done_prompt + s.item.extend_len < len(s.seq.prompt))
                 and s.seq.finish_reason is None and s.seq.max_new_tokens != 0]
        if not which:
            return which, None, None
        seqs = [plan[i].seq for i in which]
        forced = None if self.sampler is None else [self.sampler(seq, rows[i]) for i, seq in zip(which, seqs)]
        if forced is not None and all(seq.params.logprobs is None for seq in seqs):
            return which, forced, None
        sub = rows if len(which) == rows.shape[0] else rows[to_device(which, rows.device)]
        pending = draw_batch(sub, [seq.params for seq in seqs],
                             [seq.generator.initial_seed() if seq.generator is not None else 0 for seq in seqs],
                             [len(seq.tokens) for seq in seqs],
                             [seq.tokens if seq.params.penalized else [] for seq in seqs], forced)
        return which, forced, pending.start_copy()

    # -- overlap: the next decode step launched before this one's tokens are read ------------
    def _launch_next(self, current: _Launched) -> _Guess | None:
        """Launch the step after `current` on the guess that every running request decodes once
        more, fed `current`'s tokens on the device; None where the guess cannot be made exactly
        (design note 32: anything that needs a token on the host first, or a plan that will
        change for certain)."""
        sched = self.scheduler
        if (self.taps is not None or self.sampler is not None or self.feed_last or sched.script is not None
                or current.pending is None or len(current.which) != len(current.plan)):
            return None  # host work per token, or a request without a token this step (mid-prompt)
        row_of = {current.plan[i].seq.rid: j for j, i in enumerate(current.which)}
        if len(sched.running) != len(row_of) or any(seq.rid not in row_of for seq in sched.running):
            return None
        staying = [seq for seq in sched.running if len(seq.tokens) + 1 < seq.max_new_tokens]
        if not staying or (sched.waiting and len(staying) < len(sched.running)):
            return None  # nothing to run; or pages freed by a finish will admit a waiting request
        if any(seq.params.penalized for seq in staying) or (
                sched.token_budget is not None and len(staying) > sched.token_budget):
            return None
        # The next token of each is at position len(prompt) + len(tokens): this step's token is
        # not appended yet.
        items = [BatchItem(seq.rid, len(seq.prompt) + len(seq.tokens), 1) for seq in staying]
        early = [self._unmapped(it) for it in items]
        if sum(map(len, early)) > self.cache.swa.num_unused:
            return None  # mapping now would take pages from the prefix cache a synchronous step leaves it
        for it in items:
            self.cache.map_window(it.rid, it.seq_len)
        batch = build_batch(self.cache, items)
        rows_fed = [row_of[seq.rid] for seq in staying]
        tokens = current.pending.tokens
        ids = tokens if rows_fed == list(range(tokens.shape[0])) else tokens[to_device(rows_fed, self.device)]
        _, rows = self._run(ids, batch)
        pending = draw_batch(rows, [seq.params for seq in staying],
                             [seq.generator.initial_seed() if seq.generator is not None else 0 for seq in staying],
                             [len(seq.tokens) + 1 for seq in staying], [[] for _ in staying]).start_copy()
        plan = [Scheduled(seq, it, []) for seq, it in zip(staying, items)]
        self.overlap_stats["launched"] += 1
        return _Guess(_Launched(plan, list(range(len(plan))), None, pending), current, rows_fed,
                      [(it.rid, page) for it, pages in zip(items, early) for page in pages])

    def _unmapped(self, item: BatchItem) -> list[int]:
        """The full-pool pages of item's request that map_window would give SWA pages now."""
        req, ps = self.cache.requests[item.rid], self.cache.page_size
        return [page for page in req.pages[req.swa_released: ceil_div(item.seq_len, ps)]
                if not self.cache.swa_page(page)]

    def _score_prompts(self) -> None:
        """Logprobs of the prompt tokens the rows _run kept score, added to each request's list."""
        spans, self._prompt_rows = self._prompt_rows, []
        if not spans:
            return
        targets = torch.tensor([t for (rid, lo, n), _ in spans for t in self._sequences[rid].prompt[lo + 1:lo + 1 + n]],
                               dtype=torch.long, device=self.device)
        n_top = max(self._sequences[rid].params.prompt_logprobs for (rid, _, _), _ in spans)
        scored = iter(token_logprobs(torch.cat([r for _, r in spans]), targets, n_top))
        for (rid, lo, n), _ in spans:
            k = self._sequences[rid].params.prompt_logprobs
            got = self._prompt_lps.setdefault(rid, [])
            got.extend([(None, None)] * (lo + 1 - len(got)))  # the first token; a reused prefix
            got.extend((lp, top[:k]) for lp, top in (next(scored) for _ in range(n)))

    def _pop_prompt_logprobs(self, seq: Sequence) -> tuple | None:
        """A request's prompt logprobs, handed out with its first token (None without them)."""
        if seq.params.prompt_logprobs is None or len(seq.tokens) != 1:
            return None
        got = self._prompt_lps.pop(seq.rid, [])
        if len(self._prompt_lps) > len(self._sequences):  # aborted requests' leftovers
            self._prompt_lps = {r: v for r, v in self._prompt_lps.items() if r in self._sequences}
        return tuple(got + [(None, None)] * (len(seq.prompt) - len(got)))

    def _finish(self, seq: Sequence) -> None:
        if self.taps is not None:
            self.pool_taps(seq)
        self.scheduler.finish(seq)
        del self._sequences[seq.rid]

    def _emit_pool_taps(self, seq: Sequence) -> None:
        emit_pool_taps(self.cache, self.config, seq.rid, len(seq.written), self.taps)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_set or (not p.ignore_eos and token in self.config.eos_token_id):
            return "stop"
        if len(seq.tokens) >= seq.max_new_tokens:
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
        while any(rid in self._sequences for rid in rids):  # fed-last requests: one more step each
            self.step()
        return [outputs[rid] for rid in rids]


@dataclass
class _Launched:
    """A step queued on the device: its plan, which plan indices produce a token, and their draw
    (a given sampler's tokens on the host, and/or the device draw, its copy to the host queued)."""
    plan: list[Scheduled]
    which: list[int]
    forced: list[int] | None
    pending: PendingDraw | None

    def drawn(self) -> dict[int, tuple[int, float | None, tuple | None]]:
        """Plan index -> (token, logprob, top logprobs); waits for the draw (this step's alone)."""
        if self.pending is None:
            return {i: (t, None, None) for i, t in zip(self.which, self.forced or [])}
        d = self.pending.result()
        return {i: v for i, v in zip(self.which, zip(d.tokens, d.logprobs, d.top_logprobs))}


@dataclass
class _Guess:
    """The step after `current`, launched before current's tokens were read (design note 32):
    every running request once more, fed current's tokens (rows `rows_fed` of its draw) on the
    device. `early` lists the (request, full page) whose SWA page it mapped ahead of time."""
    launched: _Launched
    current: _Launched
    rows_fed: list[int]
    early: list[tuple[int, int]]

    def matches(self, plan: list[Scheduled]) -> bool:
        """Whether the scheduler's real plan is the guess: the same requests in the same order at
        the same positions. Then the tokens it fed must be the ones the host now feeds."""
        guessed = self.launched.plan
        if len(plan) != len(guessed) or any(s.seq is not g.seq or s.item != g.item for s, g in zip(plan, guessed)):
            return False
        tokens = self.current.pending.result().tokens
        fed = [tokens[j] for j in self.rows_fed]
        if fed != [t for s in plan for t in s.ids]:
            raise RuntimeError(f"overlap: the step launched ahead fed tokens {fed}, the plan feeds "
                               f"{[t for s in plan for t in s.ids]}")
        self.launched.plan = plan
        return True

    def early_pages(self, cache: KVCache) -> int:
        """SWA pages mapped ahead that a synchronous engine would not have mapped yet: those of
        requests still registered (a finished or aborted request's went back with it)."""
        return sum(1 for rid, page in self.early if rid in cache.requests and cache.swa_page(page))


def emit_pool_taps(cache: KVCache, config: Gemma4Config, rid, length: int, taps: TapSink) -> None:
    """`layers.{l}.k_cache/.v_cache` of request `rid`: pool contents read back through its page
    tables, every position on full layers, the last W on sliding layers (the ones a next query
    would need, plus the one it drops)."""
    row = cache.requests[rid].row
    ps = cache.page_size
    for spec in config.layers:
        if spec.kv_shared:
            continue
        lo = 0 if spec.window is None else max(0, length - spec.window)
        pos = torch.arange(lo, length, device=cache.device)
        slots = cache.req_to_token[row, pos].long()
        if spec.is_sliding:
            slots = cache.full_to_swa_page[slots // ps].long() * ps + slots % ps
        k, v = cache.buffers(spec)
        taps(rid, f"layers.{spec.index}.k_cache", pos, k[slots].clone())
        taps(rid, f"layers.{spec.index}.v_cache", pos, v[slots].clone())


def _without_logits(taps: TapSink) -> TapSink:
    def sink(rid, name, positions, tensor):
        if name != "logits":
            taps(rid, name, positions, tensor)

    return sink
