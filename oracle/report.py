"""The HTML parity report: one self-contained file a reviewer can read in a minute.

    html = render_report(facts)
    html_path, json_path = write_report(facts, "reports/run-1")

`facts` is a plain JSON-able dict or an oracle.facts.Facts; its schema is declared once, in
oracle/facts.py (Facts > ScenarioFacts > Layout / Comparison > RequestComparison > TapRow ...),
and checked on the way in: a missing or unknown field is a ReportError naming its path. The
view below reads the checked facts as Records, which refuse a name the schema does not declare.

Numbers may be floats, ints, None, or the strings "inf" / "-inf" / "nan" that
Comparison.to_dict() uses for non-finite values. Everything from the facts reaches the HTML
through Jinja2's autoescaping; the geometry of the drawings is computed here, the template
only writes it out. No JavaScript, no external assets.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jinja2

from reference.fileio import write_atomic

from .facts import VERDICTS, Facts, FactsError, load_facts
from .taps import HEAD_KINDS, LAYER_KINDS, TAIL_KINDS

REQUIRED = ("title", "verdict", "summary", "scenarios", "environment", "command")
TEMPLATE = "report.html.j2"

TOP_POSITIONS = 8  # worst positions listed in the first-divergence card
TOP_HEADS = 8
POSITIONS_FOR_CHUNK_SENTENCE = 5  # "the 5 worst positions sit in ..."


class ReportError(ValueError):
    """The facts cannot make a report (a required key missing, an unknown verdict, a field the
    schema in oracle/facts.py does not know)."""


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def load(facts: Mapping[str, Any] | Facts) -> Facts:
    """The facts checked against the schema (oracle/facts.py); ReportError naming the field's
    path when they do not fit it."""
    if isinstance(facts, Facts):
        return facts
    _check(facts)
    try:
        return load_facts(jsonable(facts))
    except FactsError as e:
        raise ReportError(str(e)) from None


def render_report(facts: Mapping[str, Any] | Facts) -> str:
    """The report as one self-contained HTML document."""
    return _render(load(facts))


def _render(facts: Facts) -> str:
    # The view reads Records: a read of a name the schema does not declare raises.
    return _environment().get_template(TEMPLATE).render(**_view(facts.to_dict(strict=True)))


def write_report(facts: Mapping[str, Any] | Facts, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write `<directory>/report.html` and `<directory>/report.json` (the same facts, non-finite
    floats spelled "inf"/"-inf"/"nan"), each atomically (reference/fileio.py: a temporary file
    beside it, fsynced and renamed into place, mode 0666 less the umask).
    Both are rendered before either is written."""
    checked = load(facts)
    html = _render(checked)
    data = json.dumps(checked.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    directory = Path(directory)
    for target in (directory / "report.json", directory / "report.html"):
        if target.exists() and not target.is_file():  # checked before either is written
            raise ReportError(f"{target}: exists and is not a file")
    directory.mkdir(parents=True, exist_ok=True)
    json_path = write_atomic(directory / "report.json", data)
    html_path = write_atomic(directory / "report.html", html)
    return html_path, json_path


def jsonable(obj: Any) -> Any:
    """Plain JSON data: non-finite floats as strings, tuples as lists, keys as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _check(facts: Mapping[str, Any]) -> None:
    if not isinstance(facts, Mapping):
        raise ReportError(f"facts must be a dict, got {type(facts).__name__}")
    missing = [k for k in REQUIRED if k not in facts]
    if missing:
        try:
            load_facts(jsonable(facts))
            detail = ""
        except FactsError as e:
            detail = f" ({e})"
        raise ReportError(f"facts lack {', '.join(missing)}{detail}")
    if facts["verdict"] not in VERDICTS:
        raise ReportError(f"verdict must be one of {VERDICTS}, got {facts['verdict']!r}")
    if not isinstance(facts["scenarios"], list):
        raise ReportError("facts['scenarios'] must be a list")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["num"] = fmt
    env.filters["ratio"] = fmt_ratio
    return env


# --------------------------------------------------------------------------------------
# Numbers and colours
# --------------------------------------------------------------------------------------


def num(v: Any) -> float | None:
    """A float from a number or a "inf"/"-inf"/"nan" string; None for anything else."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())  # float() reads "inf", "-inf", "nan", "Infinity"
        except ValueError:
            return None
    return None


def fmt(v: Any, digits: int = 3) -> str:
    """Compact text for a number: 3 significant digits, "inf"/"nan" spelled out, "–" for None."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    x = num(v)
    if x is None:
        return str(v)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def fmt_ratio(v: Any) -> str:
    """An error/budget ratio for a heatmap cell, in at most 5 characters; a ratio under 1
    never reads as 1 or more, nor one over 1 as 1."""
    x = num(v)
    if x is None or not math.isfinite(x):
        return fmt(v)
    if x >= 1e4:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    if x >= 10:
        return f"{x:.0f}"
    if 0 < x < 0.01:
        return "<.01"
    if 0.95 <= x < 1:  # never round a pass up to the budget line, nor a failure down to it
        return f"{math.floor(x * 1000) / 1000:.3f}"
    if 1 < x <= 1.05:
        return f"{math.ceil(x * 1000) / 1000:.3f}"
    return f"{x:.2g}"


def ratio_colour(v: Any) -> tuple[str, str]:
    """(background, text colour) for an error/budget ratio: green well under budget, yellow near
    it, red over it (darker the further over); grey when there is none, purple for NaN."""
    x = num(v)
    if x is None:
        return "#eceef1", "#6a7280"
    if math.isnan(x):
        return "#6b3fa0", "#ffffff"
    if x <= 1:
        t = min(max(math.log10(max(x, 1e-12)) + 1, 0.0), 1.0)  # 0.1 and below -> 0, 1 -> 1
        return _hsl(135 - 85 * t, 0.42 + 0.38 * t, 0.80 - 0.10 * t), "#111111"
    t = min(math.log10(x) / 3, 1.0)  # 1x -> 0, 1000x and beyond -> 1
    return _hsl(8 - 8 * t, 0.72, 0.54 - 0.22 * t), "#ffffff"


def _hsl(hue: float, saturation: float, lightness: float) -> str:
    r, g, b = colorsys.hls_to_rgb(hue / 360.0, lightness, saturation)
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))


RATIO_LEGEND = (0.05, 0.25, 0.5, 0.8, 1.0, 2.0, 10.0, 100.0, 1000.0)


def ratio_legend() -> list[dict]:
    out = []
    for r in RATIO_LEGEND:
        bg, fg = ratio_colour(r)
        out.append({"text": ("≤" if r == RATIO_LEGEND[0] else "≥" if r == RATIO_LEGEND[-1] else "") + fmt_ratio(r),
                    "bg": bg, "fg": fg})
    return out


# --------------------------------------------------------------------------------------
# Chunks: which chunk a position sits in, in words
# --------------------------------------------------------------------------------------


def chunk_spans(layout_request: Mapping[str, Any] | None) -> list[dict]:
    """A request's chunks as spans with kind "reused" (the prefix taken from the cache),
    "prefill" or "decode", numbered within their kind, and a label."""
    if not layout_request:
        return []
    prompt = int(layout_request.get("prompt_len") or 0)
    spans = []
    reused = int(layout_request.get("prefix_reused") or 0)
    if reused:
        spans.append({"kind": "reused", "start": 0, "end": reused})
    for start, length in layout_request.get("chunks") or []:
        start, length = int(start), int(length)
        kind = "decode" if start >= prompt and prompt > 0 else "prefill"
        spans.append({"kind": kind, "start": start, "end": start + length})
    totals = {k: sum(s["kind"] == k for s in spans) for k in ("prefill", "decode")}
    seen = {"prefill": 0, "decode": 0}
    for s in spans:
        if s["kind"] == "reused":
            s["label"] = f"reused prefix [{s['start']}, {s['end']})"
            continue
        seen[s["kind"]] += 1
        s["index"] = seen[s["kind"]]
        if s["kind"] == "decode":
            s["label"] = f"decode step {s['index']}/{totals['decode']} (position {s['start']})"
        else:
            s["label"] = f"prefill chunk {s['index']}/{totals['prefill']} [{s['start']}, {s['end']})"
    return spans


def chunk_label(position: Any, spans: list[dict], fallback_starts: Iterable[int] | None = None) -> str:
    """The chunk a position sits in, in words; from the comparison's chunk starts when the
    layout does not cover it; "–" when nothing says."""
    p = num(position)
    if p is None:
        return "–"
    for s in spans:
        if s["start"] <= p < s["end"]:
            return s["label"]
    starts = sorted(int(s) for s in fallback_starts or [])
    inside = [s for s in starts if s <= p]
    if inside:
        later = [s for s in starts if s > p]
        return f"chunk [{inside[-1]}, {later[0] if later else '…'})"
    return "–"


# --------------------------------------------------------------------------------------
# Drawings: geometry here, the template writes the primitives out
# --------------------------------------------------------------------------------------


def _r(x: float) -> float:
    return round(x, 1)


def _rect(x, y, w, h, cls, title=None) -> dict:
    return {"t": "rect", "x": _r(x), "y": _r(y), "w": _r(max(w, 0.0)), "h": _r(h), "cls": cls, "title": title}


def _line(x1, y1, x2, y2, cls) -> dict:
    return {"t": "line", "x1": _r(x1), "y1": _r(y1), "x2": _r(x2), "y2": _r(y2), "cls": cls}


def _text(x, y, text, cls="", anchor="start", title=None) -> dict:
    return {"t": "text", "x": _r(x), "y": _r(y), "text": str(text), "cls": cls, "anchor": anchor, "title": title}


LAYOUT_WIDTH = 1120  # px: the drawing's width, label column included
LAYOUT_LABEL = 150
PAGE_H, CHUNK_H, MARK_H, ROW_GAP = 20, 14, 8, 16


def layout_drawing(layout: Mapping[str, Any], marks: Mapping[str, list[tuple[int, str]]] | None = None) -> dict | None:
    """Page layout and chunks of every request: one row each, token positions left to right,
    grouped into pages labelled with their pool page id; below the pages, the chunks (prefill
    chunks in two alternating colours, decode steps in a third, the reused prefix shaded), a
    cut at every chunk boundary, and red marks under `marks[request]` positions."""
    requests = layout.get("requests") or []
    page_size = int(layout.get("page_size") or 1)
    if not requests:
        return None
    marks = marks or {}
    spans_needed = [max(len(r.get("pages") or []) * page_size, _total(r)) for r in requests]
    n = max(max(spans_needed), page_size)
    cell = min(30.0, (LAYOUT_WIDTH - LAYOUT_LABEL - 12) / n)
    x0 = LAYOUT_LABEL
    page_counts: dict[Any, int] = {}
    for r in requests:
        for pid in r.get("pages") or []:
            page_counts[pid] = page_counts.get(pid, 0) + 1

    items: list[dict] = []
    axis_y = 14
    # Position axis: ticks at page boundaries, every 2**k pages so that labels have room.
    pages_max = math.ceil(n / page_size)
    every = 1
    while every * page_size * cell < 34:
        every *= 2
    tick_every = 1 if page_size * cell >= 4 else every
    for k in range(0, pages_max + 1, tick_every):
        x = x0 + k * page_size * cell
        items.append(_line(x, axis_y, x, axis_y + 4, "axis"))
        if k % every == 0:
            items.append(_text(x, axis_y - 3, k * page_size, "tick", "middle"))
    items.append(_text(x0 - 8, axis_y - 3, "position", "tick", "end"))

    y = axis_y + 10
    for req in requests:
        rid = str(req.get("id", "?"))
        total = _total(req)
        spans = chunk_spans(req)
        short = rid if len(rid) <= 20 else rid[:19] + "…"
        items.append(_text(x0 - 8, y + PAGE_H - 6, short, "rid", "end", title=rid))
        items.append(_text(x0 - 8, y + PAGE_H + CHUNK_H - 2, f"{req.get('prompt_len', '?')} + {req.get('new_tokens', 0)} tok",
                           "sub", "end"))
        labels: list[dict] = []  # drawn last, over the chunk cuts
        # Pages: boxes with their pool page id; too narrow for a box, alternating shades; too
        # narrow for that, one band (the ids are in the requests table).
        pages = req.get("pages") or []
        pw = page_size * cell
        if pw < 2 and pages:
            items.append(_rect(x0, y, len(pages) * pw, PAGE_H, "page",
                               f"{rid}: {len(pages)} pages of {page_size} slots, too many to draw one by one"))
        for i, pid in enumerate(pages if pw >= 2 else []):
            px = x0 + i * pw
            first, last = i * page_size, (i + 1) * page_size - 1
            shared = page_counts.get(pid, 0) > 1
            title = f"page {i} of {rid}: pool page {pid}, positions {first}-{last}" + (
                " (shared with another request)" if shared else "")
            cls = "page" if pw >= 6 else f"page dense{i % 2}"
            items.append(_rect(px, y, pw, PAGE_H, cls + (" shared" if shared else ""), title))
            if total < (i + 1) * page_size and pw >= 6:  # the unused tail of the last page
                tx = x0 + max(total, first) * cell
                items.append(_rect(tx, y + 1, px + pw - tx, PAGE_H - 2, "unused", f"unused slots of pool page {pid}"))
            if pw >= 7 * len(str(pid)) + 4:
                labels.append(_text(px + pw / 2, y + PAGE_H - 6, pid, "pid", "middle", title=title))
        # Chunks.
        cy = y + PAGE_H + 2
        alt = {"prefill": 0, "decode": 0}
        for s in spans:
            sx, sw = x0 + s["start"] * cell, (s["end"] - s["start"]) * cell
            if s["kind"] == "reused":
                cls = "reused"
            else:
                cls = ("c" if s["kind"] == "prefill" else "d") + str(alt[s["kind"]] % 2)
                alt[s["kind"]] += 1
            items.append(_rect(sx, cy, sw, CHUNK_H, cls, s["label"]))
            text = "reused" if s["kind"] == "reused" else str(s["end"] - s["start"]) if s["kind"] == "prefill" else ""
            if text and sw >= 7 * len(text) + 4:
                labels.append(_text(sx + sw / 2, cy + CHUNK_H - 3, text, "clabel " + cls, "middle", title=s["label"]))
        if cell >= 5:  # token separators inside the chunk band
            for p in range(1, total):
                items.append(_line(x0 + p * cell, cy + CHUNK_H - 4, x0 + p * cell, cy + CHUNK_H, "tok"))
        cuts = sorted({s["start"] for s in spans if s["kind"] != "reused" or s["start"] > 0}
                      | ({max(s["end"] for s in spans)} if spans else set()))
        last_x = -math.inf
        for p in cuts:  # chunk cuts across pages and chunks; where they crowd (decode steps), fewer
            x = x0 + p * cell
            if x - last_x >= 3 or p == cuts[-1]:
                items.append(_line(x, y - 2, x, cy + CHUNK_H + 2, "cut"))
                last_x = x
        items.extend(labels)
        # Marks: where the first divergence's worst positions sit.
        my = cy + CHUNK_H + 2
        for position, title in marks.get(rid, []):
            mx = x0 + (position + 0.5) * cell
            half = max(min(cell / 2, 5.0), 2.5)
            items.append({"t": "path", "d": f"M{_r(mx - half)},{_r(my + MARK_H)} L{_r(mx)},{_r(my)} "
                                            f"L{_r(mx + half)},{_r(my + MARK_H)} Z", "cls": "mark", "title": title})
        y += PAGE_H + 2 + CHUNK_H + 2 + MARK_H + ROW_GAP
    kinds = {s["kind"] for r in requests for s in chunk_spans(r)}
    legend = {"prefill": "prefill" in kinds, "decode": "decode" in kinds, "reused": "reused" in kinds,
              "shared": any(n > 1 for n in page_counts.values()), "marks": any(marks.get(str(r.get("id"))) for r in requests)}
    return {"width": LAYOUT_WIDTH, "height": int(y - ROW_GAP + 4), "cls": "layout", "items": items,
            "label": "page layout and chunks per request", "legend": legend}


def _total(req: Mapping[str, Any]) -> int:
    """Token positions a request occupies: its prompt and its decode steps (or its chunks' end)."""
    total = int(req.get("prompt_len") or 0) + int(req.get("new_tokens") or 0)
    chunks = req.get("chunks") or []
    if chunks:
        total = max(total, max(int(s) + int(n) for s, n in chunks))
    return total


GROWTH_W, GROWTH_H = 154, 136
G_LEFT, G_RIGHT, G_TOP, G_BOTTOM = 34, 6, 18, 20


def growth_drawings(layer_growth: Mapping[str, Any] | None, mark_layer: Mapping[str, int] | None = None) -> list[dict]:
    """Small multiples, one per tap kind: relative L2 error per layer of the candidate (solid),
    the reference's noise (dashed) and the budget (dotted), on one log scale shared by all
    kinds of the request. Candidate points over budget are red dots; values at or below the
    axis floor (e.g. exactly 0) sit on the floor."""
    if not layer_growth:
        return []
    kinds: Mapping[str, Any] = layer_growth.get("kinds") or {}
    layers = list(layer_growth.get("layers") or [])
    if not kinds or not layers:
        return []
    finite = [x for series in kinds.values() for name in ("candidate", "reference", "budget")
              for x in (num(v) for v in series.get(name) or []) if x is not None and math.isfinite(x) and x > 0]
    if not finite:
        return []
    lo, hi = math.floor(math.log10(min(finite))), math.ceil(math.log10(max(finite)))
    if hi <= lo:
        hi = lo + 1
    pw, ph = GROWTH_W - G_LEFT - G_RIGHT, GROWTH_H - G_TOP - G_BOTTOM
    span = max(len(layers) - 1, 1)

    def gx(i: int) -> float:
        return G_LEFT + pw * i / span

    def gy(v: float) -> float:
        if math.isnan(v) or v == math.inf:
            return G_TOP
        e = math.log10(v) if v > 0 else lo
        e = min(max(e, lo), hi)
        return G_TOP + ph * (hi - e) / (hi - lo)

    decade_step = max(1, math.ceil((hi - lo) / 5))
    drawings = []
    for kind, series in kinds.items():
        items: list[dict] = [_rect(G_LEFT, G_TOP, pw, ph, "frame"), _text(G_LEFT, 13, kind, "gtitle")]
        for e in range(lo, hi + 1, decade_step):
            items.append(_line(G_LEFT, gy(10.0 ** e), G_LEFT + pw, gy(10.0 ** e), "grid"))
            items.append(_text(G_LEFT - 4, gy(10.0 ** e) + 3, f"1e{e}", "tick", "end"))
        x_every = max(1, math.ceil(len(layers) / 10))
        for i, layer in enumerate(layers):
            if i % x_every == 0 or i == len(layers) - 1:
                items.append(_text(gx(i), GROWTH_H - G_BOTTOM + 12, layer, "tick", "middle"))
        # The reference dashes are drawn over the candidate line: where the two coincide (a clean
        # candidate), both stay visible.
        for name, cls in (("budget", "s-budget"), ("candidate", "s-cand"), ("reference", "s-ref")):
            values = [num(v) for v in series.get(name) or []]
            for run in _runs(values):
                pts = " ".join(f"{_r(gx(i))},{_r(gy(values[i]))}" for i in run)
                items.append({"t": "polyline", "points": pts, "cls": cls})
        cand, budget, ref = ([num(v) for v in series.get(k) or []] for k in ("candidate", "budget", "reference"))
        for i, c in enumerate(cand):
            if c is None:
                continue
            b = budget[i] if i < len(budget) else None
            r = ref[i] if i < len(ref) else None
            over = math.isnan(c) or (b is not None and c > b)
            title = (f"layer {layers[i]} {kind}: candidate {fmt(c)}, reference {fmt(r)}, budget {fmt(b)}"
                     + (" - over budget" if over else ""))
            items.append({"t": "circle", "cx": _r(gx(i)), "cy": _r(gy(c)), "r": 2.6 if over else 1.8,
                          "cls": "pt-over" if over else "pt", "title": title})
        if mark_layer and kind in mark_layer:
            x = gx(layers.index(mark_layer[kind])) if mark_layer[kind] in layers else None
            if x is not None:
                items.insert(1, _line(x, G_TOP, x, G_TOP + ph, "first-layer"))
        drawings.append({"width": GROWTH_W, "height": GROWTH_H, "cls": "growth", "items": items, "kind": kind,
                         "label": f"relative L2 error per layer, {kind}"})
    return drawings


def _runs(values: list[float | None]) -> list[list[int]]:
    """Index runs of consecutive present values (a line breaks where a layer was not judged)."""
    runs, current = [], []
    for i, v in enumerate(values):
        if v is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(i)
    if current:
        runs.append(current)
    return runs


# --------------------------------------------------------------------------------------
# Heatmap
# --------------------------------------------------------------------------------------


def _cell(row: Mapping[str, Any] | None, first_tap: str | None, layer: int | None, kind: str) -> dict:
    tap = f"layers.{layer}.{kind}" if layer is not None else kind
    if row is None:
        return {"tap": tap, "layer": layer, "kind": kind, "text": "", "title": f"{tap}: not captured",
                "bg": "#ffffff", "fg": "#999999", "first": False, "status": "absent"}
    status = row.get("status", "?")
    ratio = row.get("ratio")
    if status == "missing":
        text, (bg, fg) = "–", ratio_colour(None)
    elif status == "misaligned":
        text, bg, fg = "mis", "#5b1a1a", "#ffffff"
    else:
        text, (bg, fg) = fmt_ratio(ratio), ratio_colour(ratio)
    err, noise, budget = (row.get(k) or {} for k in ("error", "noise", "budget"))
    parts = [f"{row.get('tap', tap)}: {status}"]
    if "inputs" in row and row["inputs"]:  # a local row's (a TapRow has none)
        parts.append(f"replayed from {', '.join(str(t) for t in row['inputs'])}")
    if ratio is not None:
        parts.append(f"error/budget {fmt(ratio)} (rel L2 {fmt(err.get('rel_l2'))}, budget {fmt(budget.get('rel_l2'))}, "
                     f"reference noise {fmt(noise.get('rel_l2'))}); max abs error/budget {fmt(row.get('max_abs_ratio'))}")
    if row.get("reasons"):
        parts.append("; ".join(str(r) for r in row["reasons"]))
    return {"tap": row.get("tap", tap), "layer": layer, "kind": kind, "text": text, "title": " - ".join(parts),
            "bg": bg, "fg": fg, "first": first_tap is not None and row.get("tap") == first_tap, "status": status}


def heatmap(request: Mapping[str, Any], n_layers: int | None = None) -> dict:
    """Layer x tap-kind grid of error/budget for one request, plus the model-level taps."""
    rows = request.get("rows") or []
    fd = request.get("first_divergence") or {}
    first_tap = fd.get("tap")
    by_key = {(r.get("layer"), r.get("kind")): r for r in rows}
    layer_rows = [r for r in rows if r.get("layer") is not None]
    kinds = [k for k in LAYER_KINDS if any(r.get("kind") == k for r in layer_rows)]
    count = max([n_layers or 0] + [int(r["layer"]) + 1 for r in layer_rows])
    grid = [{"layer": layer, "cells": [_cell(by_key.get((layer, k)), first_tap, layer, k) for k in kinds]}
            for layer in range(count)]
    head = [_cell(by_key[(None, k)], first_tap, None, k) for k in HEAD_KINDS if (None, k) in by_key]
    tail = [_cell(by_key[(None, k)], first_tap, None, k) for k in TAIL_KINDS if (None, k) in by_key]
    return {"kinds": kinds, "grid": grid, "head": head, "tail": tail}


def local_heatmap(request: Mapping[str, Any], n_layers: int | None = None) -> dict | None:
    """The same grid for the layer-local judgements (error against a replay of the tap's own
    inputs, over the reference's noise against ITS replay); None when no tap was judged locally.
    Skipped judgements show as "skip" with their reason on hover."""
    rows = []
    for r in request.get("rows") or []:
        loc = r.get("local")
        if not loc:
            continue
        reasons = list(loc.get("reasons") or []) + ([loc["note"]] if loc.get("note") else [])
        rows.append({**loc, "tap": r.get("tap"), "layer": r.get("layer"), "kind": r.get("kind"),
                     "reasons": reasons, "inputs": loc.get("inputs")})
    if not rows:
        return None
    fd = request.get("first_divergence") or {}
    local_first = fd if "local" in str(fd.get("judgement") or "") else {}
    grid = heatmap({"rows": rows, "first_divergence": local_first}, n_layers)
    for cells in [grid["head"], grid["tail"], *(row["cells"] for row in grid["grid"])]:
        for c in cells:
            if c["status"] == "skipped":
                c.update(text="skip", bg="#eceef1", fg="#6a7280")
    return grid


# --------------------------------------------------------------------------------------
# The view: facts reshaped for the template
# --------------------------------------------------------------------------------------


def _view(facts: Mapping[str, Any]) -> dict:
    scenarios = [_scenario_view(i, s) for i, s in enumerate(facts["scenarios"])]
    first = _first_divergence_view(facts["scenarios"], scenarios)
    totals = {"scenarios": len(scenarios), "requests": 0, "taps_judged": 0, "taps_failed": 0}
    for s in facts["scenarios"]:
        counts = (s.get("comparison") or {}).get("counts") or {}
        totals["requests"] += int(counts.get("requests") or 0)
        totals["taps_judged"] += int(counts.get("taps_judged") or 0)
        totals["taps_failed"] += int(counts.get("taps_failed") or 0)
    return {
        "title": str(facts["title"]),
        "verdict": facts["verdict"],
        "verdict_class": {"parity": "ok", "divergence": "bad", "no verdict": "unknown"}[facts["verdict"]],
        "summary": str(facts["summary"]),
        "totals": totals,
        "scenarios": scenarios,
        "first": first,
        "kernels": _kernels_view(facts.get("kernels")),
        "env": _env_view(facts.get("environment") or {}),
        "command": str(facts["command"]),
        "legend": ratio_legend(),
    }


def _compact(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(jsonable(v), ensure_ascii=False, separators=(", ", ": "))
    return fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v) if v is not None else "–"


def _scenario_view(index: int, s: Mapping[str, Any]) -> dict:
    scenario = s.get("scenario") or {}
    layout = s.get("layout") or {}
    comp = s.get("comparison") or {}
    model, engine = scenario.get("model") or {}, scenario.get("engine") or {}
    settings = [("model", k, _compact(v)) for k, v in model.items()]
    settings += [("engine", k, _compact(v)) for k, v in engine.items()]
    for k, v in scenario.items():
        if k not in ("model", "engine", "requests"):
            settings.append(("scenario", k, _compact(v)))
    settings += [("compared", "dtype", _compact(comp.get("dtype"))),
                 ("compared", "truth dtype", _compact(comp.get("truth_dtype")))]
    tol = comp.get("tolerance") or {}
    if tol:
        settings.append(("compared", "budget", f"{fmt(tol.get('multiple'))}x noise (max abs "
                                               f"{fmt(tol.get('max_abs_multiple'))}x) + floor"))

    layout_reqs = {str(r.get("id")): r for r in layout.get("requests") or []}
    comp_reqs = {str(r.get("request")): r for r in comp.get("requests") or []}
    scen_reqs = {str(r.get("id")): r for r in scenario.get("requests") or []}
    ids = list(dict.fromkeys([*scen_reqs, *layout_reqs, *comp_reqs]))
    requests = []
    for rid in ids:
        sr, lr, cr = scen_reqs.get(rid, {}), layout_reqs.get(rid, {}), comp_reqs.get(rid)
        spans = chunk_spans(lr)
        prefill = [s["end"] - s["start"] for s in spans if s["kind"] == "prefill"]
        decode = sum(s["kind"] == "decode" for s in spans)
        fd = (cr or {}).get("first_divergence")
        requests.append({
            "id": rid,
            "prompt": lr.get("prompt_len", sr.get("length", len(sr["tokens"]) if isinstance(sr.get("tokens"), list) else None)),
            "new_tokens": lr.get("new_tokens", sr.get("new_tokens")),
            "arrival": sr.get("arrival"),
            "prefix_from": _prefix_source(sr.get("prefix_from")),
            "reused": lr.get("prefix_reused"),
            "chunks": (" + ".join(str(n) for n in prefill) or "–") + (f", then {decode} decode" if decode else ""),
            "pages": _id_list(lr.get("pages") or []),
            "pages_all": ", ".join(str(p) for p in lr.get("pages") or []),
            "status": "–" if cr is None else ("pass" if cr.get("passed") else "fail"),
            "first_tap": fd.get("tap") if fd else None,
        })

    first = comp.get("first_divergence") or {}
    marks: dict[str, list[tuple[int, str]]] = {}
    for req in comp.get("requests") or []:
        fd = req.get("first_divergence") or {}
        for p in (fd.get("positions") or [])[:3]:
            if num(p.get("position")) is not None:
                marks.setdefault(str(req.get("request")), []).append(
                    (int(p["position"]), f"worst position {p['position']} of {fd.get('tap')}: rel error "
                                         f"{fmt(p.get('rel_error'))} (reference {fmt(p.get('ref_rel_error'))})"))

    per_request = []
    for req in comp.get("requests") or []:
        growth = req.get("layer_growth") or {}
        fd = req.get("first_divergence") or {}
        mark = {fd["kind"]: fd["layer"]} if fd.get("layer") is not None and fd.get("kind") else None
        per_request.append({
            "id": str(req.get("request")),
            "passed": bool(req.get("passed")),
            "first_tap": fd.get("tap"),
            "heatmap": heatmap(req, len(growth.get("layers") or []) or None),
            "local_heatmap": local_heatmap(req, len(growth.get("layers") or []) or None),
            "distribution": distribution_view(req),
            "growth": growth_drawings(growth, mark),
            "missing": req.get("missing") or [],
        })
    return {
        "index": index,
        "anchor": f"scenario-{index + 1}",
        "name": str(s.get("name", f"scenario {index + 1}")),
        "passed": bool(s.get("passed")),
        "settings": settings,
        "requests": requests,
        "layout": layout_drawing(layout, marks) if layout else None,
        "page_size": layout.get("page_size"),
        "num_pages": layout.get("num_pages"),
        "comparison_summary": str(comp.get("summary", "")),
        "counts": comp.get("counts") or {},
        "per_request": per_request,
        "missing_requests": comp.get("missing_requests") or [],
        "extra_requests": comp.get("extra_requests") or [],
        "first_tap": first.get("tap"),
        "truth_routing": comp.get("truth_routing") or None,
    }


def _prefix_source(v: Any) -> str | None:
    """A scenario's prefix_from: a request id, or {"request": id, "length": n}."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        length = v.get("length")
        return f"{v.get('request')}" + (f" ({length} tokens)" if length is not None else "")
    return str(v)


def _id_list(ids: list, limit: int = 12) -> str:
    if not ids:
        return "–"
    text = ", ".join(str(p) for p in ids[:limit])
    return text + (f", … ({len(ids)} pages)" if len(ids) > limit else "")


def _first_divergence_view(raw: list, views: list[dict]) -> dict | None:
    """The card: the first scenario (in order) whose comparison found a divergence."""
    for s, view in zip(raw, views):
        comp = s.get("comparison") or {}
        fd = comp.get("first_divergence")
        if fd:
            break
    else:
        return None
    rid = str(fd.get("request"))
    req = next((r for r in comp.get("requests") or [] if str(r.get("request")) == rid), {})
    row = next((r for r in req.get("rows") or [] if r.get("tap") == fd.get("tap")), {})
    judgement = fd.get("judgement") or "global"
    local = row.get("local") or {}
    led_by_local = judgement in ("local", "local and distribution")  # compare.Divergence.led_by_local
    if led_by_local:  # the numbers of the judgement that failed: error against the replay
        row = local
    layout_req = next((r for r in (s.get("layout") or {}).get("requests") or [] if str(r.get("id")) == rid), None)
    spans = chunk_spans(layout_req)
    starts = req.get("chunk_starts")

    def where(p):
        return chunk_label(p, spans, starts)

    err, noise, budget = (row.get(k) or {} for k in ("error", "noise", "budget"))
    metrics = [
        ("rel L2 error", fmt(err.get("rel_l2")), fmt(noise.get("rel_l2")), fmt(budget.get("rel_l2")), fmt(fd.get("ratio"))),
        ("max abs error", fmt(err.get("max_abs")), fmt(noise.get("max_abs")), fmt(budget.get("max_abs")),
         fmt(fd.get("max_abs_ratio"))),
        ("cosine", fmt(err.get("cosine"), 8), fmt(noise.get("cosine"), 8), "", ""),
        ("mismatch fraction", fmt(err.get("mismatch_fraction")), "", "", ""),
        ("new NaN/Inf", fmt(err.get("new_nonfinite")), fmt(noise.get("new_nonfinite")), "", ""),
    ]

    coords: list[str] = []
    for e in fd.get("worst_elements") or []:
        for k in (e.get("coords") or {}):
            if k not in coords:
                coords.append(k)
    elements = []
    for e in fd.get("worst_elements") or []:
        t, r = num(e.get("truth")), num(e.get("ref"))
        elements.append({"position": e.get("position"),
                         "coords": [(e.get("coords") or {}).get(k) for k in coords],
                         "candidate": fmt(e.get("candidate"), 7), "truth": fmt(e.get("truth"), 7),
                         "ref": fmt(e.get("ref"), 7), "abs_error": fmt(e.get("abs_error")),
                         # A local failure's "truth" is the replay of the CANDIDATE's inputs; the
                         # reference's own replay differs, so |ref - it| would mean nothing.
                         "ref_error": fmt(abs(r - t)) if r is not None and t is not None and not led_by_local
                         else "–"})

    positions = []
    for p in (fd.get("positions") or [])[:TOP_POSITIONS]:
        c, r = num(p.get("rel_error")), num(p.get("ref_rel_error"))
        positions.append({"position": p.get("position"), "chunk": where(p.get("position")),
                          "rel_error": fmt(c), "ref_rel_error": fmt(r),
                          "times": fmt(c / r, 2) + "x" if c is not None and r and math.isfinite(r) else "–"})

    top = [where(p.get("position")) for p in (fd.get("positions") or [])[:POSITIONS_FOR_CHUNK_SENTENCE]]
    grouped: dict[str, int] = {}
    for label in top:
        grouped[label] = grouped.get(label, 0) + 1
    chunk_sentence = ""
    if top:
        parts = [f"{label} ({n})" for label, n in sorted(grouped.items(), key=lambda kv: -kv[1])]
        chunk_sentence = f"The {len(top)} worst positions sit in " + ", ".join(parts) + "."

    worst_position = (fd.get("positions") or [{}])[0].get("position")
    chunks = []
    for c in fd.get("chunks") or []:
        chunks.append({"label": where(c.get("start")), "range": f"[{c.get('start')}, {c.get('end')})",
                       "positions": c.get("positions"), "max": fmt(c.get("max_rel_error")),
                       "mean": fmt(c.get("mean_rel_error")), "ref_max": fmt(c.get("ref_max_rel_error")),
                       "worst_position": c.get("worst_position"),
                       "worst": worst_position is not None and c.get("start") is not None
                       and c.get("end") is not None and c["start"] <= worst_position < c["end"]})

    heads = []
    head_rows = (fd.get("heads") or [])[:TOP_HEADS]
    scale = max([x for h in head_rows for x in (num(h.get("rel_error")), num(h.get("ref_rel_error")))
                 if x is not None and math.isfinite(x)] or [0.0])
    for h in head_rows:
        c, r = num(h.get("rel_error")), num(h.get("ref_rel_error"))
        heads.append({"head": h.get("head"), "rel_error": fmt(c), "ref_rel_error": fmt(r),
                      "cand_w": _bar(c, scale), "ref_w": _bar(r, scale)})

    others = []
    for s2 in raw:
        for r2 in (s2.get("comparison") or {}).get("requests") or []:
            fd2 = r2.get("first_divergence")
            if fd2 and not (s2 is s and str(r2.get("request")) == rid):
                others.append({"scenario": str(s2.get("name")), "request": str(r2.get("request")),
                               "tap": fd2.get("tap"), "ratio": fmt_ratio(fd2.get("ratio"))})

    return {
        "scenario": view["name"], "anchor": view["anchor"], "request": rid,
        "layer": fd.get("layer"), "kind": fd.get("kind"), "tap": fd.get("tap"), "truth_tap": fd.get("truth_tap"),
        "status": fd.get("status"), "reasons": [str(r) for r in fd.get("reasons") or []],
        "ratio": fmt_ratio(fd.get("ratio")), "ratio_bg": ratio_colour(fd.get("ratio"))[0],
        "metrics": metrics, "coords": coords, "elements": elements, "positions": positions,
        "chunk_sentence": chunk_sentence, "chunks": chunks, "heads": heads,
        "ulp": _ulp_view(err.get("ulp"), noise.get("ulp")), "others": others,
        "judgement": judgement, "local_inputs": [str(t) for t in local.get("inputs") or []],
        "distribution": distribution_view(req) if "distribution" in judgement else None,
        "against": "replay" if led_by_local else "truth", "led_by_local": led_by_local,
    }


def distribution_view(request: Mapping[str, Any]) -> dict | None:
    """The logits row's distribution judgement (oracle/distribution.py) as a small table: one row
    per budgeted metric (candidate, reference, budget, ratio), plus the shares a reader expects
    (argmax agreement, top-k overlap) and the worst positions by KL. None without one."""
    row = next((r for r in request.get("rows") or [] if r.get("kind") == "logits" and r.get("distribution")), None)
    if row is None:
        return None
    d = row["distribution"]
    cand, ref = d.get("candidate") or {}, d.get("reference") or {}
    checks = []
    for c in d.get("checks") or []:
        ratio = c.get("ratio")
        checks.append({"metric": str(c.get("metric")), "candidate": fmt(c.get("candidate")),
                       "reference": fmt(c.get("reference")), "budget": fmt(c.get("budget")),
                       "ratio": fmt_ratio(ratio), "ratio_bg": ratio_colour(ratio)[0], "ratio_fg": ratio_colour(ratio)[1],
                       "passed": bool(c.get("passed")), "rule": str(c.get("rule", ""))})
    k = cand.get("k")
    shares = [("argmax agreement", fmt(cand.get("argmax_agreement")), fmt(ref.get("argmax_agreement"))),
              (f"top-{k} overlap", fmt(cand.get("topk_overlap")), fmt(ref.get("topk_overlap")))]
    worst = [{"position": p.get("position"), "kl": fmt(p.get("kl")), "ref_kl": fmt(p.get("ref_kl"))}
             for p in d.get("worst_positions") or []]
    return {"passed": bool(d.get("passed")), "positions": cand.get("positions"), "k": k, "checks": checks,
            "shares": shares, "worst": worst, "ratio": fmt_ratio(d.get("ratio"))}


def _bar(x: float | None, scale: float) -> float:
    if x is None or not scale:
        return 0.0
    if not math.isfinite(x):
        return 100.0
    return round(100.0 * min(x / scale, 1.0), 1)


def _ulp_view(cand: Mapping[str, Any] | None, ref: Mapping[str, Any] | None) -> dict | None:
    """The tap's ULP histograms (candidate and reference vs the truth), as compare.py gives them
    for the whole tap; bar lengths on a log(1 + count) scale so that the tail shows."""
    if not cand or not isinstance(cand.get("histogram"), Mapping):
        return None
    ch = dict(cand["histogram"])
    rh = dict((ref or {}).get("histogram") or {})
    labels = list(dict.fromkeys([*ch, *rh]))
    labels.sort(key=_bucket_order)
    counts = [int(num(v) or 0) for v in [*ch.values(), *rh.values()]]
    top = math.log1p(max(counts or [0])) or 1.0
    rows = []
    for b in labels:
        c, r = int(num(ch.get(b, 0)) or 0), int(num(rh.get(b, 0)) or 0)
        if rows and c == r == 0 and rows[-1]["cand"] == rows[-1]["ref"] == 0:  # one row for a run of empty buckets
            rows[-1]["bucket"] = f"{rows[-1]['bucket'].split('-')[0]}-{b.split('-')[-1]}"
            continue
        rows.append({"bucket": str(b), "cand": c, "ref": r, "cand_w": round(100 * math.log1p(c) / top, 1),
                     "ref_w": round(100 * math.log1p(r) / top, 1)})
    return {"dtype": cand.get("dtype"), "cand_max": fmt(cand.get("max")), "ref_max": fmt((ref or {}).get("max")),
            "rows": rows}


def _bucket_order(label: str) -> float:
    head = str(label).split("-")[0]
    x = num(head)
    return x if x is not None else math.inf


def _kernels_view(rows: Any) -> list[dict] | None:
    if not rows:
        return None
    out = []
    for k in rows:
        shape = k.get("shape")
        t, eager, unfused = num(k.get("time_us")), num(k.get("eager_us")), num(k.get("unfused_us"))
        out.append({
            "name": str(k.get("name", "?")),
            "shape": " x ".join(str(d) for d in shape) if isinstance(shape, (list, tuple)) else _compact(shape),
            "dtype": _compact(k.get("dtype")), "max_ulp": fmt(k.get("max_ulp")), "max_rel": fmt(k.get("max_rel")),
            "passed": k.get("passed"), "time_us": fmt(k.get("time_us")), "eager_us": fmt(k.get("eager_us")),
            "unfused_us": fmt(k.get("unfused_us")),
            "vs_eager": _speedup(eager, t), "vs_unfused": _speedup(unfused, t),
        })
    return out


def _speedup(base: float | None, t: float | None) -> str:
    if base is None or t is None or not (math.isfinite(base) and math.isfinite(t)) or t <= 0:
        return "–"
    return f"{base / t:.2g}x"


def _env_view(env: Mapping[str, Any]) -> dict:
    git = env.get("git")
    if isinstance(git, Mapping):
        revision = str(git.get("revision") or "?")
        git_text = revision[:12] + (" (dirty: uncommitted changes)" if git.get("dirty") else "")
    else:
        git_text = "not a git checkout"
    versions = env.get("versions") or {}
    return {
        "rows": [("device", _compact(env.get("device"))), ("dtype", _compact(env.get("dtype"))), ("git", git_text),
                 ("host", _compact(env.get("host")))] + [
                    (k, _compact(v)) for k, v in env.items() if k not in ("device", "dtype", "git", "host", "versions")],
        "versions": [(str(k), "not installed" if v is None else _compact(v)) for k, v in versions.items()],
    }
