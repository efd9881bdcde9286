"""The HTML parity report (oracle/report.py), on facts built from real comparisons of the tiny
reference model: truth in float64, reference and candidate in float32, the candidate run through
chunked prefill and decode pieces on a hand-made paged layout, once with head 0 of layer 4's
attention output scaled by 1.01 (a divergence) and once clean (parity)."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import pytest
import torch

import reference
import reference.model as reference_model
from oracle.capture import CaptureBuilder, capture_metadata, git_revision, package_versions
from oracle.compare import compare
from oracle.report import ReportError, render_report, write_report

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PAGE_SIZE = 4
NUM_PAGES = 16
FAULT_LAYER = 4  # head 0 of this layer's attention output is scaled by 1.01 in the faulty candidate
HOSTILE = "<script>alert(1)</script>"
COMMAND = "python -m pytest tests/test_report.py -q"


# --------------------------------------------------------------------------------------
# Facts from real runs
# --------------------------------------------------------------------------------------


def pages_for(tokens: int, pool: list[int], shared: list[int] = ()) -> list[int]:
    """Pool page ids of a request's pages: the shared prefix pages first, then fresh ones."""
    need = math.ceil(tokens / PAGE_SIZE) - len(shared)
    fresh = [pool.pop(0) for _ in range(need)]
    return list(shared) + fresh


def run_taps(model, ids: torch.Tensor, fault: bool = False) -> dict[str, torch.Tensor]:
    """The reference's taps; with `fault`, head 0 of layer FAULT_LAYER's attention scaled by 1.01."""
    taps, calls = {}, []
    real = reference_model.attend

    def faulty(*args):
        calls.append(1)
        out = real(*args)  # [B, heads, T, D]
        if len(calls) == FAULT_LAYER + 1:
            out[:, 0] *= 1.01
        return out

    with pytest.MonkeyPatch.context() as mp:
        if fault:
            mp.setattr(reference_model, "attend", faulty)
        model(ids, taps=taps)
    return taps


def capture(config, per_request: dict, dtype, path: str, chunks: dict | None = None):
    """A capture: whole sequences at once, or (with `chunks`) piece by piece per chunk and
    decode step in shuffled order, from the request's first chunk on, as a paged server would."""
    builder = CaptureBuilder(capture_metadata(config, path=path, dtype=dtype))
    pieces = []
    for rid, taps in per_request.items():
        spans = chunks[rid] if chunks else [(0, next(iter(taps.values())).shape[0])]
        for start, length in spans:
            for name, t in taps.items():
                pieces.append((rid, name, torch.arange(start, start + length), t[start:start + length]))
    if chunks:
        random.Random(3).shuffle(pieces)
    for piece in pieces:
        builder.add(*piece)
    return builder.build()


def scenario_facts(name: str, config, models, requests: list[dict], page_seed: int, fault: bool) -> dict:
    """One scenario: run truth, reference and candidate, compare, and describe the layout."""
    truth_model, ref_model = models
    gen = torch.Generator().manual_seed(11)
    ids, pool = {}, list(range(1, NUM_PAGES))  # page 0 is the reserved padding sink
    random.Random(page_seed).shuffle(pool)
    layout_requests = []
    for r in requests:
        total = r["length"] + r["new_tokens"]
        fresh = torch.randint(0, config.vocab_size, (total,), generator=gen)
        reused = r.get("prefix_reused", 0)
        if reused:
            fresh[:reused] = ids[r["prefix_from"]][:reused]
            shared = next(x for x in layout_requests if x["id"] == r["prefix_from"])["pages"][:reused // PAGE_SIZE]
        else:
            shared = []
        ids[r["id"]] = fresh
        chunks = [[s, n] for s, n in r["chunks"]] + [[r["length"] + i, 1] for i in range(r["new_tokens"])]
        layout_requests.append({"id": r["id"], "prompt_len": r["length"], "new_tokens": r["new_tokens"],
                                "pages": pages_for(total, pool, shared), "chunks": chunks, "prefix_reused": reused})

    chunks = {x["id"]: x["chunks"] for x in layout_requests}
    truth = capture(config, {rid: run_taps(truth_model, t) for rid, t in ids.items()}, torch.float64, "truth")
    ref_taps = {rid: run_taps(ref_model, t) for rid, t in ids.items()}
    ref = capture(config, ref_taps, torch.float32, "reference")
    if fault:
        cand_taps = {rid: run_taps(ref_model, t, fault=True) for rid, t in ids.items()}
    else:  # reference-sized error in another pattern: what a correct kernel with other rounding looks like
        cand_taps = {rid: {n: (truth.requests[rid].taps[n] + (t.double() - truth.requests[rid].taps[n]).flip(0)).float()
                           for n, t in taps.items()} for rid, taps in ref_taps.items()}
    cand = capture(config, cand_taps, torch.float32, "optimized", chunks)
    comparison = compare(truth, ref, cand, config, chunk_boundaries={rid: [s for s, _ in c] for rid, c in chunks.items()})

    scenario = {
        "model": {"source": "tiny", "seed": 0, "dtype": "float32", "device": "cpu"},
        "engine": {"page_size": PAGE_SIZE, "chunk_size": None, "num_pages": NUM_PAGES, "page_order_seed": page_seed},
        "requests": [{"id": r["id"], "length": r["length"], "new_tokens": r["new_tokens"], "arrival": r["arrival"],
                      "chunks": [n for _, n in r["chunks"]], "prefix_from": r.get("prefix_from")} for r in requests],
    }
    if fault:
        scenario["fault"] = f"layers.{FAULT_LAYER}.o head 0 scaled by 1.01"
    return {"name": name, "passed": comparison.passed, "scenario": scenario,
            "layout": {"page_size": PAGE_SIZE, "num_pages": NUM_PAGES, "requests": layout_requests},
            "comparison": comparison.to_dict()}


def report_facts(scenarios: list[dict]) -> dict:
    comparisons = [s["comparison"] for s in scenarios]
    if all(c["passed"] for c in comparisons):
        verdict = "parity"
    elif any(c["first_divergence"] for c in comparisons):
        verdict = "divergence"
    else:
        verdict = "no verdict"
    summary = " ".join(f"{s['name']}: {s['comparison']['summary'].splitlines()[0]}" for s in scenarios)
    return {
        "title": "Parity report: tiny preset, float32, paged chunked path vs eager reference",
        "verdict": verdict,
        "summary": summary,
        "scenarios": scenarios,
        # Illustrative kernel rows: the report only lays them out.
        "kernels": [
            {"name": "rmsnorm", "shape": [13, 64], "dtype": "float32", "max_ulp": 1.0, "max_rel": 1.1e-7,
             "passed": True, "time_us": 7.9, "eager_us": 21.4, "unfused_us": 30.2},
            {"name": "paged_decode_attention", "shape": [2, 4, 16], "dtype": "float32", "max_ulp": 3.0,
             "max_rel": 4.6e-7, "passed": True, "time_us": 12.5, "eager_us": 40.1, "unfused_us": None},
        ],
        "environment": {"versions": package_versions(), "device": "cpu", "dtype": "float32",
                        "git": git_revision(REPO), "host": platform.node()},
        "command": COMMAND,
    }


def build_facts() -> dict:
    """{"divergence": facts of a report with the faulty and the clean scenario, "parity": facts
    of a report with the clean one alone}."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config, weights = reference.resolve("tiny", dtype=torch.float64, seed=0)
        models = (reference.Gemma4Reference(config, weights),
                  reference.Gemma4Reference(config, {k: v.float() for k, v in weights.items()}))
        chunked = [
            {"id": "r0", "length": 11, "new_tokens": 2, "arrival": 0, "chunks": [(0, 3), (3, 3), (6, 5)]},
            {"id": "r1/chat", "length": 14, "new_tokens": 1, "arrival": 1, "chunks": [(8, 6)],
             "prefix_from": "r0", "prefix_reused": 8},
        ]
        clean = [{"id": "r0", "length": 11, "new_tokens": 2, "arrival": 0, "chunks": [(0, 5), (5, 6)]}]
        faulty = scenario_facts("chunked-prefill-with-fault", config, models, chunked, 7, fault=True)
        parity = scenario_facts("clean-chunked-prefill", config, models, clean, 3, fault=False)
    finally:
        torch.set_num_threads(before)
    return {"divergence": report_facts([faulty, parity]), "parity": report_facts([parity])}


@pytest.fixture(scope="module")
def built():
    return build_facts()


@pytest.fixture(scope="module")
def divergent(built):
    return built["divergence"]


@pytest.fixture(scope="module")
def divergent_html(divergent):
    return render_report(divergent)


# --------------------------------------------------------------------------------------
# A small DOM from the standard library's parser
# --------------------------------------------------------------------------------------

VOID = {"meta", "link", "br", "hr", "img", "input", "source", "col", "area", "base", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def own_text(self) -> str:
        """Text directly inside, without that of child elements (an SVG <title>, say)."""
        return "".join(c for c in self.children if isinstance(c, str))

    def walk(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.walk()

    def has(self, key: str, value: str) -> bool:
        key = key.rstrip("_").replace("_", "-")
        if key == "class":
            return value in (self.attrs.get("class") or "").split()
        return self.attrs.get(key) == value

    def find_all(self, tag=None, **attrs):
        """Descendants by tag and attributes (class_="x": x among the classes; data_tap: data-tap)."""
        return [n for n in self.walk() if (tag is None or n.tag == tag) and all(n.has(k, v) for k, v in attrs.items())]

    def find(self, tag=None, **attrs):
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]


class Tree(HTMLParser):
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {})
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, attrs, self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def dom(html: str) -> Node:
    return Tree(html).root


# --------------------------------------------------------------------------------------
# Contents
# --------------------------------------------------------------------------------------


def test_divergence_verdict_banner(divergent, divergent_html):
    banner = dom(divergent_html).find(id="verdict")
    assert banner.attrs["data-verdict"] == "divergence"
    assert banner.find(class_="verdict-word").text().strip() == "DIVERGENCE"
    assert divergent["summary"] in banner.text()
    assert divergent["summary"].startswith("chunked-prefill-with-fault: DIVERGENCE at layer 4, tensor o")


def test_parity_verdict_banner(built):
    html = render_report(built["parity"])
    root = dom(html)
    banner = root.find(id="verdict")
    assert banner.attrs["data-verdict"] == "parity"
    assert banner.find(class_="verdict-word").text().strip() == "PARITY"
    assert "PARITY: " in banner.text()
    assert not root.find_all(id="first-divergence")


def test_no_verdict_banner(built):
    facts = dict(built["parity"], verdict="no verdict", summary="No tap could be judged.")
    banner = dom(render_report(facts)).find(id="verdict")
    assert banner.attrs["data-verdict"] == "no verdict"
    assert banner.find(class_="verdict-word").text().strip() == "NO VERDICT"


def test_unknown_verdict_or_missing_facts_are_refused(divergent):
    with pytest.raises(ReportError, match="verdict must be one of"):
        render_report(dict(divergent, verdict="maybe"))
    with pytest.raises(ReportError, match="facts lack command"):
        render_report({k: v for k, v in divergent.items() if k != "command"})


def test_first_divergence_card_names_layer_tap_and_where(divergent, divergent_html):
    scenario = divergent["scenarios"][0]
    fd = scenario["comparison"]["first_divergence"]
    assert (fd["request"], fd["tap"]) == ("r0", f"layers.{FAULT_LAYER}.o")  # earliest tap; ties: request order
    card = dom(divergent_html).find(id="first-divergence")
    assert card.attrs["data-tap"] == f"layers.{FAULT_LAYER}.o" and card.attrs["data-layer"] == str(FAULT_LAYER)
    where = " ".join(card.find(class_="fd-where").text().split())
    assert where == f"layer {FAULT_LAYER}, tensor o (layers.{FAULT_LAYER}.o) · request r0 · scenario {scenario['name']}"
    text = " ".join(card.text().split())
    assert f"{float(card.find(class_='fd-ratio').text().split('×')[0]):.0f}" == f"{fd['ratio']:.0f}"
    assert "relative L2 error" in text and "exceeds its budget" in text
    # Worst elements: the scaled head, with candidate, truth and reference values.
    elements = card.find("table", class_="elements")
    header = [th.text() for th in elements.find_all("th")]
    assert header[:3] == ["position", "head", "dim"] and {"candidate", "truth", "reference"} <= set(header)
    rows = [[td.text() for td in tr.find_all("td")] for tr in elements.find_all("tr")[1:]]
    assert len(rows) == len(fd["worst_elements"]) and all(r[1] == "0" for r in rows)
    worst = fd["worst_elements"][0]
    assert rows[0][0] == str(worst["position"]) and rows[0][3] == f"{worst['candidate']:.7g}"
    assert rows[0][4] == f"{worst['truth']:.7g}" and rows[0][5] == f"{worst['ref']:.7g}"
    # The chunk the worst positions sit in, named from the layout.
    position = fd["positions"][0]["position"]
    layout = next(r for r in scenario["layout"]["requests"] if r["id"] == fd["request"])
    start, n = next((s, n) for s, n in layout["chunks"] if s <= position < s + n)
    sentence = card.find(class_="chunk-sentence").text()  # a decode step is named by its position
    assert f"[{start}, {start + n})" in sentence or f"(position {start})" in sentence
    assert "worst positions sit in prefill chunk" in text
    # The ULP histogram compare.py gives for the whole tap (error.ulp), candidate and reference.
    assert "ULP distance to the truth (float32, whole tap)" in text
    row = next(r for r in scenario["comparison"]["requests"] if r["request"] == "r0")["rows"]
    histogram = next(r for r in row if r["tap"] == fd["tap"])["error"]["ulp"]["histogram"]
    ulp_rows = [[td.text() for td in tr.find_all("td")] for tr in card.find("table", class_="ulp").find_all("tr")[1:]]
    assert sum(int(r[1]) for r in ulp_rows) == sum(histogram.values())  # runs of empty buckets share a row
    assert ulp_rows[0][0] == "0" and ulp_rows[-1][0].split("-")[-1] == list(histogram)[-1].split("-")[-1]
    # The other request's divergence is listed, not lost.
    assert "r1/chat" in text


def test_heatmap_has_a_cell_per_layer_and_kind(divergent, divergent_html):
    root = dom(divergent_html)
    scenarios = root.find_all("section", class_="scenario")
    assert len(scenarios) == len(divergent["scenarios"])
    for section, scenario in zip(scenarios, divergent["scenarios"]):
        for req in scenario["comparison"]["requests"]:
            box = next(b for b in section.find_all("div", class_="heatmap") if b.attrs["data-request"] == req["request"])
            cells = [td for td in box.find_all("td") if "data-layer" in td.attrs]
            got = {(int(td.attrs["data-layer"]), td.attrs["data-kind"]) for td in cells}
            want = {(r["layer"], r["kind"]) for r in req["rows"] if r["layer"] is not None}
            assert got == want and len(cells) == len(want)
            for td in cells:  # the ratio as text and on hover
                assert td.text().strip() and "error/budget" in td.attrs["title"]
            firsts = [td.attrs["data-tap"] for td in box.find_all("td") if td.attrs.get("data-first") == "true"]
            fd = req["first_divergence"]
            assert firsts == ([fd["tap"]] if fd else [])
    # Over budget is red, well under budget is green.
    cell = root.find("td", data_tap=f"layers.{FAULT_LAYER}.o", data_first="true")
    assert "first" in cell.attrs["class"] and float(cell.text()) > 1
    red = cell.attrs["style"].split("background:")[1][:7]
    assert int(red[1:3], 16) > 2 * int(red[3:5], 16)
    green = root.find("td", data_tap="layers.0.q").attrs["style"].split("background:")[1][:7]
    assert int(green[3:5], 16) > int(green[1:3], 16)


def test_layout_drawing_shows_pool_pages_and_chunks(divergent, divergent_html):
    root = dom(divergent_html)
    for section, scenario in zip(root.find_all("section", class_="scenario"), divergent["scenarios"]):
        svg = section.find("svg", class_="layout")
        labels = [t.own_text().strip() for t in svg.find_all("text", class_="pid")]
        for req in scenario["layout"]["requests"]:
            for i, pid in enumerate(req["pages"]):
                assert str(pid) in labels
                assert any(f"page {i} of {req['id']}: pool page {pid}," in r.text() for r in svg.find_all("rect"))
        chunk_titles = [r.find("title").text() for r in svg.find_all("rect")
                        if r.attrs["class"] in ("c0", "c1", "d0", "d1", "reused")]
        n_chunks = sum(len(r["chunks"]) + (r["prefix_reused"] > 0) for r in scenario["layout"]["requests"])
        assert len(chunk_titles) == n_chunks
    svg = root.find_all("section", class_="scenario")[0].find("svg", class_="layout")
    titles = [r.find("title").text() for r in svg.find_all("rect")]
    assert "reused prefix [0, 8)" in titles and "decode step 2/2 (position 12)" in titles
    assert "prefill chunk 3/3 [6, 11)" in titles
    shared = [r for r in svg.find_all("rect") if r.attrs["class"] == "page shared"]
    assert len(shared) == 4  # r1/chat reuses r0's first two pages
    assert svg.find_all("path", class_="mark")  # the worst positions are marked


def test_error_growth_charts(divergent, divergent_html):
    section = dom(divergent_html).find_all("section", class_="scenario")[0]
    kinds = divergent["scenarios"][0]["comparison"]["requests"][0]["layer_growth"]["kinds"]
    charts = section.find_all("svg", class_="growth")
    assert [c.find("text", class_="gtitle").text() for c in charts[:len(kinds)]] == list(kinds)
    out = charts[list(kinds).index("out")]
    assert out.find_all("polyline", class_="s-cand") and out.find_all("polyline", class_="s-ref")
    over = [c.find("title").text() for c in out.find_all("circle", class_="pt-over")]
    assert over and all(int(t.split()[1]) >= FAULT_LAYER for t in over)


def test_kernels_environment_and_command_last(divergent, divergent_html):
    root = dom(divergent_html)
    kernels = root.find(id="kernels")
    assert "paged_decode_attention" in kernels.text() and "2.7x" in kernels.text()  # 21.4 / 7.9
    env = " ".join(root.find(id="environment").text().split())
    # The installed distribution's version, as facts record it (torch.__version__ may differ from
    # it, e.g. a local "+cu130" suffix on a GPU build).
    assert f"torch {package_versions()['torch']}" in env and "device cpu" in env
    body = root.find("body")
    last = [c for c in body.children if isinstance(c, Node) or c.strip()][-1]
    assert isinstance(last, Node) and last.tag == "pre" and last.attrs.get("id") == "repro"
    assert last.text() == COMMAND
    assert divergent_html.rstrip().endswith(f'<pre id="repro">{COMMAND}</pre>\n</body>\n</html>')


def test_report_is_self_contained(built):
    for facts in built.values():
        html = render_report(facts)
        assert "http://" not in html and "https://" not in html
        lowered = html.lower()
        assert "<script" not in lowered and "<link" not in lowered and "<img" not in lowered
        assert " src=" not in lowered and " href=\"" not in lowered.replace(' href="#', "")
        assert "url(" not in lowered and "@import" not in lowered and "@font-face" not in lowered


def test_write_report_writes_html_and_the_same_facts_as_json(divergent, tmp_path):
    html_path, json_path = write_report(divergent, tmp_path / "run")
    assert (html_path, json_path) == (tmp_path / "run" / "report.html", tmp_path / "run" / "report.json")
    assert json.loads(json_path.read_text(encoding="utf-8")) == divergent
    assert html_path.read_text(encoding="utf-8") == render_report(divergent)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "report.json"]
    write_report(divergent, tmp_path / "run")  # overwrites in place, no leftovers
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "report.json"]


def test_user_controlled_text_is_escaped(divergent):
    facts = json.loads(json.dumps(divergent).replace('"r0"', json.dumps(HOSTILE)))
    facts["title"] = HOSTILE
    facts["command"] = f"gemma4-testbed report --out '{HOSTILE}'"
    facts["scenarios"][0]["name"] = 'x" onmouseover="alert(2)'
    facts["environment"]["host"] = "<b>host</b>"
    html = render_report(facts)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onmouseover="' not in html and "&#34; onmouseover=&#34;alert(2)" in html
    assert "<b>host</b>" not in html
    root = dom(html)
    assert not root.find_all("script") and not [n for n in root.walk() if "onmouseover" in n.attrs]
    assert root.find("div", class_="heatmap", data_request=HOSTILE)
    assert root.find(id="repro").text() == facts["command"]
    assert HOSTILE in root.find(id="first-divergence").find(class_="fd-where").text()


def test_inf_and_nan_values_render(divergent, tmp_path):
    facts = copy.deepcopy(divergent)
    comp = facts["scenarios"][0]["comparison"]
    rows = comp["requests"][0]["rows"]
    rows[3]["ratio"], rows[4]["ratio"], rows[5]["ratio"] = "inf", float("nan"), math.inf
    comp["first_divergence"]["ratio"] = math.inf
    comp["first_divergence"]["positions"][0]["rel_error"] = "nan"
    comp["first_divergence"]["heads"][0]["rel_error"] = math.inf
    growth = comp["requests"][0]["layer_growth"]["kinds"]["out"]
    growth["candidate"][2], growth["candidate"][3], growth["reference"][1] = "inf", float("nan"), 0.0
    facts["kernels"][0]["max_ulp"], facts["kernels"][0]["time_us"] = math.inf, "nan"
    html = render_report(facts)
    root = dom(html)
    assert root.find("td", data_tap=rows[3]["tap"]).text() == "inf"
    assert root.find("td", data_tap=rows[4]["tap"]).text() == "nan"
    assert "inf× budget" in root.find(id="first-divergence").text()
    _, json_path = write_report(facts, tmp_path)
    saved = json.loads(json_path.read_text())  # strict JSON: no bare Infinity/NaN
    assert "Infinity" not in json_path.read_text() and "NaN" not in json_path.read_text()
    assert saved["scenarios"][0]["comparison"]["requests"][0]["rows"][4]["ratio"] == "nan"
    assert saved["kernels"][0]["max_ulp"] == "inf"


def test_sparse_facts_render():
    # No layout, no comparison, no kernels, no git: the report still says what it knows.
    facts = {"title": "t", "verdict": "no verdict", "summary": "nothing was judged",
             "scenarios": [{"name": "empty", "passed": False}],
             "environment": {"versions": {"torch": None}, "git": None}, "command": "gemma4-testbed run x.json"}
    root = dom(render_report(facts))
    assert root.find(id="verdict").attrs["data-verdict"] == "no verdict"
    assert not root.find_all(id="first-divergence") and not root.find_all(id="kernels")
    assert "not a git checkout" in root.find(id="environment").text()
    assert root.find(id="repro").text() == "gemma4-testbed run x.json"


def test_long_sequences_stay_drawable(divergent):
    facts = copy.deepcopy(divergent)
    layout = facts["scenarios"][0]["layout"]
    for r in layout["requests"]:
        r.update(prompt_len=3000, new_tokens=40, pages=list(range(100, 100 + 3040 // PAGE_SIZE)),
                 chunks=[[i, 500] for i in range(0, 3000, 500)] + [[3000 + i, 1] for i in range(40)])
    root = dom(render_report(facts))
    svg = root.find("svg", class_="layout")
    assert len(list(svg.walk())) < 800  # not one element per token or per page
    assert "… (760 pages)" in root.find("table", class_="requests").text()


# --------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_chromium_renders_the_report(divergent, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed: apt-get install chromium")
    html_path, _ = write_report(divergent, tmp_path / "report")
    url = html_path.resolve().as_uri()

    dumped = chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    root = dom(dumped.stdout)
    banner = root.find(id="verdict")
    assert banner.attrs["data-verdict"] == "divergence" and "DIVERGENCE" in banner.text()
    card = root.find(id="first-divergence")
    assert f"layers.{FAULT_LAYER}.o" in card.text()
    assert root.find("svg", class_="layout") and root.find(id="repro").text() == COMMAND

    shot = tmp_path / "report.png"
    taken = chromium(tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400",
                     "--hide-scrollbars", url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    if os.environ.get("REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copyfile(shot, os.environ["REPORT_SCREENSHOT"])


# --------------------------------------------------------------------------------------
# The facts schema (oracle/facts.py): declared once, checked on the way in
# --------------------------------------------------------------------------------------


def test_facts_round_trip_json_schema_json_unchanged(built, tmp_path):
    from oracle.facts import load_facts
    from oracle.report import jsonable

    for facts in built.values():
        data = json.loads(json.dumps(jsonable(facts), allow_nan=False))
        assert load_facts(data).to_dict() == data
        _, json_path = write_report(facts, tmp_path)
        text = json_path.read_text(encoding="utf-8")
        assert json.dumps(load_facts(json.loads(text)).to_dict(), indent=1, ensure_ascii=False) + "\n" == text


# (path of a dict in report.json, a field of it): renaming the field must fail, naming the path
RENAMED = [
    ((), "summary"),
    (("environment",), "host"),
    (("kernels", 0), "eager_us"),
    (("scenarios", 0), "layout"),
    (("scenarios", 0, "layout"), "page_size"),
    (("scenarios", 0, "layout", "requests", 1), "prefix_reused"),
    (("scenarios", 0, "comparison"), "first_divergence"),
    (("scenarios", 0, "comparison", "counts"), "taps_failed"),
    (("scenarios", 0, "comparison", "first_divergence"), "judgement"),
    (("scenarios", 0, "comparison", "first_divergence", "positions", 0), "ref_rel_error"),
    (("scenarios", 0, "comparison", "requests", 0, "rows", 3), "ratio"),
    (("scenarios", 0, "comparison", "requests", 0, "rows", 3, "error"), "rel_l2"),
    (("scenarios", 0, "comparison", "requests", 0, "rows", 3, "error", "ulp"), "histogram"),
    (("scenarios", 0, "comparison", "requests", 0, "rows", 3, "budget"), "max_abs"),
    (("scenarios", 0, "comparison", "requests", 0, "layer_growth", "kinds", "out"), "budget"),
]


def _path_text(path) -> str:
    return "facts" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


@pytest.mark.parametrize("path,name", RENAMED, ids=[_path_text(p) + "." + n for p, n in RENAMED])
def test_a_renamed_field_fails_with_its_path(divergent, tmp_path, path, name):
    from oracle import cli

    facts = copy.deepcopy(divergent)
    node = facts
    for p in path:
        node = node[p]
    assert name in node, f"{_path_text(path)} has no field {name}"
    node[name + "_renamed"] = node.pop(name)
    where = f"{_path_text(path)}.{name}"
    with pytest.raises(ReportError) as e:
        render_report(facts)
    assert where in str(e.value) and f"{where}_renamed: unknown field" in str(e.value)
    # `gemma4-testbed report` on such a report.json: one line naming the field, exit 2.
    (tmp_path / "report.json").write_text(json.dumps(jsonable_facts(facts)))
    assert cli.main(["report", str(tmp_path)]) == 2
    assert not (tmp_path / "report.html").exists()


def jsonable_facts(facts):
    from oracle.report import jsonable

    return jsonable(facts)


def test_the_report_reads_only_fields_of_the_schema(built):
    # The view reads the facts as Records (oracle/facts.py), which raise for a name the schema
    # does not declare; the template reads the view under jinja2.StrictUndefined. A real report
    # rendered both ways (divergence with the local and distribution judgements, and parity)
    # therefore touches no field that does not exist.
    from oracle.facts import FactsError, load_facts
    from oracle.report import _environment

    assert _environment().undefined is jinja2.StrictUndefined
    for facts in built.values():
        render_report(facts)
    record = load_facts(jsonable_facts(built["divergence"])).to_dict(strict=True)
    with pytest.raises(FactsError, match="ScenarioFacts.layuot: read, but not a field"):
        record["scenarios"][0].get("layuot")
    with pytest.raises(FactsError, match="TapRow.inputs"):
        record["scenarios"][0]["comparison"]["requests"][0]["rows"][0]["inputs"]
    assert record["scenarios"][0]["comparison"]["requests"][0]["rows"][0].get("distribution") is None  # declared


def test_unknown_top_level_field_and_wrong_type_are_refused(divergent):
    with pytest.raises(ReportError, match=r"facts\.extra: unknown field"):
        render_report(dict(divergent, extra=1))
    facts = copy.deepcopy(divergent)
    facts["scenarios"][0]["comparison"]["counts"]["taps_failed"] = "three"
    with pytest.raises(ReportError, match=r"facts\.scenarios\[0\]\.comparison\.counts\.taps_failed: expected int"):
        render_report(facts)
