"""Tolerance budgets: judge a candidate's error against the noise the reference itself has.

For one tap (shared/DESIGN.md "Tolerance"):

    truth  the reference in float64 (float32 where float64 does not fit)
    ref    the reference in the compared dtype          noise = metric(ref  vs truth)
    cand   the optimized path in the compared dtype     error = metric(cand vs truth)

    budget = multiple * noise + floor[dtype]

The primary metric is relative L2 error; max abs error is checked too, with its own (larger)
multiple and a floor scaled by the truth's largest magnitude. A tap diverges when either error
exceeds its budget, or when the candidate has NaN/Inf where the truth does not.

The constants below are PROVISIONAL: they are reasoned starting points, to be replaced by
values calibrated over many clean fuzzed scenarios (no false alarm) and injected faults (every
one caught). Pass a `Tolerance` to override them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch

from .metrics import ErrorMetrics, as_float_dtype, error_metrics

# A clean candidate rounds at different points than the reference (fused kernels, other
# accumulation orders), so its error is a second draw of noise of about the reference's size.
# Relative L2 averages over many elements and is stable between draws, so 4x leaves headroom
# without hiding a real bug, which shows as an error many times the noise. In bfloat16 the
# optimized path measured no noisier than the reference (ratios <= 1.0 on the H100).
DEFAULT_MULTIPLE = 4.0
# Max abs error is one extreme of a tail; the extreme of another draw of the same noise varies far
# more than an L2 norm does, so its multiple is larger.
DEFAULT_MAX_ABS_MULTIPLE = 8.0
# The floor keeps the budget from collapsing where the reference happens to be exact (an
# embedding lookup scaled by a power of two has zero noise in float32) and covers rounding the
# candidate does that the reference does not: storing a float32 accumulator into the compared
# dtype, summing in another order. Relative to ||truth|| for relative L2, and to max|truth| for
# max abs. bfloat16 and float16: about one unit roundoff (2**-9 = 1.95e-3, 2**-11 = 4.9e-4).
# float32: calibrated (bench/calibrate_tolerance.py on property-generated clean scenarios,
# docs/measurements.md): with a 1e-6 floor the max-abs side of the paged attention's reordered
# sums reached 0.79 of the budget (layers.2.o); with 1e-5 (about 170 roundoffs) the worst clean
# tap sits near 0.4-0.5, set by the relative-L2 term deep in the stack (the candidate's error is a
# second draw of about twice the reference's noise there). float32 faults land hundreds to
# thousands of times over (a 1% error in one head is 5e-3 relative at its tap).
DEFAULT_FLOORS: dict[str, float] = {
    "float64": 1e-12,
    "float32": 1e-5,
    "float16": 5e-4,
    "bfloat16": 2e-3,
}


@dataclass(frozen=True)
class Budget:
    rel_l2: float
    max_abs: float
    floor: float  # the relative floor used (for the report)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tolerance:
    multiple: float = DEFAULT_MULTIPLE
    max_abs_multiple: float = DEFAULT_MAX_ABS_MULTIPLE
    floors: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FLOORS))

    def floor(self, dtype: torch.dtype | str) -> float:
        name = str(as_float_dtype(dtype)).removeprefix("torch.")
        if name not in self.floors:
            raise ValueError(f"no tolerance floor for dtype {name}; floors are set for {', '.join(self.floors)}")
        return float(self.floors[name])

    def budget(self, noise: ErrorMetrics, dtype: torch.dtype | str) -> Budget:
        floor = self.floor(dtype)
        return Budget(
            rel_l2=self.multiple * noise.rel_l2 + floor,
            max_abs=self.max_abs_multiple * noise.max_abs + floor * noise.truth_max_abs,
            floor=floor,
        )

    def to_dict(self) -> dict:
        return {"multiple": self.multiple, "max_abs_multiple": self.max_abs_multiple, "floors": dict(self.floors)}


DEFAULT_TOLERANCE = Tolerance()


@dataclass(frozen=True)
class Verdict:
    error: ErrorMetrics  # candidate vs truth
    noise: ErrorMetrics  # reference in the compared dtype vs truth
    budget: Budget
    reasons: tuple[str, ...]  # why it fails; empty when it passes

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def ratio(self) -> float:
        """Relative L2 error over its budget: above 1 fails."""
        return _ratio(self.error.rel_l2, self.budget.rel_l2)

    @property
    def max_abs_ratio(self) -> float:
        return _ratio(self.error.max_abs, self.budget.max_abs)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": list(self.reasons), "ratio": self.ratio,
                "max_abs_ratio": self.max_abs_ratio, "error": self.error.to_dict(),
                "noise": self.noise.to_dict(), "budget": self.budget.to_dict()}


def judge(candidate: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype | str,
          tolerance: Tolerance = DEFAULT_TOLERANCE, *, ref_truth: torch.Tensor | None = None) -> Verdict:
    """Verdict on one tap; the tensors are aligned row for row and of the same shape.

    `ref_truth` is what the reference is measured against when that is not the candidate's
    truth: a layer-local judgement (oracle/replay.py) measures each path against a replay of its
    own inputs."""
    noise = error_metrics(ref, truth if ref_truth is None else ref_truth, ulp_dtype=dtype)
    budget = tolerance.budget(noise, dtype)
    # Mismatch fraction: the share of elements beyond the max-abs budget (how widespread a
    # failure is).
    error = error_metrics(candidate, truth, ulp_dtype=dtype, mismatch_threshold=budget.max_abs)
    return Verdict(error, noise, budget, _reasons(error, budget))


def _reasons(error: ErrorMetrics, budget: Budget) -> tuple[str, ...]:
    reasons = []
    if error.new_nonfinite:
        reasons.append(f"candidate has {error.new_nonfinite} NaN/Inf where the truth has none "
                       f"({error.candidate_nan} NaN, {error.candidate_inf} Inf in all)")
    if error.rel_l2 > budget.rel_l2:
        reasons.append(f"relative L2 error {error.rel_l2:.3g} exceeds its budget {budget.rel_l2:.3g} "
                       f"({_ratio(error.rel_l2, budget.rel_l2):.3g}x)")
    if error.max_abs > budget.max_abs:
        reasons.append(f"max abs error {error.max_abs:.3g} exceeds its budget {budget.max_abs:.3g} "
                       f"({_ratio(error.max_abs, budget.max_abs):.3g}x)")
    return tuple(reasons)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf
