"""Error metrics between a candidate tensor and a truth tensor of the same shape.

Everything is computed in float64, whatever the inputs. Elements where either side is NaN or
Inf are left out of the numeric metrics and counted instead: `new_nonfinite` counts candidate
elements that are NaN/Inf where the truth is not the same non-finite value, which the verdict
treats as a divergence on its own.

ULP distance measures |candidate - truth| in units of the spacing of the compared dtype at the
truth's magnitude: a correctly rounded value is at most 0.5 ULP away. Distances are bucketed
by rounding to the nearest whole ULP (ties down, so a correctly rounded tie lands in 0):
0, 1, 2, 3-4, 5-8, 9-16, ...
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

_FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def as_float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16 or "bfloat16" -> torch.bfloat16; only the floating dtypes taps use."""
    if isinstance(dtype, torch.dtype) and dtype in _FLOAT_DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(_FLOAT_DTYPES)}")
    return _FLOAT_DTYPES[name]


@dataclass(frozen=True)
class UlpStats:
    dtype: str
    max: float  # largest distance, in ULPs of the truth's magnitude
    histogram: dict[str, int]  # bucket label -> element count, buckets in increasing order

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ErrorMetrics:
    numel: int
    compared: int  # elements finite on both sides
    rel_l2: float  # ||c - t|| / ||t||
    max_abs: float
    max_abs_index: tuple[int, ...] | None  # index into the tensor; the caller names the axes
    candidate_at_max: float | None
    truth_at_max: float | None
    cosine: float
    truth_max_abs: float  # scale of the truth, for absolute floors
    candidate_nan: int
    candidate_inf: int
    truth_nonfinite: int
    new_nonfinite: int  # candidate NaN/Inf where the truth holds something else
    mismatch_threshold: float | None = None
    mismatch_fraction: float | None = None  # share of compared elements with |c - t| > threshold
    ulp: UlpStats | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_abs_index"] = list(self.max_abs_index) if self.max_abs_index is not None else None
        return {k: _json_float(v) for k, v in d.items()}


def _json_float(v):
    """inf/nan are not JSON: spell them as strings so reports survive json.dumps(allow_nan=False)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


# --------------------------------------------------------------------------------------
# The single entry point most callers want
# --------------------------------------------------------------------------------------


def error_metrics(candidate: torch.Tensor, truth: torch.Tensor, *, ulp_dtype: torch.dtype | str | None = None,
                  mismatch_threshold: float | None = None) -> ErrorMetrics:
    """All metrics of `candidate` against `truth`. ULP stats need `ulp_dtype` (the compared
    dtype); the mismatch fraction needs an absolute `mismatch_threshold`."""
    c, t = _pair(candidate, truth)
    ok = torch.isfinite(c) & torch.isfinite(t)
    diff = torch.where(ok, c - t, 0.0)
    t_ok = torch.where(ok, t, 0.0)
    c_ok = torch.where(ok, c, 0.0)
    abs_diff = diff.abs()
    compared = int(ok.sum())

    if compared:
        flat = int(abs_diff.argmax())
        index = unravel(flat, abs_diff.shape)
        max_abs, c_at, t_at = float(abs_diff.reshape(-1)[flat]), float(c.reshape(-1)[flat]), float(t.reshape(-1)[flat])
    else:
        index, max_abs, c_at, t_at = None, 0.0, None, None

    nan, inf, truth_bad, new_bad = _nonfinite(c, t)
    ulp_stats = None
    if ulp_dtype is not None:
        dist = (abs_diff / ulp(t_ok, ulp_dtype))[ok]
        ulp_stats = UlpStats(str(as_float_dtype(ulp_dtype)).removeprefix("torch."),
                             float(dist.max()) if dist.numel() else 0.0, ulp_histogram(dist))
    fraction = None
    if mismatch_threshold is not None:
        fraction = float((abs_diff > mismatch_threshold).sum()) / compared if compared else 0.0

    return ErrorMetrics(
        numel=c.numel(), compared=compared,
        rel_l2=_ratio(float(diff.norm()), float(t_ok.norm())),
        max_abs=max_abs, max_abs_index=index, candidate_at_max=c_at, truth_at_max=t_at,
        cosine=_cosine(c_ok, t_ok),
        truth_max_abs=float(t_ok.abs().max()) if compared else 0.0,
        candidate_nan=nan, candidate_inf=inf, truth_nonfinite=truth_bad, new_nonfinite=new_bad,
        mismatch_threshold=mismatch_threshold, mismatch_fraction=fraction, ulp=ulp_stats,
    )


# --------------------------------------------------------------------------------------
# Individual metrics
# --------------------------------------------------------------------------------------


def rel_l2(candidate: torch.Tensor, truth: torch.Tensor) -> float:
    """||c - t|| / ||t|| (0 when both are zero, inf when only the truth is)."""
    c, t = _pair(candidate, truth)
    return _ratio(float((c - t).norm()), float(t.norm()))


def max_abs_error(candidate: torch.Tensor, truth: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """Largest |c - t| and its index (first occurrence)."""
    c, t = _pair(candidate, truth)
    abs_diff = (c - t).abs()
    flat = int(abs_diff.argmax())
    return float(abs_diff.reshape(-1)[flat]), unravel(flat, c.shape)


def cosine_similarity(candidate: torch.Tensor, truth: torch.Tensor) -> float:
    """Cosine of the angle between the flattened tensors (1 when both are zero, 0 when one is)."""
    return _cosine(*_pair(candidate, truth))


def mismatch_fraction(candidate: torch.Tensor, truth: torch.Tensor, threshold: float) -> float:
    """Share of elements whose absolute error exceeds `threshold`."""
    c, t = _pair(candidate, truth)
    return float(((c - t).abs() > threshold).sum()) / c.numel() if c.numel() else 0.0


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count)."""
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def ulp(x: torch.Tensor, dtype: torch.dtype | str) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64): eps * 2**floor(log2|x|), and the subnormal spacing
    below the smallest normal. ulp(1.0, bfloat16) == 2**-7."""
    info = torch.finfo(as_float_dtype(dtype))
    mag = x.to(torch.float64).abs().clamp(min=info.tiny)
    _, exponent = torch.frexp(mag)  # mag = m * 2**exponent with m in [0.5, 1)
    eps = torch.full_like(mag, info.eps)
    return torch.ldexp(eps, exponent - 1)


def ulp_distance(candidate: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype | str) -> torch.Tensor:
    """|c - t| per element in ULPs of `dtype` at the truth's magnitude (float64 tensor)."""
    c, t = _pair(candidate, truth)
    return (c - t).abs() / ulp(t, dtype)


def ulp_histogram(distances: torch.Tensor) -> dict[str, int]:
    """Counts per bucket 0, 1, 2, 3-4, 5-8, ... (rounded to the nearest whole ULP, ties down).
    Every bucket up to the largest occupied one is listed, empty ones as 0."""
    d = distances.to(torch.float64).reshape(-1)
    d = d[torch.isfinite(d)]
    n = torch.ceil(d - 0.5).clamp(min=0)  # n such that d lies in (n - 0.5, n + 0.5]
    bucket = torch.where(n <= 0, torch.zeros_like(n), torch.ceil(torch.log2(n.clamp(min=1))) + 1).to(torch.int64)
    counts = torch.bincount(bucket, minlength=3).tolist()
    return {_bucket_label(b): int(count) for b, count in enumerate(counts)}


def _bucket_label(b: int) -> str:
    if b <= 2:
        return str(b)
    return f"{2 ** (b - 2) + 1}-{2 ** (b - 1)}"


# --------------------------------------------------------------------------------------
# Where the error sits
# --------------------------------------------------------------------------------------


def axis_profile(candidate: torch.Tensor, truth: torch.Tensor, dim: int) -> torch.Tensor:
    """Relative L2 error of each slice along `dim` (float64 [size of dim]); non-finite elements
    are left out, as in error_metrics."""
    c, t = _pair(candidate, truth)
    ok = torch.isfinite(c) & torch.isfinite(t)
    diff = torch.where(ok, c - t, 0.0).movedim(dim, 0).reshape(c.shape[dim], -1)
    ref = torch.where(ok, t, 0.0).movedim(dim, 0).reshape(c.shape[dim], -1)
    err, norm = diff.norm(dim=1), ref.norm(dim=1)
    rel = err / norm
    # A zero truth slice: no error is no error, any error is infinitely relative.
    return torch.where(norm > 0, rel, torch.where(err > 0, math.inf, 0.0))


def position_profile(candidate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Relative error per token row (axis 0)."""
    return axis_profile(candidate, truth, 0)


def head_profile(candidate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Relative error per head of a [T, heads, D] tap (axis 1)."""
    if candidate.dim() != 3:
        raise ValueError(f"head_profile wants [T, heads, D], got {list(candidate.shape)}")
    return axis_profile(candidate, truth, 1)


# --------------------------------------------------------------------------------------


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """Index tuple of a flat (row-major) index; plain integer arithmetic, no tensor ops."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _pair(candidate: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if candidate.shape != truth.shape:
        raise ValueError(f"shape mismatch: candidate {list(candidate.shape)} vs truth {list(truth.shape)}")
    return candidate.detach().to(torch.float64), truth.detach().to(torch.float64)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _cosine(c: torch.Tensor, t: torch.Tensor) -> float:
    nc, nt = float(c.norm()), float(t.norm())
    if nc == 0 and nt == 0:
        return 1.0
    if nc == 0 or nt == 0:
        return 0.0
    return float((c * t).sum()) / (nc * nt)


def _nonfinite(c: torch.Tensor, t: torch.Tensor) -> tuple[int, int, int, int]:
    nan, inf = nonfinite_counts(c)
    same = (torch.isnan(c) & torch.isnan(t)) | (torch.isinf(c) & (c == t))
    new = ~torch.isfinite(c) & ~same
    return nan, inf, int((~torch.isfinite(t)).sum()), int(new.sum())
