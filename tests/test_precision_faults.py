"""Precision bugs (issue 9): the precision faults are caught in float32 and bfloat16 at their tap;
the sharp checks of oracle/tolerance.py stay quiet on clean runs and on pure rounding noise; `diff`
without a truth budgets by ULPs and still catches a 1% change."""

from __future__ import annotations

import pytest
import torch

from optimized.kernels import default_device
from oracle.faults import PRECISION_FAULTS
from oracle.run import run_scenario
from oracle.scenario import from_dict
from oracle.replay import attend_probs_rounded
from oracle.tolerance import (DRIFT_MIN_CHANGED, DRIFT_Z, OPSEQ_FRACTION, OPSEQ_ULPS, ROUNDING_MULTIPLE, judge,
                              op_sequence_distance, paired_drift, rounding_error)
from reference.model import attention_mask, gelu_tanh

DEVICE = str(default_device())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(PRECISION_FAULTS))
def test_precision_fault_is_caught_at_its_tap(name, dtype):
    fault = PRECISION_FAULTS[name]
    run = run_scenario(fault.scenario(dtype=dtype, device=DEVICE), faults=[name])
    first = run.comparison.first_divergence
    assert first is not None, f"{name} not caught in {dtype}: {run.comparison.summary()}"
    assert first.tap == fault.expect, run.comparison.summary()


@pytest.mark.slow  # clean generated scenarios (README: the second test command)
def test_clean_bf16_scenarios_pass_the_sharp_checks():
    for i, (model, length) in enumerate([("tiny", 24), ("tiny-kv-eq-v", 17)]):
        sc = from_dict({"name": f"clean-{i}", "model": {"source": model, "seed": i, "dtype": "bfloat16", "device": DEVICE},
                        "engine": {"page_size": 4, "chunk_size": 7, "page_order_seed": i},
                        "requests": [{"id": "r0", "length": length, "seed": 3 + i, "new_tokens": 2}]})
        run = run_scenario(sc)
        rows = [row for req in run.comparison.requests for row in req.rows]
        assert all(r.failed_by in (None, "distribution") for r in rows), run.comparison.summary()
        ratios = [r.local.verdict.precision.rounding_ratio for r in rows
                  if r.local is not None and r.local.verdict is not None and r.kind == "o"]
        assert ratios and max(ratios) < ROUNDING_MULTIPLE
        far = [r.local.verdict.precision.opseq_far_fraction for r in rows
               if r.local is not None and r.local.verdict is not None and r.kind == "mlp_act"]
        assert far and max(far) == 0.0  # the kernels reproduce the eager rounding (interpreter: bit for bit)


def _noisy(t: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    return t.to(dtype).double()


def test_pure_rounding_noise_passes_and_a_small_systematic_scale_fails_only_the_drift_test():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(256, 64, dtype=torch.float64, generator=g)
    ref = _noisy(truth)
    # Rounded the same numbers another way (a different but correct op order): both directions.
    other = _noisy(truth * (1 + 2 ** -10 * torch.randn(truth.shape, dtype=torch.float64, generator=g)))
    z, changed = paired_drift(other, ref)
    assert changed > 1000 and abs(z) < DRIFT_Z
    v = judge(other, ref, truth, torch.bfloat16, kind="ple")
    assert v.passed, v.reasons
    # A 0.5% systematic scale: inside the L2 budget (4x noise + floor), every element moves away from 0.
    scaled = _noisy(truth * 1.005)
    v = judge(scaled, ref, truth, torch.bfloat16, kind="ple")
    assert v.error.rel_l2 < v.budget.rel_l2
    assert not v.passed and v.precision.drift_z > DRIFT_Z
    # The drift test applies to the input taps only (deeper taps carry chaotic inherited error).
    assert judge(scaled, ref, truth, torch.bfloat16, kind="mlp_out").passed


def test_drift_needs_an_effect_size_and_a_16_bit_dtype():
    """A correct compiled kernel whose float32 arithmetic is biased by an ULP flips a rare bf16
    element, always the same way: many such flips pass z = 6 but not the share of changed elements.
    In float32 compiled and eager arithmetic differ systematically (H200: z = 8.6 on clean `ple`)."""
    g = torch.Generator().manual_seed(3)
    truth = torch.randn(20000, 64, dtype=torch.float64, generator=g)
    ref = _noisy(truth)
    rare = ref.clone().reshape(-1)
    idx = torch.randperm(rare.numel(), generator=g)[: int(0.5 * DRIFT_MIN_CHANGED * rare.numel())]
    rare[idx] = torch.nextafter(rare[idx].to(torch.bfloat16), rare[idx].to(torch.bfloat16) * 2).double()
    rare = rare.reshape(ref.shape)
    v = judge(rare, ref, truth, torch.bfloat16, kind="ple")
    assert v.precision.drift_z > DRIFT_Z and v.precision.drift_changed_fraction < DRIFT_MIN_CHANGED and v.passed
    f32_ref = truth.float().double()
    f32_biased = (truth.float() * (1 + 2 ** -23)).double()  # one float32 ULP up, everywhere
    v = judge(f32_biased, f32_ref, truth, torch.float32, kind="ple")
    assert v.passed and v.precision.drift_z is None


def test_rounding_floor_follows_the_documented_rounding_points():
    """Where compiled, the kernels round the probabilities to the dtype before P @ V: the floor of
    the rounding check is then that emulation's error (oracle/replay.py attend_probs_rounded), so a
    correct kernel measures ~1.0x on diffuse attention too, and one more rounding still fails."""
    g = torch.Generator().manual_seed(4)
    T, H, D = 64, 4, 16
    q = torch.randn(T, H, D, dtype=torch.float64, generator=g) * 0.3  # diffuse: scores of std ~1
    k = torch.randn(T, 2, D, dtype=torch.float64, generator=g) * 0.3
    v = torch.randn(T, 2, D, dtype=torch.float64, generator=g)
    mask = attention_mask(torch.arange(T), None, torch.float64)
    from reference.model import attend
    replay = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)[0].transpose(0, 1)
    documented = attend_probs_rounded(q, k, v, mask, torch.bfloat16)
    gpu_clean = _noisy(documented)  # what a correct compiled kernel stores
    ref = _noisy(replay * (1 + 2 ** -7 * torch.randn(replay.shape, dtype=torch.float64, generator=g)))
    once = judge(gpu_clean, ref, replay, torch.bfloat16, ref_truth=replay, kind="o")
    doc = judge(gpu_clean, ref, replay, torch.bfloat16, ref_truth=replay, kind="o", documented=documented)
    assert doc.passed and doc.precision.rounding_ratio == pytest.approx(1.0)
    assert once.precision.rounding_ratio > doc.precision.rounding_ratio
    # The same kernel with its accumulator in bf16: rounded after each block of 16 keys.
    kk, vv = k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1)
    s_ = torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)) + mask
    p = torch.exp(s_ - s_.amax(-1, keepdim=True))
    acc = torch.zeros(H, T, D, dtype=torch.float64)
    for s0 in range(0, T, 16):
        acc = _noisy(acc + torch.matmul(_noisy(p[..., s0:s0 + 16]), vv[:, s0:s0 + 16]))
    lowp_acc = _noisy((acc / p.sum(-1, keepdim=True)).transpose(0, 1))
    v_ = judge(lowp_acc, ref, replay, torch.bfloat16, ref_truth=replay, kind="o", documented=documented)
    assert not v_.passed and v_.precision.rounding_ratio > ROUNDING_MULTIPLE, v_.precision


def test_op_sequence_check_of_the_activation():
    """mlp_act against the reference's ops in bf16 on the same gate/up: a kernel within 1 ULP (another
    tanh, no intermediate rounding) passes; the erf formula fails; float32 is left to the L2 budget."""
    g = torch.Generator().manual_seed(5)
    gate = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    up = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    same = gelu_tanh(gate) * up
    truth = gelu_tanh(gate.double()) * up.double()
    for candidate in (same, (torch.nn.functional.gelu(gate.float(), approximate="tanh") * up.float()).to(torch.bfloat16),
                      torch.nn.functional.gelu(gate.double(), approximate="tanh").to(torch.bfloat16) * up):
        d = op_sequence_distance(candidate, same, torch.bfloat16)
        assert float(d.max()) <= 1.0
        assert judge(candidate, same, truth, torch.bfloat16, ref_truth=truth, kind="mlp_act", same_dtype=same).passed
    erf = torch.nn.functional.gelu(gate) * up
    v = judge(erf, same, truth, torch.bfloat16, ref_truth=truth, kind="mlp_act", same_dtype=same)
    assert v.error.rel_l2 < v.budget.rel_l2  # under the L2 budget
    assert not v.passed and v.precision.opseq_far_fraction > OPSEQ_FRACTION and v.precision.opseq_max_ulps > OPSEQ_ULPS


def test_rounding_resolution_of_attention_outputs():
    g = torch.Generator().manual_seed(1)
    replay = torch.randn(64, 4, 16, dtype=torch.float64, generator=g)
    correct = _noisy(replay)
    assert rounding_error(replay, torch.bfloat16) == pytest.approx(float((correct - replay).norm()))
    ref = _noisy(replay * (1 + 2 ** -8 * torch.randn(replay.shape, dtype=torch.float64, generator=g)))
    v = judge(correct, ref, replay, torch.bfloat16, ref_truth=replay, kind="o")
    assert v.passed and v.precision.rounding_ratio == pytest.approx(1.0)
    # One extra rounding on the way (an accumulator in bf16): ~1.4x, under the reference's noise.
    denom = 1 + 2 * torch.rand(64, 1, 1, dtype=torch.float64, generator=g)  # the softmax denominator
    twice = _noisy(_noisy(replay * denom) / denom)  # the unnormalised sum rounded, then the output
    v = judge(twice, ref, replay, torch.bfloat16, ref_truth=replay, kind="o")
    assert v.error.rel_l2 < v.budget.rel_l2 and v.precision.rounding_ratio > ROUNDING_MULTIPLE and not v.passed
    # Not applied in float32 (sharp enough already) nor globally.
    assert judge(twice, ref, replay, torch.bfloat16, kind="o").passed


def test_without_a_truth_the_budget_counts_ulps_and_a_one_percent_change_is_caught():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(32, 64, generator=g)  # float32: the baseline is the truth and the reference
    reordered = base + base.abs() * 2e-5 * torch.randn(base.shape, generator=g)  # reordered sums, deep
    v = judge(reordered, base, base, torch.float32)
    assert v.passed and v.precision.no_noise_ulps is not None
    assert v.error.rel_l2 > v.budget.floor  # the old floor-only budget would have fired
    perturbed = base.clone()
    perturbed[3] *= 1.01
    v = judge(perturbed, base, base, torch.float32)
    assert not v.passed
