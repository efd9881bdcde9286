"""`gemma4-testbed`: the command line. Exit codes: 0 parity / success, 1 divergence found,
2 bad input or usage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT = 0, 1, 2


def _version() -> str:
    try:
        return version("gemma4-testbed")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def cmd_info(args) -> int:
    import torch

    from optimized.memory import plan_kv_bytes
    from reference import CheckpointError, ConfigError, PRESETS, load_config
    from reference.weights import expected_shapes, parameter_bytes, parameter_count

    try:
        cfg = PRESETS[args.model] if args.model in PRESETS else load_config(args.model)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"model {args.model}")
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
              "attention_k_eq_v", "sliding_window", "num_kv_shared_layers", "use_double_wide_mlp",
              "hidden_size_per_layer_input", "enable_moe_block", "num_experts", "top_k_experts",
              "moe_intermediate_size", "final_logit_softcapping"]
    for f in fields:
        print(f"  {f:28s} {getattr(cfg, f)}")
    print("layers (index type head_dim kv_heads kv_source mlp_width):")
    for s in cfg.layers:
        shared = f"<- {s.kv_source}" if s.kv_shared else ""
        print(f"  {s.index:3d} {'sliding' if s.is_sliding else 'full   '} {s.head_dim:4d} {s.num_kv_heads:3d} "
              f"{shared:6s} {s.mlp_width}{'' if s.has_v_proj or s.kv_shared else '  (K=V)'}")
    print(f"weights: {len(expected_shapes(cfg))} tensors, {parameter_count(cfg):,} parameters, "
          f"{_gib(parameter_bytes(cfg, torch.bfloat16))} in bf16")
    print(f"KV cache per sequence, bf16, page size {args.page_size} (paged hybrid layout vs one full-length "
          "cache per layer):")
    for ctx in args.context:
        p = plan_kv_bytes(cfg, ctx, args.page_size)
        print(f"  {ctx:>7d} tokens: {_gib(p.paged_bytes)} vs {_gib(p.naive_bytes)} ({p.saving:.2f}x smaller)")
    return EXIT_OK


def _device(name: str) -> str:
    if name != "auto":
        return name
    from optimized.kernels import default_device

    return str(default_device())


def _scenarios(args):
    from .faults import FAULTS, get
    from .scenario import builtin, load

    model = (args.model, args.dtype, _device(args.device), args.seed)
    injected = getattr(args, "inject", [])
    if not args.scenario and injected:  # each injected fault's own scenario, once
        return list({s.name: s for s in (get(n).scenario(*model) for n in injected)}.values())
    if not args.scenario:
        return builtin(*model)
    names = {s.name: s for s in [*builtin(*model), *(f.scenario(*model) for f in FAULTS.values())]}
    out = []
    for item in args.scenario:
        if item in names:
            out.append(names[item])
        else:
            out.append(load(item))
    return out


def _progress(i: int, n: int, name: str, status: str, seconds: float | None = None) -> None:
    done = i if seconds is not None else i - 1
    bar = "#" * done + "." * (n - done)
    took = f" ({seconds:.1f}s)" if seconds is not None else ""
    print(f"[{bar}] {i}/{n} {name:34s} {status}{took}", file=sys.stderr, flush=True)


def _command_line(argv) -> str:
    import shlex

    return "gemma4-testbed " + " ".join(shlex.quote(a) for a in argv)


def cmd_check(args) -> int:
    import time

    from reference import CheckpointError, ConfigError, resolve

    from .capture import CaptureError
    from .faults import get
    from .report import write_report
    from .run import report_facts, run_scenario
    from .scenario import ScenarioError

    try:
        faults = [get(n) for n in args.inject]
        scenarios = _scenarios(args)
        for sc in scenarios:  # resolve every model up front: bad input fails before any work
            resolve(sc.model.source, dtype=sc.dtype, device="meta", seed=sc.model.seed)
    except (ScenarioError, CheckpointError, ConfigError, CaptureError, ValueError) as e:  # UnknownFault too
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for f in faults:
        print(f"injected fault {f.name}: {f.summary} (alone, on tiny, its scenario {f.scenario_spec['name']} "
              f"must diverge first at {f.expect})")
    runs = []
    for i, sc in enumerate(scenarios, 1):
        _progress(i, len(scenarios), sc.name, "running")
        t0 = time.perf_counter()
        try:
            run = run_scenario(sc, faults=args.inject)
        except (ScenarioError, CheckpointError, ConfigError, ValueError) as e:
            print(f"error: scenario {sc.name!r}: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        runs.append(run)
        _progress(i, len(scenarios), sc.name, "parity" if run.passed else "DIVERGENCE", time.perf_counter() - t0)
    title = f"Gemma 4 parity: {args.model} ({args.dtype})"
    if faults:
        title += f", injected: {', '.join(f.name for f in faults)}"
    kernels = _kernel_rows(args) if args.kernels else None
    facts = report_facts(runs, _command_line(args.argv), title, kernels=kernels)
    out = Path(args.out) if args.out else Path("reports") / f"check-{Path(args.model).name}-{args.dtype}"
    html, _ = write_report(facts, out)
    print(facts["summary"])
    for run in runs:
        if not run.passed:
            print(run.comparison.summary())
            break
    if len(faults) == 1:  # with several, the first divergence is the earliest of their taps
        _say_whether_the_fault_was_named(faults[0], args.model, runs)
    print(f"report: {html}")
    kernels_ok = kernels is None or all(k["passed"] for k in kernels)
    return EXIT_OK if all(r.passed for r in runs) and kernels_ok else EXIT_DIVERGED


def _kernel_rows(args) -> list[dict]:
    """The kernel testbed on the check's device and dtype, as rows of the report's kernels table."""
    import torch

    from .kernel_check import run_kernel_check

    device = torch.device(_device(args.device))
    results = run_kernel_check(device, (getattr(torch, args.dtype),), "small" if device.type == "cpu" else "e2b",
                               repeats=3, progress=lambda what: print(f"kernel {what}", file=sys.stderr))
    if not all(r.passed for r in results):
        print("kernel testbed: " + ", ".join(r.name for r in results if not r.passed) + " FAILED")
    return [{"name": r.name, "shape": r.shape, "dtype": r.dtype, "max_ulp": r.scale_ulp, "max_rel": r.rel,
             "passed": r.passed, "time_us": r.time_us, "eager_us": r.eager_us, "unfused_us": r.unfused_us}
            for r in results]


def _say_whether_the_fault_was_named(fault, model: str, runs) -> None:
    """After `check --inject`: whether the oracle named the fault's expected tap on its scenario."""
    own = [r for r in runs if r.scenario.name == fault.scenario_spec["name"]]
    if model != "tiny" or not own:
        return
    first = own[0].comparison.first_divergence
    found = "parity (not caught)" if first is None else first.tap
    verdict = "as expected" if found == fault.expect else f"EXPECTED {fault.expect}"
    print(f"fault {fault.name}: first divergence {found} on {own[0].scenario.name} ({verdict})")


def cmd_faults(args) -> int:
    from .faults import FAULTS, UnknownFault, get

    try:
        chosen = [get(n) for n in args.names] if args.names else list(FAULTS.values())
    except UnknownFault as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    width = max(len(f.name) for f in chosen)
    for f in chosen:
        if args.names:
            print(f"{f.name}: {f.summary}\n  {f.description}\n  scenario {f.scenario_spec['name']}, "
                  f"first divergence on tiny: {f.expect}")
        else:
            print(f"{f.name:{width}s}  {f.summary}")
    return EXIT_OK


def cmd_capture(args) -> int:
    from reference import CheckpointError, ConfigError

    from .capture import CaptureError, save_capture
    from .run import run_scenario
    from .scenario import ScenarioError

    try:
        if len(args.scenario) != 1:
            raise ScenarioError("capture takes exactly one --scenario (a file or a built-in name)")
        (scenario,) = _scenarios(args)
        run = run_scenario(scenario)
        capture = {"truth": run.truth, "reference": run.ref, "optimized": run.cand}[args.path]
        where = save_capture(capture, args.out, overwrite=args.overwrite)
    except (ScenarioError, CheckpointError, ConfigError, CaptureError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"capture ({args.path}, {scenario.name}): {where}")
    return EXIT_OK


def cmd_diff(args) -> int:
    from reference import Gemma4Config

    from .capture import CaptureError, load_capture
    from .compare import CompareError, compare
    from .report import write_report

    try:
        base, cand = load_capture(args.baseline), load_capture(args.candidate)
        truth = load_capture(args.truth) if args.truth else base
        config = Gemma4Config.from_hf_dict(cand.metadata["model_config"])
        comparison = compare(truth, base, cand, config)
    except (CaptureError, CompareError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(comparison.summary())
    if args.out:
        scenario = cand.metadata.get("scenario") or {}
        facts = {
            "title": f"diff {args.baseline} {args.candidate}",
            "verdict": "parity" if comparison.passed else "divergence",
            "summary": comparison.summary().splitlines()[0],
            "scenarios": [{"name": scenario.get("name", "capture"), "passed": comparison.passed,
                           "scenario": scenario, "layout": None, "comparison": comparison.to_dict()}],
            "environment": {"versions": cand.metadata.get("versions", {}), "device": cand.metadata.get("device"),
                            "dtype": cand.metadata.get("dtype"), "git": cand.metadata.get("git"), "host": ""},
            "command": _command_line(args.argv),
        }
        html, _ = write_report(facts, args.out)
        print(f"report: {html}")
    return EXIT_OK if comparison.passed else EXIT_DIVERGED


def cmd_report(args) -> int:
    import json

    from .report import write_report

    src = Path(args.directory) / "report.json"
    try:
        facts = json.loads(src.read_text())
        html, _ = write_report(facts, args.out or args.directory)
    except FileNotFoundError:
        print(f"error: {src}: no report.json to render", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {src}: cannot render ({e})", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {html}")
    return EXIT_OK if facts.get("verdict") == "parity" else EXIT_DIVERGED


def cmd_kernels(args) -> int:
    import json

    import torch

    from .kernel_check import format_table, run_kernel_check

    device = torch.device(_device(args.device))
    size = args.size or ("small" if device.type == "cpu" else "e2b")
    dtypes = [getattr(torch, d) for d in args.dtype]
    n = [0]

    def progress(what: str) -> None:
        n[0] += 1
        print(f"[{n[0]}] {what}", file=sys.stderr, flush=True)

    results = run_kernel_check(device, dtypes, size, args.repeats, progress=progress)
    print(f"device {device}, sizes '{size}', median of {args.repeats}")
    print(format_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "size": size, "results": [r.to_dict() for r in results]},
                              indent=1))
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    print(f"json: {out}")
    return EXIT_DIVERGED if failed else EXIT_OK


def cmd_serve(args) -> int:
    from optimized.serve import build_server, run_until_interrupted

    try:
        server = build_server(args.model, host=args.host, port=args.port, dtype=args.dtype,
                              device=_device(args.device), page_size=args.page_size,
                              chunk_size=args.chunk_size, num_pages=args.num_pages, max_requests=args.max_requests,
                              token_budget=args.token_budget, max_context=args.max_context, seed=args.seed)
    except ValueError as e:  # CheckpointError, ConfigError, TokenizerError, ChatError, bad engine settings
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # the address is taken or not ours to bind
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_until_interrupted(server)
    return EXIT_OK


def _add_model_args(p, scenarios: bool = True) -> None:
    p.add_argument("model", nargs="?", default="tiny", help="preset name or checkpoint directory (default: tiny)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, xpu or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset")
    if scenarios:
        p.add_argument("--scenario", action="append", default=[],
                       help="a scenario JSON file or a built-in scenario name (repeatable; default: the built-in set)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-testbed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a preset's or checkpoint's config and memory plan")
    info.add_argument("model", nargs="?", default="tiny", help="preset name or checkpoint directory")
    info.add_argument("--page-size", type=int, default=16)
    info.add_argument("--context", type=int, nargs="+", default=[4096, 32768, 131072])
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="run scenarios on both paths, judge parity, write the HTML report")
    _add_model_args(check)
    check.add_argument("--out", help="report directory (default: reports/check-<model>-<dtype>)")
    check.add_argument("--kernels", action="store_true",
                       help="also run the kernel testbed (see `kernels`) and put its table in the report")
    check.add_argument("--inject", action="append", default=[], metavar="FAULT",
                       help="inject a known bug into the optimized path (repeatable; see `faults`); without "
                            "--scenario, runs each fault's own scenario")
    check.set_defaults(func=cmd_check)

    faults = sub.add_parser("faults", help="list the known bug classes `check --inject` can inject")
    faults.add_argument("names", nargs="*", metavar="FAULT", help="show these in full")
    faults.set_defaults(func=cmd_faults)

    capture = sub.add_parser("capture", help="capture one path's taps for a scenario into a directory")
    _add_model_args(capture)
    capture.add_argument("--path", required=True, choices=["truth", "reference", "optimized"])
    capture.add_argument("--out", required=True, help="capture directory to create")
    capture.add_argument("--overwrite", action="store_true")
    capture.set_defaults(func=cmd_capture)

    diff = sub.add_parser("diff", help="judge a candidate capture against a baseline capture")
    diff.add_argument("baseline")
    diff.add_argument("candidate")
    diff.add_argument("--truth", help="a float64 truth capture; without it the baseline is the truth and "
                                      "budgets are the per-dtype floors alone")
    diff.add_argument("--out", help="write an HTML report into this directory")
    diff.set_defaults(func=cmd_diff)

    kernels = sub.add_parser("kernels", help="every Triton kernel against its eager twin on this device")
    kernels.add_argument("--device", default="auto")
    kernels.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                         choices=["float32", "bfloat16", "float16"])
    kernels.add_argument("--size", choices=["small", "e2b", "e4b", "31b", "26b-a4b"],
                         help="input sizes: small, or a preset's shapes at 2048 tokens (default: small on CPU, e2b on GPU)")
    kernels.add_argument("--repeats", type=int, default=5)
    kernels.add_argument("--out", default="reports/kernels.json")
    kernels.set_defaults(func=cmd_kernels)

    serve = sub.add_parser("serve", help="serve the optimized path over HTTP (/generate, OpenAI-compatible "
                                         "/v1/completions and /v1/chat/completions) until Ctrl-C; a checkpoint "
                                         "directory's tokenizer.json and chat template are used where present")
    _add_model_args(serve, scenarios=False)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port")
    serve.add_argument("--page-size", type=int, default=16)
    serve.add_argument("--chunk-size", type=int, default=512, help="most prompt tokens per request per step")
    serve.add_argument("--num-pages", type=int, help="KV pool size in pages (default: max-requests full contexts)")
    serve.add_argument("--max-requests", type=int, default=16, help="most requests running at once")
    serve.add_argument("--max-context", type=int, help="most positions per request (default: the model's, <= 4096)")
    serve.add_argument("--token-budget", type=int, help="most tokens per step (default: no limit)")
    serve.set_defaults(func=cmd_serve)

    report = sub.add_parser("report", help="re-render report.html from a report directory's report.json")
    report.add_argument("directory")
    report.add_argument("--out", help="write into another directory")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help/--version
        return int(e.code or 0)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
