"""The engine: continuous batching under a token budget, sampling, stopping, queueing and aborts.

Greedy output is checked against the eager reference's own greedy loop on the same weights, so
a scheduling bug (a chunk fed twice, a decode at the wrong position, a window released early)
shows as a different token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from optimized.engine import Engine, SamplingParams, sample
from optimized.kernels import default_device

from tests.engine_helpers import engine as _engine, model as _model, prompts as _prompts, reference_greedy

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("preset", ["tiny", "tiny-kv-eq-v", "tiny-moe"])
def test_greedy_matches_reference(preset):
    prompts = _prompts([9, 3, 17])
    outs = _engine(preset, fused=True, attention="triton", chunk_size=4, page_size=2).generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.tokens == reference_greedy(preset, p, 4)
        assert o.finish_reason == "length"


@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3), chunk=st.integers(1, 8),
       budget=st.one_of(st.none(), st.integers(1, 10)), page=st.sampled_from([1, 2, 4, 16]),
       max_requests=st.integers(1, 3), shared=st.integers(0, 9), seed=st.integers(0, 100))
def test_any_schedule_gives_the_reference_tokens(lengths, chunk, budget, page, max_requests, shared, seed):
    """Whatever the chunking, token budget, page size, number of request rows (few rows make
    requests queue) and shared prompt opening (prefix reuse where the window allows), every
    request gets the reference's greedy tokens and every page comes back."""
    engine = _engine(chunk_size=chunk, token_budget=budget, page_size=page, max_requests=max_requests,
                     max_context=32)
    free = engine.cache.full.num_free, engine.cache.swa.num_free
    opening = _prompts([shared], seed + 1)[0] if shared else []
    prompts = [opening + p for p in _prompts(lengths, seed)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.tokens == reference_greedy("tiny", p, 2)
    assert (engine.cache.full.num_free, engine.cache.swa.num_free) == free
    assert not engine.has_work()


def test_token_budget_bounds_every_step():
    engine = _engine(chunk_size=8, token_budget=5)
    for p in _prompts([12, 7, 9]):
        engine.add_request(p, GREEDY)
    while engine.has_work():
        plan_sizes = []
        original = engine.scheduler.schedule

        def spy():
            plan = original()
            plan_sizes.append(sum(s.item.extend_len for s in plan))
            return plan
        engine.scheduler.schedule = spy
        engine.step()
        engine.scheduler.schedule = original
        assert 1 <= plan_sizes[0] <= 5


def test_pool_smaller_than_the_queue_serves_everyone_in_order():
    # 2 requests of 8 positions at page_size 4 need 4 pages; the pool has 5 (page 0 reserved)
    engine = _engine(page_size=4, num_pages=5, max_context=8)
    prompts = _prompts([5, 5, 5, 5])
    first_token_step = {}
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=3, ignore_eos=True)) for p in prompts]
    step = 0
    while engine.has_work():
        for e in engine.step():
            first_token_step.setdefault(e.rid, step)
        step += 1
    assert [first_token_step[r] for r in rids] == sorted(first_token_step[r] for r in rids)
    assert first_token_step[rids[2]] > first_token_step[rids[1]]  # had to wait for pages
    assert engine.cache.full.num_free == 4


def test_stop_tokens_and_eos_end_a_request():
    prompt = _prompts([6])[0]
    first = reference_greedy("tiny", prompt, 1)[0]
    engine = _engine()
    out = engine.generate([prompt], SamplingParams(max_new_tokens=5, stop_token_ids=(first,)))[0]
    assert (out.tokens, out.finish_reason) == ([first], "stop")
    # the model's own eos ids stop it unless ignore_eos
    cfg = _model("tiny")[0]
    eos_engine = Engine(dataclasses.replace(cfg, eos_token_id=(first,)), weights=_model("tiny")[1],
                        device=default_device())
    assert eos_engine.generate([prompt], SamplingParams(max_new_tokens=5))[0].tokens == [first]
    assert len(eos_engine.generate([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].tokens) == 5


def test_seeded_sampling_does_not_depend_on_the_batch():
    prompt = _prompts([7])[0]
    params = SamplingParams(max_new_tokens=6, temperature=1.5, seed=1234, ignore_eos=True)
    alone = _engine().generate([prompt], params)[0].tokens
    others = _prompts([3, 11, 5], seed=9)
    crowd = _engine(chunk_size=3, token_budget=6).generate(
        others[:1] + [prompt] + others[1:],
        [SamplingParams(max_new_tokens=4, temperature=1.0, seed=7), params] + [GREEDY] * 2)
    assert crowd[1].tokens == alone
    different = _engine().generate([prompt], SamplingParams(max_new_tokens=6, temperature=1.5, seed=99,
                                                            ignore_eos=True))[0].tokens
    assert different != alone  # 6 draws at temperature 1.5 over 256 ids: equal by chance ~never


def test_top_k_1_and_tiny_top_p_are_greedy():
    prompt = _prompts([5])[0]
    want = reference_greedy("tiny", prompt, 4)
    for params in (SamplingParams(max_new_tokens=4, temperature=2.0, top_k=1, ignore_eos=True, seed=3),
                   SamplingParams(max_new_tokens=4, temperature=0.7, top_p=1e-6, ignore_eos=True, seed=3)):
        assert _engine().generate([prompt], params)[0].tokens == want


def test_sample_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = lambda p: [sample(logits, p, g) for _ in range(400)]  # noqa: E731
    assert set(draws(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    # top_p 0.7: {0.5, 0.3} reaches it; 0.15 and 0.05 never drawn
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0))), minlength=4) / 400
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.08)


def test_abort_frees_everything():
    engine = _engine(chunk_size=2)
    free = engine.cache.full.num_free
    a = engine.add_request(_prompts([9])[0], GREEDY)
    b = engine.add_request(_prompts([4])[0], GREEDY)
    engine.step()  # both admitted, part-way through their prompts
    engine.abort(a)
    engine.abort(b)
    assert engine.cache.full.num_free == free and not engine.has_work()
    with pytest.raises(KeyError):
        engine.abort(a)
    c = engine.add_request(_prompts([3])[0], GREEDY)  # still serves after aborts
    engine.abort(c)  # a waiting request
    assert not engine.has_work()


@pytest.mark.parametrize("kw, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"), (dict(stop_token_ids=[1, "x"]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"), (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_bad_sampling_params_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_from_dict_rejects_unknown_fields():
    assert SamplingParams.from_dict({"temperature": 0.5}).temperature == 0.5
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


@pytest.mark.parametrize("prompt, params, message", [
    ([], None, "non-empty"), ([1, 256], None, r"\[0, 256\)"), ([1, -1], None, "integers"),
    ([1, True], None, "integers"), ([1] * 30, SamplingParams(max_new_tokens=3), "max_context"),
    ([1], SamplingParams(stop_token_ids=(300,)), "stop_token_ids"),
])
def test_bad_requests_are_refused_and_change_nothing(prompt, params, message):
    engine = _engine(max_context=32)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_work()


def test_a_request_larger_than_the_pool_is_refused():
    engine = _engine(page_size=4, num_pages=3, max_context=64)
    with pytest.raises(ValueError, match="pool holds 8"):
        engine.add_request([1] * 6, SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("kw", [dict(page_size=0), dict(chunk_size=True), dict(num_pages=1),
                                dict(token_budget=0), dict(max_requests=0), dict(attention="flash")])
def test_bad_engine_settings_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        _engine(**kw)


def test_eager_attention_gives_the_kernels_tokens():
    """attention="eager" (the attention kernels' torch twins; with fused=False no Triton runs, how the
    server's tests run on a CPU) serves the same greedy tokens as the kernels, through prefill chunks,
    decode past tiny's window of 5, and prefix reuse."""
    prompts = _prompts([9, 3, 12])
    prompts.append(prompts[0][:6] + [7, 8])
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    kernels = _engine(chunk_size=4, page_size=2, attention="triton").generate(prompts, params)
    eager = _engine(chunk_size=4, page_size=2, attention="eager").generate(prompts, params)
    assert [o.tokens for o in eager] == [o.tokens for o in kernels]
    assert [o.tokens for o in eager] == [reference_greedy("tiny", p, 5) for p in prompts]


def test_padded_static_decode_gives_the_reference_tokens():
    """The decode-graph path's static buffers and padding, run eagerly (a CPU cannot capture
    graphs): batches of 1-5 requests padded to the captured sizes 1, 2, 4, 5."""
    from optimized.engine.graphs import DecodeGraphs, batch_sizes

    assert batch_sizes(5) == [1, 2, 4, 5] and batch_sizes(1) == [1] and batch_sizes(8) == [1, 2, 4, 8]
    engine = _engine(max_requests=5, page_size=2, max_context=24, chunk_size=4, attention="triton")
    engine.decode_graphs = DecodeGraphs(engine.model, 5, 12, capture=False)
    prompts = _prompts([3, 7, 1, 5, 2])
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 2, 5, 3, 4)])
    for p, o in zip(prompts, outs):
        assert o.tokens == reference_greedy("tiny", p, len(o.tokens))


def test_eager_attention_is_never_captured(monkeypatch):
    """Its twins read lengths on the host, so a capture would fail (and a failed capture can cost
    a device reset): on a device that captures, graphs stay off, or graphs=True is refused."""
    import optimized.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "graphs_supported", lambda device: True)  # as on a GPU
    assert _engine(attention="eager").graphs_off_because == "eager attention syncs with the host"
    with pytest.raises(ValueError, match="attention='triton' captures"):
        _engine(attention="eager", graphs=True)
    assert _engine(attention="eager", graphs="static").decode_graphs.capture is False  # nothing captured


def test_graphs_need_a_capable_device():  # about the CPU: it cannot capture
    with pytest.raises(ValueError, match="graphs"):
        _engine(graphs=True, device="cpu")
    assert _engine(device="cpu").decode_graphs is None  # auto: off on the CPU
    assert _engine(graphs="static", device="cpu").decode_graphs.capture is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a device that captures graphs; CPU cannot")
def test_a_failed_capture_leaves_the_device_usable(device):
    """An H200 regression: the torch-ops MoE step syncs with the host, so capturing it fails and
    the engine falls back to eager decode. That failure once left the thread on a stream still in
    capture, and every later random op on the worker failed."""
    from optimized.kernels import capture_graph

    x = torch.randn(4, device=device)
    with pytest.raises(RuntimeError):
        capture_graph(device, lambda: (x * 2).sum().item())  # .item() syncs: not capturable
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(4, device=device)  # raised "Offset increment outside graph capture" before the fix
    engine = _engine("tiny-moe", fused=False)  # not even tried: the torch ops' MoE loop syncs
    assert engine.decode_graphs is None and "syncs with the host" in engine.graphs_off_because
    graph, out = capture_graph(device, lambda: x * 2)  # and a good capture still works after
    x.add_(1)
    graph.replay()
    assert torch.equal(out, x * 2)


def test_a_shared_prompt_prefix_is_reused_and_gives_the_reference_tokens():
    """Requests that arrive while another with the same opening runs reuse its K/V pages: whole
    written pages, and only while the sliding keys their first query needs are resident (tiny's
    window is 4). Their tokens are still the reference's, and every page comes back."""
    engine = _engine(page_size=4, chunk_size=4, max_context=40)
    free = engine.cache.full.num_free
    system = _prompts([13], seed=5)[0]
    prompts = [system + [7, 8, 9], system + [10, 11], system[:6] + [3]]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    first = engine.add_request(prompts[0], params)
    engine.step()
    engine.step()  # the first request has written 8 prompt tokens; its page 0 has left the window
    rest = [engine.add_request(p, params) for p in prompts[1:]]
    got = {}
    while engine.has_work():
        for e in engine.step():
            got.setdefault(e.rid, []).append(e)
    assert got[rest[0]][-1].reused_tokens == 8  # keys from position 5 on: pages 1-2, resident
    assert got[rest[1]][-1].reused_tokens == 0  # 4 tokens would need position 1, on evicted page 0
    for rid, p in zip([first] + rest, prompts):
        assert [e.token for e in got[rid]] == reference_greedy("tiny", p, 3)
    assert engine.cache.full.num_free == free


def test_no_reuse_once_the_window_has_moved_on():
    """tiny's sliding window is 4: after a long prompt and decode, the donor's early SWA pages
    are gone, so a request sharing only its opening recomputes it (and is still right)."""
    engine = _engine(page_size=2, chunk_size=32, max_context=40)
    donor_prompt = _prompts([20], seed=3)[0]
    engine.add_request(donor_prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.step()
    engine.step()
    late = donor_prompt[:8] + [5]
    rid = engine.add_request(late, SamplingParams(max_new_tokens=2, ignore_eos=True))
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if e.rid == rid]
    assert events[-1].reused_tokens == 0
    assert [e.token for e in events] == reference_greedy("tiny", late, 2)


def test_prefix_sharing_can_be_turned_off():
    engine = _engine(page_size=4, share_prefixes=False)
    p = _prompts([9], seed=1)[0]
    outs = engine.generate([p, p + [4]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert [o.reused_tokens for o in outs] == [0, 0]


# -- the engine under the oracle ---------------------------------------------------------------


def _oracle_scenario(device, n=3, **engine):
    """Requests decoding side by side; the third has explicit chunks."""
    from oracle.scenario import from_dict

    return from_dict({
        "name": "engine-under-oracle", "model": {"source": "tiny", "device": str(device)},
        "engine": {"page_size": 2, "chunk_size": 4, "page_order_seed": 1, **engine},
        "requests": [{"id": "a", "length": 6, "seed": 1, "new_tokens": 2},
                     {"id": "b", "length": 3, "seed": 2, "new_tokens": 2},
                     {"id": "c", "length": 4, "seed": 3, "new_tokens": 1, "chunks": [1, 3]}][:n]})


def test_a_wrong_sampling_row_is_caught_at_the_logits_tap(monkeypatch, device):
    """Teacher forcing decides the tokens, so a wrong row would leave them right; the `logits` tap
    is the row the sampler was handed, so the oracle still names it."""
    from oracle.run import run_scenario

    def previous_requests_row(self, batch):  # request i gets request i-1's last row
        return torch.roll(batch.cu_seqlens_q[1:].long() - 1, 1)

    monkeypatch.setattr(Engine, "_sample_rows", previous_requests_row)
    run = run_scenario(_oracle_scenario(device, n=2))
    assert not run.passed
    assert run.comparison.first_divergence.tap == "logits"


def test_the_oracle_judges_continuous_batching_and_the_static_decode_path(device):
    """A token budget lets the scheduler cut the unscripted prompts (steps mix prefill chunks and
    decodes); decode steps run the decode graphs' padded static batch (captured graphs replay it
    on a GPU, each replay checked bitwise against it). Everything holds parity."""
    from oracle.run import run_scenario

    run = run_scenario(_oracle_scenario(device, token_budget=3, max_requests=2), decode_graphs="static")
    assert run.passed, run.comparison.summary()
    assert run.layout["decode"] == "static"
    chunks = {r["id"]: r["chunks"] for r in run.layout["requests"]}
    assert chunks["c"][:2] == [[0, 1], [1, 3]]  # explicit splits still hold under a budget
    assert all(n <= 3 for steps in chunks.values() for _, n in steps)
    assert chunks["a"][:2] == [[0, 3], [3, 3]]  # the budget cut a's prompt


def test_a_replayed_graph_that_disagrees_with_its_eager_twin_is_an_error(device):
    """Stand a stale graph in for a captured one (a CPU cannot capture): with taps on, the replay
    is checked against the same static step run eagerly, and a difference raises."""
    from optimized.engine.graphs import DecodeGraphs, GraphMismatch

    taps = []
    engine = _engine(max_requests=2, page_size=2, max_context=12, taps=lambda *a: taps.append(a[1]))
    graphs = engine.decode_graphs = DecodeGraphs(engine.model, 2, 6, capture=False)

    class StaleGraph:
        def __init__(self, size):
            self.size, self.out = size, None

        def replay(self):
            self.out.copy_(graphs.forward(self.size) + 1e-3)

    for size in graphs.sizes:
        g = StaleGraph(size)
        g.out = graphs.forward(size).clone()
        graphs._graphs[size] = (g, g.out)
    graphs.capture = True
    engine.add_request(_prompts([3])[0], GREEDY)
    with pytest.raises(GraphMismatch, match="disagree"):
        while engine.has_work():
            engine.step()
    assert "logits" in taps


# -- warm-up (optimized/engine/warmup.py, design note 34) --------------------------------------

def _state(engine) -> dict:
    """Everything a warm-up must leave as it was: pools (K/V contents), tables, free lists in
    order, references, rows, stats and the prefix cache."""
    c = engine.cache
    tree = engine.scheduler.prefix_cache
    return dict(
        kv=[t.clone() for t in [*c._k.values(), *c._v.values()]], req_to_token=c.req_to_token.clone(),
        full_to_swa=c.full_to_swa_page.clone(), swa_of=list(c._swa_of), rows=list(c._free_rows),
        alloc=[(list(a._free), list(a._refs), list(a._held)) for a in (c.full, c.swa)], stats=engine.stats(),
        tree=sorted((tuple(n.tokens), tuple(n.pages), tuple(n.swa)) for n in tree.nodes()) if tree else None)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif k == "kv":
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k])), "a K/V pool changed"
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("graphs", ["static", False])  # False: eager decode steps are warmed too
def test_warm_up_leaves_the_engine_as_it_was_and_changes_no_token(graphs):
    """Forced on here (on the CPU kernels do not compile, so it is off by default): an engine that
    warmed up has the pools, tables, free lists, stats and prefix cache of one that did not, and
    generates the same tokens (greedy and seeded, a shared prefix reused) with the same end state."""
    from optimized.engine import warmup

    kw = dict(max_requests=3, chunk_size=4, token_budget=6, page_size=4, max_context=24, graphs=graphs)
    warm, cold = _engine(warm_up=True, **kw), _engine(warm_up=False, **kw)
    steps = warmup.plan(max_requests=3, chunk_size=4, token_budget=6, max_context=24, page_size=4,
                        eager_decode=graphs is False)
    assert warm.warm_up_stats["steps"] == len(steps) and cold.warm_up_stats is None
    assert any(s == [(4, 2), (5, 1), (5, 1)] for s, _ in steps)  # a mixed step of 3 after a prefix
    _assert_same(_state(warm), _state(cold))
    system = _prompts([9], seed=3)[0]
    prompts = [system + [5, 6], system + [7], _prompts([4], seed=4)[0]]
    params = [GREEDY, SamplingParams(max_new_tokens=5, temperature=0.8, top_k=20, seed=7, ignore_eos=True), GREEDY]
    outs = [e.generate(prompts[:2], params[:2]) + e.generate(prompts, params) for e in (warm, cold)]
    assert [(o.tokens, o.reused_tokens) for o in outs[0]] == [(o.tokens, o.reused_tokens) for o in outs[1]]
    assert any(o.reused_tokens for o in outs[0])
    _assert_same(_state(warm), _state(cold))


def _class(n: int) -> tuple:
    """What Triton and the launch code can distinguish about a count n: its power-of-two bucket
    (every kernel's saturates by MAX_TOKENS), n == 1, and its 2-adic valuation up to 4 (which
    decides whether n * k is divisible by 16, for any head or expert count k)."""
    import triton

    from optimized.engine.warmup import MAX_TOKENS

    return min(triton.next_power_of_2(n), MAX_TOKENS), n == 1, min((n & -n).bit_length() - 1, 4)


@pytest.mark.parametrize("max_requests, chunk, budget, context", [
    (16, 512, None, 4096), (64, 512, 576, 336), (5, 8, 20, 64), (1, 3, None, 16), (48, 2048, 4000, 4096)])
def test_warm_up_plan_covers_every_reachable_step(max_requests, chunk, budget, context):
    """Every token count, sampled-row count and extend batch size a step of this engine can have
    falls in a class (bucket, == 1, % 16, parity; attention's BLOCK_B) that a warm-up step has."""
    from optimized.engine import warmup
    from optimized.kernels.attention import extend_block_b

    steps = warmup.plan(max_requests=max_requests, chunk_size=chunk, token_budget=budget, max_context=context,
                        page_size=16, eager_decode=False)
    most = min(budget or max_requests * min(chunk, context), max_requests * min(chunk, context))
    extend = [s for s, _ in steps if any(e > 1 for _, e in s)]
    assert all(p + e <= context for s, _ in steps for p, e in s) and all(len(s) <= max_requests for s, _ in steps)
    assert all(sum(e for _, e in s) <= most and max(e for _, e in s) <= chunk for s in extend)
    tokens = {_class(sum(e for _, e in s)) for s in extend}
    rows = {_class(sum(e for _, e in s) if every else len(s)) for s, every in steps}
    blocks = {extend_block_b(len(s)) for s in extend}
    for n in range(2, most + 1):  # an extend step of n tokens, with n rows of logits or fewer
        assert _class(n) in tokens and _class(n) in rows, n
    for b in range(1, max_requests + 1):
        if b + 1 <= most:  # a step of b requests, one of them extending
            assert _class(b) in rows and extend_block_b(b) in blocks, b
    assert len(steps) <= 5 * 11 + 5 * 7 + 2


def test_warm_up_is_off_where_kernels_do_not_compile():
    assert _engine(device="cpu").warm_up_stats is None  # the interpreter compiles nothing
    with pytest.raises(ValueError, match="warm_up"):
        _engine(warm_up="yes")


def _compiled_variants() -> int:
    """Compiled specializations held by every Triton kernel of optimized.kernels."""
    import importlib

    from triton.runtime.jit import JITFunction

    total = 0
    for name in ("attention", "norms", "rope", "activation", "moe", "common"):
        for fn in vars(importlib.import_module(f"optimized.kernels.{name}")).values():
            if isinstance(fn, JITFunction):
                total += sum(len(next(c for c in caches if isinstance(c, dict))) for caches in fn.device_caches.values())
    return total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernels compile only on a GPU (the CPU interprets them)")
def test_no_step_compiles_after_the_warm_up(device):
    """Serving after construction never stops for a Triton compile: arrivals of many prompt
    lengths mixed with decoding requests, batch sizes 1 to max_requests, a shared prefix, prompt
    logprobs; the number of compiled kernel variants is the one the engine was built with."""
    engine = _engine(fused=True, device=device, max_requests=8, chunk_size=16, token_budget=40, page_size=4,
                     max_context=96)
    assert engine.warm_up_stats is not None
    built = _compiled_variants()
    assert built > 0
    g = torch.Generator().manual_seed(0)
    system = _prompts([13], seed=9)[0]
    for i in range(40):
        if i % 3 == 0 and len(engine.scheduler.waiting) < 4:
            n = int(torch.randint(1, 50, (1,), generator=g))
            prompt = (system if i % 2 else []) + _prompts([n], seed=i)[0]
            engine.add_request(prompt, SamplingParams(max_new_tokens=int(torch.randint(1, 12, (1,), generator=g)),
                                                      ignore_eos=True, prompt_logprobs=2 if i == 9 else None))
        engine.step()
    while engine.has_work():
        engine.step()
    assert _compiled_variants() == built
