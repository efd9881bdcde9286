"""Run a scenario on both paths and judge it.

truth = the reference in float64 (on the compared weights), ref = the reference in the compared
dtype (its error against the truth is the noise a correct implementation has), cand = the
optimized path in the compared dtype. Decode steps are teacher-forced with the reference's own
greedy tokens, so both paths see the same sequence even where an argmax would differ.

The optimized path is the Engine's one loop (through the `optimized.Runner` facade): the
scenario's schedule, the teacher tokens and the tap sink are policy it takes. Its `logits` tap
is the row the engine hands its sampler, so a wrong sampling row shows there even though the
teacher decides the token. On a device that can capture graphs, decode steps replay them and
each replay is checked bitwise against the same step run eagerly with taps (a mismatch raises
GraphMismatch); `decode_graphs="static"` runs the graphs' padded static batch eagerly instead,
which is how a CPU exercises that path.

MoE models compared in another dtype than float64 get two more float64 forwards per request (the
cost of "routed truths", docs/design_notes.md note 35): the truth forced to the reference's
captured expert choices (`layers.{l}.experts`) and the truth forced to the candidate's (its taps
from chunks and decode steps, reassembled by position). compare() judges each path against the
truth that routed as it did, so rows past a near-tie expert choice are judged too.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from optimized.kernels import graphs_supported
from optimized.model import OP_SETS, share_projection_storage
from optimized.parallel import TensorParallel
from optimized.runner import Runner
from reference import Gemma4Reference, resolve
from reference.weights import CastOnRead, resolve_config

from .capture import Capture, CaptureBuilder, RequestCapture, capture_metadata, git_revision, package_versions
from .compare import Comparison, compare
from .facts import ABSENT, Environment, Facts, Git, Kernel, Layout, ScenarioFacts
from .facts import Comparison as FactsComparison
from .faults import get as get_fault, inject_all
from .scenario import Scenario
from .tolerance import DEFAULT_TOLERANCE, Tolerance

TRUTH_DTYPE = torch.float64


@dataclass
class ScenarioRun:
    scenario: Scenario
    truth: Capture
    ref: Capture
    cand: Capture
    comparison: Comparison
    layout: dict

    @property
    def passed(self) -> bool:
        return self.comparison.passed


def greedy_continuation(model: Gemma4Reference, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor(seq, device=model.device))[-1].argmax()))
    return seq[len(prompt):]


def reference_capture(model: Gemma4Reference, scenario: Scenario, sequences: dict[str, list[int]],
                      path: str, forced: Mapping[str, Mapping[int, torch.Tensor]] | None = None) -> Capture:
    """`forced`: request id -> {layer: expert ids [T, k]} that the model routes to (MoE)."""
    metadata = capture_metadata(model.config, path=path, dtype=model.dtype, device=model.device,
                                scenario=scenario.to_dict())
    builder = CaptureBuilder(metadata)
    for rid, seq in sequences.items():
        taps: dict = {}
        model(torch.tensor(seq, device=model.device), taps=taps,
              forced_experts=None if forced is None else forced[rid])
        builder.add_taps(rid, torch.arange(len(seq)), taps)
    return builder.build()


def expert_choices(request: RequestCapture, num_layers: int) -> dict[int, torch.Tensor] | None:
    """{layer: expert ids [T, k]} from a capture's `layers.{l}.experts` taps over its positions,
    or None where a layer's tap is absent."""
    out = {}
    for layer in range(num_layers):
        tap = request.taps.get(f"layers.{layer}.experts")
        if tap is None:
            return None
        out[layer] = tap
    return out


def candidate_choices(cand: Capture, ref: Capture, sequences: dict[str, list[int]], rid: str,
                      donors: Sequence[str], num_layers: int) -> dict[int, torch.Tensor] | None:
    """The candidate's expert choices for every position of request `rid` [len(seq), k]. Positions
    it did not compute (a reused prefix) take the choices of the request whose computation it
    reused: the first of `donors` (its prefix source first, then every other request) that holds
    the position and the same tokens up to it; failing that, the reference's own (which then
    means: judged as the reference routed there). None where the candidate has no experts taps."""
    seq = sequences[rid]
    req = cand.requests.get(rid)
    if req is None or ref.requests.get(rid) is None:
        return None
    mine = expert_choices(req, num_layers)
    base = expert_choices(ref.requests[rid], num_layers)
    if mine is None or base is None:
        return None
    out = {layer: base[layer].clone() for layer in range(num_layers)}
    filled = torch.zeros(len(seq), dtype=torch.bool)
    sources = [(rid, req)] + [(d, cand.requests[d]) for d in donors if d != rid and d in cand.requests]
    for source, capture in sources:
        choices = mine if source == rid else expert_choices(capture, num_layers)
        if choices is None:
            continue
        have = capture.positions
        if source != rid:  # only the positions whose whole prefix the two requests share
            other = sequences[source]
            same = 0
            while same < min(len(seq), len(other)) and seq[same] == other[same]:
                same += 1
            keep = have < same
        else:
            keep = have < len(seq)
        keep &= ~filled[have.clamp(max=len(seq) - 1)]
        pos = have[keep]
        if pos.numel() == 0:
            continue
        for layer in range(num_layers):
            out[layer][pos] = choices[layer][keep].to(out[layer].dtype)
        filled[pos] = True
    return out


def run_scenario(scenario: Scenario, *, tolerance: Tolerance = DEFAULT_TOLERANCE,
                 runner_factory: Callable[..., Runner] = Runner, weights=None,
                 faults: Sequence[str] = (), decode_graphs: bool | str | None = None,
                 tp: TensorParallel | None = None, ops: str = "kernels") -> ScenarioRun | None:
    """Capture truth, reference and optimized path for a scenario and compare them.
    `runner_factory` lets a test substitute the optimized path; `faults` names known bugs
    (oracle/faults.py) injected into the optimized path while it runs; `decode_graphs` is the
    engine's `graphs` (None: the scenario's `engine.decode`; "static": the padded static decode
    batch without capture; False: plain eager decode; True: graphs or an error); `ops`: the
    optimized path's op set (optimized.model.OP_SETS: "eager" runs no Triton).

    `tp`: the optimized path runs sharded (optimized/parallel.py); every rank calls this with
    the same arguments. Rank 0 runs the reference, hands its teacher tokens to the other ranks,
    receives the taps in the unsharded layout and judges as without tp; the other ranks run
    their shard only and return None. Memory: rank 0 holds the whole model, because the
    reference and the truth (cast on read from it) are unsharded, plus its Runner's shard cut
    from it; the other ranks hold only their shard, which their Runner reads from the
    checkpoint's slices or draws on their device as rank 0 drew the whole (parallel.load_shard),
    unless `weights` hands every rank the whole model."""
    for name in faults:
        get_fault(name)  # an unknown name fails before any work
    if ops not in OP_SETS:
        raise ValueError(f"ops must be one of {', '.join(OP_SETS)}, got {ops!r}")
    m = scenario.model
    lead = tp is None or tp.rank == 0  # the rank that runs the reference and judges
    if decode_graphs is None:
        decode_graphs = engine_graphs(scenario.engine.decode, m.device)
    if weights is not None:
        cfg, weights = weights
    elif lead:
        cfg, weights = resolve(m.source, dtype=scenario.dtype, device=m.device, seed=m.seed)
    else:  # no reference here: this rank's Runner reads (or draws) its shard alone
        cfg = resolve_config(m.source)
    if weights is not None:
        # The reference reads q/k/v and gate/up, the paged model their stacks: one copy serves both.
        weights = share_projection_storage(cfg, weights)
    prompts = scenario.prompts(cfg.vocab_size)
    ids = [r.id for r in scenario.requests]
    if lead:
        ref_model = Gemma4Reference(cfg, weights)
        truth_model = Gemma4Reference(cfg, CastOnRead(weights, TRUTH_DTYPE))  # no float64 copy held
        teacher = [greedy_continuation(ref_model, p, r.new_tokens) for p, r in zip(prompts, scenario.requests)]
        sequences = {rid: p + t for rid, p, t in zip(ids, prompts, teacher)}
        truth = reference_capture(truth_model, scenario, sequences, "truth")
        ref = reference_capture(ref_model, scenario, sequences, "reference")
    if tp is not None:  # every rank forces the same tokens: rank 0's reference decides them
        teacher = tp.broadcast_object(teacher if lead else None)

    e = scenario.engine
    builder = CaptureBuilder(capture_metadata(cfg, path="optimized", dtype=scenario.dtype, device=m.device,
                                              scenario=scenario.to_dict(), ops=ops))
    index = {r.id: i for i, r in enumerate(scenario.requests)}
    # Only what differs from the Runner's defaults: a test's runner_factory need not know tp or ops.
    options = ({} if tp is None else {"tp": tp}) | ({} if ops == "kernels" else OP_SETS[ops])
    model = (cfg, {"weights": weights}) if weights is not None else (m.source, {"seed": m.seed})
    with inject_all(faults):
        runner = runner_factory(model[0], **model[1], dtype=scenario.dtype, device=m.device,
                                page_size=e.page_size, chunk_size=e.chunk_size, num_pages=e.num_pages,
                                page_order_seed=e.page_order_seed, token_budget=e.token_budget,
                                max_requests=e.max_requests, graphs=decode_graphs, **options)
        results = runner.run(
            prompts, max_new_tokens=[r.new_tokens for r in scenario.requests], teacher_tokens=teacher,
            chunk_splits=[None if r.chunks is None else list(r.chunks) for r in scenario.requests],
            arrivals=[r.arrival for r in scenario.requests],
            share_prefix_with=[None if r.prefix_from is None else index[r.prefix_from["request"]]
                               for r in scenario.requests],
            # Every rank's engine gathers the taps (a collective); only rank 0 keeps them.
            taps=(lambda i, name, pos, t: builder.add(ids[i], name, pos, t)) if lead else _discard)
    if not lead:
        return None
    cand = builder.build()
    chunks = {rid: [start for start, _ in res.steps] for rid, res in zip(ids, results)}
    routed = routed_truths(truth_model, scenario, sequences, ref, cand)
    # The truth model's float64 weights let compare() replay each stage locally (oracle/replay.py).
    comparison = compare(truth, ref, cand, cfg, tolerance=tolerance, chunk_boundaries=chunks, weights=truth_model.w,
                         routed_truths=routed)
    layout = {
        "page_size": e.page_size,
        "num_pages": runner.cache.full.num_pages,
        "decode": _decode_path(getattr(runner, "engine", None)),
        "requests": [{"id": rid, "prompt_len": len(p), "new_tokens": r.new_tokens, "pages": res.pages,
                      "chunks": [list(s) for s in res.steps], "prefix_reused": res.prefix_reused}
                     for rid, p, r, res in zip(ids, prompts, scenario.requests, results)],
    }
    return ScenarioRun(scenario, truth, ref, cand, comparison, layout)


def routed_truths(truth_model: Gemma4Reference, scenario: Scenario, sequences: dict[str, list[int]], ref: Capture,
                  cand: Capture) -> dict[str, Capture] | None:
    """{"reference": the truth forced to the reference's expert choices, "candidate": forced to
    the candidate's} (module docstring), or None: a dense model, a float64 comparison (the truth's
    own routing is the reference's), or a capture without experts taps. Two more truth forwards per
    request."""
    cfg = truth_model.config
    if not cfg.enable_moe_block or scenario.dtype == TRUTH_DTYPE:
        return None
    L = cfg.num_hidden_layers
    index = {r.id: r for r in scenario.requests}
    forced_ref, forced_cand = {}, {}
    for rid in sequences:
        r = ref.requests.get(rid)
        mine = None if r is None else expert_choices(r, L)
        spec = index.get(rid)
        source = None if spec is None or spec.prefix_from is None else spec.prefix_from["request"]
        donors = ([source] if source else []) + [d for d in sequences if d != source]
        theirs = candidate_choices(cand, ref, sequences, rid, donors, L)
        if mine is None or theirs is None:
            return None
        forced_ref[rid], forced_cand[rid] = mine, theirs
    return {"reference": reference_capture(truth_model, scenario, sequences, "truth", forced_ref),
            "candidate": reference_capture(truth_model, scenario, sequences, "truth", forced_cand)}


def _discard(*_) -> None:
    pass


def engine_graphs(decode: str, device: str) -> bool | str | None:
    """The engine's `graphs` setting for a scenario's `engine.decode` (oracle/scenario.py)."""
    if decode == "graphs":
        return None if graphs_supported(torch.device(device)) else "static"
    return {"auto": None, "static": "static", "eager": False}[decode]


def _decode_path(engine) -> str:
    """How the engine ran decode steps: "graphs", "static" (padded, not captured) or "eager (why)"."""
    if engine is None:
        return "unknown"
    graphs = engine.decode_graphs
    if graphs is None:
        return f"eager ({engine.graphs_off_because})"
    return "graphs" if graphs.capture else "static"


def report_facts(runs: list[ScenarioRun], command: str, title: str, kernels: list | None = None) -> dict:
    """Everything the HTML report and its JSON twin show (oracle/report.py renders it), built
    through the schema of oracle/facts.py."""
    failed = [r for r in runs if not r.passed]
    failed_kernels = [k["name"] for k in kernels or [] if not k["passed"]]
    if failed_kernels and not failed:
        verdict = "divergence"
        summary = f"Kernel testbed: {', '.join(failed_kernels)} disagree with their eager twins."
    elif failed:
        verdict = "divergence"
        what = "The scenario diverges" if len(runs) == 1 else f"{len(failed)} of {len(runs)} scenarios diverge"
        summary = f"{what}. First: {failed[0].scenario.name}: " \
                  f"{failed[0].comparison.summary().splitlines()[0]}"
    else:
        verdict = "parity"
        what = "The scenario holds" if len(runs) == 1 else f"All {len(runs)} scenarios hold"
        summary = f"{what} parity with the reference within the noise budget."
    first = runs[0].scenario if runs else None
    git = git_revision(Path(__file__).resolve().parent.parent)
    facts = Facts(
        title=title,
        verdict=verdict,
        summary=summary,
        scenarios=[ScenarioFacts(name=r.scenario.name, passed=r.passed, scenario=r.scenario.to_dict(),
                                 layout=Layout.load(r.layout, f"facts.scenarios[{i}].layout"),
                                 comparison=FactsComparison.load(r.comparison.to_dict(),
                                                                 f"facts.scenarios[{i}].comparison"))
                   for i, r in enumerate(runs)],
        environment=Environment(
            versions=package_versions(),
            device=first.model.device if first else "",
            dtype=first.model.dtype if first else "",
            git=None if git is None else Git.load(git, "facts.environment.git"),
            host=f"{platform.node()} ({platform.machine()}, {platform.python_version()})",
        ),
        command=command,
        kernels=ABSENT if kernels is None else [Kernel.load(k, f"facts.kernels[{i}]") for i, k in enumerate(kernels)],
    )
    return facts.to_dict()
