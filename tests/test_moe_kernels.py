"""Property tests: the MoE kernels (optimized/kernels/moe.py) against their eager twins, and the
twins against the reference's own router and experts (reference.model.moe_route / moe_experts,
which Gemma4Reference.route / .experts call).

Tolerances, derived. u = 2^-24 is float32's unit roundoff; ulp(t) is one ULP of t's dtype at |t|.
Kernel and twin run the same ops in the same order and round to the dtype at the same points, so
they differ only through (a) sums taken in another order, (b) Triton's exp/tanh against torch's,
and (c) a rounding to the dtype that (a) or (b) pushed across a rounding boundary ("a flip"):
two values within d round to values within d + 1.5 ulp (half an ULP each side, and one more half
where the two straddle a power of two).

- router_input: (a) is the norm's sum of squares, a few float32 ULP; the two products after it
  carry a flip of the normed value forward (as in tests/test_fused_kernels.py).
- softmax_topk, on the same logits: exp is monotone in both, and one row shares one denominator,
  so both rank the experts by logit, the lowest id first among equal logits. The ids therefore
  agree exactly, except where two distinct logits are so close (|x_a - x_b| <= 2^-20) that one exp
  can merge them and the other not: such rows only have to pick equally likely experts. The
  softmax denominator cancels in the renormalised weight w_i = p_i / sum_topk p_j; what is left
  is each side's exp (1 ULP, plus on a GPU exp2's argument rounding, |x - max| * 1.5u), the
  division, the k-term sum, the renormalising division and the scale product: per side
  (k + 7)u + 1.5u(|x_i - max| + max_topk |x_j - max|), and twice that between kernel and twin.
- experts: (a) is the float32 accumulation of the three GEMMs: two orders of one dot of length n
  differ by at most 2 gamma_n sum|a_i b_i|, gamma_n = n u / (1 - n u) (bf16/fp16 products are
  exact in float32). Propagated in float64 through the reference's op sequence with the twin's
  own intermediates: gelu_tanh's slope is at most 1.13, Triton's tanh adds |gate| * 2^-20, every
  rounded intermediate adds a flip, each token's k rounded adds of the combine another flip of
  the partial sums. The combine order itself is tested exactly, on data where every GEMM is exact.
  In float16/bfloat16 most elements are bit-identical, which catches a missed rounding that the
  elementwise bound (a few ULPs) would let through.

Sizes stay small: under Triton's interpreter every program costs milliseconds.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from optimized.kernels import INTERPRETING, default_device, moe
from reference.model import gelu_tanh, moe_experts, moe_route, rms_norm as reference_rms_norm
from tests.sm90 import check_compiles

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = default_device()
EPS = 1e-6
U = 2.0 ** -24
GELU_SLOPE = 1.13  # max |d/dx gelu_tanh(x)| is 1.129

seeds = st.integers(0, 2**31 - 1)
tokens = st.integers(1, 40)
num_experts = st.sampled_from([4, 8, 16])
top_ks = st.sampled_from([1, 2, 4])
hidden = st.sampled_from([16, 24, 32, 48, 64])
inter = st.sampled_from([16, 24, 32, 64])


def ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of t's dtype at |t|, as float64."""
    fi = torch.finfo(t.dtype)
    mag = t.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def flip(t: torch.Tensor) -> torch.Tensor:
    """What one rounding to t's dtype can add to a difference (module docstring)."""
    return 1.5 * ulp(t)


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0, strided: bool = False):
    """Normal values of the given shape; with strided=True a column slice of a wider tensor."""
    pad = 8 if strided else 0
    t = (torch.randn(*shape[:-1], shape[-1] + 2 * pad, generator=gen) * scale).to(DEVICE, dtype)
    return t[..., pad:pad + shape[-1]]


def uniform(gen: torch.Generator, n: int, dtype: torch.dtype, lo: float = 0.5, hi: float = 1.5):
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(DEVICE, dtype)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, *, identical: float = 0.0) -> None:
    """|got - want| <= bound elementwise, and at least a share `identical` bit-identical."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous()
    err = (got.double() - want.double()).abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{int((err > bound).sum())} of {err.numel()} elements beyond tolerance; worst at "
                             f"flat index {i}: kernel {got.flatten()[i].item()!r}, twin {want.flatten()[i].item()!r}, "
                             f"bound {bound.flatten()[i].item():.3g}")
    same = float((got == want).double().mean()) if got.numel() else 1.0
    assert same >= identical, f"only {same:.1%} of the elements bit-identical"


# -- router ------------------------------------------------------------------------------------

def near_tie_rows(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows where two distinct logits among the top k + 1 are within 2^-20 of each other."""
    top = logits.float().topk(min(top_k + 1, logits.shape[1]), dim=-1).values
    gaps = top[:, :-1] - top[:, 1:]
    return ((gaps > 0) & (gaps <= 2.0 ** -20)).any(-1)


def assert_router_matches(got, want, logits: torch.Tensor, top_k: int) -> None:
    """softmax_topk (or route, rows with equal logits) against its twin: see the module docstring."""
    (got_w, got_i), (want_w, want_i) = got, want
    assert got_w.dtype == torch.float32 and got_i.dtype == torch.int64 and got_w.shape == (logits.shape[0], top_k)
    clear = ~near_tie_rows(logits, top_k)
    assert torch.equal(got_i[clear], want_i[clear]), "expert ids differ"

    x = logits.double()
    dist = x.max(-1, keepdim=True).values - x.gather(1, want_i)  # |x_i - max| of the picks
    rel = 2 * ((top_k + 7) * U + 1.5 * U * (dist + dist.max(-1, keepdim=True).values))
    assert_within(got_w[clear], want_w[clear], rel[clear] * want_w[clear].double().abs())

    if not clear.all():  # near-ties: the picks must be equally likely
        probs = torch.softmax(logits[~clear].double(), dim=-1)
        assert torch.allclose(probs.gather(1, got_i[~clear]), probs.gather(1, want_i[~clear]), rtol=2.0 ** -18)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=tokens, width=hidden, strided=st.booleans())
def test_router_input(dtype, seed, rows, width, strided):
    gen = torch.Generator().manual_seed(seed)
    r = randn(gen, rows, width, dtype=dtype, scale=3.0, strided=strided)
    scale = uniform(gen, width, dtype, -1.5, 1.5)
    got, want = moe.router_input(r, scale, EPS), moe.router_input_eager(r, scale, EPS)
    # The norms' tolerance (8 float32 ULP, 1 ULP in 16 bits), with a flip of the normed value
    # and of its product with `scale` carried through the products that follow.
    normed = reference_rms_norm(r, None, EPS)
    slack = width ** -0.5 * (scale.double().abs() * ulp(normed) + ulp(normed * scale))
    factor = 8 if dtype == torch.float32 else 1
    assert_within(got, want, factor * (ulp(want) + slack), identical=0.0 if dtype == torch.float32 else 0.97)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=tokens, E=num_experts, k=top_ks, spread=st.sampled_from([0.5, 4.0, 30.0]),
       ties=st.booleans(), strided=st.booleans())
def test_softmax_topk(dtype, seed, rows, E, k, spread, ties, strided):
    gen = torch.Generator().manual_seed(seed)
    logits = randn(gen, rows, E, dtype=dtype, scale=spread, strided=strided)
    if ties:  # a few distinct values per row: equal probabilities everywhere, the top-k boundary included
        logits = (logits / spread * 1.5).round() * spread / 4
    pes = uniform(gen, E, dtype)
    got = moe.softmax_topk(logits, pes, k)
    want = moe.softmax_topk_eager(logits, pes, k)
    assert_router_matches(got, want, logits, k)


def test_softmax_topk_takes_the_lowest_id_among_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], device=DEVICE)
    pes = torch.ones(6, device=DEVICE)
    w, i = moe.softmax_topk(logits, pes, 4)
    assert i.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]
    assert torch.equal(w[1], torch.full((4,), 0.25, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=tokens, width=hidden, E=num_experts, k=top_ks, strided=st.booleans())
def test_route(dtype, seed, rows, width, E, k, strided):
    gen = torch.Generator().manual_seed(seed)
    r = randn(gen, rows, width, dtype=dtype, scale=3.0, strided=strided)
    scale = uniform(gen, width, dtype)
    proj_w = randn(gen, E, width, dtype=dtype, scale=2.0)
    pes = uniform(gen, E, dtype)
    got = moe.route(r, scale, proj_w, pes, k, EPS)
    z = moe.router_input(r, scale, EPS)
    logits = F.linear(z, proj_w)
    # route is exactly its two kernels around torch's GEMM ...
    for g, w in zip(got, moe.softmax_topk(logits, pes, k)):
        assert torch.equal(g, w)
    # ... and matches its twin to softmax_topk's tolerance on every token whose router input
    # came out bit-identical (the others differ by router_input's tolerance, before the GEMM).
    want = moe.route_eager(r, scale, proj_w, pes, k, EPS)
    same = (z == moe.router_input_eager(r, scale, EPS)).all(-1)
    assert_router_matches([t[same] for t in got], [t[same] for t in want], logits[same], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_twin_is_the_reference_up_to_ties(dtype):
    gen = torch.Generator().manual_seed(0)
    N, H, E, k = 1024, 32, 16, 4
    r = randn(gen, N, H, dtype=dtype, scale=3.0)
    scale, pes, proj_w = uniform(gen, H, dtype), uniform(gen, E, dtype), randn(gen, E, H, dtype=dtype, scale=0.5)
    ref_w, ref_i = moe_route(r, scale, proj_w, pes, k, EPS)
    twin_w, twin_i = moe.route_eager(r, scale, proj_w, pes, k, EPS)
    probs = torch.softmax(F.linear(moe.router_input_eager(r, scale, EPS), proj_w), dim=-1, dtype=torch.float32)
    # The two pick equally probable experts in the same order, and where they pick the same
    # ones they agree bit for bit; they part only where torch.topk breaks a tie another way.
    assert torch.equal(probs.gather(1, ref_i), probs.gather(1, twin_i))
    same = (ref_i == twin_i).all(-1)
    assert torch.equal(ref_w[same], twin_w[same])
    if dtype == torch.bfloat16:
        assert 0 < int((~same).sum()) < N // 4, "bf16 logits should tie now and then, and only then differ"
    else:
        assert bool(same.all())


# -- experts -----------------------------------------------------------------------------------

def drawn_ids(gen: torch.Generator, n: int, E: int, k: int, kind: str) -> torch.Tensor:
    """[n, k] distinct expert ids per row, in router order: "uniform", "skewed" (low ids
    favoured) or "shared" (every token on the same k experts)."""
    scores = torch.rand(n, E, generator=gen)
    if kind == "skewed":
        scores = scores * torch.linspace(8.0, 0.05, E)
    elif kind == "shared":
        scores = torch.rand(E, generator=gen).expand(n, E)
    return scores.topk(k, dim=-1).indices


def draw_routing(gen: torch.Generator, n: int, E: int, k: int, kind: str, strided: bool):
    """top_w float32 [n, k] and top_i [n, k] (distinct ids per row, in router order, not sorted).
    "uniform": every expert equally likely; "skewed": low ids favoured, some experts idle, some
    with many rows; "shared": all tokens on the same k experts (an expert spans several tiles)."""
    top_i = drawn_ids(gen, n, E, k, kind)
    top_w = 0.05 + 1.5 * torch.rand(n, k, generator=gen)
    if strided:  # column-major storage, as a transposed [k, n] tensor would be
        top_i, top_w = top_i.t().contiguous().t(), top_w.t().contiguous().t()
    return top_w.to(DEVICE), top_i.to(DEVICE, torch.int32 if strided else torch.int64)


def expert_weights(gen, E, H, I, dtype):
    gate_up = randn(gen, E, 2 * I, H, dtype=dtype, scale=2.0 * H ** -0.5)
    down = randn(gen, E, H, I, dtype=dtype, scale=I ** -0.5)
    return gate_up, down


def experts_bound(xe, top_w, top_i, gate_up, down) -> torch.Tensor:
    """Elementwise bound on |experts - experts_eager| (module docstring), following the twin's op
    sequence expert by expert with its own intermediates."""
    H, I = xe.shape[1], down.shape[2]
    bound = torch.zeros(xe.shape, dtype=torch.float64, device=xe.device)
    magnitude = torch.zeros_like(bound)  # sum of |contributions|: bounds every partial sum
    for e in range(gate_up.shape[0]):
        tok, slot = torch.nonzero(top_i == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        x = xe[tok]
        gu = F.linear(x, gate_up[e])
        gate, up = gu[:, :I], gu[:, I:]
        g = gelu_tanh(gate)
        act = g * up
        y = F.linear(act, down[e])
        w = top_w[tok, slot, None].double()
        z = (y * top_w[tok, slot, None]).to(xe.dtype)

        d_gu = 2 * gamma(H) * (x.double().abs() @ gate_up[e].double().abs().T) + flip(gu)
        d_gate, d_up = d_gu[:, :I], d_gu[:, I:]
        d_g = GELU_SLOPE * d_gate + gate.double().abs() * 2.0 ** -20 + flip(g)
        d_act = g.double().abs() * d_up + up.double().abs() * d_g + d_g * d_up + flip(act)
        w_down = down[e].double().abs()
        d_y = 2 * gamma(I) * (act.double().abs() @ w_down.T) + d_act @ w_down.T + flip(y)
        bound.index_add_(0, tok, w.abs() * d_y + flip(z))
        magnitude.index_add_(0, tok, z.double().abs())
    return bound + top_i.shape[1] * flip(magnitude.to(xe.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=seeds, rows=tokens, E=num_experts, k=top_ks, H=hidden, I=inter,
       kind=st.sampled_from(["uniform", "skewed", "shared"]), strided=st.booleans(), dropped=st.booleans())
def test_experts(dtype, seed, rows, E, k, H, I, kind, strided, dropped):
    gen = torch.Generator().manual_seed(seed)
    xe = randn(gen, rows, H, dtype=dtype, strided=strided)
    top_w, top_i = draw_routing(gen, rows, E, k, kind, strided)
    if dropped:  # ids outside [0, E): the reference skips them
        bad = torch.tensor([-1, E, E + 3], device=DEVICE, dtype=top_i.dtype)
        pick = torch.randint(0, 3, top_i.shape, generator=gen).to(DEVICE)
        top_i = torch.where((torch.rand(top_i.shape, generator=gen) < 0.25).to(DEVICE), bad[pick], top_i)
        if strided:  # torch.where's result is row-major: keep the ids column-major
            top_i = top_i.t().contiguous().t()
    gate_up, down = expert_weights(gen, E, H, I, dtype)
    got = moe.experts(xe, top_w, top_i, gate_up, down)
    want = moe.experts_eager(xe, top_w, top_i, gate_up, down)
    assert_within(got, want, experts_bound(xe, top_w, top_i, gate_up, down),
                  identical=0.0 if dtype == torch.float32 else 0.9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_combine_order_is_the_references(dtype):
    # Integer data make every GEMM exact in float32, whatever its order: gate = 16 for every
    # token (gelu_tanh(16) = 16 exactly), up and the down projection small integers. Only the
    # roundings of y * w and of the combine's adds are left, so kernel and twin must agree bit
    # for bit, and would not if the kernel added the experts in another order.
    gen = torch.Generator().manual_seed(1)
    N, H, I, E, k = 24, 16, 16, 8, 4

    def ints(*shape, lo=-1, hi=1):
        return torch.randint(lo, hi + 1, shape, generator=gen).to(DEVICE, dtype)

    xe = ints(N, H)
    xe[:, 0] = 1
    gate_up = torch.cat([torch.zeros(E, I, H, dtype=dtype, device=DEVICE), ints(E, I, H)], dim=1)
    gate_up[:, :I, 0] = 16
    down = ints(E, H, I, lo=-2, hi=2)
    top_w, top_i = draw_routing(gen, N, E, k, "uniform", strided=False)
    top_w = torch.exp2(torch.rand(N, k, generator=gen) * 8 - 6).to(DEVICE)  # 2^-6 .. 2^2: orders of magnitude

    want = moe.experts_eager(xe, top_w, top_i, gate_up, down)
    assert torch.equal(moe.experts(xe, top_w, top_i, gate_up, down), want)
    reversed_order = moe.experts_eager(xe, top_w, E - 1 - top_i, gate_up.flip(0), down.flip(0))
    assert not torch.equal(reversed_order, want), "the data should make the combine order matter"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_twin_is_the_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    N, H, I, E, k = 16, 32, 16, 8, 2
    xe = randn(gen, N, H, dtype=dtype)
    top_w, top_i = draw_routing(gen, N, E, k, "skewed", strided=False)
    gate_up, down = expert_weights(gen, E, H, I, dtype)
    want = moe_experts(xe, top_w, top_i, gate_up, down)
    assert torch.equal(moe.experts_eager(xe, top_w, top_i, gate_up, down), want)


# -- routing layout (group_by_expert) ----------------------------------------------------------
#
# The kernel builds the same four tensors as the torch ops of its twin, out of integer compares
# and copies only, so they must be equal bit for bit: no tolerance anywhere below.

def layout_ids(gen: torch.Generator, n: int, E: int, k: int, kind: str, dropped: bool) -> torch.Tensor:
    """top_i [n, k] int64 on the CPU. "uniform", "skewed" as draw_routing; "shared": every token on
    the same k experts; "all": k == E, every expert for each token, in a random order. dropped:
    about a third of the ids outside [0, E), repeats within a row included (several -1s)."""
    if kind == "all":
        top_i = torch.stack([torch.randperm(E, generator=gen) for _ in range(n)])
    else:
        top_i = drawn_ids(gen, n, E, k, kind)
    if dropped:
        bad = torch.tensor([-1, -1, -7, E, E, E + 3])
        pick = bad[torch.randint(0, len(bad), top_i.shape, generator=gen)]
        top_i = torch.where(torch.rand(top_i.shape, generator=gen) < 0.35, pick, top_i)
    return top_i


def layout_inputs(gen, n, E, k, kind, dropped, id_dtype, w_dtype, strided):
    top_i = layout_ids(gen, n, E, k, kind, dropped).to(DEVICE, id_dtype)
    top_w = (0.05 + 1.5 * torch.rand(n, k, generator=gen)).to(DEVICE, w_dtype)
    if strided:  # column-major, as a transposed [k, n] tensor would be
        top_i, top_w = top_i.t().contiguous().t(), top_w.t().contiguous().t()
    return top_w, top_i


def assert_same_layout(got, want) -> None:
    for name, g, w in zip(("entries", "offsets", "weights", "ids"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous(), name
        assert torch.equal(g, w), f"{name} differ: kernel {g.tolist()}, twin {w.tolist()}"


@given(seed=seeds, rows=st.one_of(st.sampled_from([1, 2, 7, 32, 128]), st.integers(1, 40)),
       E=st.sampled_from([4, 8, 32, 128]), k=st.sampled_from([1, 2, 8]),
       kind=st.sampled_from(["uniform", "skewed", "shared", "all"]), dropped=st.booleans(),
       id_dtype=st.sampled_from([torch.int64, torch.int32]), w_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       strided=st.booleans())
def test_layout_kernel(seed, rows, E, k, kind, dropped, id_dtype, w_dtype, strided):
    gen = torch.Generator().manual_seed(seed)
    if kind == "all":  # k == E: a few tokens only, or the interpreter takes minutes
        k, rows = E, min(rows, 3)
    k = min(k, E)
    top_w, top_i = layout_inputs(gen, rows, E, k, kind, dropped, id_dtype, w_dtype, strided)
    assert_same_layout(moe._layout_launch(top_w, top_i, E), moe.group_by_expert_eager(top_w, top_i, E))


def test_layout_kernel_example():
    # Worked by hand, so that kernel and twin cannot agree on a wrong layout: rows sorted by id
    # [[1, 3], [0, 1], [-1, -1], [2, 5]]; sorted entries -1 (f 4), -1 (f 5), 0 (f 2), 1 (f 0),
    # 1 (f 3), 2 (f 6), 3 (f 1), 5 (f 7); expert e's rows start after the ids below e.
    top_i = torch.tensor([[3, 1], [1, 0], [-1, -1], [5, 2]], device=DEVICE)
    top_w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], device=DEVICE)
    for layout in (moe._layout_launch(top_w, top_i, 4), moe.group_by_expert_eager(top_w, top_i, 4)):
        entries, offsets, weights, ids = layout
        assert ids.tolist() == [[1, 3], [0, 1], [-1, -1], [2, 5]]
        assert torch.equal(weights, torch.tensor([0.2, 0.1, 0.4, 0.3, 0.5, 0.6, 0.8, 0.7], device=DEVICE))
        assert entries.tolist() == [4, 5, 2, 0, 3, 6, 1, 7]
        assert offsets.tolist() == [2, 3, 5, 6, 7]


def test_layout_kernel_at_its_bound():
    # The largest routing the kernel takes, 128 programs, where the kernels are compiled; under the
    # interpreter a quarter of it (the whole bound takes 15-20 s there; the code path is the same).
    gen = torch.Generator().manual_seed(3)
    k, E = 8, 128
    entries = moe._LAYOUT_MAX_ENTRIES // (4 if INTERPRETING else 1)
    top_w, top_i = layout_inputs(gen, entries // k, E, k, "skewed", True, torch.int64, torch.float32, False)
    assert_same_layout(moe._layout_launch(top_w, top_i, E), moe.group_by_expert_eager(top_w, top_i, E))


def test_group_by_expert_takes_the_kernel_up_to_the_bound(monkeypatch):
    launches = []

    def counted(*args):
        launches.append(args[1].numel())
        return launch(*args)

    launch = moe._layout_launch
    monkeypatch.setattr(moe, "_layout_launch", counted)
    monkeypatch.setattr(moe, "_LAYOUT_MAX_ENTRIES", 16)
    monkeypatch.setattr(moe, "_LAYOUT_MAX_TOP_K", 4)
    gen = torch.Generator().manual_seed(4)
    for n, k, kernel in ((4, 4, True), (1, 1, True), (16, 1, True), (17, 1, False), (3, 6, False), (0, 2, False)):
        top_w, top_i = layout_inputs(gen, n, 8, k, "uniform", True, torch.int64, torch.float32, False)
        launches.clear()
        assert_same_layout(moe.group_by_expert(top_w, top_i, 8), moe.group_by_expert_eager(top_w, top_i, 8))
        assert launches == ([n * k] if kernel else []), (n, k)


@pytest.mark.parametrize("rows", [1, 7, 32])
def test_experts_alike_through_either_layout(rows, monkeypatch):
    # The GEMMs and the combine see the same layout from the kernel and from the torch ops, so
    # experts() must give the same bits both ways (and match its twin as test_experts bounds it).
    gen = torch.Generator().manual_seed(5 + rows)
    E, k, H, I, dtype = 32, 8, 16, 16, torch.bfloat16
    xe = randn(gen, rows, H, dtype=dtype)
    top_w, top_i = layout_inputs(gen, rows, E, k, "skewed", True, torch.int64, torch.float32, True)
    gate_up, down = expert_weights(gen, E, H, I, dtype)
    got = moe.experts(xe, top_w, top_i, gate_up, down)
    monkeypatch.setattr(moe, "_LAYOUT_MAX_ENTRIES", 0)
    assert torch.equal(moe.experts(xe, top_w, top_i, gate_up, down), got)
    assert_within(got, moe.experts_eager(xe, top_w, top_i, gate_up, down),
                  experts_bound(xe, top_w, top_i, gate_up, down), identical=0.9)


def test_layout_kernel_compiles_for_a_gpu():
    """The layout kernel for sm_90 (tests/sm90.py says why; it caught a name reused with another
    shape inside a loop, which the interpreter ran)."""
    check_compiles("""
        from optimized.kernels import moe
        for w, i, k, rows, block_off, chunk in (("*fp32", "*i64", 8, 8, 256, 8), ("*bf16", "*i32", 8, 32, 8, 128),
                                                ("*fp32", "*i64", 128, 1, 256, 1), ("*fp32", "*i32", 6, 32, 1, 128)):
            types = dict(top_w=w, top_i=i, ids=i, weights=w, entries="*i32", offsets="*i32")
            consts = dict(K=k, BLOCK_K=triton.next_power_of_2(k), ROWS=rows, BLOCK_OFF=block_off, CHUNK=chunk)
            compile_for_sm90(moe._layout_kernel, types, consts, num_warps=4, enable_fp_fusion=False)
    """)


# -- edge cases and input validation -----------------------------------------------------------

def test_empty_inputs():
    r = torch.randn(0, 32, device=DEVICE)
    w, i = moe.route(r, torch.ones(32, device=DEVICE), torch.randn(8, 32, device=DEVICE),
                     torch.ones(8, device=DEVICE), 2, EPS)
    assert w.shape == (0, 2) and i.shape == (0, 2)
    out = moe.experts(r, w, i, torch.randn(8, 32, 32, device=DEVICE), torch.randn(8, 32, 16, device=DEVICE))
    assert out.shape == (0, 32)


_r = torch.randn(4, 32, device=DEVICE)
_h = torch.ones(32, device=DEVICE)
_proj = torch.randn(8, 32, device=DEVICE)
_pes = torch.ones(8, device=DEVICE)
_gu = torch.randn(8, 32, 32, device=DEVICE)
_dn = torch.randn(8, 32, 16, device=DEVICE)
_tw = torch.rand(4, 2, device=DEVICE)
_ti = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], device=DEVICE)

BAD_CALLS = {
    "route top_k 0": lambda: moe.route(_r, _h, _proj, _pes, 0, EPS),
    "route top_k > E": lambda: moe.route(_r, _h, _proj, _pes, 9, EPS),
    "route proj width": lambda: moe.route(_r, _h, _proj[:, :16], _pes, 2, EPS),
    "route proj dtype": lambda: moe.route(_r, _h, _proj.half(), _pes, 2, EPS),
    "route scale size": lambda: moe.route(_r, _h[:16], _proj, _pes, 2, EPS),
    "route per_expert_scale size": lambda: moe.route(_r, _h, _proj, _pes[:4], 2, EPS),
    "route eps": lambda: moe.route(_r, _h, _proj, _pes, 2, -1.0),
    "route float64": lambda: moe.route(_r.double(), _h.double(), _proj.double(), _pes.double(), 2, EPS),
    "softmax_topk last dim strided": lambda: moe.softmax_topk(torch.randn(8, 4, device=DEVICE).t(), _pes[:8], 2),
    "experts float ids": lambda: moe.experts(_r, _tw, _ti.float(), _gu, _dn),
    "experts ids shape": lambda: moe.experts(_r, _tw, _ti[:3], _gu, _dn),
    "experts weights shape": lambda: moe.experts(_r, _tw[:, :1], _ti, _gu, _dn),
    "experts gate_up width": lambda: moe.experts(_r, _tw, _ti, _gu[:, :, :16], _dn),
    "experts odd gate_up": lambda: moe.experts(_r, _tw, _ti, _gu[:, :31], _dn),
    "experts down shape": lambda: moe.experts(_r, _tw, _ti, _gu, _dn[:, :, :8]),
    "experts dtype": lambda: moe.experts(_r.half(), _tw, _ti, _gu, _dn),
    "experts xe strided": lambda: moe.experts(torch.randn(32, 4, device=DEVICE).t(), _tw, _ti, _gu, _dn),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_rejects_bad_inputs(name):
    with pytest.raises(ValueError):
        BAD_CALLS[name]()
