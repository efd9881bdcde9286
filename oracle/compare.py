"""Compare a candidate capture with the truth, budgeted by the reference's own noise, and find
the first divergence in dataflow order.

    comparison = compare(truth, ref, cand, config)
    assert comparison.passed, comparison.summary()

Alignment is by position value: every tap carries its positions (a candidate may hold only
some, e.g. after a prefix-cache hit), and the truth's and ref's rows are looked up at those
positions. Pool taps (`layers.{l}.k_cache` / `.v_cache`, optimized path only) are judged
against the truth's `layers.{l}.k` / `.v` at the positions the pool tap covers.

Row statuses: "pass"; "fail" (over budget or new NaN/Inf); "misaligned" (positions or shapes
that cannot line up: a failure too); "missing" (in one capture but not another: reported, not
judged). A comparison passes when no row fails, no truth request is absent from the candidate,
and every truth request had at least one tap judged.

Given the model's weights (`compare(..., weights=...)`, as run_scenario does), each tap that has a
replay (oracle/replay.py) is also judged locally: the candidate against a float64 replay of its
own upstream taps, budgeted by the reference against a replay of ITS upstream taps, so neither
carries error inherited from earlier stages. A row then fails when its global OR its local
judgement fails, and the first divergence says which one did. A local judgement whose inputs a
capture lacks is "skipped", with the reason. Without weights (the `diff` CLI) nothing changes.

The `logits` row also gets a distribution judgement (oracle/distribution.py: KL, argmax, top-k
overlap and top-k logprobs against the truth, budgeted by the reference's own), which fails the
row like the others; the first divergence then names `logits` and says "distribution".

MoE models (docs/design_notes.md notes 25 and 35). A correct path in a low precision routes some
rows to other experts than the float64 truth does at near-tie router logits, and the rows past such
a choice carry a whole other expert's output. Given routed truths (`compare(...,
routed_truths={"reference": ..., "candidate": ...})`: the float64 truth forced to each path's own
`experts` taps, as run_scenario builds them), the global judgement measures the candidate against
the truth routed as the candidate routed and budgets with the reference against the truth routed
as the reference routed, on every row (Comparison.truth_routing = "per-path"). Without them, rows
past a near-tie choice leave the global judgement (Replayer.routing_ties), as before. The
`experts` taps themselves are choices, not numbers: their row (status "info") counts the rows whose
expert set differs from the truth's and never fails. A routing bug is the local judgement's to
catch: it recomputes mlp_out, routing included, in float64 from the path's own input.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .capture import Capture, RequestCapture, rows_at
from .distribution import DEFAULT_DISTRIBUTION_TOLERANCE, DistributionVerdict, judge_distribution
from .metrics import as_float_dtype, axis_profile, unravel
from .replay import NO_TIE, Replayer, Skipped
from .taps import LAYER_KINDS, is_integer_tap, order_key, parse_tap, truth_counterpart
from .tolerance import DEFAULT_TOLERANCE, Tolerance, Verdict, judge

PASS, FAIL, MISALIGNED, MISSING, SKIPPED = "pass", "fail", "misaligned", "missing", "skipped"
INFO = "info"  # a row shown, never judged (the MoE experts taps: choices, not numbers)
PER_PATH = "per-path"  # Comparison.truth_routing: each path judged against the truth routed as it routed
FAILING = (FAIL, MISALIGNED)
GLOBAL, LOCAL, BOTH = "global", "local", "global and local"  # which judgement a divergence failed
DISTRIBUTION = "distribution"  # the logits row's distribution judgement (oracle/distribution.py)
TOP_ELEMENTS = 5  # worst elements listed for a divergent tap
TOP_POSITIONS = 32  # positions listed, worst first, for a divergent tap


class CompareError(ValueError):
    """The three captures cannot be compared (other model, mismatched dtypes): bad input, not a
    divergence."""


# --------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------


@dataclass
class Element:
    """One tensor element, its axes named: position, then e.g. head and dim."""

    position: int
    coords: dict[str, int]
    candidate: float
    truth: float
    ref: float | None
    abs_error: float

    def where(self) -> str:
        return ", ".join([f"position {self.position}"] + [f"{k} {v}" for k, v in self.coords.items()])

    def to_dict(self) -> dict:
        return {"position": self.position, "coords": dict(self.coords), "candidate": self.candidate,
                "truth": self.truth, "ref": self.ref, "abs_error": self.abs_error}


@dataclass
class LocalRow:
    """A tap's layer-local judgement: the candidate against a replay of its own inputs."""

    inputs: list[str]  # the taps it was replayed from
    status: str  # PASS, FAIL or SKIPPED
    reasons: list[str] = field(default_factory=list)  # why it fails, or why it was skipped
    verdict: Verdict | None = None
    positions: int = 0  # rows judged
    note: str | None = None  # rows a replay left out, and why

    def to_dict(self) -> dict:
        d = {"inputs": list(self.inputs), "status": self.status, "reasons": list(self.reasons),
             "positions": self.positions, "note": self.note}
        if self.verdict is not None:
            d.update(_verdict_dict(self.verdict))
        return d


@dataclass
class TapRow:
    tap: str  # the candidate's tap name (or the truth's, for a tap the candidate lacks)
    truth_tap: str  # what it is judged against
    status: str  # of the global judgement
    reasons: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    positions: int = 0  # rows compared
    worst: Element | None = None  # the max-abs element
    local: LocalRow | None = None  # None: no local judgement (no weights given, or no replay for this tap)
    distribution: DistributionVerdict | None = None  # the logits row only
    left_out: int = 0  # rows the global judgement left out (past a near-tie expert choice)
    # An experts row (status INFO): rows, and how many route to another expert set than the truth
    # in the candidate and in the reference.
    routing: dict | None = None

    @property
    def distribution_failed(self) -> bool:
        return self.distribution is not None and not self.distribution.passed

    @property
    def layer(self) -> int | None:
        return parse_tap(self.tap).layer

    @property
    def kind(self) -> str:
        return parse_tap(self.tap).kind

    @property
    def failed_by(self) -> str | None:
        """GLOBAL, LOCAL or BOTH (or DISTRIBUTION, alone or joined with " and "): which judgements
        fail; None when none does."""
        g = self.status in FAILING
        loc = self.local is not None and self.local.status == FAIL
        which = BOTH if g and loc else GLOBAL if g else LOCAL if loc else None
        if self.distribution_failed:
            return DISTRIBUTION if which is None else f"{which} and {DISTRIBUTION}"
        return which

    def to_dict(self) -> dict:
        d = {"tap": self.tap, "truth_tap": self.truth_tap, "layer": self.layer, "kind": self.kind,
             "status": self.status, "reasons": list(self.reasons), "positions": self.positions,
             "worst": self.worst.to_dict() if self.worst else None, "failed_by": self.failed_by,
             "left_out": self.left_out,
             "local": self.local.to_dict() if self.local else None}
        if self.distribution is not None:
            d["distribution"] = self.distribution.to_dict()
        if self.routing is not None:
            d["routing"] = dict(self.routing)
        if self.verdict is not None:
            d.update(_verdict_dict(self.verdict))
        return d


def _verdict_dict(v: Verdict) -> dict:
    return {"ratio": v.ratio, "max_abs_ratio": v.max_abs_ratio, "error": v.error.to_dict(),
            "noise": v.noise.to_dict(), "budget": v.budget.to_dict(), "precision": v.precision.to_dict()}


@dataclass
class Divergence:
    """The first failing tap of a request, and where in it the error sits."""

    request: str
    row: TapRow
    worst_elements: list[Element] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)  # worst first: position, chunk, rel errors
    chunks: list[dict] = field(default_factory=list)  # per chunk: range, max/mean rel error
    heads: list[dict] = field(default_factory=list)  # worst first, for taps with a head axis

    @property
    def judgement(self) -> str:
        """GLOBAL, LOCAL or BOTH. Where the global judgement fails, the location above is of the
        error against the truth; where only the local one does, of the error against the replay."""
        return self.row.failed_by or GLOBAL

    @property
    def led_by_local(self) -> bool:
        """The local judgement fails and the global one does not (the distribution one may): the
        location and numbers are of the error against the replay."""
        return self.judgement in (LOCAL, f"{LOCAL} and {DISTRIBUTION}")

    @property
    def verdict(self) -> Verdict | None:
        return self.row.local.verdict if self.led_by_local else self.row.verdict

    @property
    def reasons(self) -> list[str]:
        if self.judgement == LOCAL:
            return self.row.local.reasons
        out = list(self.row.reasons) if self.row.status in FAILING else []
        if not out and self.row.local is not None and self.row.local.status == FAIL:
            out = list(self.row.local.reasons)
        if self.row.distribution_failed:
            out += [f"distribution: {r}" for r in self.row.distribution.reasons]
        return out

    @property
    def tap(self) -> str:
        return self.row.tap

    @property
    def layer(self) -> int | None:
        return self.row.layer

    @property
    def kind(self) -> str:
        return self.row.kind

    def describe(self) -> str:
        where = "model level" if self.layer is None else f"layer {self.layer}"
        how = f"{self.judgement} judgement"
        if self.led_by_local:
            how += f", replayed from {', '.join(self.row.local.inputs)}"
        text = f"{where}, tensor {self.kind} ({self.tap}), request {self.request!r} [{how}]: {'; '.join(self.reasons)}"
        if self.worst_elements:
            e = self.worst_elements[0]
            against = "replay" if self.led_by_local else "truth"
            text += f"; worst at {e.where()}: candidate {e.candidate:.6g} vs {against} {e.truth:.6g}"
        return text

    def to_dict(self) -> dict:
        v = self.verdict
        return {"request": self.request, "tap": self.tap, "truth_tap": self.row.truth_tap, "layer": self.layer,
                "kind": self.kind, "judgement": self.judgement,
                "status": self.row.status if self.row.status in FAILING else FAIL, "reasons": list(self.reasons),
                "ratio": v.ratio if v else None, "max_abs_ratio": v.max_abs_ratio if v else None,
                "worst_elements": [e.to_dict() for e in self.worst_elements],
                "positions": self.positions, "chunks": self.chunks, "heads": self.heads}


@dataclass
class RequestComparison:
    request: str
    rows: list[TapRow]  # dataflow order
    first_divergence: Divergence | None
    layer_growth: dict[str, Any]
    chunk_starts: list[int] | None

    @property
    def judged(self) -> list[TapRow]:
        return [r for r in self.rows if r.status not in (MISSING, INFO)]

    @property
    def passed(self) -> bool:
        return self.first_divergence is None and bool(self.judged)

    def to_dict(self) -> dict:
        missing = [r for r in self.rows if r.status == MISSING]
        return {"request": self.request, "passed": self.passed,
                "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
                "rows": [r.to_dict() for r in self.rows], "layer_growth": self.layer_growth,
                "chunk_starts": self.chunk_starts,
                "missing": [{"tap": r.tap, "reason": "; ".join(r.reasons)} for r in missing]}


@dataclass
class Comparison:
    requests: list[RequestComparison]
    dtype: str | None
    truth_dtype: str | None
    tolerance: Tolerance
    missing_requests: list[str]  # in the truth, not in the candidate
    extra_requests: list[str]  # in the candidate, not in the truth
    notes: list[str]
    truth_routing: str | None = None  # PER_PATH where MoE taps were judged against routed truths

    @property
    def passed(self) -> bool:
        return not self.missing_requests and all(r.passed for r in self.requests)

    @property
    def first_divergence(self) -> Divergence | None:
        """The earliest divergence in dataflow order over all requests (ties: request order)."""
        found = [r.first_divergence for r in self.requests if r.first_divergence is not None]
        return min(found, key=lambda d: order_key(d.tap), default=None)

    def counts(self) -> dict[str, int]:
        rows = [row for r in self.requests for row in r.rows]
        local = [row.local for row in rows if row.local is not None]
        return {"requests": len(self.requests),
                "taps_judged": sum(row.status not in (MISSING, INFO) for row in rows),
                "taps_failed": sum(row.failed_by is not None for row in rows),
                "taps_missing": sum(row.status == MISSING for row in rows),
                "requests_diverged": sum(r.first_divergence is not None for r in self.requests),
                "local_judged": sum(x.status != SKIPPED for x in local),
                "local_failed": sum(x.status == FAIL for x in local),
                "local_skipped": sum(x.status == SKIPPED for x in local)}

    def to_dict(self) -> dict:
        first = self.first_divergence
        routing = {} if self.truth_routing is None else {"truth_routing": self.truth_routing}
        return _jsonable({
            "passed": self.passed, "dtype": self.dtype, "truth_dtype": self.truth_dtype, **routing,
            "tolerance": self.tolerance.to_dict(), "counts": self.counts(),
            "first_divergence": first.to_dict() if first else None,
            "requests": [r.to_dict() for r in self.requests],
            "missing_requests": list(self.missing_requests), "extra_requests": list(self.extra_requests),
            "notes": list(self.notes), "summary": self.summary(),
        })

    def summary(self) -> str:
        """A few lines for a terminal or a failing assertion; the first names the verdict."""
        c = self.counts()
        local = f"; {c['local_judged']} local judgements" if c["local_judged"] or c["local_skipped"] else ""
        routed = " routed per path" if self.truth_routing == PER_PATH else ""
        settings = (f"[{self.dtype} vs {self.truth_dtype} truth{routed}{local}; budget {self.tolerance.multiple:g}x noise "
                    f"(max abs {self.tolerance.max_abs_multiple:g}x) + floor]")
        first = self.first_divergence
        if first is not None:
            lines = [f"DIVERGENCE at {first.describe()}",
                     f"{c['requests_diverged']} of {c['requests']} requests diverge; "
                     f"{c['taps_failed']} of {c['taps_judged']} judged taps fail {settings}"]
        elif not self.passed:
            lines = [f"NO VERDICT: {self._why_unjudged()} {settings}"]
        else:
            lines = [f"PARITY: {c['taps_judged']} taps in {c['requests']} requests within budget"
                     f"{self._closest_call()} {settings}"]
        if self.missing_requests:
            lines.append(f"requests missing from the candidate: {self.missing_requests}")
        if self.extra_requests:
            lines.append(f"requests only in the candidate (not judged): {self.extra_requests}")
        if c["taps_missing"]:
            lines.append(f"{c['taps_missing']} taps present in one capture but not another (see rows marked missing)")
        if c["local_skipped"]:
            lines.append(f"{c['local_skipped']} local judgements skipped (their inputs are not in a capture; "
                         f"see each row's local.reasons)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def _why_unjudged(self) -> str:
        if self.missing_requests:
            return f"{len(self.missing_requests)} truth requests are missing from the candidate"
        empty = [r.request for r in self.requests if not r.judged]
        return f"no tap could be judged for requests {empty}"

    def _closest_call(self) -> str:
        rows = [(row.verdict.ratio, row.tap, r.request, "") for r in self.requests for row in r.rows if row.verdict]
        rows += [(row.local.verdict.ratio, row.tap, r.request, " (local)") for r in self.requests for row in r.rows
                 if row.local is not None and row.local.verdict]
        rows += [(row.distribution.ratio, row.tap, r.request, " (distribution)") for r in self.requests
                 for row in r.rows if row.distribution is not None]
        if not rows:
            return ""
        ratio, tap, request, how = max(rows)
        return f" (closest: {tap}{how} of request {request!r} at {ratio:.2g} of its budget)"


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------


def compare(truth: Capture, ref: Capture, cand: Capture, config, *, tolerance: Tolerance = DEFAULT_TOLERANCE,
            chunk_boundaries: Mapping[str, Sequence[int]] | None = None,
            weights: Mapping[str, torch.Tensor] | None = None,
            routed_truths: Mapping[str, Capture] | None = None) -> Comparison:
    """Judge every tap of `cand` against `truth`, budgeted by `ref`'s noise.

    `config` (Gemma4Config) must be the model all three captured. `chunk_boundaries` maps a
    request id to the positions where its prefill chunks (and decode steps) start; without it,
    the candidate's metadata["scenario"]["chunk_boundaries"] is used when present. `weights`
    (that model's, in the compared dtype or float64) turn on the layer-local judgement.
    `routed_truths` ({"reference": capture, "candidate": capture}, MoE models): the truth forced to
    each path's expert choices; the global judgement then measures each path against its own
    (module docstring). A request either lacks is judged against `truth` as without them."""
    _check_same_model(config, truth=truth, ref=ref, cand=cand)
    dtype = _compared_dtype(ref, cand)
    truth_dtype = truth.metadata.get("dtype")
    notes = _notes(dtype, truth_dtype)
    if chunk_boundaries is None:
        chunk_boundaries = _scenario_chunks(cand)
    replayer = Replayer(config, weights) if weights is not None else None
    if routed_truths is not None:
        if set(routed_truths) != {"reference", "candidate"}:
            raise CompareError(f"routed_truths needs the keys 'reference' and 'candidate', got {sorted(routed_truths)}")
        for name, capture in routed_truths.items():
            _check_same_model(config, **{f"{name}-routed truth": capture})

    results = []
    per_path = False
    for request_id, truth_req in truth.requests.items():
        if request_id not in cand.requests:
            continue
        starts = _chunk_starts(chunk_boundaries.get(request_id)) if chunk_boundaries else None
        routed = None
        if routed_truths is not None and all(request_id in c.requests for c in routed_truths.values()):
            routed = (routed_truths["reference"].requests[request_id], routed_truths["candidate"].requests[request_id])
            per_path = True
        results.append(_compare_request(request_id, truth_req, ref.requests.get(request_id), cand.requests[request_id],
                                        config, dtype, tolerance, starts, replayer, routed))
    missing = [r for r in truth.requests if r not in cand.requests]
    extra = [r for r in cand.requests if r not in truth.requests]
    return Comparison(results, dtype, truth_dtype, tolerance, missing, extra, notes, PER_PATH if per_path else None)


def _compare_request(request_id: str, truth: RequestCapture, ref: RequestCapture | None, cand: RequestCapture,
                     config, dtype: str | None, tolerance: Tolerance, starts: list[int] | None,
                     replayer: Replayer | None = None,
                     routed: tuple[RequestCapture, RequestCapture] | None = None) -> RequestComparison:
    """`routed`: (the truth routed as the reference routed, the truth routed as the candidate
    routed) for this request, or None."""
    # MoE models without routed truths: rows past a near-tie expert choice leave the global
    # judgement (Replayer.routing_ties). With them every row is judged, each path on its own routing.
    ties = (replayer.routing_ties(truth, ref, as_float_dtype(dtype)) if replayer is not None and dtype
            and routed is None else None)
    rows = [_routing_row(tap, truth, ref, cand) if is_integer_tap(tap)
            else _compare_tap(tap, truth_counterpart(tap), truth, ref, cand, dtype, tolerance, ties, routed)
            for tap in cand.taps]
    for tap in truth.taps:
        # A pool tap judged against it does not stand in for it; an experts tap an older candidate
        # lacks is information it does not give, not a tap it fails to report.
        if tap not in cand.taps and not is_integer_tap(tap):
            rows.append(TapRow(tap, tap, MISSING, ["not captured by the candidate"]))
    rows.sort(key=lambda r: order_key(r.tap))

    failing_local = {}  # tap -> the aligned tensors of a failing local judgement, to locate it
    if replayer is not None:
        for row in rows:
            if row.tap in cand.taps:
                row.local, tensors = _local_row(row.tap, replayer, ref, cand, dtype, tolerance)
                if row.local is not None and row.local.status == FAIL:
                    failing_local[row.tap] = tensors
    for row in rows:
        if row.kind == "logits" and row.status in (PASS, FAIL):
            row.distribution = _distribution_verdict(row, truth, ref, cand, dtype, ties, routed)

    first_row = next((r for r in rows if r.failed_by is not None), None)
    first = None
    if first_row is not None:
        if first_row.status not in FAILING and first_row.tap in failing_local:
            first = _locate(request_id, first_row, failing_local[first_row.tap], starts)
        else:  # global (or the distribution judgement alone: located against the truth)
            aligned = (_align(first_row.tap, first_row.truth_tap, truth, ref, cand, routed)
                       if first_row.status != MISALIGNED else None)
            first = _locate(request_id, first_row, aligned, starts)
    return RequestComparison(request_id, rows, first, _layer_growth(rows, config), starts)


def _distribution_verdict(row: TapRow, truth: RequestCapture, ref: RequestCapture, cand: RequestCapture,
                          dtype: str | None, ties: torch.Tensor | None = None,
                          routed: tuple[RequestCapture, RequestCapture] | None = None) -> DistributionVerdict | None:
    """The logits row's distribution judgement (None where its rows do not line up); with
    `routed`, each path against the truth routed as it routed."""
    aligned = _align(row.tap, row.truth_tap, truth, ref, cand, routed)
    if isinstance(aligned, str):
        return None
    aligned, _ = _clear_routing(row.tap, aligned, truth, ties)
    if aligned is None:
        return None
    c, r, t, positions = aligned[:4]
    return judge_distribution(c, r, t, dtype or str(c.dtype).removeprefix("torch."), DEFAULT_DISTRIBUTION_TOLERANCE,
                              positions=positions, ref_truth=aligned[4] if len(aligned) > 4 else None)


def _local_row(tap: str, replayer: Replayer, ref: RequestCapture | None, cand: RequestCapture, dtype: str | None,
               tolerance: Tolerance) -> tuple[LocalRow | None, tuple | None]:
    """The local judgement of one tap (None where the tap has no replay) and, when it fails, the
    aligned (cand, ref, cand replay, positions, ref replay) to locate the error in."""
    inputs = replayer.inputs(tap)
    if inputs is None:
        return None, None
    inputs = list(inputs)
    if ref is None:
        return LocalRow(inputs, SKIPPED, ["the reference has no capture of this request"]), None
    compared = as_float_dtype(dtype) if dtype else cand.taps[tap].dtype
    replays = {}
    for side, req in (("candidate", cand), ("reference", ref)):
        if tap not in req.taps:
            return LocalRow(inputs, SKIPPED, [f"the {side} has no {tap}"]), None
        replays[side] = replayer.replay(tap, req, compared)
        if isinstance(replays[side], Skipped):
            return LocalRow(inputs, SKIPPED, [f"{side}: {replays[side].reason}"]), None
    c_rep, r_rep = replays["candidate"], replays["reference"]

    positions = cand.positions_of(tap)
    r_idx, absent = rows_at(ref.positions_of(tap), positions)
    if absent:
        return LocalRow(inputs, SKIPPED, [f"candidate positions {absent} are not in the reference's {tap}"]), None
    keep = torch.ones(positions.numel(), dtype=torch.bool)
    if c_rep.rows is not None:
        keep &= c_rep.rows
    if r_rep.rows is not None:
        keep &= r_rep.rows[r_idx]
    note = "; ".join(f"{side}: {x.note}" for side, x in replays.items() if x.note) or None
    if not bool(keep.any()):
        return LocalRow(inputs, SKIPPED, [f"no row could be replayed ({note})"], note=note), None
    c, c_truth = cand.taps[tap][keep], c_rep.values[keep]
    r, r_truth = ref.taps[tap][r_idx][keep], r_rep.values[r_idx][keep]
    if c.shape != c_truth.shape or r.shape != c.shape or r_truth.shape != c.shape:
        return LocalRow(inputs, SKIPPED, [f"shapes do not line up: candidate {list(c.shape)}, replay "
                                          f"{list(c_truth.shape)}, reference {list(r.shape)}"]), None
    sharp = {name: getattr(c_rep, name)[keep] for name in ("same_dtype", "documented")  # tolerance.py's sharp checks
             if getattr(c_rep, name) is not None and getattr(c_rep, name).shape == c_rep.values.shape}
    verdict = judge(c, r, c_truth, dtype or c.dtype, tolerance, ref_truth=r_truth, kind=parse_tap(tap).kind, **sharp)
    row = LocalRow(inputs, PASS if verdict.passed else FAIL, list(verdict.reasons), verdict, int(keep.sum()), note)
    return row, (None if verdict.passed else (c, r, c_truth, positions[keep], r_truth))


def _compare_tap(tap: str, truth_tap: str, truth: RequestCapture, ref: RequestCapture | None, cand: RequestCapture,
                 dtype: str | None, tolerance: Tolerance, ties: torch.Tensor | None = None,
                 routed: tuple[RequestCapture, RequestCapture] | None = None) -> TapRow:
    if truth_tap not in truth.taps:
        return TapRow(tap, truth_tap, MISSING, [f"the truth has no {truth_tap}"])
    if ref is None or truth_tap not in ref.taps:
        return TapRow(tap, truth_tap, MISSING, [f"the reference in the compared dtype has no {truth_tap}: "
                                                f"no noise to budget against"])
    aligned = _align(tap, truth_tap, truth, ref, cand, routed)
    if isinstance(aligned, str):
        return TapRow(tap, truth_tap, MISALIGNED, [aligned])
    aligned, left_out = _clear_routing(tap, aligned, truth, ties)
    if aligned is None:
        return TapRow(tap, truth_tap, SKIPPED, ["every row is past a near-tie expert choice (the local judgement "
                                                "still applies)"], left_out=left_out)
    c, r, t, positions = aligned[:4]
    # With routed truths the reference is measured against its own (a global judgement still).
    per_path = {"ref_truth": aligned[4], "local": False} if len(aligned) > 4 else {}
    verdict = judge(c, r, t, dtype or c.dtype, tolerance, kind=parse_tap(tap).kind, **per_path)
    worst = None
    if verdict.error.max_abs_index is not None:
        worst = _element(tap, verdict.error.max_abs_index, positions, c, r, t)
    return TapRow(tap, truth_tap, PASS if verdict.passed else FAIL, list(verdict.reasons), verdict,
                  positions.numel(), worst, left_out=left_out)


def _clear_routing(tap: str, aligned: tuple, truth: RequestCapture, ties: torch.Tensor | None
                   ) -> tuple[tuple | None, int]:
    """The aligned rows without those past a near-tie expert choice (Replayer.routing_ties; None
    when no row is left), and how many were left out. Such a row is a coin flip for any correct
    path in the compared dtype: a little more or less in the router input picks a whole other
    expert, whose output then flows on (a clean bf16 tiny-moe check failed layers.1.mlp_out at 3x
    its budget on one such row). The local judgement still judges every stage whose own choice
    is clear."""
    if ties is None:
        return aligned, 0
    c, r, t, positions = aligned
    parsed = parse_tap(tap)
    if parsed.kind in ("embed", "ple"):
        return aligned, 0
    at, absent = rows_at(truth.positions, positions)
    if absent:
        return aligned, 0
    # Attention is causal: a flip at position p reaches every later position one layer on, as
    # keys and values (a clean bf16 tiny-moe run: layers.2.o 1.8x off at a row whose own choices
    # were clear, attending to one that flipped at layer 1).
    reached = torch.cummin(ties, 0).values + 1  # first layer whose attention reads a flipped row
    if parsed.layer is None:  # final_norm, logits: past every layer
        keep = reached[at] > NO_TIE
    elif parsed.kind in ("mlp_out", "out"):  # after the layer's own expert choice
        keep = (ties[at] > parsed.layer) & (reached[at] > parsed.layer)
    else:
        keep = reached[at] > parsed.layer
    if bool(keep.all()):
        return aligned, 0
    if not bool(keep.any()):
        return None, len(keep)
    return (c[keep], r[keep], t[keep], positions[keep]), int((~keep).sum())


def _align(tap: str, truth_tap: str, truth: RequestCapture, ref: RequestCapture, cand: RequestCapture,
           routed: tuple[RequestCapture, RequestCapture] | None = None):
    """(cand rows, ref rows, truth rows, positions) lined up by position value, or a reason why not.
    With `routed` (the reference's and the candidate's routed truths), the truth rows are the
    candidate's routed truth's, and the reference's routed truth's rows come fifth."""
    positions = cand.positions_of(tap)
    c = cand.taps[tap]
    if routed is not None:
        if truth_tap not in routed[0].taps or truth_tap not in routed[1].taps:
            return f"a routed truth has no {truth_tap}"
        truth = routed[1]
    t_idx, t_absent = rows_at(truth.positions_of(truth_tap), positions)
    if t_absent:
        return f"candidate positions {t_absent} are not in the truth's {truth_tap}"
    r_idx, r_absent = rows_at(ref.positions_of(truth_tap), positions)
    if r_absent:
        return f"candidate positions {r_absent} are not in the reference's {truth_tap}"
    t, r = truth.taps[truth_tap][t_idx], ref.taps[truth_tap][r_idx]
    if c.shape != t.shape or r.shape != t.shape:
        return (f"shapes do not line up: candidate {list(c.shape)}, reference {list(r.shape)}, "
                f"truth {list(t.shape)} at the same positions")
    if routed is None:
        return c, r, t, positions
    rt_idx, rt_absent = rows_at(routed[0].positions_of(truth_tap), positions)
    if rt_absent:
        return f"candidate positions {rt_absent} are not in the reference's routed truth's {truth_tap}"
    rt = routed[0].taps[truth_tap][rt_idx]
    if rt.shape != t.shape:
        return f"shapes do not line up: routed truths {list(rt.shape)} and {list(t.shape)}"
    return c, r, t, positions, rt


def _routing_row(tap: str, truth: RequestCapture, ref: RequestCapture | None, cand: RequestCapture) -> TapRow:
    """An experts tap (the MoE router's choice): how many of the candidate's rows, and of the
    reference's at the same positions, route to another expert set than the float64 truth. Shown,
    never judged (status INFO): at a near tie either set is a correct output, and a routing bug is
    the local judgement's to catch (it recomputes the choice from the path's own input)."""
    positions = cand.positions_of(tap)
    c = cand.taps[tap]
    if tap not in truth.taps:
        return TapRow(tap, tap, INFO, [f"the truth has no {tap}: nothing to count against"], positions=c.shape[0])
    t_idx, absent = rows_at(truth.positions_of(tap), positions)
    if absent or truth.taps[tap][t_idx].shape != c.shape:
        return TapRow(tap, tap, INFO, [f"the candidate's {tap} does not line up with the truth's"],
                      positions=c.shape[0])
    t = truth.taps[tap][t_idx]
    differs = int((c != t).any(dim=-1).sum())
    ref_differs = None
    if ref is not None and tap in ref.taps:
        r_idx, r_absent = rows_at(ref.positions_of(tap), positions)
        if not r_absent and ref.taps[tap][r_idx].shape == t.shape:
            ref_differs = int((ref.taps[tap][r_idx] != t).any(dim=-1).sum())
    ref_text = "" if ref_differs is None else f" (reference: {ref_differs})"
    return TapRow(tap, tap, INFO, [f"{differs} of {c.shape[0]} rows route to another expert set than the float64 "
                                   f"truth{ref_text}; not judged"], positions=c.shape[0],
                  routing={"rows": int(c.shape[0]), "differs": differs, "reference_differs": ref_differs})


def _element(tap: str, index: tuple[int, ...], positions: torch.Tensor, c: torch.Tensor, r: torch.Tensor,
             t: torch.Tensor) -> Element:
    axes = parse_tap(tap).axes[1:]
    cv, tv, rv = float(c[index]), float(t[index]), float(r[index])
    return Element(int(positions[index[0]]), dict(zip(axes, index[1:])), cv, tv, rv, abs(cv - tv))


# --------------------------------------------------------------------------------------
# Where the error sits (first divergence only: the rest is downstream of it)
# --------------------------------------------------------------------------------------


def _locate(request_id: str, row: TapRow, aligned: tuple | None, starts: list[int] | None) -> Divergence:
    """`aligned`: (cand, ref, truth, positions[, the ref's own truth]) row for row, or None where
    nothing lines up to measure (misaligned). A local judgement's truths are the two replays."""
    div = Divergence(request_id, row)
    if aligned is None:
        return div
    c, r, t, positions = aligned[:4]
    c64, r64, t64 = c.double(), r.double(), t.double()
    rt64 = aligned[4].double() if len(aligned) > 4 else t64

    abs_err = torch.where(torch.isfinite(c64) & torch.isfinite(t64), (c64 - t64).abs(), math.inf)
    abs_err = torch.where(torch.isnan(t64), 0.0, abs_err)  # both-sided NaN carries no information
    top = abs_err.reshape(-1).topk(min(TOP_ELEMENTS, abs_err.numel())).indices
    for flat in top.tolist():
        index = unravel(flat, c.shape)
        div.worst_elements.append(_element(row.tap, index, positions, c, r, t))

    cand_rows = axis_profile(c64, t64, 0)
    ref_rows = axis_profile(r64, rt64, 0)
    order = torch.argsort(cand_rows, descending=True, stable=True)
    for i in order[:TOP_POSITIONS].tolist():
        p = int(positions[i])
        div.positions.append({"position": p, "chunk": _chunk_of(p, starts), "rel_error": float(cand_rows[i]),
                              "ref_rel_error": float(ref_rows[i])})
    if starts is not None:
        div.chunks = _by_chunk(positions, cand_rows, ref_rows, starts)
    if "head" in parse_tap(row.tap).axes:
        cand_heads, ref_heads = axis_profile(c64, t64, 1), axis_profile(r64, rt64, 1)
        for h in torch.argsort(cand_heads, descending=True, stable=True).tolist():
            div.heads.append({"head": h, "rel_error": float(cand_heads[h]), "ref_rel_error": float(ref_heads[h])})
    return div


def _chunk_starts(boundaries: Sequence[int] | None) -> list[int] | None:
    """Sorted chunk start positions, always starting at 0, from the boundaries a caller gives
    (with or without 0)."""
    if boundaries is None:
        return None
    return sorted({0, *(int(b) for b in boundaries)})


def _chunk_of(position: int, starts: list[int] | None) -> int | None:
    return None if starts is None else bisect.bisect_right(starts, position) - 1


def _by_chunk(positions: torch.Tensor, cand_rows: torch.Tensor, ref_rows: torch.Tensor,
              starts: list[int]) -> list[dict]:
    chunk = torch.tensor([_chunk_of(int(p), starts) for p in positions.tolist()])
    out = []
    for k in chunk.unique().tolist():
        sel = chunk == k
        errs, pos = cand_rows[sel], positions[sel]
        end = starts[k + 1] if k + 1 < len(starts) else int(positions.max()) + 1
        out.append({"chunk": k, "start": starts[k], "end": end, "positions": int(sel.sum()),
                    "max_rel_error": float(errs.max()), "mean_rel_error": float(errs.mean()),
                    "worst_position": int(pos[errs.argmax()]), "ref_max_rel_error": float(ref_rows[sel].max())})
    return out


def _layer_growth(rows: list[TapRow], config) -> dict[str, Any]:
    """Per layer kind, the candidate's and the reference's relative L2 error (and the budget)
    layer by layer: how error grows through the stack. None where a layer was not judged."""
    layers = list(range(config.num_hidden_layers))
    kinds: dict[str, dict[str, list]] = {}
    for row in rows:
        if row.verdict is None or row.layer is None or row.layer >= len(layers):
            continue
        series = kinds.setdefault(row.kind, {"candidate": [None] * len(layers), "reference": [None] * len(layers),
                                             "budget": [None] * len(layers)})
        series["candidate"][row.layer] = row.verdict.error.rel_l2
        series["reference"][row.layer] = row.verdict.noise.rel_l2
        series["budget"][row.layer] = row.verdict.budget.rel_l2
    ordered = {k: kinds[k] for k in LAYER_KINDS if k in kinds}
    return {"metric": "rel_l2", "layers": layers, "kinds": ordered}


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_same_model(config, **captures: Capture) -> None:
    want = config.to_hf_dict()
    for name, capture in captures.items():
        got = capture.metadata.get("model_config")
        if got is not None and (differ := config_difference(got, want)):
            raise CompareError(f"the {name} capture was taken with another model config than the one given "
                               f"({differ})")


def config_difference(got: Mapping, want: Mapping, shown: int = 3) -> str | None:
    """Where two model configs (config.json dicts) differ, as "field got vs want, ..." (the first
    `shown` fields in name order), or None where they are the same."""
    fields = sorted(k for k in {*got, *want} if _canonical(got.get(k)) != _canonical(want.get(k)))
    if not fields:
        return None
    text = ", ".join(f"{k} {got.get(k)!r} vs {want.get(k)!r}" for k in fields[:shown])
    return text + (", ..." if len(fields) > shown else "")


def _canonical(d) -> str:
    return json.dumps(d, sort_keys=True, default=list)


def _compared_dtype(ref: Capture, cand: Capture) -> str | None:
    r, c = ref.metadata.get("dtype"), cand.metadata.get("dtype")
    if r is not None and c is not None and r != c:
        raise CompareError(f"the reference was captured in {r} but the candidate in {c}: the noise "
                           f"budget needs the reference in the compared dtype")
    dtype = c or r
    if dtype is not None:
        try:
            as_float_dtype(dtype)
        except ValueError as e:
            raise CompareError(str(e)) from None
    return dtype


def _notes(dtype: str | None, truth_dtype: str | None) -> list[str]:
    if dtype is None or truth_dtype is None:
        return []
    bits = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
    if bits.get(truth_dtype, 0) <= bits.get(dtype, 0):
        return [f"note: the truth ({truth_dtype}) is not more precise than the compared dtype ({dtype}); "
                f"budgets are mostly floors"]
    return []


def _scenario_chunks(cand: Capture) -> dict[str, Sequence[int]] | None:
    chunks = cand.metadata.get("scenario", {}).get("chunk_boundaries") if isinstance(
        cand.metadata.get("scenario"), dict) else None
    return chunks if isinstance(chunks, dict) else None


def _jsonable(obj):
    """Plain JSON data: non-finite floats spelled as strings, tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
