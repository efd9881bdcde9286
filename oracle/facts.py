"""The report's facts, declared once: what compare/run write, report.json holds and report.py reads.

    facts = Facts.load(json.loads(text))      # FactsError naming the field's path if it does not fit
    data = facts.to_dict()                    # the same JSON back (round trip: unchanged)
    view = facts.to_dict(strict=True)         # dicts that refuse to be read by an undeclared name

Every object of report.json is a dataclass here. A field without a default is required; one whose
default is ABSENT may be left out of the JSON (and stays out when written back). Loading refuses a
missing required field and an unknown one, so a field renamed on either side fails loudly (its
path in the message) instead of rendering "-". Numbers (`Num`) may be ints, floats, None or the
strings "inf" / "-inf" / "nan" that non-finite values are spelled as. Free-form parts (a scenario's
own JSON, package versions, a tap's coordinates) are plain dicts.

`to_dict(strict=True)` gives `Record`s, dicts whose `get` / `[]` raise FactsError for a name the
schema does not declare: the report reads them, so a read of a field that does not exist fails
at once (tests render real facts this way).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union


class FactsError(ValueError):
    """The facts do not fit the schema: the message names the field's path."""


class _Absent:
    """A field left out of the JSON (not the same as a null)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


class Num:
    """A number as facts hold it: int, float, None, or "inf" / "-inf" / "nan"."""


# --------------------------------------------------------------------------------------
# Loading and dumping, driven by the dataclasses' annotations
# --------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _load(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return v
    if tp is Num:
        if v is None or (isinstance(v, (int, float, str)) and not isinstance(v, bool)):
            return v
        raise FactsError(f"{path}: expected a number (or null, \"inf\", \"nan\"), got {type(v).__name__}")
    if origin is Union:
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _load(rest[0] if len(rest) == 1 else Any, v, path)
    if tp in (str, bool, int, float):
        ok = isinstance(v, tp) and not (tp is int and isinstance(v, bool))
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise FactsError(f"{path}: expected {tp.__name__}, got {type(v).__name__}")
        return v
    if origin is list or tp is list:
        if not isinstance(v, (list, tuple)):
            raise FactsError(f"{path}: expected a list, got {type(v).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_load(item, x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is dict or tp is dict:
        if not isinstance(v, Mapping):
            raise FactsError(f"{path}: expected an object, got {type(v).__name__}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _load(item, x, f"{path}.{k}") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return tp.load(v, path)
    raise TypeError(f"facts schema: no loader for {tp!r}")


def _dump(v: Any, strict: bool) -> Any:
    if isinstance(v, _Schema):
        return v.to_dict(strict)
    if isinstance(v, list):
        return [_dump(x, strict) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x, strict) for k, x in v.items()}
    return v


class Record(dict):
    """A facts object as a dict whose reads by an undeclared name raise FactsError."""

    __slots__ = ("schema", "fields")

    def _known(self, key: Any) -> None:
        if key not in self.fields:
            raise FactsError(f"{self.schema}.{key}: read, but not a field of the facts schema "
                             f"(fields: {', '.join(self.fields)})")

    def get(self, key, default=None):
        self._known(key)
        return dict.get(self, key, default)

    def __getitem__(self, key):
        self._known(key)
        return dict.__getitem__(self, key)

    def __reduce__(self):  # copies and pickles are plain dicts
        return (dict, (dict(self),))


class _Schema:
    """Base of the facts dataclasses: load from JSON data, dump back to it."""

    @classmethod
    def load(cls, data: Any, path: str = "facts") -> Any:
        if not isinstance(data, Mapping):
            raise FactsError(f"{path}: expected an object ({cls.__name__}), got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = [k for k in data if k not in names]
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if unknown or missing:
            parts = [f"{path}.{k}: missing (a required field of {cls.__name__})" for k in missing]
            parts += [f"{path}.{k}: unknown field (not in {cls.__name__}: "
                      f"{', '.join(sorted(names))})" for k in unknown]
            raise FactsError("; ".join(parts))
        hints = _hints(cls)
        return cls(**{f.name: _load(hints[f.name], data[f.name], f"{path}.{f.name}")
                      for f in fields if f.name in data})

    def to_dict(self, strict: bool = False) -> dict:
        out = Record() if strict else {}
        order = _json_order(type(self))
        for f in order:
            v = getattr(self, f.name)
            if v is not ABSENT:
                out[f.name] = _dump(v, strict)
        if strict:
            out.schema = type(self).__name__
            out.fields = tuple(f.name for f in order)
        return out


def _json_order(cls: type) -> tuple[dataclasses.Field, ...]:
    """A class's fields in JSON order: its own as declared, then those of the bases it shares
    (dataclasses list a base's first; here, as in compare's to_dict, the shared verdict trails)."""
    own = cls.__dict__.get("__annotations__", {})
    fields = dataclasses.fields(cls)
    return tuple(f for f in fields if f.name in own) + tuple(f for f in fields if f.name not in own)


def schema(cls):
    """A facts dataclass."""
    return dataclass(cls)


# --------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------


@schema
class Budget(_Schema):
    rel_l2: Num
    max_abs: Num
    floor: Num


@schema
class Ulp(_Schema):
    dtype: str
    max: Num
    histogram: dict[str, int]


@schema
class Metrics(_Schema):
    """oracle/metrics.py ErrorMetrics.to_dict()."""

    numel: int
    compared: int
    rel_l2: Num
    max_abs: Num
    max_abs_index: Optional[list[int]]
    candidate_at_max: Num
    truth_at_max: Num
    cosine: Num
    truth_max_abs: Num
    candidate_nan: int
    candidate_inf: int
    truth_nonfinite: int
    new_nonfinite: int
    mismatch_threshold: Num
    mismatch_fraction: Num
    ulp: Optional[Ulp]


@schema
class Precision(_Schema):
    """oracle/tolerance.py Precision.to_dict()."""

    drift_z: Num
    drift_changed: Num
    drift_changed_fraction: Num
    rounding_ratio: Num
    no_noise_ulps: Num
    opseq_far_fraction: Num
    opseq_mismatch_fraction: Num
    opseq_max_ulps: Num


@schema
class Element(_Schema):
    position: Optional[int]
    coords: dict[str, Any]
    candidate: Num
    truth: Num
    ref: Num
    abs_error: Num


@schema
class _Judged(_Schema):
    """A verdict's fields (compare._verdict_dict), present where a row was judged. Keyword-only,
    so the rows that share them declare their required fields after them."""

    ratio: Num = field(default=ABSENT, kw_only=True)
    max_abs_ratio: Num = field(default=ABSENT, kw_only=True)
    error: Metrics = field(default=ABSENT, kw_only=True)
    noise: Metrics = field(default=ABSENT, kw_only=True)
    budget: Budget = field(default=ABSENT, kw_only=True)
    precision: Precision = field(default=ABSENT, kw_only=True)


@schema
class LocalRow(_Judged):
    """compare.LocalRow.to_dict(); the verdict's fields when it was judged."""

    inputs: list[str]
    status: str
    reasons: list[str]
    positions: int
    note: Optional[str]


@schema
class DistributionMetrics(_Schema):
    positions: int
    k: int
    kl_mean: Num
    kl_max: Num
    kl_max_row: Optional[int]
    argmax_agreement: Num
    argmax_disagreements: int
    topk_overlap: Num
    topk_misses: int
    topk_logprob_max_abs: Num


@schema
class Check(_Schema):
    metric: str
    candidate: Num
    reference: Num
    budget: Num
    ratio: Num
    passed: bool
    rule: str


@schema
class WorstPosition(_Schema):
    position: int
    kl: Num
    ref_kl: Num


@schema
class Distribution(_Schema):
    """oracle/distribution.py DistributionVerdict.to_dict()."""

    passed: bool
    ratio: Num
    reasons: list[str]
    candidate: DistributionMetrics
    reference: DistributionMetrics
    checks: list[Check]
    worst_positions: list[WorstPosition]


@schema
class TapRow(_Judged):
    """compare.TapRow.to_dict()."""

    tap: str
    truth_tap: str
    layer: Optional[int]
    kind: str
    status: str
    reasons: list[str]
    positions: int
    worst: Optional[Element]
    failed_by: Optional[str]
    left_out: int
    local: Optional[LocalRow]
    distribution: Distribution = ABSENT  # the logits row only
    # An experts row (status "info"): rows, rows whose expert set differs from the truth's, the
    # reference's count (None where it has no such tap).
    routing: dict[str, Any] = ABSENT


@schema
class Position(_Schema):
    position: int
    chunk: Optional[int]
    rel_error: Num
    ref_rel_error: Num


@schema
class Chunk(_Schema):
    chunk: int
    start: int
    end: int
    positions: int
    max_rel_error: Num
    mean_rel_error: Num
    worst_position: int
    ref_max_rel_error: Num


@schema
class Head(_Schema):
    head: int
    rel_error: Num
    ref_rel_error: Num


@schema
class Divergence(_Schema):
    """compare.Divergence.to_dict()."""

    request: str
    tap: str
    truth_tap: str
    layer: Optional[int]
    kind: str
    judgement: str
    status: str
    reasons: list[str]
    ratio: Num
    max_abs_ratio: Num
    worst_elements: list[Element]
    positions: list[Position]
    chunks: list[Chunk]
    heads: list[Head]


@schema
class GrowthSeries(_Schema):
    candidate: list[Num]
    reference: list[Num]
    budget: list[Num]


@schema
class LayerGrowth(_Schema):
    metric: str
    layers: list[int]
    kinds: dict[str, GrowthSeries]


@schema
class MissingTap(_Schema):
    tap: str
    reason: str


@schema
class RequestComparison(_Schema):
    """compare.RequestComparison.to_dict()."""

    request: str
    passed: bool
    first_divergence: Optional[Divergence]
    rows: list[TapRow]
    layer_growth: LayerGrowth
    chunk_starts: Optional[list[int]]
    missing: list[MissingTap]


@schema
class Tolerance(_Schema):
    multiple: Num
    max_abs_multiple: Num
    floors: dict[str, Num]


@schema
class Counts(_Schema):
    requests: int
    taps_judged: int
    taps_failed: int
    taps_missing: int
    requests_diverged: int
    local_judged: int
    local_failed: int
    local_skipped: int


@schema
class Comparison(_Schema):
    """compare.Comparison.to_dict()."""

    passed: bool
    dtype: Optional[str]
    truth_dtype: Optional[str]
    tolerance: Tolerance
    counts: Counts
    first_divergence: Optional[Divergence]
    requests: list[RequestComparison]
    missing_requests: list[str]
    extra_requests: list[str]
    notes: list[str]
    summary: str
    truth_routing: str = ABSENT  # "per-path": MoE taps judged against routed truths (design note 35)


@schema
class LayoutRequest(_Schema):
    id: str
    prompt_len: int
    new_tokens: int
    pages: list[int]
    chunks: list[list[int]]  # [start, length] of each prefill chunk and decode step
    prefix_reused: int


@schema
class Layout(_Schema):
    page_size: int
    num_pages: int
    # How the engine ran decode steps (oracle/run.py _decode_path); keyword-only so that it keeps
    # its place in the JSON, before the requests.
    decode: str = field(default=ABSENT, kw_only=True)
    requests: list[LayoutRequest]


@schema
class ScenarioFacts(_Schema):
    name: str
    passed: bool
    scenario: dict[str, Any] = ABSENT  # the scenario's own JSON (oracle/scenario.py)
    layout: Optional[Layout] = ABSENT
    comparison: Optional[Comparison] = ABSENT

    @classmethod
    def load(cls, data: Any, path: str = "facts") -> "ScenarioFacts":
        scenario = super().load(data, path)
        # oracle/run.py and `diff` write `passed` as the comparison's own; the verdict checks read
        # only `passed`, so a hand-edited report.json that flips one of the two would render a
        # verdict its own comparison contradicts.
        comparison = scenario.comparison
        if isinstance(comparison, Comparison) and scenario.passed != comparison.passed:
            raise FactsError(f"{path} ({scenario.name}): passed is {str(scenario.passed).lower()}, but "
                             f"comparison.passed is {str(comparison.passed).lower()}")
        return scenario


@schema
class Kernel(_Schema):
    name: str
    shape: Any
    dtype: Any
    max_ulp: Num
    max_rel: Num
    passed: Optional[bool]
    time_us: Num
    eager_us: Num
    unfused_us: Num


@schema
class Git(_Schema):
    revision: str
    dirty: bool


@schema
class Environment(_Schema):
    versions: dict[str, Any]
    device: Any = ABSENT  # optional: facts of a run that recorded none
    dtype: Any = ABSENT
    git: Optional[Git] = ABSENT
    host: Any = ABSENT


VERDICTS = ("parity", "divergence", "no verdict")


@schema
class Facts(_Schema):
    """The whole report (report.json)."""

    title: str
    verdict: str  # one of VERDICTS
    summary: str
    scenarios: list[ScenarioFacts]
    environment: Environment
    command: str
    kernels: Optional[list[Kernel]] = ABSENT

    def not_passed(self, path: str = "facts") -> list[str]:
        """The scenarios and kernels that did not pass, by the rule oracle/run.py report_facts
        writes the verdict by (`not passed`): a kernel left unjudged, None, has not passed either.
        Both verdict checks use it, so no report.json is refused by one and let through by the other."""
        kernels = [] if self.kernels is ABSENT or self.kernels is None else self.kernels
        return ([f"{path}.scenarios[{i}] ({s.name})" for i, s in enumerate(self.scenarios) if not s.passed]
                + [f"{path}.kernels[{i}] ({k.name})" for i, k in enumerate(kernels) if not k.passed])

    @classmethod
    def load(cls, data: Any, path: str = "facts") -> "Facts":
        facts = super().load(data, path)
        if facts.verdict not in VERDICTS:
            raise FactsError(f"{path}.verdict: must be one of {VERDICTS}, got {facts.verdict!r}")
        failed = facts.not_passed(path)
        if facts.verdict == "parity" and failed:
            # A hand-edited report.json must not pass for parity (`report` exits 0 on it) while a
            # scenario or kernel in it failed.
            raise FactsError(f"{path}.verdict: 'parity', but {', '.join(failed[:3])} did not pass")
        if facts.verdict == "divergence" and not failed:
            # Nor for divergence (exit 1) while everything in it passed.
            raise FactsError(f"{path}.verdict: 'divergence', but no scenario or kernel in it failed")
        return facts


def load_facts(data: Any) -> Facts:
    """Facts from JSON data (non-finite floats already spelled as strings, or not: both load)."""
    return Facts.load(data)
