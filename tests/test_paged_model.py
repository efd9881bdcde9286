"""The optimized path against the reference, under many page layouts, chunkings and batches.

Bound (fp32 on CPU): logits within 5e-5 of the largest logit and every tap within 1e-4 relative
L2 of the reference. Both compute the same ops in fp32; they differ only in the order of the
attention sums (online softmax over key blocks vs one dense softmax), each layer adding roughly sqrt(keys) * 2^-24
~ 1e-6 relative error, which compounds over the ten layers of the tiny models to a measured worst
of ~2e-5 (on small-norm taps late in the stack). A real bug is far above the bound: one head
scaled by 1.01 shows as ~5e-3 at its tap, a wrong key or position as ~1e-1.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import reference
from optimized.kernels import default_device
from optimized.runner import Runner

# The machine's device: on a GPU the kernels run compiled (the reference stays on the CPU).
DEVICE = default_device()

LOGIT_RTOL = 5e-5  # of max|logit|: random init puts logits at std ~6 (reference/weights.py)
TAP_RTOL = 1e-4


class TapCollector:
    """A tap sink that reassembles pieces by (request, position)."""

    def __init__(self):
        self.rows: dict[tuple, dict[int, torch.Tensor]] = {}

    def __call__(self, rid, name, positions, tensor):
        slot = self.rows.setdefault((rid, name), {})
        for p, row in zip(positions.tolist(), tensor):
            assert p not in slot, f"{name}: position {p} of request {rid} reported twice"
            slot[p] = row.cpu()

    def get(self, rid, name):
        slot = self.rows[(rid, name)]
        pos = sorted(slot)
        return torch.tensor(pos), torch.stack([slot[p] for p in pos])


def _prompts(cfg, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_parity(preset, lengths, new=3, seed=0, taps=True, **runner_kw):
    """Run the optimized path, then check every request's logits and taps against the reference
    on prompt + generated tokens (greedy decode must also agree)."""
    run_kw = {k: runner_kw.pop(k) for k in ("chunk_splits", "arrivals", "share_prefix_with", "prompts")
              if k in runner_kw}
    cfg, w = reference.resolve(preset, dtype=torch.float32, seed=seed)
    ref = reference.Gemma4Reference(cfg, w)
    runner = Runner(cfg, weights=w, dtype=torch.float32, device=DEVICE, **runner_kw)
    prompts = run_kw.pop("prompts", None) or _prompts(cfg, lengths, seed)
    sink = TapCollector() if taps else None
    results = runner.run(prompts, max_new_tokens=new, return_logits=True, taps=sink, **run_kw)
    for i, (prompt, res) in enumerate(zip(prompts, results)):
        seq = prompt + res.tokens
        ref_taps = {}
        ref_logits = ref(torch.tensor(seq), taps=ref_taps)
        assert res.logits.shape == ref_logits.shape
        err = ((res.logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert err < LOGIT_RTOL, f"request {i}: logits differ by {err:.3g} of the largest"
        greedy = ref_logits[len(prompt) - 1:-1].argmax(-1).tolist()
        assert res.tokens == greedy, f"request {i}: greedy tokens {res.tokens} vs reference {greedy}"
        if sink is None:
            continue
        names = {n for (rid, n) in sink.rows if rid == i}
        assert {n for n in ref_taps} <= names
        for name in sorted(names):
            pos, got = sink.get(i, name)
            base = name.replace("_cache", "")
            want = ref_taps[base][pos]
            assert got.shape == want.shape, f"{name}: {list(got.shape)} vs {list(want.shape)}"
            rel = _rel(got, want)
            assert rel < TAP_RTOL, f"request {i} tap {name}: relative error {rel:.3g}"
            if name.endswith("_cache"):
                spec = cfg.layers[int(name.split(".")[1])]
                expect_lo = 0 if spec.window is None else max(0, len(seq) - spec.window)
                assert pos.tolist() == list(range(expect_lo, len(seq))), f"{name}: resident positions"
            elif res.prefix_reused == 0:
                assert pos.tolist() == list(range(len(seq))), f"{name}: positions"
    return runner, results


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-ops"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-kv-eq-v", "tiny-moe"])
def test_one_shot_prefill_and_decode(preset, fused):
    check_parity(preset, [11], new=3, page_size=16, chunk_size=64, fused=fused)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_chunked_prefill_shuffled_pages(preset):
    check_parity(preset, [13, 6], new=2, page_size=4, chunk_size=3, page_order_seed=7)


def test_token_granular_pages_and_one_token_chunks():
    check_parity("tiny-kv-eq-v", [9], new=2, page_size=1, chunk_size=1, page_order_seed=1, taps=False)


def test_explicit_non_page_aligned_chunk_splits():
    check_parity("tiny", [14, 5], new=1, page_size=4, page_order_seed=2,
                 chunk_splits=[[1, 6, 2, 5], [5]])


def test_decode_well_past_the_window():
    # tiny's window is 5: 20 decode steps evict many sliding pages; pages of 2 split windows unevenly.
    runner, _ = check_parity("tiny", [4], new=20, page_size=2, chunk_size=4, page_order_seed=3)
    cache = runner.cache
    assert cache.full.num_free == cache.full.num_pages - 1  # everything returned at the end
    assert cache.swa.num_free == cache.swa.num_pages - 1


def test_mixed_extend_and_decode_batches():
    # The second request arrives while the first decodes: batches hold both kinds of work.
    check_parity("tiny", [7, 10], new=5, page_size=4, chunk_size=4, arrivals=[0, 3], page_order_seed=4)


def test_prefix_reused_from_the_pool():
    cfg = reference.PRESETS["tiny"]
    base = _prompts(cfg, [12], seed=5)[0]
    prompts = [base, base[:8] + _prompts(cfg, [5], seed=6)[0]]
    runner, results = check_parity("tiny", None, new=2, page_size=4, chunk_size=8, prompts=prompts,
                                   arrivals=[0, 1], share_prefix_with=[None, 0], taps=False)
    assert results[1].prefix_reused == 8


@pytest.mark.slow  # 30 s on 2 cores; test_engine and test_prefix_cache cover the rule quicker
def test_prefix_not_reused_once_its_window_left_the_pool():
    # The donor decodes far past the shared prefix: its sliding pages for that prefix are gone, so
    # reusing it would read evicted keys. The runner must recompute instead.
    cfg = reference.PRESETS["tiny"]
    base = _prompts(cfg, [8], seed=8)[0]
    prompts = [base, base + [1, 2, 3]]
    _, results = check_parity("tiny", None, new=12, page_size=2, chunk_size=8, prompts=prompts,
                              arrivals=[0, 10], share_prefix_with=[None, 0], taps=False)
    assert results[1].prefix_reused == 0


def test_out_of_pages_queues_requests():
    # A pool that fits one request at a time: the others wait and still come out right.
    check_parity("tiny-moe", [6, 5, 7], new=2, page_size=4, chunk_size=4, num_pages=4, taps=False)


def test_same_inputs_same_outputs():
    cfg, w = reference.resolve("tiny", seed=9)
    prompts = _prompts(cfg, [9, 4], seed=9)
    runs = [Runner(cfg, weights=w, device=DEVICE, page_size=4, chunk_size=3, page_order_seed=1)
            .run(prompts, max_new_tokens=3, return_logits=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert a.tokens == b.tokens and torch.equal(a.logits, b.logits)


def test_teacher_forcing_overrides_greedy():
    cfg, w = reference.resolve("tiny", seed=10)
    prompt = _prompts(cfg, [6], seed=10)[0]
    teacher = [[5, 6, 7]]
    res = Runner(cfg, weights=w, device=DEVICE, page_size=4).run([prompt], max_new_tokens=3, teacher_tokens=teacher,
                                                                 return_logits=True)[0]
    assert res.tokens == [5, 6, 7]
    ref = reference.Gemma4Reference(cfg, w)(torch.tensor(prompt + [5, 6, 7]))
    assert (res.logits - ref).abs().max() < LOGIT_RTOL * ref.abs().max()


@pytest.mark.parametrize("kwargs, args, match", [
    ({"page_size": 0}, None, "page_size"),
    ({"chunk_size": 0}, None, "chunk_size"),
    ({"num_pages": 1}, None, "num_pages"),
    ({}, dict(prompts=[[]]), "prompt 0 is empty"),
    ({}, dict(prompts=[[1, 256]]), r"token ids must be ints in \[0, 256\)"),
    ({}, dict(prompts=[[1, -1]]), "token ids"),
    ({"page_size": 4, "num_pages": 3}, dict(prompts=[[1] * 9]), "pool can ever hold 8"),
    ({}, dict(prompts=[[1, 2]], chunk_splits=[[1, 2]]), "chunk_splits"),
    ({}, dict(prompts=[[1, 2]], max_new_tokens=2, teacher_tokens=[[3]]), "teacher_tokens"),
    ({}, dict(prompts=[[1, 2]], max_new_tokens=-1), "max_new_tokens"),
    ({}, dict(prompts=[[1, 2], [3]], share_prefix_with=[1, None]), "share_prefix_with"),
])
def test_bad_arguments_fail_before_any_work(kwargs, args, match):
    cfg, w = reference.resolve("tiny", seed=0)
    with pytest.raises(ValueError, match=match):
        runner = Runner(cfg, weights=w, device=DEVICE, **kwargs)
        runner.run(**args)


@pytest.mark.parametrize("preset", ["tiny", "tiny-kv-eq-v"])
def test_shared_projection_storage_stacks_without_a_copy(preset):
    """The oracle's memory rule at 31B: the reference's q/k/v and gate/up are views of the paged
    model's stacks, and fuse_projections on them copies nothing."""
    from optimized.model import fuse_projections, share_projection_storage

    cfg, w = reference.resolve(preset, dtype=torch.float32, seed=3)
    before = {k: v.clone() for k, v in w.items()}
    q_part = weakref.ref(w["layers.0.self_attn.q_proj.weight"])
    shared = share_projection_storage(cfg, w)
    assert shared is w and shared.keys() == before.keys() and all(torch.equal(shared[k], before[k]) for k in w)
    assert q_part() is None  # in place: the dict held the part's only reference, and it is gone
    copied, stacked = fuse_projections(cfg, before), fuse_projections(cfg, shared)
    for name, t in stacked.items():
        assert torch.equal(t, copied[name]), name
    q = shared["layers.0.self_attn.q_proj.weight"]
    assert stacked["layers.0.qkv"].data_ptr() == q.data_ptr()  # a view, not a copy
    assert stacked["layers.0.gate_up"].data_ptr() == shared["layers.0.mlp.gate_proj.weight"].data_ptr()
    # Parts that are not back to back are copied, as before.
    assert copied["layers.0.qkv"].data_ptr() != before["layers.0.self_attn.q_proj.weight"].data_ptr()


def test_cast_on_read_holds_no_copy():
    from reference.weights import CastOnRead

    cfg, w = reference.resolve("tiny", dtype=torch.bfloat16, seed=1)
    lazy = CastOnRead(w, torch.float64)
    assert len(lazy) == len(w) and list(lazy) == list(w)
    x = torch.randint(0, cfg.vocab_size, (9,))
    eager = reference.Gemma4Reference(cfg, {k: v.to(torch.float64) for k, v in w.items()})
    assert torch.equal(reference.Gemma4Reference(cfg, lazy).forward(x), eager.forward(x))
