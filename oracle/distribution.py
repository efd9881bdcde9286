"""Distribution-level judgement of the logits, as serving engines compare two models.

Tap budgets (oracle/tolerance.py) judge the logits as numbers. This module judges them as what
they are for: next-token distributions. Per position (a row of logits [..., V]), against the
truth (the reference in float64):

    KL          KL(truth || candidate) = sum_v p_t(v) (log p_t(v) - log p_c(v)), in nats
    argmax      the candidate's argmax agrees with the truth's (tie-aware: it agrees when the
                truth's argmax is among the candidate's largest logits, ties included: a bf16 tie
                picks an index by position, not by value)
    top-k       overlap of the truth's top-k tokens with the candidate's (tie-aware likewise: a
                truth top-k token counts when its candidate logit is >= the candidate's k-th largest)
    logprob     |log p_c(v) - log p_t(v)| on the truth's top-k tokens (the tokens a sampler draws)

and over the positions: mean and max KL, agreement and overlap as shares (and as counts of
disagreements and misses), the largest top-k logprob difference.

Budgets come from the reference in the compared dtype against the same truth (its own noise),
as for the taps. The rules (DistributionTolerance):

    KL mean           <= kl_multiple     * ref KL mean + kl_floor
    KL max            <= kl_max_multiple * ref KL max  + kl_floor
                         (kl_floor = max(kl_floor[dtype], (logprob floor below)^2 / 2))
    top-k logprob     <= logprob_multiple * ref's      + logprob_floor[dtype] * max(1, max |truth logit|)
    argmax            disagreements <= d_ref + 1 + z * sqrt(2 d_ref)
    top-k             misses        <= m_ref + 1 + z * sqrt(2 m_ref)

where a disagreement (a miss) counts only beyond a near-tie: the candidate's logit of the truth's
winner (top-k token) below its own largest (k-th largest) by more than rank_slack times the
reference's largest logit error. KL multiples are squares of the tap multiples (KL is quadratic
in the logit error).

The counting rules treat the reference's disagreements (misses) as a Poisson count: a clean
candidate is a second draw of the same noise, and the difference of two Poisson(d) draws has a
standard deviation of sqrt(2 d); z (3) standard deviations plus one position of slack keep a
clean run from failing on a few near-ties, while a bug that flips the winner at many positions
fails. "Agreement must be >= the reference's minus a margin" in those terms: margin =
(1 + z sqrt(2 d_ref)) / positions. The KL and logprob multiples mirror the tap tolerance (4x for
a mean, 8x for an extreme of a tail); the floors cover rounding the candidate may do that the
reference does not. Everything is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch

DEFAULT_TOP_K = 10


# --------------------------------------------------------------------------------------
# Per-position metrics (pure functions of two logits tensors [..., V])
# --------------------------------------------------------------------------------------


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the last axis, flattened to [N, V]."""
    x = logits.detach().to(torch.float64)
    return torch.log_softmax(x.reshape(-1, x.shape[-1]), dim=-1)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    x = logits.detach().to(torch.float64)
    return x.reshape(-1, x.shape[-1])


def _check(truth: torch.Tensor, cand: torch.Tensor) -> None:
    if truth.shape != cand.shape:
        raise ValueError(f"shape mismatch: candidate {list(cand.shape)} vs truth {list(truth.shape)}")
    if truth.dim() < 1 or truth.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty vocabulary axis, got {list(truth.shape)}")


def kl_divergence(truth: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """KL(truth || candidate) per position [N], in nats. Terms where the truth has probability 0
    contribute 0; where only the candidate has probability 0, +inf."""
    _check(truth, cand)
    lt, lc = log_probs(truth), log_probs(cand)
    pt = lt.exp()
    terms = torch.where(pt > 0, pt * (lt - lc), torch.zeros_like(pt))
    return terms.sum(-1).clamp(min=0.0)  # tiny negatives are rounding


def argmax_agrees(truth: torch.Tensor, cand: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
    """Per position [N] bool: the truth's argmax is among the candidate's largest logits, within
    `slack` (a logit difference rounding noise can make: a near-tie is not a disagreement)."""
    _check(truth, cand)
    t, c = _rows(truth), _rows(cand)
    top = t.argmax(-1, keepdim=True)
    return c.gather(-1, top).squeeze(-1) >= c.max(-1).values - slack


def topk_overlap(truth: torch.Tensor, cand: torch.Tensor, k: int = DEFAULT_TOP_K, slack: float = 0.0) -> torch.Tensor:
    """Per position [N] int: how many of the truth's top-k tokens are in the candidate's top k
    (a token within `slack` of the candidate's k-th largest counts as in)."""
    _check(truth, cand)
    t, c = _rows(truth), _rows(cand)
    k = min(k, t.shape[-1])
    top = t.topk(k, dim=-1).indices
    kth = c.topk(k, dim=-1).values[:, -1:]
    return (c.gather(-1, top) >= kth - slack).sum(-1)


def topk_logprob_diff(truth: torch.Tensor, cand: torch.Tensor, k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Per position [N]: max |log p_c - log p_t| over the truth's top-k tokens."""
    _check(truth, cand)
    lt, lc = log_probs(truth), log_probs(cand)
    k = min(k, lt.shape[-1])
    top = lt.topk(k, dim=-1).indices
    return (lc.gather(-1, top) - lt.gather(-1, top)).abs().max(-1).values


# --------------------------------------------------------------------------------------
# Summaries and verdicts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributionMetrics:
    """One side (candidate or reference) against the truth, over all positions."""

    positions: int
    k: int
    kl_mean: float
    kl_max: float
    kl_max_row: int | None  # row index (the caller maps it to a position)
    argmax_agreement: float  # share of positions
    argmax_disagreements: int
    topk_overlap: float  # mean share of the truth's top k found in the candidate's
    topk_misses: int  # sum over positions of (k - overlap)
    topk_logprob_max_abs: float

    def to_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}


def distribution_metrics(truth: torch.Tensor, cand: torch.Tensor, k: int = DEFAULT_TOP_K,
                         slack: float = 0.0) -> DistributionMetrics:
    """All metrics of `cand` against `truth` (logits [..., V], aligned row for row); `slack` as in
    argmax_agrees and topk_overlap."""
    kl = kl_divergence(truth, cand)
    n = kl.numel()
    if n == 0:
        return DistributionMetrics(0, k, 0.0, 0.0, None, 1.0, 0, 1.0, 0, 0.0)
    k = min(k, truth.shape[-1])
    agree = argmax_agrees(truth, cand, slack)
    overlap = topk_overlap(truth, cand, k, slack)
    lp = topk_logprob_diff(truth, cand, k)
    kl_ok = torch.where(torch.isnan(kl), math.inf, kl)
    return DistributionMetrics(
        positions=n, k=k, kl_mean=float(kl_ok.mean()), kl_max=float(kl_ok.max()), kl_max_row=int(kl_ok.argmax()),
        argmax_agreement=float(agree.double().mean()), argmax_disagreements=int((~agree).sum()),
        topk_overlap=float(overlap.double().mean()) / k, topk_misses=int((k - overlap).sum()),
        topk_logprob_max_abs=float(torch.nan_to_num(lp, nan=math.inf).max()),
    )


# Floors: rounding a clean candidate may do that the reference does not (another accumulation
# order for the lm_head, a fused softcap). KL of a logit perturbation d is about Var_p(d) / 2, so a
# floor of e.g. 1e-4 nats in bfloat16 is a perturbation of about 0.014 in the logits (a tenth of
# a bf16 ULP at 16-32, where the largest logits sit). Logprob floors are relative to the largest
# truth logit, as the tap tolerance's max-abs floor is (oracle/tolerance.py, same values): a
# logprob error comes from logit errors, which scale with the logits (float32: `diff` without a
# truth, where the reference's noise is zero, measured 3.2e-5 on tiny, logits up to ~25).
KL_FLOORS: dict[str, float] = {"float64": 1e-15, "float32": 1e-9, "float16": 1e-5, "bfloat16": 1e-4}
LOGPROB_FLOORS: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-4, "bfloat16": 2e-3}


@dataclass(frozen=True)
class DistributionTolerance:
    """The budget rules of the module docstring."""

    k: int = DEFAULT_TOP_K
    # KL is quadratic in the logit error, so its multiples are the squares of the tap budget's
    # (4x for an L2 mean, 8x for a max): a candidate twice as noisy as the reference in the logits
    # is four times its KL (measured: bf16 tiny, chunked prefill, 5x the reference's KL mean with
    # the logits tap itself at 0.5 of its budget).
    kl_multiple: float = 16.0
    kl_max_multiple: float = 64.0
    rank_slack: float = 2.0  # near-tie width for argmax and top-k, in reference max-abs logit errors
    logprob_multiple: float = 8.0
    z: float = 3.0  # standard deviations of the difference of two Poisson counts
    kl_floors: Mapping[str, float] = field(default_factory=lambda: dict(KL_FLOORS))
    logprob_floors: Mapping[str, float] = field(default_factory=lambda: dict(LOGPROB_FLOORS))

    def allowed_count(self, ref_count: int) -> float:
        """Disagreements (or misses) a candidate may have where the reference has `ref_count`."""
        return ref_count + 1 + self.z * math.sqrt(2 * ref_count)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kl_floors"], d["logprob_floors"] = dict(self.kl_floors), dict(self.logprob_floors)
        return d


DEFAULT_DISTRIBUTION_TOLERANCE = DistributionTolerance()


@dataclass(frozen=True)
class Check:
    """One budgeted quantity: the candidate's value, the reference's, the budget (an upper bound)."""

    metric: str
    candidate: float
    reference: float
    budget: float
    rule: str

    @property
    def passed(self) -> bool:
        return self.candidate <= self.budget  # NaN compares False: fails

    @property
    def ratio(self) -> float:
        if self.budget > 0:
            return self.candidate / self.budget
        return 0.0 if self.candidate == 0 else math.inf

    def to_dict(self) -> dict:
        return {"metric": self.metric, "candidate": _json_float(self.candidate), "reference": _json_float(self.reference),
                "budget": _json_float(self.budget), "ratio": _json_float(self.ratio), "passed": self.passed,
                "rule": self.rule}


@dataclass(frozen=True)
class DistributionVerdict:
    error: DistributionMetrics  # candidate vs truth
    noise: DistributionMetrics  # reference in the compared dtype vs truth
    checks: tuple[Check, ...]
    worst_positions: tuple[dict, ...] = ()  # by candidate KL, worst first: position, kl, ref_kl

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def ratio(self) -> float:
        """The largest value/budget over the checks: above 1 fails."""
        return max((c.ratio for c in self.checks), default=0.0)

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{c.metric} {c.candidate:.4g} exceeds its budget {c.budget:.4g} ({c.ratio:.3g}x; "
                     f"reference {c.reference:.4g}; rule: {c.rule})" for c in self.checks if not c.passed)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "ratio": _json_float(self.ratio), "reasons": list(self.reasons),
                "candidate": self.error.to_dict(), "reference": self.noise.to_dict(),
                "checks": [c.to_dict() for c in self.checks], "worst_positions": [dict(p) for p in self.worst_positions]}


def _floor(floors: Mapping[str, float], dtype) -> float:
    name = str(dtype).removeprefix("torch.")
    if name not in floors:
        raise ValueError(f"no distribution floor for dtype {name}; floors are set for {', '.join(floors)}")
    return float(floors[name])


def judge_distribution(cand: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype,
                       tolerance: DistributionTolerance = DEFAULT_DISTRIBUTION_TOLERANCE,
                       positions: torch.Tensor | None = None, worst: int = 5,
                       ref_truth: torch.Tensor | None = None) -> DistributionVerdict:
    """Judge the candidate's logits [N, V] against the truth's, budgeted by the reference's (all
    three aligned row for row). `positions` [N] names the rows in worst_positions. `ref_truth`:
    what the reference is measured against when that is another truth than the candidate's (MoE
    models, each path against the float64 truth routed as it routed: docs/design_notes.md note 35)."""
    tol = tolerance
    rt = truth if ref_truth is None else ref_truth
    # Rank changes within twice the reference's own largest logit error are near-ties that a
    # second draw of the same rounding noise flips (a bf16 check of tiny, 256 tokens of near-flat
    # ranks 8-12, counted 4 top-10 misses against the reference's 0 on a clean run).
    both = torch.isfinite(rt) & torch.isfinite(ref)
    slack = tol.rank_slack * float((ref.double() - rt.double())[both].abs().max()) if both.any() else 0.0
    e = distribution_metrics(truth, cand, tol.k, slack)
    n = distribution_metrics(rt, ref, tol.k, slack)
    finite = truth[torch.isfinite(truth)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    lp_floor = _floor(tol.logprob_floors, dtype) * scale
    # A logit perturbation d moves KL by about Var_p(d) / 2, so logits rounded at the logprob
    # floor's scale reach KL ~ lp_floor^2 / 2: a fixed KL floor alone was too tight for compiled
    # float32 (an H200 gave KL max 6.8e-9 on tiny against a budget of 3.7e-9).
    kl_floor = max(_floor(tol.kl_floors, dtype), 0.5 * lp_floor ** 2)
    checks = (
        Check("KL mean", e.kl_mean, n.kl_mean, tol.kl_multiple * n.kl_mean + kl_floor,
              f"{tol.kl_multiple:g} x reference + {kl_floor:g}"),
        Check("KL max", e.kl_max, n.kl_max, tol.kl_max_multiple * n.kl_max + kl_floor,
              f"{tol.kl_max_multiple:g} x reference + {kl_floor:g}"),
        Check(f"top-{e.k} logprob max abs diff", e.topk_logprob_max_abs, n.topk_logprob_max_abs,
              tol.logprob_multiple * n.topk_logprob_max_abs + lp_floor,
              f"{tol.logprob_multiple:g} x reference + {lp_floor:.3g} ({_floor(tol.logprob_floors, dtype):g} x max |logit|)"),
        Check("argmax disagreements", e.argmax_disagreements, n.argmax_disagreements,
              tol.allowed_count(n.argmax_disagreements), f"reference + 1 + {tol.z:g} sqrt(2 reference)"),
        Check(f"top-{e.k} misses", e.topk_misses, n.topk_misses, tol.allowed_count(n.topk_misses),
              f"reference + 1 + {tol.z:g} sqrt(2 reference)"),
    )
    worst_rows: list[dict] = []
    if e.positions:
        kl_c, kl_r = kl_divergence(truth, cand), kl_divergence(rt, ref)
        pos = positions.reshape(-1).tolist() if positions is not None else list(range(e.positions))
        order = torch.argsort(torch.nan_to_num(kl_c, nan=math.inf), descending=True, stable=True)[:worst]
        worst_rows = [{"position": int(pos[i]), "kl": _json_float(float(kl_c[i])), "ref_kl": _json_float(float(kl_r[i]))}
                      for i in order.tolist()]
    return DistributionVerdict(e, n, checks, tuple(worst_rows))


def _json_float(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v
