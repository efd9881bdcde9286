"""Routed truths for MoE models (docs/design_notes.md note 35).

- the `layers.N.experts` tap: order, shape, both paths, storage;
- the reference's forced routing: forced to its own choice it is bitwise the unforced model;
- compare() with routed truths judges every row, each path against the truth routed as it routed,
  and without them (old captures, dense models, float64) nothing changes;
- clean bf16 tiny-moe scenarios hold parity with every logits row judged, and the MoE routing
  fault is still caught (by the local judgement) in float32 and bfloat16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import reference
from oracle.capture import Capture, CaptureBuilder, RequestCapture, load_capture, save_capture
from oracle.compare import INFO, PER_PATH, compare
from oracle.faults import FAULTS, MOE_FAULTS, get
from oracle.report import render_report
from oracle.run import candidate_choices, reference_capture, report_facts, run_scenario
from oracle.scenario import builtin
from oracle.taps import tap_order, tap_trailing_shape
from oracle.testing import scenario

MOE = "tiny-moe"


@pytest.fixture(scope="module")
def moe64():
    cfg, w = reference.resolve(MOE, dtype=torch.float64, seed=0)
    return cfg, reference.Gemma4Reference(cfg, w)


def _ids(cfg, n=11, seed=3):
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# The tap
# --------------------------------------------------------------------------------------


def test_experts_tap_sits_before_mlp_out_on_moe_models_only():
    moe, dense = reference.get_preset(MOE), reference.get_preset("tiny")
    order = tap_order(moe)
    assert order.index("layers.0.mlp_act") < order.index("layers.0.experts") < order.index("layers.0.mlp_out")
    assert sum(name.endswith(".experts") for name in order) == moe.num_hidden_layers
    assert not any(name.endswith(".experts") for name in tap_order(dense))
    assert tap_trailing_shape(moe, "layers.2.experts") == (moe.top_k_experts,)


def test_reference_records_sorted_int64_expert_ids(moe64):
    cfg, model = moe64
    taps: dict = {}
    model(_ids(cfg), taps=taps)
    assert [t for t in tap_order(cfg) if t in taps] == tap_order(cfg)
    e = taps["layers.1.experts"]
    assert e.dtype == torch.int64 and e.shape == (11, cfg.top_k_experts)
    assert torch.equal(e, e.sort(dim=-1).values) and bool((e[:, 1:] != e[:, :-1]).all())


def test_an_integer_tap_round_trips_through_a_capture_directory(tmp_path):
    b = CaptureBuilder({"path": "optimized", "dtype": "bfloat16"})
    b.add("r0", "layers.0.experts", torch.arange(4, 6), torch.tensor([[1, 3], [0, 2]]))  # a later chunk
    b.add("r0", "layers.0.experts", torch.arange(0, 4), torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]]))
    b.add("r0", "layers.0.out", torch.arange(6), torch.zeros(6, 2))
    cap = b.build()
    assert cap.requests["r0"].taps["layers.0.experts"][:, 0].tolist() == [0, 2, 1, 0, 1, 0]
    back = load_capture(save_capture(cap, tmp_path / "c"))
    assert torch.equal(back.requests["r0"].taps["layers.0.experts"], cap.requests["r0"].taps["layers.0.experts"])


# --------------------------------------------------------------------------------------
# Forced routing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_forced_to_its_own_choice_the_reference_is_bitwise_unforced(dtype):
    cfg, w = reference.resolve(MOE, dtype=dtype, seed=1)
    model = reference.Gemma4Reference(cfg, w)
    ids = _ids(cfg, 13)
    plain: dict = {}
    logits = model(ids, taps=plain)
    forced = {layer: plain[f"layers.{layer}.experts"] for layer in range(cfg.num_hidden_layers)}
    again: dict = {}
    assert torch.equal(model(ids, taps=again, forced_experts=forced), logits)
    assert plain.keys() == again.keys() and all(torch.equal(plain[k], again[k]) for k in plain)


def test_forced_routing_routes_there_with_the_routers_weights(moe64):
    cfg, model = moe64
    ids = _ids(cfg)
    plain: dict = {}
    model(ids, taps=plain)
    own = plain["layers.2.experts"]
    other = own.clone()
    unused = next(e for e in range(cfg.num_experts) if e not in own[4].tolist())
    other[4, 0] = unused
    forced: dict = {}
    out = model(ids, taps=forced, forced_experts={2: other})
    assert torch.equal(forced["layers.2.experts"][4], other[4].sort().values)
    assert torch.equal(forced["layers.1.out"], plain["layers.1.out"])  # upstream untouched
    # Other rows keep their own choice (to rounding: an expert's matmul now spans one more token).
    torch.testing.assert_close(forced["layers.2.mlp_out"][:4], plain["layers.2.mlp_out"][:4], rtol=1e-12, atol=1e-12)
    assert (forced["layers.2.mlp_out"][4] - plain["layers.2.mlp_out"][4]).abs().max() > 1e-3
    assert not torch.equal(out[4:], model(ids)[4:])  # and on through attention
    # The weights are the router's at those ids: renormalized softmax probabilities x per_expert_scale.
    p = "layers.2."
    weights, experts = model.route(plain["layers.2.attn_out"], p, other)
    z = reference.model.moe_router_input(plain["layers.2.attn_out"], model.w[p + "router.scale"], cfg.rms_norm_eps)
    probs = torch.softmax(torch.nn.functional.linear(z, model.w[p + "router.proj.weight"]), dim=-1)
    want = probs.gather(-1, experts) / probs.gather(-1, experts).sum(-1, keepdim=True)
    torch.testing.assert_close(weights, want * model.w[p + "router.per_expert_scale"][experts])
    with pytest.raises(ValueError, match="forced expert ids"):
        model(ids, forced_experts={2: other[:, :1]})


# --------------------------------------------------------------------------------------
# compare() with routed truths, on captures of the reference alone
# --------------------------------------------------------------------------------------


def _flip_choice(cfg, model64, ids):
    """Expert choices of the bf16 reference, with one clear (not near-tie) choice changed: layer 1,
    position 6, its first expert swapped for one it did not choose."""
    plain: dict = {}
    model64(ids, taps=plain)
    forced = {layer: plain[f"layers.{layer}.experts"].clone() for layer in range(cfg.num_hidden_layers)}
    row = forced[1][6]
    row[0] = next(e for e in range(cfg.num_experts) if e not in row.tolist())
    return forced


def test_a_path_that_routes_elsewhere_is_judged_on_every_row_against_its_routed_truth(moe64):
    cfg, model64 = moe64
    _, w16 = reference.resolve(MOE, dtype=torch.bfloat16, seed=0)
    model16 = reference.Gemma4Reference(cfg, w16)
    sc = scenario(MOE, lengths=[12], new_tokens=0, dtype="bfloat16", device="cpu")
    seqs = {"r0": _ids(cfg, 12, seed=5).tolist()}
    forced = {"r0": _flip_choice(cfg, model64, torch.tensor(seqs["r0"]))}
    truth = reference_capture(model64, sc, seqs, "truth")
    ref = reference_capture(model16, sc, seqs, "reference")
    # A "candidate" that is the bf16 reference routed elsewhere at one row: a whole other expert.
    cand = reference_capture(model16, sc, seqs, "optimized", forced)
    cand.metadata["path"] = "optimized"
    plain = compare(truth, ref, cand, cfg)
    assert not plain.passed  # against the one truth, the other expert's output is far over budget
    routed = {"reference": reference_capture(model64, sc, seqs, "truth",
                                             {"r0": {k: v for k, v in _choices(ref, cfg).items()}}),
              "candidate": reference_capture(model64, sc, seqs, "truth", forced)}
    per_path = compare(truth, ref, cand, cfg, routed_truths=routed)
    assert per_path.passed, per_path.summary()
    assert per_path.truth_routing == PER_PATH and per_path.to_dict()["truth_routing"] == PER_PATH
    rows = per_path.requests[0].rows
    assert all(r.left_out == 0 for r in rows)
    assert all(r.positions == 12 for r in rows if r.status != INFO)
    logits = next(r for r in rows if r.tap == "logits")
    assert logits.distribution is not None and logits.distribution.error.positions == 12
    experts = next(r for r in rows if r.tap == "layers.1.experts")
    assert experts.status == INFO and experts.routing["differs"] >= 1 and experts.verdict is None
    assert "routed per path" in per_path.summary()


def _choices(capture: Capture, cfg, rid="r0"):
    return {layer: capture.requests[rid].taps[f"layers.{layer}.experts"] for layer in range(cfg.num_hidden_layers)}


def test_candidate_choices_of_a_reused_prefix_come_from_the_request_that_computed_it():
    k = 2
    seqs = {"r0": [5, 6, 7, 8, 9], "r1": [5, 6, 7, 1]}
    ref = Capture({rid: RequestCapture(torch.arange(len(s)), {"layers.0.experts": torch.full((len(s), k), 9)})
                   for rid, s in seqs.items()})
    cand = Capture({
        "r0": RequestCapture(torch.arange(5), {"layers.0.experts": torch.arange(10).reshape(5, 2)}),
        # r1 reused r0's first 2 positions: the candidate computed positions 2 and 3 only
        "r1": RequestCapture(torch.arange(2, 4), {"layers.0.experts": torch.tensor([[0, 1], [2, 3]])}),
    })
    got = candidate_choices(cand, ref, seqs, "r1", ["r0"], 1)[0]
    assert got.tolist() == [[0, 1], [2, 3], [0, 1], [2, 3]]
    # No donor sharing the tokens: the reference's own choice stands in.
    seqs["r0"] = [4, 6, 7, 8, 9]
    assert candidate_choices(cand, ref, seqs, "r1", ["r0"], 1)[0][:2].tolist() == [[9, 9], [9, 9]]


# --------------------------------------------------------------------------------------
# Whole runs (CPU, tiny-moe)
# --------------------------------------------------------------------------------------


def _builtin(name, dtype, seed, device):
    return next(s for s in builtin(MOE, dtype, str(device), seed) if s.name == name)


# The engine's scenario in the main suite; the other two are slow (CI's 20 minutes on 2 cores).
@pytest.mark.parametrize("name,seed", [("engine-continuous-batching", 0),
                                       pytest.param("chunked-prefill-shuffled-pages", 1, marks=pytest.mark.slow),
                                       pytest.param("mixed-batch-prefix-reuse", 2, marks=pytest.mark.slow)])
def test_clean_bfloat16_moe_scenarios_hold_parity_with_every_logits_row_judged(name, seed, device):
    run = run_scenario(_builtin(name, "bfloat16", seed, device))
    c = run.comparison
    assert c.passed, c.summary()
    assert c.truth_routing == PER_PATH
    for req in c.requests:
        assert all(r.left_out == 0 for r in req.rows), [r.tap for r in req.rows if r.left_out]
        logits = next(r for r in req.rows if r.tap == "logits")
        assert logits.distribution is not None
        assert logits.distribution.error.positions == logits.positions == run.cand.requests[req.request].taps[
            "logits"].shape[0]
        assert sum(r.status == INFO for r in req.rows) == run.ref.metadata["model_config"]["num_hidden_layers"]
    facts = report_facts([run], "gemma4-testbed check tiny-moe --dtype bfloat16", "routed")
    assert facts["scenarios"][0]["comparison"]["truth_routing"] == PER_PATH
    assert 'data-truth-routing="per-path"' in render_report(facts)


def test_dense_comparisons_use_the_one_truth(device):
    run = run_scenario(scenario("tiny", lengths=[6], new_tokens=1, dtype="bfloat16", device=str(device)))
    assert run.passed and run.comparison.truth_routing is None
    assert "truth_routing" not in run.comparison.to_dict()
    assert not any(name.endswith(".experts") for name in run.cand.requests["r0"].taps)


def test_the_moe_routing_fault_is_registered_apart_from_the_tiny_faults():
    fault = get("moe-route-scaled-before-topk")
    assert fault.model == MOE and fault.name in MOE_FAULTS and fault.name not in FAULTS
    assert fault.scenario().model.source == MOE


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_moe_routing_fault_is_caught_with_routed_truths_on(dtype, device):
    fault = get("moe-route-scaled-before-topk")
    run = run_scenario(fault.scenario(dtype=dtype, device=str(device)), faults=[fault.name])
    c = run.comparison
    assert c.truth_routing == PER_PATH
    first = c.first_divergence
    assert first is not None, c.summary()
    assert first.tap == fault.expect and "local" in first.judgement, c.summary()
    experts = next(r for r in c.requests[0].rows if r.tap == "layers.0.experts")
    assert experts.routing["differs"] > experts.routing["reference_differs"]


def test_captures_without_experts_taps_compare_as_before(device):
    run = run_scenario(scenario(MOE, lengths=[9], new_tokens=2, page_size=4, chunk_size=4, dtype="bfloat16",
                                device=str(device), seed=4))
    cfg = reference.get_preset(MOE)
    weights = reference.resolve(MOE, dtype=torch.float64, seed=4)[1]

    def strip(capture: Capture) -> Capture:
        return dataclasses.replace(capture, requests={
            rid: RequestCapture(r.positions, {t: v for t, v in r.taps.items() if not t.endswith(".experts")},
                                dict(r.tap_positions)) for rid, r in capture.requests.items()})

    with_taps = compare(run.truth, run.ref, run.cand, cfg, weights=weights).to_dict()
    old = compare(strip(run.truth), strip(run.ref), strip(run.cand), cfg, weights=weights).to_dict()
    for req in with_taps["requests"]:
        req["rows"] = [r for r in req["rows"] if r["kind"] != "experts"]
    assert old == with_taps and "truth_routing" not in old
    # A new truth beside an old candidate: no missing rows for the taps the candidate never had.
    mixed = compare(run.truth, run.ref, strip(run.cand), cfg, weights=weights)
    assert mixed.counts()["taps_missing"] == 0
