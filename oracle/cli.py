"""`gemma4-testbed`: the command line. Exit codes: 0 parity / success, 1 divergence found,
2 bad input or usage, 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """Input the CLI itself refuses (a flag's value, a path, a device): main() prints the message,
    which names the flag or field, as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the argument, exit 2 (not usage + error)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# What a message quotes of a value given: a 5000-digit number quoted in full buried the message.
QUOTE_CHARS = 20
_INTEGER = re.compile(r"\s*[+-]?\d+(_\d+)*\s*")  # what int() takes (it takes underscores and spaces too)


def _quoted(text: str, quote: bool = True) -> str:
    """`text` as repr() writes it (as it is, quote=False: a number), or past QUOTE_CHARS
    characters its first ones, "..." and its length (in digits where it is an integer)."""
    shown = repr if quote else str
    if len(text) <= QUOTE_CHARS:
        return shown(text)
    size = f"{sum(c.isdigit() for c in text)} digits" if _INTEGER.fullmatch(text) else f"{len(text)} characters"
    return f"{shown(text[:QUOTE_CHARS])}... ({size})"


def _seconds(text: str) -> float | None:
    """A time limit in seconds: a finite number >= 0, 0 meaning none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {_quoted(text)}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {_quoted(text)}")
    return value or None


def _int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= minimum (and <= maximum); argparse's error names the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            if not _INTEGER.fullmatch(text):
                raise argparse.ArgumentTypeError(f"expected an integer, got {_quoted(text)}") from None
            # An integer all the same, of more digits than int() reads (sys.get_int_max_str_digits()):
            # past any bound, so the bound it breaks is what the message names.
            if text.strip().startswith("-"):
                want = f">= {minimum}"
            elif maximum is not None:
                want = f"<= {maximum}"
            else:
                want = f"of at most {sys.get_int_max_str_digits()} digits"
            message = f"expected an integer {want}, got {_quoted(text.strip(), False)}"
            raise argparse.ArgumentTypeError(message) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {_quoted(str(value), False)}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {_quoted(str(value), False)}")
        return value

    return parse


def _path(text: str) -> str:
    """An argparse type for a file or directory: an empty string would mean the current
    directory, or be taken as not given (`--out ""` fell back to the default, a `diff` capture
    "" crashed), so it is refused."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _model(text: str) -> str:
    """An argparse type for MODEL: a preset name or a checkpoint directory. "" is neither (as a
    path it is the current directory), and "expected a path" left the presets out."""
    if not text:
        from reference import PRESETS  # here, not at import: the CLI starts without torch

        raise argparse.ArgumentTypeError(f"expected a preset name ({', '.join(PRESETS)}) or a checkpoint "
                                         "directory, got an empty string")
    return text


def _scenario_arg(text: str) -> str:
    """An argparse type for --scenario: a file or a built-in name, so not "expected a path"."""
    if not text:
        raise argparse.ArgumentTypeError("expected a scenario file or a built-in scenario name (`gemma4-testbed "
                                         "scenarios` lists them), got an empty string")
    return text


# `--ops` of check and serve: optimized.model.OP_SETS's names (not imported here: the CLI starts
# without torch). A test checks that the two agree.
OPS = ("kernels", "eager")
OPS_HELP = ("kernels (default): the Triton kernels; eager: their torch twins and no Triton at all (attention's "
            "eager twins over the same pages, the unfused ops), slower at real sizes; {what}")

# `kernels --repeats`: a median of 1000 is as steady as it gets; 10**30 ran until killed.
MAX_REPEATS = 1000


def _port(text: str) -> int:
    """An argparse type for --port. Any integer outside 0..65535 is named by that range: one of
    more digits than int() reads said "of at most 4300 digits", a negative one ">= 0"."""
    try:
        return _int_at_least(0, 65535)(text)
    except argparse.ArgumentTypeError:
        if not _INTEGER.fullmatch(text):
            raise
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535 (0: any free port), "
                                         f"got {_quoted(text.strip(), False)}") from None


def resolve_device(name: str, where: str = "--device") -> str:
    """The device a command runs on: "auto" is the machine's (an accelerator where there is
    one, else the CPU); a named one must exist here, or BadInput names it and `where`."""
    import torch

    from optimized.kernels import default_device

    # A name is quoted by its first characters (_quoted): a 5000-character one was quoted in full.
    if name == "auto":
        return str(default_device())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BadInput(f"{where}: {_quoted(name)} is not a device (cpu, cuda, cuda:N, xpu or auto)") from None
    if device.type == "cpu":
        return "cpu"
    if device.type not in ("cuda", "xpu"):
        raise BadInput(f"{where}: {_quoted(name)}: the kernels run on cpu, cuda or xpu")
    module = getattr(torch, device.type, None)
    count = module.device_count() if module is not None and module.is_available() else 0
    if count == 0:
        raise BadInput(f"{where}: {_quoted(name)}: this machine has no {device.type} device "
                       f"(torch.{device.type}.is_available() is False); use --device cpu or auto")
    if device.index is not None and device.index >= count:
        raise BadInput(f"{where}: {_quoted(name)}: this machine has {count} {device.type} device(s)")
    return str(device)


REPORT_FILES = ("report.json", "report.html")


def _check_out_dir(path: str | Path, flag: str = "--out", files: tuple[str, ...] = REPORT_FILES) -> Path:
    """Refuse, before any work, an output directory that cannot be created or written: an existing
    file, a file among its parents, a read-only parent, or one of the `files` the command writes
    there that exists as something other than a file (a directory: replacing it fails after the
    run, with the other file already written). Leaves nothing behind (why_not_creatable's probe
    directory is removed)."""
    from reference.fileio import why_not_creatable

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path}: exists and is not a directory")
    for name in files:
        if (path / name).exists() and not (path / name).is_file():
            raise BadInput(f"{flag} {path}: {path / name} exists and is not a file")
    why = why_not_creatable(path)
    if why is not None:
        raise BadInput(f"{flag} {path}: {why}")
    return path


def _message(e: BaseException) -> str:
    """An error's one line. A checkpoint error that was re-raised with its file as prefix can
    carry that prefix twice ("d/config.json: d/config.json: no config.json"): said once."""
    text = " ".join(str(e).split())  # one line, whatever the message held
    head, sep, rest = text.partition(": ")
    while sep and rest.startswith(head + ": "):
        rest = rest[len(head) + 2:]
    return f"{head}{sep}{rest}"


def _refuse(e: BaseException, context: str = "") -> int:
    print(f"error: {context}{_message(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _version() -> str:
    try:
        return version("gemma4-testbed")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def _config(source: str):
    """A preset's or checkpoint directory's config. An unreadable config.json (a directory, no
    permission) raises CheckpointError like a missing one, not an OSError traceback."""
    from reference import PRESETS, CheckpointError, load_config

    if source in PRESETS:
        return PRESETS[source]
    if not Path(source).exists():
        raise CheckpointError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint "
                              "directory")
    try:
        return load_config(source)
    except OSError as e:  # a config.json that is a directory, no permission
        raise CheckpointError(f"{source}: cannot read config.json ({e})") from None


def cmd_info(args) -> int:
    import torch

    from optimized.memory import plan_kv_bytes
    from reference import CheckpointError, ConfigError
    from reference.weights import expected_shapes, parameter_bytes, parameter_count

    try:
        cfg = _config(args.model)
    except (CheckpointError, ConfigError) as e:
        return _refuse(e)
    if args.page_size > cfg.max_position_embeddings:  # a plan of one page bigger than any sequence
        return _refuse(BadInput(f"--page-size: {args.page_size} is past the model's max_position_embeddings "
                                f"{cfg.max_position_embeddings}"))
    too_long = [c for c in args.context if c > cfg.max_position_embeddings]
    if too_long:
        return _refuse(BadInput(f"--context: {too_long[0]} is past the model's max_position_embeddings "
                                f"{cfg.max_position_embeddings}"))
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


def _scenarios(args) -> list:
    """The scenarios a check or capture runs. Built-in and fault scenarios take the model from the
    command line; a scenario file keeps its own model fields except those given explicitly (MODEL,
    --dtype, --seed, a --device other than auto), which override it, said on stderr."""
    from .faults import FAULTS, get
    from .scenario import builtin, default_suite

    device = resolve_device(args.device)
    model = (args.model or "tiny", args.dtype or "float32", device, 0 if args.seed is None else args.seed)
    injected = getattr(args, "inject", [])
    if not args.scenario and injected:  # each injected fault's own scenario (and, without MODEL, preset), once
        faults = [get(n) for n in injected]
        return list({s.name: s for s in (f.scenario(args.model, *model[1:]) for f in faults)}.values())
    # No MODEL: the main job, every test architecture (scenario.default_suite).
    suite = default_suite(*model[1:]) if args.model is None else builtin(*model)
    if not args.scenario:
        return suite
    names = {s.name: s for s in [*suite, *builtin(*model), *(f.scenario(*model) for f in FAULTS.values())]}
    return [names[item] if item in names else _from_file(item, args) for item in args.scenario]


def _from_file(path: str, args):
    from .scenario import load

    scenario = load(path)
    explicit = [("source", args.model, "MODEL"), ("dtype", args.dtype, "--dtype"), ("seed", args.seed, "--seed")]
    if args.device != "auto":  # a scenario saved on one machine runs on the device asked for
        explicit.append(("device", resolve_device(args.device), "--device"))
    else:  # the file's own device, which must exist here
        resolve_device(scenario.model.device, f"scenario {path}: model.device")
    changes = {}
    for field, value, flag in explicit:
        if value is not None and value != getattr(scenario.model, field):
            print(f"scenario {path}: model.{field} {getattr(scenario.model, field)} -> {value} (from {flag})",
                  file=sys.stderr)
            changes[field] = value
    return scenario.with_model(**changes) if changes else scenario


def _check_before_work(scenarios, faults=()) -> None:
    """Everything about the scenarios' models that can be known without running them: the model
    resolves (config and checkpoint layout, on the meta device: nothing is loaded), the optimized
    path supports it, each scenario fits it, an injected MoE fault has experts to break. Raises the
    input error that names the field."""
    from optimized.kernels import check_supported
    from reference import CheckpointError, resolve

    from .faults import MOE_FAULTS
    from .scenario import ScenarioError, check_fits

    for sc in scenarios:
        try:
            cfg, _ = resolve(sc.model.source, dtype=sc.dtype, device="meta", seed=sc.model.seed)
        except OSError as e:  # a config.json that is a directory, a file without permission
            raise CheckpointError(f"{sc.model.source}: cannot read the checkpoint ({e})") from None
        check_supported(cfg)
        moe = [f.name for f in faults if f.name in MOE_FAULTS]
        if moe and not cfg.enable_moe_block:  # it would patch nothing and report "not caught"
            raise BadInput(f"--inject {', '.join(moe)}: breaks the MoE router, and {sc.model.source} has no "
                           f"experts (scenario {sc.name!r}); use a MoE model such as tiny-moe, or leave MODEL out")
        try:
            check_fits(sc, cfg)
            _check_memory(sc, cfg)
        except ScenarioError as e:
            raise ScenarioError(f"scenario {sc.name!r}: {e}") from None


def _check_ops(ops: str, scenarios, faults, kernels: bool) -> None:
    """Refuse an op set the run cannot use: faults break the kernels' path (some of them a kernel
    itself), and kernels on a CPU need Triton's interpreter (_need_kernels_on)."""
    if faults and ops != "kernels":
        raise BadInput("--inject: faults break the kernels' path; leave out --ops eager")
    for sc in scenarios:
        if ops == "kernels":
            _need_kernels_on(sc.model.device, f"scenario {sc.name!r} runs the kernels on", "--ops eager")
        if kernels:
            _need_kernels_on(sc.model.device, "--kernels runs the kernel testbed on", "no --kernels")


def _need_kernels_on(device, what: str, instead: str | None = None) -> None:
    """BadInput unless Triton kernels run on `device` here. With an accelerator present Triton
    compiles for it, and a kernel refuses CPU tensors mid-run (a traceback, not a message)."""
    import torch

    from optimized.kernels import kernels_refusal

    refusal = kernels_refusal(torch.device(device), what, (instead,) if instead else ())
    if refusal:
        raise BadInput(refusal)


def _check_memory(sc, cfg) -> None:
    """Refuse a scenario that cannot fit in this machine's memory at all, rather than fail minutes
    in. Lower bounds: the float64 truth forward holds one layer's dense [T, T] mask and its
    [Hq, T, T] attention scores at once (reference/model.py), on the scenario's device; the
    optimized path's pools hold engine.num_pages pages of K and V rows for every layer that
    stores its own K/V."""
    import os

    import torch

    from .scenario import ScenarioError

    device = torch.device(sc.model.device)
    if device.type == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf: no check
            return
    else:
        total = torch.get_device_module(device).get_device_properties(device).total_memory
    e = sc.engine
    if e.num_pages is not None:
        row = sum(2 * s.num_kv_heads * s.head_dim for s in cfg.layers if not s.kv_shared)
        need = e.num_pages * e.page_size * row * (4 if sc.model.dtype == "float32" else 2)  # an exact int, any size
        if need > total:
            raise ScenarioError(f"engine.num_pages: {e.num_pages} pages of {e.page_size} slots need at least "
                                f"{need >> 30} GiB for the K/V pools; this machine's {device.type} memory is "
                                f"{total >> 30} GiB")
    if e.max_requests is not None:  # the engine's request table: a row of max_context int32 per request
        longest = max((len(r.tokens) if r.tokens is not None else r.length) + r.new_tokens
                      + (r.prefix_from["length"] if r.prefix_from else 0) for r in sc.requests)
        need = e.max_requests * (4 * longest + 36)  # and a free-row list: a pointer and an int each
        if need > total:
            raise ScenarioError(f"engine.max_requests: {e.max_requests} request rows of {longest} positions need at "
                                f"least {need >> 30} GiB; this machine's {device.type} memory is {total >> 30} GiB")
    for i, r in enumerate(sc.requests):
        positions = (len(r.tokens) if r.tokens is not None else r.length) + r.new_tokens
        if r.prefix_from:
            positions += r.prefix_from["length"]
        need = (1 + cfg.num_attention_heads) * 8 * positions**2
        if need > total:
            raise ScenarioError(f"requests[{i}].length: {positions} positions need at least {need / 2**30:.0f} GiB "
                                f"for the float64 truth's attention ([T, T] mask and {cfg.num_attention_heads} heads "
                                f"of scores); this machine's {device.type} memory is {total / 2**30:.0f} GiB")


def _ran(scenarios) -> tuple[str, str]:
    """(models, dtypes) the scenarios ran on, for the report's title and default directory."""
    models = list(dict.fromkeys(Path(s.model.source).name for s in scenarios))
    dtypes = list(dict.fromkeys(s.model.dtype for s in scenarios))
    return "+".join(models), "+".join(dtypes)


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

    from reference import CheckpointError, ConfigError

    from .faults import FaultScenarioError, UnknownFault, get
    from .report import write_report
    from .run import report_facts, run_scenario
    from .scenario import ScenarioError

    try:  # every input is checked here, before any work: a mistake costs no minutes
        faults = [get(n) for n in args.inject]
        scenarios = _scenarios(args)
        _check_before_work(scenarios, faults)
        tp = _tensor_parallel(args.tp, scenarios)
        _check_ops(args.ops, scenarios, faults, args.kernels)
        models, dtypes = _ran(scenarios)
        inject = f"-inject-{'+'.join(f.name for f in faults)}" if faults else ""  # never over the clean report
        out = _check_out_dir(args.out or Path("reports") / f"check-{models}-{dtypes}{inject}")
    except (ScenarioError, CheckpointError, ConfigError, UnknownFault, BadInput) as e:
        return _refuse(e) if _launched_rank() == 0 else EXIT_BAD_INPUT  # one message, from rank 0
    if tp is not None and tp.rank > 0:
        return _follow(scenarios, args.inject, tp, args.ops)
    for f in faults:
        print(f"injected fault {f.name}: {f.summary} (alone, on {f.model}, its scenario {f.scenario_spec['name']} "
              f"must diverge first at {f.expect})")
    runs = []
    jobs = _jobs(args.jobs, scenarios, tp)
    if jobs > 1:
        print(f"running {len(scenarios)} scenarios {jobs} at a time, each in its own process", file=sys.stderr)
    results = _run_in_processes(scenarios, args.inject, jobs, args.ops) if jobs > 1 else None
    for i, sc in enumerate(scenarios, 1):
        if results is None:
            _progress(i, len(scenarios), sc.name, "running")
        t0 = time.perf_counter()
        try:
            run, seconds = (next(results) if results is not None
                            else (run_scenario(sc, faults=args.inject, tp=tp, ops=args.ops), None))
        # Input errors only: a ValueError from inside a kernel is a bug, and its traceback says where.
        except (ScenarioError, CheckpointError, ConfigError, FaultScenarioError) as e:
            return _refuse(e, f"scenario {sc.name!r}: ")
        runs.append(run)
        _progress(i, len(scenarios), sc.name, "parity" if run.passed else "DIVERGENCE",
                  time.perf_counter() - t0 if seconds is None else seconds)
    title = f"Gemma 4 parity: {models} ({dtypes})"
    if tp is not None:
        title += f", tensor parallel {tp.world}"
    if faults:
        title += f", injected: {', '.join(f.name for f in faults)}"
    if args.ops != "kernels":
        title += f", {args.ops} ops (no Triton)"
    # The kernel testbed on the device and in the dtype the scenarios ran in.
    kernels = _kernel_rows(scenarios[0].model.device, scenarios[0].model.dtype) if args.kernels else None
    facts = report_facts(runs, _command_line(args.argv), title, kernels=kernels)
    html, _ = write_report(facts, out)
    print(facts["summary"])
    for run in runs:
        if not run.passed:
            print(run.comparison.summary())
            break
    if len(faults) == 1:  # with several, the first divergence is the earliest of their taps
        _say_whether_the_fault_was_named(faults[0], runs)
    print(f"report: {html}")
    kernels_ok = kernels is None or all(k["passed"] for k in kernels)
    code = EXIT_OK if all(r.passed for r in runs) and kernels_ok else EXIT_DIVERGED
    return code if tp is None else _leave(tp, code)


# Scenarios at once on a CPU: Triton's interpreter runs each kernel in one Python thread, so two
# processes on CI's two cores took the main job (12 scenarios) from 97 s to 60 s. One on an accelerator: the
# scenarios would share one device, and each process would pay its own start-up there.
CPU_JOBS = 2


def _jobs(asked: int | None, scenarios, tp) -> int:
    if tp is not None or len(scenarios) < 2:
        return 1
    if asked is not None:
        return min(asked, len(scenarios))
    import os

    on_cpu = all(sc.model.device == "cpu" for sc in scenarios)
    return min(CPU_JOBS, os.cpu_count() or 1, len(scenarios)) if on_cpu else 1


def _timed_run(scenario, faults, ops):
    """run_scenario in a worker process, with its own wall time."""
    import time

    from .run import run_scenario

    t0 = time.perf_counter()
    run = run_scenario(scenario, faults=faults, ops=ops)
    return run, time.perf_counter() - t0


def _worker_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _run_in_processes(scenarios, faults, jobs: int, ops: str):
    """(run, seconds) of each scenario, in order, computed `jobs` at a time in spawned processes
    (fresh interpreters: no forked torch thread pools). A worker's exception is raised here when
    its scenario's turn comes, as the sequential loop would raise it."""
    import multiprocessing
    import os
    import signal
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_threads, initargs=(threads,)) as pool:
        # The workers start in these submits, and keep an ignored SIGINT through their exec: a
        # terminal's Ctrl-C reaches the whole process group, and a worker's own KeyboardInterrupt
        # printed a traceback from wherever it was (importing torch, waiting for work). The
        # parent acts on it for all.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            futures = [pool.submit(_timed_run, sc, list(faults), ops) for sc in scenarios]
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            for f in futures:
                yield f.result()
        except KeyboardInterrupt:
            # Leaving the `with` would wait for the running scenarios (minutes): stop them now,
            # through the pool's own process map (Python 3.14 has pool.terminate_workers()). The
            # pool then fails the pending futures itself; cancelling them while it does raised
            # InvalidStateError in its thread (a traceback), so none is cancelled before it is done.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=True)
            raise
        finally:
            for f in futures:
                f.cancel()


def _launched_rank() -> int:
    from optimized.parallel import launched_rank

    return launched_rank()


def _tensor_parallel(size: int | None, scenarios):
    """`check --tp N`: every scenario's model must split across N ranks, on one device; then
    `_join_tensor_parallel`. None without --tp."""
    if size is None:
        return None
    from reference import resolve

    devices = {sc.model.device for sc in scenarios}
    if len(devices) > 1:
        raise BadInput(f"--tp {size}: every scenario must run on one device, got {', '.join(sorted(devices))}")
    models = [(sc.model.source, resolve(sc.model.source, dtype=sc.dtype, device="meta", seed=sc.model.seed)[0])
              for sc in scenarios]
    return _join_tensor_parallel(size, models, devices.pop(), "check")


def _join_tensor_parallel(size: int, models, device: str, command: str):
    """`check|serve --tp N`: each (name, config) in `models` must split across N ranks and N
    processes must have been launched (torchrun; N = 1 needs none); then this process joins the
    group (gloo on a CPU, NCCL on CUDA)."""
    from optimized.parallel import TensorParallelError, check_shardable, launched_world, setup
    from reference import ConfigError

    for name, cfg in models:
        try:
            check_shardable(cfg, size)
        except ConfigError as e:
            raise ConfigError(f"--tp {size}: {name}: {e}") from None
    world = launched_world()
    if world is None and size > 1:
        raise BadInput(f"--tp {size}: needs {size} processes; launch it as "
                       f"`torchrun --nproc-per-node {size} -m oracle.cli {command} --tp {size} ...`")
    if world is not None and world != size:
        raise BadInput(f"--tp {size}: torchrun started {world} processes (--nproc-per-node must equal --tp)")
    try:
        return setup(size, device)
    except TensorParallelError as e:
        raise BadInput(f"--tp {size}: {e}") from None


def _follow(scenarios, faults, tp, ops) -> int:
    """A rank other than 0 under `check --tp`: run its shard of every scenario beside rank 0, print
    nothing, and exit as rank 0 does."""
    from .run import run_scenario

    for sc in scenarios:
        run_scenario(sc, faults=faults, tp=tp, ops=ops)
    return _leave(tp, None)


def _leave(tp, code: int | None) -> int:
    """Every rank leaves with rank 0's exit code, once all are done (a rank that exits while another
    still talks to it makes gloo abort that one)."""
    import torch.distributed as dist

    code = tp.broadcast_object(code)
    dist.barrier()
    dist.destroy_process_group()
    return code


def _kernel_rows(device: str, dtype: str) -> list[dict]:
    """The kernel testbed on the check's device and dtype, as rows of the report's kernels table."""
    import torch

    from .kernel_check import run_kernel_check

    device = torch.device(device)
    results = run_kernel_check(device, (getattr(torch, dtype),), "small" if device.type == "cpu" else "e2b",
                               repeats=3, progress=lambda what: print(f"kernel {what}", file=sys.stderr))
    if not all(r.passed for r in results):
        print("kernel testbed: " + ", ".join(r.name for r in results if not r.passed) + " FAILED")
    return [{"name": r.name, "shape": r.shape, "dtype": r.dtype, "max_ulp": r.scale_ulp, "max_rel": r.rel,
             "passed": r.passed, "time_us": r.time_us, "eager_us": r.eager_us, "unfused_us": r.unfused_us}
            for r in results]


def _say_whether_the_fault_was_named(fault, runs) -> None:
    """After `check --inject`: whether the oracle named the fault's expected tap on its scenario."""
    own = [r for r in runs if r.scenario.name == fault.scenario_spec["name"]]
    if not own or own[0].scenario.model.source != fault.model:  # the expected taps are that preset's
        return
    first = own[0].comparison.first_divergence
    found = "parity (not caught)" if first is None else first.tap
    verdict = "as expected" if found == fault.expect else f"EXPECTED {fault.expect}"
    print(f"fault {fault.name}: first divergence {found} on {own[0].scenario.name} ({verdict})")


def cmd_faults(args) -> int:
    from .faults import FAULTS, MOE_FAULTS, UnknownFault, get

    try:
        chosen = [get(n) for n in args.names] if args.names else [*FAULTS.values(), *MOE_FAULTS.values()]
    except UnknownFault as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    width = max(len(f.name) for f in chosen)
    for f in chosen:
        if args.names:
            print(f"{f.name}: {f.summary}\n  {f.description}\n  scenario {f.scenario_spec['name']}, "
                  f"first divergence on {f.model}: {f.expect}")
        else:  # a fault for another preset than `check`'s default says which (MOE_FAULTS: tiny-moe)
            print(f"{f.name:{width}s}  {f.summary}{'' if f.model == 'tiny' else f' (check {f.model})'}")
    return EXIT_OK


def cmd_capture(args) -> int:
    import time

    from reference import CheckpointError, ConfigError

    from .capture import CaptureError, check_capture_target, save_capture
    from .run import run_scenario
    from .scenario import ScenarioError

    try:  # before any work: the scenario, its model, and where the capture goes
        if len(args.scenario) != 1:
            raise BadInput("--scenario: capture takes exactly one (a file or a built-in name; "
                           "`gemma4-testbed scenarios` lists those)")
        (scenario,) = _scenarios(args)
        _check_before_work([scenario])
        _check_ops(args.ops, [scenario], (), False)
        check_capture_target(args.out, args.overwrite, how="pass --overwrite")
    except (ScenarioError, CheckpointError, ConfigError, CaptureError, BadInput) as e:
        return _refuse(e)
    t0 = time.perf_counter()
    _say(f"capture: running {scenario.name} (truth, reference and optimized paths: the {args.path} one is kept)")
    try:
        run = run_scenario(scenario, ops=args.ops)
    except (ScenarioError, CheckpointError, ConfigError) as e:  # input errors only, as in check
        return _refuse(e, f"scenario {scenario.name!r}: ")
    capture = {"truth": run.truth, "reference": run.ref, "optimized": run.cand}[args.path]
    _say(f"capture: ran in {time.perf_counter() - t0:.1f}s; writing {args.out}")
    try:
        where = save_capture(capture, args.out, overwrite=args.overwrite)
    except CaptureError as e:  # the target appeared while we worked
        return _refuse(e)
    print(f"capture ({args.path}, {scenario.name}): {where}")
    return EXIT_OK


def _say(line: str) -> None:
    """A progress line: stderr, so stdout stays the result."""
    print(line, file=sys.stderr, flush=True)


def cmd_diff(args) -> int:
    from reference import ConfigError, Gemma4Config

    from .capture import CaptureError, load_capture
    from .compare import CompareError, compare
    from .report import write_report

    try:
        out = _check_out_dir(args.out) if args.out else None
        loaded, paths = {}, {}
        for role, path in (("baseline", args.baseline), ("candidate", args.candidate), ("truth", args.truth)):
            if path:
                _say(f"diff: loading the {role} capture {path}")
                loaded[role], paths[role] = load_capture(path), path
        base, cand = loaded["baseline"], loaded["candidate"]
        raw_config = cand.metadata.get("model_config")
        if not isinstance(raw_config, dict):
            raise CaptureError(f"{args.candidate}: metadata.model_config: missing, so there is no model to judge by")
        config = Gemma4Config.from_hf_dict(raw_config)
        _check_diff_inputs(loaded, paths)
        ops = _op_sets(loaded, paths)
        _say(f"diff: comparing {len(cand.requests)} request(s)"
             + (f"; optimized op sets: {', '.join(f'{role} {o}' for role, o in ops.items())}" if ops else ""))
        comparison = compare(loaded.get("truth", base), base, cand, config)
        facts = _diff_facts(args, cand, comparison, ops) if out else None  # before any verdict is printed
    except (CaptureError, CompareError, ConfigError, BadInput) as e:
        return _refuse(e)
    print(comparison.summary())
    if out:
        html, _ = write_report(facts, out)
        print(f"report: {html}")
    return EXIT_OK if comparison.passed else EXIT_DIVERGED


def _check_diff_inputs(loaded: dict, paths: dict) -> None:
    """Captures `diff` cannot judge, named by their path: one (the truth, else the baseline) with
    no request, which would judge nothing and say PARITY; a baseline or truth of another model
    than the candidate's (compare's own check names its roles, not the paths given)."""
    from .capture import CaptureError
    from .compare import config_difference

    truth = "truth" if "truth" in loaded else "baseline"
    if not loaded[truth].requests:
        raise CaptureError(f"{paths[truth]}: the {truth} capture holds no request, so there is nothing to judge")
    _check_same_prompts(loaded, paths)
    want = loaded["candidate"].metadata.get("model_config")
    for role in ("baseline", "truth"):
        got = loaded[role].metadata.get("model_config") if role in loaded else None
        if isinstance(got, dict) and (differ := config_difference(got, want)):
            raise CaptureError(f"{paths[role]}: the {role} capture is of another model than the candidate "
                               f"{paths['candidate']} (metadata.model_config: {differ})")


def _op_sets(loaded: dict, paths: dict) -> dict[str, str]:
    """{role: op set} of the captures that record one (metadata.ops, optimized captures since
    session 13); CaptureError for a value that names no op set."""
    from .capture import CaptureError

    ops = {role: c.metadata["ops"] for role, c in loaded.items() if "ops" in c.metadata}
    for role, name in ops.items():
        if name not in OPS:
            raise CaptureError(f"{paths[role]}: metadata.ops: {name!r} is not an op set ({', '.join(OPS)})")
    return ops


def _check_same_prompts(loaded: dict, paths: dict) -> None:
    """Captures of other prompts or other random weights than the candidate's (another scenario,
    a request's seed or length changed) differ everywhere: that is no divergence to report, so
    where both captures' metadata.scenario say what ran, those must agree (a preset's
    model.seed, and per request id in both its prompt: tokens, length, seed, prefix_from)."""
    from .capture import CaptureError

    def spec(capture) -> tuple:
        sc = capture.metadata.get("scenario")
        if not isinstance(sc, dict):
            return None, {}
        model = sc.get("model") if isinstance(sc.get("model"), dict) else {}
        requests = sc.get("requests") if isinstance(sc.get("requests"), list) else []
        prompts = {r.get("id"): {k: r.get(k) for k in ("tokens", "length", "seed", "prefix_from")}
                   for r in requests if isinstance(r, dict) and isinstance(r.get("id"), str)}
        return model.get("seed"), prompts

    seed, prompts = spec(loaded["candidate"])
    for role in ("baseline", "truth"):
        if role not in loaded:
            continue
        other_seed, other = spec(loaded[role])
        if seed is not None and other_seed is not None and seed != other_seed:
            raise CaptureError(f"{paths[role]}: the {role} capture ran model.seed {other_seed!r}, the candidate "
                               f"{paths['candidate']} {seed!r} (other weights: metadata.scenario.model.seed)")
        for rid in other.keys() & prompts.keys():
            fields = [k for k in other[rid] if other[rid][k] != prompts[rid][k]]
            if fields:
                shown = ", ".join(f"{k} {other[rid][k]!r} vs {prompts[rid][k]!r}" for k in fields)
                raise CaptureError(f"{paths[role]}: request {rid!r} of the {role} capture has another prompt than "
                                   f"in the candidate {paths['candidate']} (metadata.scenario.requests: {shown})")


def _diff_facts(args, cand, comparison, ops: dict[str, str]):
    """The report's facts for `diff --out`; BadInput where the candidate's metadata does not fit.
    `ops`: the op sets the captures recorded; those other than the kernels are named in the title."""
    from .facts import Comparison as FactsComparison
    from .facts import Environment, Facts, FactsError, ScenarioFacts

    scenario = cand.metadata.get("scenario") or {}
    if not isinstance(scenario, dict):
        raise BadInput(f"{args.candidate}: metadata.scenario: expected an object, got {type(scenario).__name__}")
    try:
        return Facts(
            title=f"diff {args.baseline} {args.candidate}"
                  + "".join(f", {role} on {o} ops (no Triton)" for role, o in ops.items() if o != "kernels"),
            verdict="parity" if comparison.passed else "divergence",
            summary=comparison.summary().splitlines()[0],
            scenarios=[ScenarioFacts(name=str(scenario.get("name", "capture")), passed=comparison.passed,
                                     scenario=scenario, layout=None,
                                     comparison=FactsComparison.load(comparison.to_dict(),
                                                                     "facts.scenarios[0].comparison"))],
            environment=Environment.load({"versions": cand.metadata.get("versions", {}),
                                          "device": cand.metadata.get("device"),
                                          "dtype": cand.metadata.get("dtype"), "git": cand.metadata.get("git"),
                                          "host": ""}, "facts.environment"),
            command=_command_line(args.argv),
        )
    except FactsError as e:
        raise BadInput(f"{args.candidate}: metadata does not fit the report: {e}") from None


def cmd_report(args) -> int:
    from reference.fileio import parse_json

    from .report import ReportError, write_report

    src = Path(args.directory) / "report.json"
    try:
        out = _check_out_dir(args.out or args.directory, "--out" if args.out else "DIRECTORY")
        facts = parse_json(src.read_text())
        html, _ = write_report(facts, out)
    except BadInput as e:
        return _refuse(e)
    except FileNotFoundError:
        return _refuse(BadInput(f"{src}: no report.json to render"))
    except (OSError, UnicodeDecodeError) as e:
        return _refuse(BadInput(f"{src}: cannot read ({e})"))
    # Whatever report.json holds is input here: a hand-edited one must not end in a traceback.
    except ReportError as e:  # the facts do not fit the schema (oracle/facts.py): the field's path
        return _refuse(BadInput(f"{src}: cannot render ({e})"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # ValueError: parse_json's too
        return _refuse(BadInput(f"{src}: cannot render ({e})"))
    print(f"report: {html}")
    return EXIT_OK if facts.get("verdict") == "parity" else EXIT_DIVERGED


def cmd_kernels(args) -> int:
    import json

    import torch

    from .kernel_check import format_table, run_kernel_check

    try:
        device = torch.device(resolve_device(args.device))
        _need_kernels_on(device, "kernels: the testbed runs the kernels on")
        out = _check_out_dir(args.out, files=("kernels.json",))
    except BadInput as e:
        return _refuse(e)
    size = args.size or ("small" if device.type == "cpu" else "e2b")
    dtypes = [getattr(torch, d) for d in args.dtype]
    n = [0]

    def progress(what: str) -> None:
        n[0] += 1
        print(f"[{n[0]}] {what}", file=sys.stderr, flush=True)

    results = run_kernel_check(device, dtypes, size, args.repeats, progress=progress)
    print(f"device {device}, sizes '{size}', median of {args.repeats}")
    print(format_table(results))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernels.json"
    path.write_text(json.dumps({"device": str(device), "size": size, "results": [r.to_dict() for r in results]},
                               indent=1))
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    print(f"json: {path}")
    return EXIT_DIVERGED if failed else EXIT_OK


def _token_budget(text: str):
    """--token-budget: a positive integer, "auto" (the serving default) or "none" (no limit)."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        if _INTEGER.fullmatch(text) and not text.strip().startswith("-"):  # more digits than int() reads
            raise argparse.ArgumentTypeError(f"must be an integer of at most {sys.get_int_max_str_digits()} "
                                             f"digits, auto or none, got {_quoted(text.strip(), False)}") from None
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, auto or none, got {_quoted(text)}")
    return value


def cmd_serve(args) -> int:
    """Serve until SIGINT/SIGTERM. Scheduling policy: unless --token-budget says otherwise, a step
    runs at most chunk-size + max-requests tokens (optimized.serve.http.default_token_budget):
    every running request's decode token first, then prompt chunks first come first served, so
    under a burst prefill and decode interleave and time to first token stays bounded."""
    import importlib.util

    # The server's packages are an optional extra: the oracle and the engine run without them.
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return _refuse(BadInput(f"serve needs {' and '.join(missing)}: pip install -e '.[serve]'"))
    from optimized.kernels import check_supported
    from optimized.model import OP_SETS
    from optimized.serve import build_engine, build_server, run_until_interrupted
    from reference import CheckpointError, ConfigError

    tp = None
    try:
        device = resolve_device(args.device)
        try:
            config = _config(args.model)
        except (CheckpointError, ConfigError):
            config = None  # build_server names what is wrong, in its order (tokenizer first)
        if config is not None:  # a model the reference runs but the paged path cannot
            check_supported(config)
        if args.tp is not None:
            if config is None:
                config = _config(args.model)  # raises, naming what is wrong
            tp = _join_tensor_parallel(args.tp, [(args.model, config)], device, "serve")
        options = dict(dtype=args.dtype, device=device, page_size=args.page_size, chunk_size=args.chunk_size,
                       num_pages=args.num_pages, max_requests=args.max_requests, token_budget=args.token_budget,
                       max_context=args.max_context, seed=args.seed, tp=tp, **OP_SETS[args.ops])
        if tp is not None and tp.rank > 0:
            return _serve_follower(build_engine(args.model, **options), tp)
        server = build_server(args.model, host=args.host, port=args.port, request_timeout=args.request_timeout,
                              **options)
    except (BadInput, CheckpointError, ConfigError) as e:
        return _refuse(e) if _launched_rank() == 0 else EXIT_BAD_INPUT  # one message, from rank 0
    # Building a server only reads the model and sizes the engine (no kernel runs yet), so its
    # ValueErrors are bad settings or files: TokenizerError, ChatError, engine limits.
    except ValueError as e:
        return _refuse(e)
    except OSError as e:  # the address is taken, not ours to bind, or not an address
        return _refuse(BadInput(f"--host/--port: cannot listen on {args.host}:{args.port}: {e}"))
    run_until_interrupted(server)  # its engine thread, ending, tells the other ranks to stop
    return EXIT_OK if tp is None else _leave(tp, EXIT_OK)


def _serve_follower(engine, tp) -> int:
    """A rank other than 0 under `serve --tp`: step in lockstep with rank 0's server until it
    shuts down. SIGINT/SIGTERM are left to rank 0 (torchrun sends them to every rank), whose
    graceful shutdown ends this loop."""
    import signal

    from optimized.serve.replicated import follow

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    follow(engine, tp)
    return _leave(tp, None)


def cmd_scenarios(args) -> int:
    """The built-in scenarios (what `check` runs by default) and the faults' own, one line each."""
    from .faults import FAULTS
    from .scenario import default_suite

    listed = default_suite()
    width = max(len(s.name) for s in [*listed, *(f.scenario() for f in FAULTS.values())])
    print("built-in (check with no MODEL runs these; with a MODEL, the tiny ones on it; --scenario NAME picks one):")
    for sc in listed:
        print(f"  {sc.name:{width}s}  {_describe(sc)}")
    print("fault scenarios (check --inject FAULT runs its own; also usable with --scenario NAME):")
    for sc in {f.scenario().name: f.scenario() for f in FAULTS.values()}.values():
        print(f"  {sc.name:{width}s}  {_describe(sc)}")
    return EXIT_OK


def _describe(sc) -> str:
    """A scenario in one line, from its fields (so the listing cannot drift from what runs)."""
    reqs = sc.requests
    prompts = "+".join(str(len(r.tokens) if r.tokens is not None else r.length) for r in reqs)
    new = "+".join(str(r.new_tokens) for r in reqs)
    e = sc.engine
    parts = [f"{len(reqs)} request{'s' if len(reqs) != 1 else ''} ({prompts} prompt + {new} new tokens)",
             f"pages of {e.page_size}", f"chunks of {e.chunk_size}"]
    if e.page_order_seed is not None:
        parts.append("shuffled pages")
    if any(r.chunks for r in reqs):
        parts.append("explicit chunk splits")
    if any(r.arrival for r in reqs):
        parts.append("staggered arrivals")
    if any(r.prefix_from for r in reqs):
        parts.append("prefix reuse")
    if e.num_pages is not None:
        parts.append(f"{e.num_pages}-page pool")
    if e.token_budget is not None or e.max_requests is not None:
        parts.append(f"scheduler decides (budget {e.token_budget}, {e.max_requests} running)")
    if e.decode != "auto":
        parts.append(f"decode: {e.decode}")
    return ", ".join(parts)


def _add_model_args(p, scenarios: bool = True) -> None:
    # With scenarios, no defaults: a scenario file keeps its own model fields unless a flag is
    # given explicitly (None = not given); _scenarios fills in tiny / float32 / seed 0.
    override = " (overrides a scenario file's model.{})" if scenarios else ""
    p.add_argument("model", type=_model, nargs="?", default=None if scenarios else "tiny",
                   help="preset name (`tiny`, `tiny-moe`, `e2b`, ...) or checkpoint directory (default: "
                        + ("the main job: the three test architectures tiny, tiny-kv-eq-v, tiny-moe; a fault's "
                           "own scenario on tiny)" if scenarios else "tiny)") + override.format("source"))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None if scenarios else "float32",
                   help="dtype of the weights and activations (default: float32)" + override.format("dtype"))
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, xpu, or auto: the machine's accelerator where it has one (default)"
                        + ("; anything but auto overrides a scenario file's model.device" if scenarios else ""))
    p.add_argument("--seed", type=_int_at_least(0), default=None if scenarios else 0,
                   help="seed of a preset's random weights (default: 0)" + override.format("seed"))
    if scenarios:
        p.add_argument("--scenario", type=_scenario_arg, action="append", default=[], metavar="FILE_OR_NAME",
                       help="a scenario JSON file or a built-in scenario name (`gemma4-testbed scenarios` lists "
                            "them; repeatable; default: the built-in set)")


def build_parser() -> argparse.ArgumentParser:
    positive = _int_at_least(1)
    parser = _Parser(prog="gemma4-testbed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print a preset's or checkpoint's config and memory plan")
    info.add_argument("model", type=_model, nargs="?", default="tiny",
                      help="preset name or checkpoint directory (default: tiny)")
    info.add_argument("--page-size", type=positive, default=16,
                      help="KV page size in tokens for the memory plan (default: 16)")
    info.add_argument("--context", type=positive, nargs="+", default=[4096, 32768, 131072], metavar="TOKENS",
                      help="sequence lengths to plan KV memory for, each at most the model's "
                           "max_position_embeddings (default: 4096 32768 131072)")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="run scenarios on both paths, judge parity, write the HTML report")
    _add_model_args(check)
    check.add_argument("--out", type=_path, metavar="DIR",
                       help="report directory (default: reports/check-<model>-<dtype>, with -inject-<fault> when "
                            "--inject is given)")
    check.add_argument("--kernels", action="store_true",
                       help="also run the kernel testbed (see `kernels`) and put its table in the report")
    check.add_argument("--inject", action="append", default=[], metavar="FAULT",
                       help="inject a known bug into the optimized path (repeatable; see `faults`); without "
                            "--scenario, runs each fault's own scenario")
    check.add_argument("--jobs", type=positive, default=None, metavar="N",
                       help="scenarios run at once, each in its own process (default: 2 on a CPU, where "
                            "Triton's interpreter keeps each process on one core; 1 on an accelerator or with --tp)")
    check.add_argument("--tp", type=positive, default=None, metavar="N",
                       help="run the optimized path tensor-parallel over N ranks, launched as `torchrun "
                            "--nproc-per-node N -m oracle.cli check --tp N ...` (gloo on a CPU, NCCL on CUDA); "
                            "rank 0 runs the reference, judges and writes the report, the others print nothing")
    check.add_argument("--ops", choices=OPS, default="kernels",
                       help=OPS_HELP.format(what="parity under eager where kernels diverge puts the bug in a kernel; "
                                                 "also runs on the CPU of a machine whose Triton compiles for a GPU"))
    check.set_defaults(func=cmd_check)

    scenarios = sub.add_parser("scenarios", help="list the built-in scenarios, one line each")
    scenarios.set_defaults(func=cmd_scenarios)

    faults = sub.add_parser("faults", help="list the known bug classes `check --inject` can inject")
    faults.add_argument("names", nargs="*", metavar="FAULT", help="show these in full")
    faults.set_defaults(func=cmd_faults)

    capture = sub.add_parser("capture", help="capture one path's taps for a scenario into a directory")
    _add_model_args(capture)
    capture.add_argument("--path", required=True, choices=["truth", "reference", "optimized"],
                         help="which path's taps to keep: truth (the reference in float64), reference (the "
                              "reference in the compared dtype) or optimized (the paged path)")
    capture.add_argument("--out", type=_path, required=True, metavar="DIR", help="capture directory to create")
    capture.add_argument("--overwrite", action="store_true",
                         help="replace DIR if it holds a capture (never a directory that is not one)")
    capture.add_argument("--ops", choices=OPS, default="kernels",
                         help=OPS_HELP.format(what="an optimized capture records it (metadata.ops) and `diff` "
                                                   "names it"))
    capture.set_defaults(func=cmd_capture)

    diff = sub.add_parser("diff", help="judge a candidate capture against a baseline capture")
    diff.add_argument("baseline", type=_path, help="capture directory taken as correct (e.g. --path reference)")
    diff.add_argument("candidate", type=_path, help="capture directory to judge (e.g. --path optimized)")
    diff.add_argument("--truth", type=_path, metavar="DIR",
                      help="a float64 truth capture; without it the baseline is the truth and budgets are the "
                           "per-dtype floors alone")
    diff.add_argument("--out", type=_path, metavar="DIR", help="write an HTML report into this directory")
    diff.set_defaults(func=cmd_diff)

    kernels = sub.add_parser("kernels", help="every Triton kernel against its eager twin on this device")
    kernels.add_argument("--device", default="auto",
                         help="cpu, cuda, cuda:N, xpu, or auto: the machine's accelerator where it has one (default)")
    kernels.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                         choices=["float32", "bfloat16", "float16"], help="dtypes to test (default: float32 bfloat16)")
    kernels.add_argument("--size", choices=["small", "e2b", "e4b", "31b", "26b-a4b"],
                         help="input sizes: small, or a preset's shapes at 2048 tokens (default: small on CPU, e2b on GPU)")
    kernels.add_argument("--repeats", type=_int_at_least(1, MAX_REPEATS), default=5,
                         help=f"timed runs per kernel, at most {MAX_REPEATS}; the table shows the median (default: 5)")
    kernels.add_argument("--out", type=_path, default="reports/kernels", metavar="DIR",
                         help="directory to write DIR/kernels.json into (default: reports/kernels)")
    kernels.set_defaults(func=cmd_kernels)

    serve = sub.add_parser("serve", help="serve the optimized path over HTTP (/generate, OpenAI-compatible "
                                         "/v1/completions and /v1/chat/completions) until Ctrl-C; a checkpoint "
                                         "directory's tokenizer.json and chat template are used where present")
    _add_model_args(serve, scenarios=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port, 0..65535; 0: any free port (default: 8000)")
    serve.add_argument("--page-size", type=positive, default=16, help="KV page size in tokens (default: 16)")
    serve.add_argument("--chunk-size", type=positive, default=512,
                       help="most prompt tokens per request per step (default: 512)")
    serve.add_argument("--num-pages", type=_int_at_least(2),
                       help="KV pool size in pages (default: max-requests full contexts)")
    serve.add_argument("--max-requests", type=positive, default=16, help="most requests running at once (default: 16)")
    serve.add_argument("--max-context", type=positive,
                       help="most positions per request (default: the model's, <= 4096)")
    serve.add_argument("--request-timeout", type=_seconds, default=600.0, metavar="S",
                       help="seconds a request may run, from arrival to its last token; past it the request is "
                            "aborted and answered 504 (streaming: an error event, then [DONE]) (default: 600; "
                            "0: no limit)")
    serve.add_argument("--tp", type=positive, default=None, metavar="N",
                       help="serve the model tensor-parallel over N ranks, launched as `torchrun --nproc-per-node N "
                            "-m oracle.cli serve --tp N ...`: rank 0 serves HTTP, every rank steps in lockstep")
    serve.add_argument("--token-budget", type=_token_budget, default="auto", metavar="N|auto|none",
                       help="most tokens one step runs. auto (default): chunk-size + max-requests, so a step "
                            "takes every running request's next token and at most one chunk of waiting prompts "
                            "(first come first served): under a burst, prefill and decode interleave and the "
                            "first token does not wait for every prompt; none: no limit (a burst is prefilled in "
                            "one step)")
    serve.add_argument("--ops", choices=OPS, default="kernels",
                       help=OPS_HELP.format(what="for asking whether a wrong answer goes with the kernels, or to "
                                                 "serve on the CPU of a machine whose Triton compiles for a GPU"))
    serve.set_defaults(func=cmd_serve)

    report = sub.add_parser("report", help="re-render report.html from a report directory's report.json")
    report.add_argument("directory", type=_path, help="a report directory (holding report.json)")
    report.add_argument("--out", type=_path, metavar="DIR", help="write into another directory")
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
    try:
        return args.func(args)
    except BadInput as e:  # raised by a helper outside a command's own input checks
        return _refuse(e)
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; 128 + SIGINT, as a shell reports it
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
