"""No traceback reaches a user: malformed input to the CLI and the HTTP server is refused with one
line that names the field, exit code 2 (or a 4xx answer), nothing half-written on disk, and a
server that keeps answering.

Every input here fails before any model work (the CLI checks up front), so the whole file stays
fast: most CLI calls run in-process through `oracle.cli.main`, a few as real subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter (import order matters there), from the repo root."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the fresh process decides it, as a user's would
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- import order ----------------------------------------------------------------------------


def test_transformers_imported_before_optimized_still_runs_kernels():
    # transformers' model classes import triton; on a machine without a GPU, optimized.kernels then
    # has to turn triton's already-defined library over to the interpreter (docs/design_notes.md).
    pytest.importorskip("triton")
    first = "from transformers import PreTrainedModel" if _installed("transformers") else "import triton"
    proc = run_python(f"""
        {first}  # imports triton before optimized does
        import sys
        import torch
        import optimized
        from optimized.kernels import default_device
        from optimized.kernels.norms import rms_norm, rms_norm_eager

        assert "triton" in sys.modules
        x = torch.randn(5, 64, device=default_device())
        w = torch.randn(64, device=default_device())
        torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_eager(x, w, 1e-6))
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- what lands on disk ----------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_reports_and_captures_are_written_with_the_umask_modes(tmp_path, umask_022):
    import torch

    from oracle.capture import CaptureBuilder, save_capture
    from oracle.report import write_report

    facts = {"title": "t", "verdict": "parity", "summary": "s", "scenarios": [], "command": "c",
             "environment": {"versions": {}, "device": "cpu", "dtype": "float32", "git": None, "host": ""}}
    html, data = write_report(facts, tmp_path / "report")
    assert [p.stat().st_mode & 0o777 for p in (html, data)] == [0o644, 0o644]  # were 0600 (mkstemp)
    builder = CaptureBuilder({"path": "truth"})
    builder.add("r0", "embed", torch.arange(2), torch.zeros(2, 4))
    where = save_capture(builder.build(), tmp_path / "capture")
    assert where.stat().st_mode & 0o777 == 0o755  # was 0700 (mkdtemp)
    assert {p.stat().st_mode & 0o777 for p in where.iterdir()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture", "report"]  # no temporaries left


def test_write_report_refuses_a_report_file_that_is_a_directory_before_writing_either(tmp_path):
    from oracle.report import ReportError, write_report

    facts = {"title": "t", "verdict": "parity", "summary": "s", "scenarios": [], "command": "c",
             "environment": {"versions": {}, "device": "cpu", "dtype": "float32", "git": None, "host": ""}}
    (tmp_path / "report.html").mkdir()
    with pytest.raises(ReportError, match="report.html: exists and is not a file"):
        write_report(facts, tmp_path)  # was IsADirectoryError, after report.json was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def _report_facts(verdict: str, scenarios: list, kernels: list | None = None) -> dict:
    """A minimal report.json body; kernels=None leaves the field out."""
    env = {"versions": {}, "device": "cpu", "dtype": "float32", "git": None, "host": ""}
    facts = {"title": "t", "verdict": verdict, "summary": "s", "command": "c", "environment": env,
             "scenarios": scenarios}
    return facts if kernels is None else dict(facts, kernels=kernels)


def _kernel_facts(passed) -> dict:
    return {"name": "gemv", "shape": [1], "dtype": "float32", "max_ulp": 0, "max_rel": 0, "passed": passed,
            "time_us": 1, "eager_us": 1, "unfused_us": 1}


def test_a_parity_verdict_over_a_failed_scenario_or_kernel_is_refused():
    """`report` exits 0 on a parity verdict: a hand-edited report.json that says parity while a
    scenario or kernel in it failed must not render (it did, exit 0)."""
    from oracle.report import ReportError, write_report

    facts = _report_facts("parity", [{"name": "a", "passed": True}, {"name": "b", "passed": False}])
    with pytest.raises(ReportError, match=r"verdict: 'parity', but facts.scenarios\[1\] \(b\) did not pass"):
        write_report(facts, None)
    facts["scenarios"][1]["passed"] = True
    facts["kernels"] = [_kernel_facts(False)]
    with pytest.raises(ReportError, match=r"facts.kernels\[0\] \(gemv\) did not pass"):
        write_report(facts, None)


def test_a_divergence_verdict_over_nothing_failed_is_refused():
    """The converse: `report` exits 1 on divergence, which the tool writes only when a scenario
    failed or a kernel did not pass (oracle/run.py report_facts); a report.json that says
    divergence while all of it passed rendered, exit 1."""
    from oracle.report import ReportError, load, write_report

    kernel = _kernel_facts(True)
    facts = _report_facts("divergence", [{"name": "a", "passed": True}], [kernel])
    with pytest.raises(ReportError, match=r"facts.verdict: 'divergence', but no scenario or kernel in it failed"):
        write_report(facts, None)
    for scenarios, passed in (([{"name": "a", "passed": False}], True), ([], False), ([], None)):
        ok = dict(facts, scenarios=scenarios, kernels=[dict(kernel, passed=passed)])
        assert load(ok).verdict == "divergence"  # as report_facts writes it: a scenario failed, a kernel not passed


def test_both_verdict_checks_count_an_unjudged_kernel_as_not_passed():
    """report_facts writes divergence for a kernel whose `passed` is None; the parity check let
    such a kernel through while the divergence check counted it, so one rule judged two ways."""
    from oracle.report import ReportError, load

    facts = _report_facts("parity", [{"name": "a", "passed": True}], [_kernel_facts(None)])
    with pytest.raises(ReportError, match=r"facts.verdict: 'parity', but facts.kernels\[0\] \(gemv\) did not pass"):
        load(facts)
    assert load(dict(facts, verdict="divergence")).verdict == "divergence"


def test_a_scenario_whose_passed_contradicts_its_comparison_is_refused():
    """The tool writes a scenario's `passed` as its comparison's; the verdict checks read only
    `passed`, so a report.json that flipped one rendered a verdict its own comparison denies."""
    from oracle.facts import ScenarioFacts
    from oracle.report import ReportError, load

    counts = dict.fromkeys(("requests", "taps_judged", "taps_failed", "taps_missing", "requests_diverged",
                            "local_judged", "local_failed", "local_skipped"), 0)
    comparison = {"passed": False, "dtype": None, "truth_dtype": None, "counts": counts, "first_divergence": None,
                  "tolerance": {"multiple": 1, "max_abs_multiple": 1, "floors": {}}, "requests": [],
                  "missing_requests": [], "extra_requests": [], "notes": [], "summary": "s"}
    facts = _report_facts("parity", [{"name": "a", "passed": True, "comparison": comparison}])
    with pytest.raises(ReportError) as e:
        load(facts)
    assert str(e.value).endswith("facts.scenarios[0] (a): passed is true, but comparison.passed is false"), e.value
    for passed, comparison in ((False, comparison), (True, dict(comparison, passed=True)), (True, None)):
        assert ScenarioFacts.load({"name": "a", "passed": passed, "comparison": comparison}).passed is passed


# -- the CLI: every malformed input is one line, exit 2, before any work ----------------------

CUDA = "torch.cuda.is_available()"  # a marker: the case needs a machine without CUDA

# (id, argv with {d} for the case directory, words the one error line must hold[, needs])
CLI_CASES = [
    # flags
    ("device-cuda-check", ["check", "--device", "cuda", "--out", "{out}"], "--device", CUDA),
    ("device-tpu-check", ["check", "--device", "tpu", "--out", "{out}"], "--device"),
    ("device-index-past-count", ["check", "--device", "cuda:99", "--out", "{out}"], "--device"),
    ("device-cuda-kernels", ["kernels", "--device", "cuda", "--out", "{out}"], "--device", CUDA),
    ("device-tpu-kernels", ["kernels", "--device", "tpu", "--out", "{out}"], "--device"),
    ("device-cuda-capture", ["capture", "--device", "cuda", "--scenario", "one-shot-prefill", "--path", "truth",
                             "--out", "{out}"], "--device", CUDA),
    ("device-cuda-serve", ["serve", "--device", "cuda", "--port", "0"], "--device", CUDA),
    ("device-meta", ["check", "--device", "meta", "--out", "{out}"], "--device"),
    # A long name or number is quoted by its first characters (both were quoted in full), and a
    # port of more digits than int() reads is named by the port range (was "of at most 4300 digits").
    ("device-name-long", ["check", "--device", "x" * 5000, "--out", "{out}"],
     "--device: 'xxxxxxxxxxxxxxxxxxxx'... (5000 characters) is not a device (cpu, cuda, cuda:N, xpu or auto)"),
    ("device-index-long", ["check", "--device", "cpu:" + "7" * 5000, "--out", "{out}"],
     "--device: 'cpu:7777777777777777'... (5004 characters) is not a device"),
    ("info-page-size-0", ["info", "--page-size", "0"], "--page-size"),
    ("info-context-0", ["info", "--context", "0"], "--context"),
    ("info-context-negative", ["info", "--context", "-5"], "--context"),
    ("info-context-past-max", ["info", "--context", "10000000"], "--context"),
    ("info-context-not-a-number", ["info", "--context", "lots"], "--context"),
    ("serve-port-too-big", ["serve", "--port", "99999"], "--port"),
    ("serve-port-negative", ["serve", "--port", "-1"], "--port: a TCP port is 0..65535 (0: any free port), got -1"),
    ("serve-port-past-int-digits", ["serve", "--port", "7" * 5000],
     "--port: a TCP port is 0..65535 (0: any free port), got 77777777777777777777... (5000 digits)"),
    ("serve-port-negative-past-int-digits", ["serve", "--port", "-" + "7" * 5000],
     "--port: a TCP port is 0..65535 (0: any free port), got -7777777777777777777... (5000 digits)"),
    ("serve-max-requests-0", ["serve", "--max-requests", "0", "--port", "0"], "--max-requests"),
    ("serve-num-pages-1", ["serve", "--num-pages", "1", "--port", "0"], "--num-pages"),
    ("check-seed-negative", ["check", "--seed", "-1", "--out", "{out}"], "--seed"),
    ("check-dtype-unknown", ["check", "--dtype", "float8", "--out", "{out}"], "--dtype"),
    ("kernels-repeats-0", ["kernels", "--repeats", "0", "--out", "{out}"], "--repeats"),
    ("check-unknown-fault", ["check", "--inject", "no-such-fault", "--out", "{out}"], "no-such-fault"),
    ("no-such-command", ["frobnicate"], "frobnicate"),
    ("check-out-is-a-file", ["check", "--scenario", "one-shot-prefill", "--out", "{d}/a-file"], "--out"),
    ("check-out-under-a-file", ["check", "--scenario", "one-shot-prefill", "--out", "{d}/a-file/report"], "--out"),
    ("kernels-out-is-a-file", ["kernels", "--out", "{d}/a-file"], "--out"),
    ("diff-out-is-a-file", ["diff", "{d}/capture", "{d}/capture", "--out", "{d}/a-file"], "--out"),
    ("report-out-is-a-file", ["report", "{d}", "--out", "{d}/a-file"], "--out"),
    ("capture-into-a-capture", ["capture", "--scenario", "one-shot-prefill", "--path", "truth", "--out", "{d}/capture"],
     "--overwrite"),
    ("capture-over-a-non-capture", ["capture", "--scenario", "one-shot-prefill", "--path", "truth", "--overwrite",
                                    "--out", "{d}"], "not a capture directory"),
    ("capture-two-scenarios", ["capture", "--scenario", "one-shot-prefill", "--scenario", "decode-past-window",
                               "--path", "truth", "--out", "{out}"], "--scenario"),
    ("capture-no-path", ["capture", "--scenario", "one-shot-prefill", "--out", "{out}"], "--path"),
    # scenario files
    ("scenario-missing", ["check", "--scenario", "{d}/nope.json", "--out", "{out}"], "no such scenario file"),
    ("scenario-is-a-directory", ["check", "--scenario", "{d}", "--out", "{out}"], "cannot read"),
    ("scenario-not-json", ["check", "--scenario", "{d}/not-json.json", "--out", "{out}"], "not valid JSON"),
    ("scenario-nested-too-deeply", ["check", "--scenario", "{d}/nested.json", "--out", "{out}"], "nested too deeply"),
    ("scenario-negative-length", ["check", "--scenario", "{d}/negative-length.json", "--out", "{out}"],
     "requests[0].length"),
    ("scenario-unknown-field", ["check", "--scenario", "{d}/unknown-field.json", "--out", "{out}"], "colour"),
    ("scenario-past-max-positions", ["check", "--scenario", "{d}/past-max-positions.json", "--out", "{out}"],
     "requests[0].length"),
    ("scenario-new-tokens-300000", ["check", "--scenario", "{d}/many-new-tokens.json", "--out", "{out}"],
     "requests[0].new_tokens"),
    ("scenario-too-big-for-memory", ["check", "--scenario", "{d}/too-big-for-memory.json", "--out", "{out}"],
     "GiB"),
    ("scenario-token-outside-vocab", ["check", "--scenario", "{d}/outside-vocab.json", "--out", "{out}"],
     "tokens"),
    ("scenario-pool-too-small", ["check", "--scenario", "{d}/small-pool.json", "--out", "{out}"],
     "engine.num_pages"),
    ("scenario-page-size-huge", ["check", "--scenario", "{d}/huge-page.json", "--out", "{out}"], "engine.page_size"),
    ("scenario-num-pages-huge", ["check", "--scenario", "{d}/huge-pool.json", "--out", "{out}"], "engine.num_pages"),
    ("scenario-dtype", ["check", "--scenario", "{d}/bad-dtype.json", "--out", "{out}"], "model.dtype"),
    ("scenario-dtype-a-list", ["check", "--scenario", "{d}/dtype-a-list.json", "--out", "{out}"], "model.dtype"),
    ("scenario-prefix-request-a-list", ["check", "--scenario", "{d}/prefix-request-a-list.json", "--out", "{out}"],
     "prefix_from.request"),
    ("scenario-seed-past-uint64", ["check", "--scenario", "{d}/seed-past-uint64.json", "--out", "{out}"],
     "requests[0].seed"),
    ("scenario-device-not-here", ["check", "--scenario", "{d}/on-cuda.json", "--out", "{out}"], "model.device", CUDA),
    ("scenario-capture-past-max", ["capture", "--scenario", "{d}/past-max-positions.json", "--path", "truth",
                                   "--out", "{out}"], "requests[0].length"),
    # checkpoints
    ("model-unknown", ["check", "no-such-model", "--out", "{out}"], "no-such-model"),
    ("checkpoint-no-config", ["check", "{d}/empty-checkpoint", "--out", "{out}"], "config.json"),
    ("checkpoint-config-not-json", ["info", "{d}/config-not-json"], "not valid JSON"),
    ("checkpoint-config-nested-too-deeply", ["info", "{d}/config-nested"], "nested too deeply"),
    ("checkpoint-config-nested-too-deeply-check", ["check", "{d}/config-nested", "--out", "{out}"],
     "nested too deeply"),
    ("checkpoint-config-not-utf8-check", ["check", "{d}/config-not-utf8", "--out", "{out}"], "UTF-8"),
    ("checkpoint-config-field-missing", ["check", "{d}/config-field-missing", "--out", "{out}"], "vocab_size"),
    ("checkpoint-config-is-a-directory", ["info", "{d}/config-is-a-directory"], "config.json"),
    ("checkpoint-no-weights", ["check", "{d}/no-weights", "--out", "{out}"], "safetensors"),
    ("checkpoint-head-dim-24", ["check", "{d}/head-dim-24", "--out", "{out}"], "head_dim"),
    ("checkpoint-head-dim-24-serve", ["serve", "{d}/head-dim-24", "--port", "0"], "head_dim"),
    # captures and reports
    ("diff-no-such-capture", ["diff", "{d}/nope", "{d}/capture", "--out", "{out}"], "no capture directory"),
    ("diff-manifest-not-json", ["diff", "{d}/capture", "{d}/capture-bad-manifest", "--out", "{out}"],
     "not valid JSON"),
    ("diff-manifest-nested-too-deeply", ["diff", "{d}/capture", "{d}/capture-nested-manifest", "--out", "{out}"],
     "nested too deeply"),
    ("diff-tap-key-a-list", ["diff", "{d}/capture", "{d}/capture-tap-key-a-list", "--out", "{out}"], "tensor ['x']"),
    ("diff-truth-dtype-a-list", ["diff", "{d}/capture", "{d}/capture", "--truth", "{d}/capture-dtype-a-list", "--out",
                                 "{out}"], "metadata.dtype"),
    ("diff-corrupt-tensor-file", ["diff", "{d}/capture", "{d}/capture-corrupt", "--out", "{out}"], "sha256"),
    ("diff-no-model-config", ["diff", "{d}/capture", "{d}/capture-no-config", "--out", "{out}"], "model_config"),
    ("report-no-report-json", ["report", "{d}/empty-checkpoint", "--out", "{out}"], "no report.json"),
    ("report-json-not-an-object", ["report", "{d}/bad-report", "--out", "{out}"], "cannot render"),
    ("report-json-nested-too-deeply", ["report", "{d}/nested-report", "--out", "{out}"], "nested too deeply"),
    # An integer past 4300 digits: json raises a plain ValueError, not a JSONDecodeError (was a traceback)
    ("scenario-integer-past-4300-digits", ["check", "--scenario", "{d}/huge-integer.json", "--out", "{out}"],
     "not valid JSON"),
    ("checkpoint-integer-past-4300-digits", ["info", "{d}/config-huge-integer"], "config.json"),
    ("checkpoint-integer-past-4300-digits-check", ["check", "{d}/config-huge-integer", "--out", "{out}"],
     "config-huge-integer"),
    ("diff-manifest-integer-past-4300-digits", ["diff", "{d}/capture", "{d}/capture-huge-integer", "--out", "{out}"],
     "not valid JSON"),
    # An empty path: `diff` crashed on a KeyError; --out "" / --truth "" were taken as not given
    ("diff-candidate-empty", ["diff", "{d}/capture", ""], "candidate"),
    ("diff-truth-empty", ["diff", "{d}/capture", "{d}/capture", "--truth", ""], "--truth"),
    ("diff-out-empty", ["diff", "{d}/capture", "{d}/capture", "--out", ""], "--out"),
    ("check-out-empty", ["check", "--scenario", "one-shot-prefill", "--out", ""], "--out"),
    ("check-model-empty", ["check", "", "--out", "{out}"], "model: expected a preset name (tiny"),
    ("capture-out-empty", ["capture", "--scenario", "one-shot-prefill", "--path", "truth", "--out", ""], "--out"),
    ("report-directory-empty", ["report", ""], "directory"),
    # A file the command writes exists as a directory: was an IsADirectoryError traceback after the
    # whole run, with report.json already replaced beside the missing report.html
    ("check-report-html-a-directory", ["check", "--scenario", "one-shot-prefill", "--out", "{d}/html-a-directory"],
     "report.html"),
    ("diff-report-json-a-directory", ["diff", "{d}/capture", "{d}/capture", "--out", "{d}/json-a-directory"],
     "report.json"),
    ("report-html-a-directory", ["report", "{d}/html-a-directory"], "DIRECTORY"),
    ("kernels-json-a-directory", ["kernels", "--out", "{d}/kernels-json-a-directory"], "kernels.json"),
    ("report-directory-a-file", ["report", "{d}/a-file"], "DIRECTORY"),  # was named --out, which was not given
    # huge numbers and odd names
    ("scenario-max-requests-huge", ["check", "--scenario", "{d}/huge-max-requests.json", "--out", "{out}"],
     "engine.max_requests"),  # was torch.zeros' overflow in the run, a traceback
    ("capture-max-requests-huge", ["capture", "--scenario", "{d}/huge-max-requests.json", "--path", "truth",
                                   "--out", "{out}"], "engine.max_requests"),
    ("scenario-source-empty", ["check", "--scenario", "{d}/source-empty.json", "--out", "{out}"],
     "model.source"),  # was "config.json: no config.json" (the current directory)
    ("scenario-source-null", ["check", "--scenario", "{d}/source-null.json", "--out", "{out}"], "model.source"),
    ("info-page-size-huge", ["info", "--page-size", str(10**30)], "--page-size"),  # printed 8e23 GiB
    ("kernels-repeats-huge", ["kernels", "--repeats", str(10**30), "--out", "{out}"], "--repeats"),  # ran on
    # captures diff cannot judge
    ("diff-no-request", ["diff", "{d}/capture-empty", "{d}/capture-empty", "--out", "{out}"],
     "nothing to judge"),  # was "PARITY: 0 taps in 0 requests", exit 0
    ("diff-scenario-a-string", ["diff", "{d}/capture", "{d}/capture-scenario-a-string", "--out", "{out}"],
     "metadata.scenario"),  # was an AttributeError traceback
    ("diff-versions-a-string", ["diff", "{d}/capture", "{d}/capture-versions-a-string", "--out", "{out}"],
     "metadata does not fit"),  # after the verdict was printed
    ("diff-other-model", ["diff", "{d}/capture-other-model", "{d}/capture"], "capture-other-model"),  # named "truth"
    ("diff-other-prompt", ["diff", "{d}/capture-prompt-a", "{d}/capture-prompt-b"], "length 3 vs 4"),  # was exit 1
    ("diff-other-weights", ["diff", "{d}/capture-prompt-a", "{d}/capture-seed-1"], "model.seed"),  # was exit 1
]


PROGRESS = ("diff: ", "capture: ")


def _scenario(**request) -> dict:
    return {"name": "bad", "model": {"source": "tiny", "device": "cpu"}, "requests": [{"length": 4, **request}]}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """Every malformed file the cases name, made once."""
    import json

    import torch

    import reference
    from oracle.capture import CaptureBuilder, capture_metadata, save_capture

    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "a-file").write_text("not a directory\n")
    (d / "not-json.json").write_text("{oops")
    nested = "[" * 100_000  # json's parser recurses per level: a RecursionError, not a JSONDecodeError
    (d / "nested.json").write_text(nested)
    huge = "1" + "0" * 5000  # past sys.get_int_max_str_digits(): json's int() raises ValueError
    (d / "huge-integer.json").write_text('{"requests": [{"length": %s}]}' % huge)
    files = {
        "negative-length": _scenario(length=-1),
        "unknown-field": _scenario(colour="red"),
        "past-max-positions": _scenario(length=200_000),
        "many-new-tokens": _scenario(new_tokens=300_000),
        # Within max positions (131072) but more than any machine's memory for the dense truth.
        "too-big-for-memory": _scenario(length=131_072),
        "outside-vocab": {"name": "bad", "requests": [{"tokens": [5, 999]}]},
        "small-pool": {**_scenario(length=20), "engine": {"page_size": 4, "num_pages": 3}},
        "bad-dtype": {**_scenario(), "model": {"dtype": "fp8"}},
        "huge-page": {**_scenario(), "engine": {"page_size": 10**30}},  # was torch.zeros' overflow, in the run
        "huge-pool": {**_scenario(), "engine": {"num_pages": 10**30}},  # was range()'s OverflowError, in the run
        "dtype-a-list": {**_scenario(), "model": {"dtype": ["float32"]}},  # was TypeError: unhashable
        "prefix-request-a-list": {"name": "bad", "requests": [{"length": 4}, {"length": 2, "prefix_from": {
            "request": ["r0"], "length": 2}}]},
        "seed-past-uint64": _scenario(seed=2**64),  # was torch.Generator's ValueError
        "on-cuda": {**_scenario(), "model": {"device": "cuda"}},
        "huge-max-requests": {**_scenario(), "engine": {"max_requests": 10**30}},
        "source-empty": {**_scenario(), "model": {"source": ""}},
        "source-null": {**_scenario(), "model": {"source": None}},
    }
    for name, raw in files.items():
        (d / f"{name}.json").write_text(json.dumps(raw))
    (d / "empty-checkpoint").mkdir()
    (d / "config-not-json").mkdir()
    (d / "config-not-json" / "config.json").write_text("{oops")
    (d / "config-nested").mkdir()
    (d / "config-nested" / "config.json").write_text(nested)
    (d / "config-not-utf8").mkdir()
    (d / "config-not-utf8" / "config.json").write_bytes(b'{"model_type": "\xff"}')
    (d / "config-field-missing").mkdir()
    (d / "config-field-missing" / "config.json").write_text(json.dumps({"model_type": "gemma4_text"}))
    (d / "config-is-a-directory" / "config.json").mkdir(parents=True)
    for name, file in (("html-a-directory", "report.html"), ("json-a-directory", "report.json"),
                       ("kernels-json-a-directory", "kernels.json")):
        (d / name / file).mkdir(parents=True)
    tiny = reference.PRESETS["tiny"]
    (d / "config-huge-integer").mkdir()
    (d / "config-huge-integer" / "config.json").write_text(
        json.dumps(tiny.to_hf_dict()).replace('"vocab_size": 256', f'"vocab_size": {huge}'))
    (d / "no-weights").mkdir()
    (d / "no-weights" / "config.json").write_text(json.dumps(tiny.to_hf_dict()))
    odd = tiny.replace(head_dim=24)  # the reference runs it; the optimized path cannot
    reference.save_checkpoint(d / "head-dim-24", odd, reference.random_weights(odd, 0, torch.float32, "cpu"))

    builder = CaptureBuilder(capture_metadata(tiny, path="reference", dtype=torch.float32))
    builder.add("r0", "embed", torch.arange(3), torch.randn(3, tiny.hidden_size))
    save_capture(builder.build(), d / "capture")
    save_capture(CaptureBuilder(capture_metadata(tiny, path="reference", dtype=torch.float32)).build(),
                 d / "capture-empty")
    moe = reference.PRESETS["tiny-moe"]
    other = CaptureBuilder(capture_metadata(moe, path="reference", dtype=torch.float32))
    other.add("r0", "embed", torch.arange(3), torch.randn(3, moe.hidden_size))
    save_capture(other.build(), d / "capture-other-model")
    for name in ("capture-bad-manifest", "capture-nested-manifest", "capture-corrupt", "capture-no-config",
                 "capture-tap-key-a-list", "capture-dtype-a-list", "capture-huge-integer",
                 "capture-scenario-a-string", "capture-versions-a-string", "capture-prompt-a", "capture-prompt-b",
                 "capture-seed-1"):
        save_capture(builder.build(), d / name)
    prompt = {"model": {"seed": 0}, "requests": [{"id": "r0", "length": 3, "seed": 1}]}
    for name, edit in (("capture-tap-key-a-list", lambda m: m["requests"][0]["taps"][0].update(key=["x"])),
                       ("capture-dtype-a-list", lambda m: m["metadata"].update(dtype=["float32"])),
                       ("capture-scenario-a-string", lambda m: m["metadata"].update(scenario="x")),
                       ("capture-versions-a-string", lambda m: m["metadata"].update(versions="x")),
                       ("capture-prompt-a", lambda m: m["metadata"].update(scenario=prompt)),
                       ("capture-prompt-b", lambda m: m["metadata"].update(scenario={
                           **prompt, "requests": [{"id": "r0", "length": 4, "seed": 1}]})),
                       ("capture-seed-1", lambda m: m["metadata"].update(scenario={**prompt, "model": {"seed": 1}}))):
        manifest = json.loads((d / name / "manifest.json").read_text())  # each was TypeError: unhashable
        edit(manifest)
        (d / name / "manifest.json").write_text(json.dumps(manifest))
    (d / "capture-bad-manifest" / "manifest.json").write_text("{oops")
    (d / "capture-nested-manifest" / "manifest.json").write_text(nested)
    manifest = d / "capture-huge-integer" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"schema_version": 1', f'"schema_version": {huge}', 1))
    tensors = d / "capture-corrupt" / "request-00000.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    manifest = json.loads((d / "capture-no-config" / "manifest.json").read_text())
    del manifest["metadata"]["model_config"]
    (d / "capture-no-config" / "manifest.json").write_text(json.dumps(manifest))
    (d / "bad-report").mkdir()
    (d / "bad-report" / "report.json").write_text("[1, 2]")
    (d / "nested-report").mkdir()
    (d / "nested-report" / "report.json").write_text(nested)
    return d


# The HTTP server needs the optional `serve` extra (FastAPI, uvicorn); CI installs it.
HAS_SERVE = _installed("fastapi") and _installed("uvicorn")
needs_serve = pytest.mark.skipif(not HAS_SERVE, reason="the server needs the serve extra: pip install -e '.[serve]'")


def _params(cases):
    out = []
    for case_id, argv, words, *needs in cases:
        marks = [pytest.mark.skipif(bool(needs) and _has_cuda(), reason="this machine has the CUDA device")]
        if argv[0] == "serve":
            marks.append(needs_serve)
        out.append(pytest.param(argv, words, id=case_id, marks=marks))
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("argv,words", _params(CLI_CASES))
def test_cli_refuses_bad_input_in_one_line(bad_dir, tmp_path, capsys, argv, words):
    from oracle.cli import main

    out = tmp_path / "out"
    before = sorted(p.name for p in bad_dir.rglob("*"))
    code = main([a.format(d=bad_dir, out=out) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    # One error line, last; before it at most progress lines (diff says what it is loading).
    assert "Traceback" not in err and all(line.startswith(PROGRESS) for line in lines[:-1]), err
    assert words in lines[-1] and "error" in lines[-1], lines[-1]
    assert not out.exists()  # nothing half-written
    assert sorted(p.name for p in bad_dir.rglob("*")) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc: a directory os.access calls "
                    "writable for root, where mkdir fails")
@pytest.mark.parametrize("argv", [
    ["check", "tiny", "--scenario", "one-shot-prefill", "--out", "/proc/gemma4-testbed-report"],
    ["capture", "tiny", "--path", "reference", "--scenario", "one-shot-prefill", "--out", "/proc/gemma4-testbed-capture"],
    ["kernels", "--out", "/proc/gemma4-testbed-kernels"],
], ids=["check", "capture", "kernels"])
def test_an_output_directory_nothing_can_be_made_in_is_refused_before_the_run(capsys, argv):
    """os.access says yes to root on /proc (and on a read-only mount); the mkdir after the run
    failed with a traceback. A probe directory made and removed before any work finds it."""
    from oracle.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot write in /proc" in err.splitlines()[-1], err


def test_cli_quotes_a_long_number_by_its_first_digits(capsys):
    """A 5000-digit value was quoted in full (5000 digits in a one-line error); past int()'s 4300
    digits --repeats also said "expected an integer" of an integer."""
    from oracle.cli import main

    huge = "7" * 5000
    for argv, want in ((["kernels", "--repeats", huge], "--repeats: expected an integer <= 1000, got "
                                                         "77777777777777777777... (5000 digits)"),
                       (["kernels", "--repeats", "7" * 30], "<= 1000, got 77777777777777777777... (30 digits)"),
                       (["kernels", "--repeats", "-" + huge], "expected an integer >= 1, got -7777777777777777777"),
                       (["info", "--page-size", huge], "--page-size: expected an integer of at most"),
                       (["info", "--page-size", "x" * 5000], "expected an integer, got 'xxxxxxxxxxxxxxxxxxxx'... "
                                                             "(5000 characters)"),
                       (["serve", "--token-budget", huge], "--token-budget: must be an integer of at most"),
                       (["serve", "--request-timeout", huge], "seconds >= 0, got '77777777777777777777'... "
                                                              "(5000 digits)"),
                       (["serve", "--port", "7" * 30], "got 77777777777777777777... (30 digits)"),
                       (["kernels", "--repeats", "1001"], "expected an integer <= 1000, got 1001 ")):  # short: whole
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert want in err and len(err) < 250 and err.count("\n") == 1, err


def test_an_empty_model_or_scenario_is_refused_naming_what_is_accepted(capsys):
    """"" is no model (as a path it is the current directory): the CLI said "expected a path",
    leaving the presets out, and resolve() said "config.json: no config.json"."""
    from oracle.cli import main
    from reference import PRESETS, CheckpointError
    from reference.weights import resolve_config

    want = f"expected a preset name ({', '.join(PRESETS)}) or a checkpoint directory, got an empty string"
    for argv, words in ((["info", ""], f"argument model: {want}"), (["serve", ""], f"argument model: {want}"),
                        (["check", "--scenario", ""], "--scenario: expected a scenario file or a built-in scenario "
                                                      "name")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    with pytest.raises(CheckpointError) as e:
        resolve_config("")
    assert str(e.value) == want


def test_cli_bad_input_in_a_real_process(bad_dir):
    # The installed entry point's process: exit code and stderr as a shell (or git bisect) sees them.
    for argv, words in ((["check", "--device", "tpu"], "--device"),
                        (["check", "--scenario", str(bad_dir / "many-new-tokens.json")], "new_tokens")):
        proc = run_python(f"import sys; from oracle.cli import main; sys.exit(main({argv!r}))")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_ctrl_c_during_check_exits_130_with_one_line_and_stops_every_worker(tmp_path):
    """Ctrl-C reaches a terminal's whole process group: the parent and (two jobs on a CPU) its
    scenario workers. It printed tracebacks, and the parent then waited for the running scenarios
    before exiting. Now: one line, exit 130 (128 + SIGINT: it also stops a `git bisect run`),
    at once, no process left, no report."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    code = f"import sys; from oracle.cli import main; sys.exit(main(['check', '--out', {str(tmp_path / 'r')!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stderr.readline()  # the first progress line: past the input checks
        time.sleep(3)  # scenarios running
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.perf_counter()
        _, err = proc.communicate(timeout=60)
        err = first + err
        waited = time.perf_counter() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert waited < 20, f"exited {waited:.0f} s after Ctrl-C"
    assert not (tmp_path / "r").exists()


def test_a_request_arriving_at_step_10_to_the_30_runs_without_counting_the_idle_steps(tmp_path, capsys, monkeypatch,
                                                                                        device):
    # Was a hang: the scripted scheduler counted every idle step one schedule() call at a time. It now
    # jumps to the next arrival when nothing runs; a regression fails here at once, not after 10**30 calls.
    import json

    from optimized.engine.scheduler import Scheduler
    from oracle.cli import main

    calls = []
    schedule = Scheduler.schedule

    def counted(self):
        plan = schedule(self)
        calls.append((self.step_count - 1, sorted(s.seq.rid for s in plan)))  # (the step it ran, who ran)
        assert len(calls) < 100, "idle steps counted one by one"
        return plan

    monkeypatch.setattr(Scheduler, "schedule", counted)
    big = 10**30
    path = tmp_path / "late.json"
    path.write_text(json.dumps({"name": "late", "model": {"source": "tiny", "device": str(device)}, "requests": [
        {"id": "r0", "length": 2, "seed": 1, "new_tokens": 1, "arrival": big},
        # waits for its donor, which arrives later, then for it to finish: both skipped to, not counted
        {"id": "r1", "length": 1, "seed": 2, "arrival": 3, "prefix_from": {"request": "r0", "length": 1}},
        {"id": "r2", "length": 1, "seed": 3, "arrival": big + 9, "prefix_from": {"request": "r0", "length": 2,
                                                                                 "finished": True}}]}))
    code = main(["check", "--scenario", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    # The steps counting one by one reaches (r0 prefills and samples, then feeds its last token; r1 starts
    # with it), with at most one idle call between jumps.
    assert [c for c in calls if c[1]] == [(big, [0, 1]), (big + 1, [0]), (big + 9, [2])], calls
    assert len(calls) <= 6, calls
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["arrival"] for r in report["scenarios"][0]["scenario"]["requests"]] == [big, 3, big + 9]


# -- the HTTP server: a 4xx naming the field, and it keeps answering ---------------------------

# (id, path, raw body, status, words the error message must hold). Complements
# tests/test_serve.py's BAD_REQUESTS with bounds and types at their edges.
HTTP_CASES = [
    ("negative-token-id", "/generate", b'{"input_ids": [-1]}', 400, "input_ids"),
    ("huge-token-id", "/generate", b'{"input_ids": [100000000000000000000000000000]}', 400, "input_ids"),
    ("float-token-id", "/generate", b'{"input_ids": [1.5]}', 400, "input_ids"),
    ("prompt-past-max-context", "/generate", b'{"input_ids": [' + b"1, " * 4999 + b'1]}', 400, "input_ids"),
    ("max-new-tokens-huge", "/generate", b'{"input_ids": [1], "sampling": {"max_new_tokens": 1000000000000000000000}}',
     400, "max_new_tokens"),
    ("max-new-tokens-bool", "/generate", b'{"input_ids": [1], "sampling": {"max_new_tokens": true}}', 400,
     "max_new_tokens"),
    ("temperature-infinite", "/generate", b'{"input_ids": [1], "sampling": {"temperature": 1e999}}', 400,
     "temperature"),
    ("seed-negative", "/generate", b'{"input_ids": [1], "sampling": {"seed": -1}}', 400, "seed"),
    ("seed-past-int64", "/generate", b'{"input_ids": [1], "sampling": {"seed": 100000000000000000000000}}', 400,
     "seed"),
    ("top-k-negative", "/generate", b'{"input_ids": [1], "sampling": {"top_k": -5}}', 400, "top_k"),
    ("top-p-zero", "/generate", b'{"input_ids": [1], "sampling": {"top_p": 0}}', 400, "top_p"),
    ("stop-ids-not-a-list", "/generate", b'{"input_ids": [1], "sampling": {"stop_token_ids": "x"}}', 400,
     "stop_token_ids"),
    ("add-special-tokens-not-bool", "/generate", b'{"input_ids": [1], "add_special_tokens": 3}', 400,
     "add_special_tokens"),
    ("body-null", "/generate", b"null", 400, "body"),
    ("max-tokens-string", "/v1/completions", b'{"prompt": [1], "max_tokens": "x"}', 400, "max_tokens"),
    ("max-tokens-past-context", "/v1/completions", b'{"prompt": [1], "max_tokens": 100000}', 400, "max_tokens"),
    ("prompt-id-outside-vocab", "/v1/completions", b'{"prompt": [256]}', 400, "prompt"),
    ("model-not-a-string", "/v1/completions", b'{"prompt": [1], "model": 7}', 400, "model"),
]


@pytest.fixture(scope="module")
def server():
    import threading

    if not HAS_SERVE:
        pytest.skip("the server needs the serve extra: pip install -e '.[serve]'")

    import torch

    from optimized.engine import Engine
    from optimized.kernels import default_device
    from optimized.serve import make_server

    srv = make_server(Engine("tiny", dtype=torch.float32, device=default_device()), model_name="tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(10)


def _post(server, path: str, raw: bytes | None, method: str = "POST") -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url + path, data=raw, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path,raw,status,words", [pytest.param(*c[1:], id=c[0]) for c in HTTP_CASES])
def test_server_refuses_bad_bodies_and_keeps_answering(server, path, raw, status, words):
    got, reply = _post(server, path, raw)
    assert got == status, reply
    message = reply["error"]["message"]
    assert words in message and "\n" not in message and "Traceback" not in message, message
    assert _post(server, "/health", None, "GET") == (200, {"status": "ok"})


@needs_serve
def test_server_refuses_a_port_out_of_range():
    from optimized.serve import make_server

    class NoEngine:  # the port is refused before the engine is looked at
        max_context = 1

    with pytest.raises(ValueError, match="port: .* 0..65535"):
        make_server(NoEngine(), port=99999)


def test_a_checkpoint_error_names_its_path_once(bad_dir, capsys):
    from oracle.cli import main

    for command in ("info", "check") + (("serve",) if HAS_SERVE else ()):  # else serve names the extra
        assert main([command, str(bad_dir / "empty-checkpoint")]) == 2
        err = capsys.readouterr().err
        # Was "d/config.json: d/config.json: no config.json".
        assert err.count(str(bad_dir / "empty-checkpoint" / "config.json")) == 1, err


def test_the_python_api_refuses_a_head_size_the_kernels_cannot_run():
    """Issue 11 point 6 for Python users: Runner and Engine say which field, before any kernel runs."""
    import dataclasses

    from optimized import Runner
    from optimized.engine import Engine
    from reference import PRESETS, ConfigError

    cfg = dataclasses.replace(PRESETS["tiny"], head_dim=24)
    for build in (lambda: Engine(cfg), lambda: Runner(cfg).run([[1, 2, 3]])):
        with pytest.raises(ConfigError, match="head_dim: 24"):
            build()
