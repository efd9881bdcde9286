"""The oracle end to end: scenarios, both paths, the verdict, the CLI and the pytest helper."""

from __future__ import annotations

import json

import pytest

import optimized.kernels
import optimized.model
import optimized.runner
from oracle import cli
from oracle.capture import load_capture
from oracle.run import run_scenario
from oracle.scenario import ScenarioError, builtin, from_dict, load
from oracle.testing import ParityError, assert_parity, scenario


def _perturb_full_attention(monkeypatch, factor=1.01):
    """A test-local kernel bug: full-attention outputs (window None) come out scaled."""
    for name in ("extend_attention", "decode_attention"):
        real = getattr(optimized.model, name)

        def wrapped(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            return out * factor if kwargs.get("window") is None else out

        monkeypatch.setattr(optimized.model, name, wrapped)


def test_builtin_scenarios_hold_parity_on_every_preset_family(device):
    for preset in ("tiny", "tiny-kv-eq-v", "tiny-moe"):
        sc = builtin(preset, device=str(device))[1]  # chunked prefill over shuffled pages with explicit splits
        run = run_scenario(sc)
        assert run.passed, run.comparison.summary()
        counts = run.comparison.counts()
        assert counts["taps_failed"] == 0 and counts["taps_missing"] == 0, counts


def test_builtin_prefix_scenario_really_reuses_pages(device):
    run = run_scenario(builtin("tiny", device=str(device))[3])
    assert run.passed, run.comparison.summary()
    assert [r["prefix_reused"] for r in run.layout["requests"]] == [0, 4]


def test_a_missing_softcap_is_named_at_the_logits(monkeypatch, device):
    import optimized.fused_ops

    monkeypatch.setattr(optimized.fused_ops, "softcap", lambda logits, cap: logits)
    with pytest.raises(ParityError) as err:
        assert_parity(scenario("tiny-moe", lengths=[6], new_tokens=1, page_size=4, chunk_size=6, device=str(device)))
    assert err.value.run.comparison.first_divergence.tap == "logits"


def test_a_perturbed_layer_is_named_as_the_first_divergence(monkeypatch, device):
    _perturb_full_attention(monkeypatch)
    with pytest.raises(ParityError) as err:
        assert_parity(scenario("tiny", lengths=[9], new_tokens=2, page_size=4, chunk_size=4, device=str(device)))
    div = err.value.run.comparison.first_divergence
    assert (div.layer, div.kind) == (4, "o")  # tiny's first full-attention layer
    assert "layers.4.o" in str(err.value)


def test_a_stale_pool_slot_is_caught_as_k_cache(monkeypatch, device):
    # Corrupt what the last sliding layer stored for position 2 after the run: only the pool tap
    # can see it, and it must say which layer and which position.
    real = optimized.runner.Runner._emit_cache

    def corrupt(self, cache, r, taps):
        spec = self.config.layers[3]
        row = cache.requests[r.index].row
        slot = int(cache.req_to_token[row, 2])
        ps = self.page_size
        swa_slot = int(cache.full_to_swa_page[slot // ps]) * ps + slot % ps
        cache.buffers(spec)[0][swa_slot] += 1.0
        real(self, cache, r, taps)

    monkeypatch.setattr(optimized.runner.Runner, "_emit_cache", corrupt)
    run = run_scenario(scenario("tiny", lengths=[6], new_tokens=0, page_size=2, chunk_size=6, device=str(device)))
    div = run.comparison.first_divergence
    assert div.tap == "layers.3.k_cache"
    assert div.to_dict()["positions"][0]["position"] == 2


def test_pytest_helper_passes_on_clean_runs(device):
    run = assert_parity(scenario("tiny-kv-eq-v", lengths=[7, 4], new_tokens=2, page_size=2, chunk_size=3,
                                 device=str(device)))
    assert run.passed


def test_scenario_json_round_trip_and_errors(tmp_path):
    sc = builtin("tiny")[3]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(sc.to_dict()))
    assert load(path) == sc
    prompts = sc.prompts(256)
    assert prompts[1][:6] == prompts[0][:6] and len(prompts[1]) == 9  # shared prefix + own tokens
    bad = [
        ({"requests": []}, "requests"),
        ({"requests": [{"length": 3}], "engine": {"page_size": 0}}, "engine.page_size"),
        ({"requests": [{"length": 3, "tokens": [1]}]}, "exactly one"),
        ({"requests": [{"length": 3, "chunks": [1, 1]}]}, r"requests\[0\].chunks"),
        ({"requests": [{"length": 3, "prefix_from": {"request": "zz", "length": 1}}]}, "prefix_from.request"),
        ({"requests": [{"length": 3}], "model": {"dtype": "float8"}}, "model.dtype"),
        ({"requests": [{"length": 3, "colour": "red"}]}, "unknown field"),
    ]
    for raw, match in bad:
        with pytest.raises(ScenarioError, match=match):
            from_dict(raw)
    path.write_text("{oops")
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load(path)


def test_cli_check_writes_a_report_and_exits_zero_on_parity(tmp_path, capsys, device):
    out = tmp_path / "report"
    code = cli.main(["check", "tiny", "--device", str(device), "--scenario", "one-shot-prefill",
                     "--scenario", "decode-past-window", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    facts = json.loads((out / "report.json").read_text())
    assert facts["verdict"] == "parity" and len(facts["scenarios"]) == 2
    assert facts["command"].startswith("gemma4-testbed check tiny")
    assert (out / "report.html").read_text().count("parity") > 0


def test_cli_check_exits_one_on_divergence_and_ops_eager_says_whether_a_kernel_is_why(tmp_path, monkeypatch, capsys,
                                                                                     device):
    _perturb_full_attention(monkeypatch)
    argv = ["check", "tiny", "--device", str(device), "--scenario", "one-shot-prefill"]
    assert cli.main(argv + ["--out", str(tmp_path / "kernels")]) == 1
    assert "layers.4.o" in capsys.readouterr().out
    # The kernels' torch twins hold parity: the bug is in a kernel (here, the patched attention).
    assert cli.main(argv + ["--ops", "eager", "--out", str(tmp_path / "eager")]) == 0
    facts = json.loads((tmp_path / "eager" / "report.json").read_text())
    assert facts["verdict"] == "parity" and facts["title"].endswith(", eager ops (no Triton)")


def test_cli_refuses_kernels_on_a_cpu_where_triton_compiles_for_a_gpu(tmp_path, monkeypatch, capsys):
    """There a kernel refuses CPU tensors mid-run, with a traceback: each command says so before any
    work, and what to do instead."""
    import torch

    monkeypatch.setattr(optimized.kernels, "kernels_run_on", lambda device: device.type != "cpu")
    monkeypatch.setattr(optimized.kernels, "default_device", lambda: torch.device("cuda"))
    one = ["--device", "cpu", "--scenario", "one-shot-prefill"]
    cases = [(["check", "tiny"] + one, ["runs the kernels on cpu", "--device cuda, --ops eager or TRITON_INTERPRET=1"]),
             (["check", "tiny", "--ops", "eager", "--kernels"] + one, ["--kernels runs the kernel testbed on cpu",
                                                                      "no --kernels"]),
             (["capture", "--path", "optimized", "--out", str(tmp_path / "c")] + one,
              ["runs the kernels on cpu", "--device cuda, --ops eager or TRITON_INTERPRET=1"]),
             (["kernels", "--device", "cpu"], ["the testbed runs the kernels on cpu"]),
             (["check", "--inject", "missing-softcap", "--ops", "eager", "--device", "cpu"],
              ["--inject: faults break the kernels' path"])]
    for argv, wanted in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in wanted), (argv, err)
    assert not (tmp_path / "c").exists()


def test_cli_bad_input_exits_two(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"requests": [{"length": -1}]}))
    assert cli.main(["check", "tiny", "--scenario", str(bad)]) == 2
    assert "requests[0].length" in capsys.readouterr().err
    assert cli.main(["check", "no-such-model"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 2


def test_cli_capture_and_diff(tmp_path, capsys, device):
    sc = builtin("tiny", device=str(device))[0]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(sc.to_dict()))
    for side in ("truth", "reference", "optimized"):
        assert cli.main(["capture", "--scenario", str(path), "--path", side, "--out", str(tmp_path / side)]) == 0
    ref, opt = str(tmp_path / "reference"), str(tmp_path / "optimized")
    code = cli.main(["diff", ref, opt, "--truth", str(tmp_path / "truth"), "--out", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "report.json").read_text())["verdict"] == "parity"
    # Without a truth the budgets are the float32 floor alone (1e-5 relative), which the optimized
    # path's reordered attention sums stay within on this scenario.
    assert cli.main(["diff", ref, opt]) == 0
    assert cli.main(["capture", "--scenario", str(path), "--path", "optimized", "--out", opt]) == 2  # exists
    # An optimized capture records its op set, and diff names it: the kernels against their twins.
    eager = str(tmp_path / "eager")
    assert cli.main(["capture", "--scenario", str(path), "--path", "optimized", "--ops", "eager", "--out", eager]) == 0
    assert (load_capture(eager).metadata["ops"], load_capture(opt).metadata["ops"]) == ("eager", "kernels")
    assert "ops" not in load_capture(ref).metadata
    capsys.readouterr()
    assert cli.main(["diff", opt, eager, "--truth", str(tmp_path / "truth"), "--out", str(tmp_path / "e")]) == 0
    assert "optimized op sets: baseline kernels, candidate eager" in capsys.readouterr().err
    title = json.loads((tmp_path / "e" / "report.json").read_text())["title"]
    assert title.endswith(", candidate on eager ops (no Triton)"), title
    manifest = json.loads((tmp_path / "eager" / "manifest.json").read_text())
    manifest["metadata"]["ops"] = "fast"
    (tmp_path / "eager" / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["diff", opt, eager]) == 2
    assert "metadata.ops: 'fast' is not an op set (kernels, eager)" in capsys.readouterr().err


def test_cli_kernels_table_and_exit_codes(tmp_path, monkeypatch, capsys, device):
    out = tmp_path / "k" / "kernels.json"  # --out names a directory, as check's does
    # The small sizes on every device (a GPU's default is e2b's): the table row below names them.
    kernels = ["kernels", "--device", str(device), "--size", "small", "--dtype", "float32", "--repeats", "1",
               "--out", str(out.parent)]
    assert cli.main(kernels) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["name"] for r in rows} >= {"rms_norm", "qkv_norm", "rope_and_store_kv", "decode_attention (full)"}
    assert all(r["passed"] for r in rows)
    # A kernel that drifts by a few ULPs is caught and fails the command.
    from optimized.kernels import norms

    real = norms.rms_norm
    monkeypatch.setattr(norms, "rms_norm", lambda x, w, eps: real(x, w, eps) * (1 + 2e-6))
    assert cli.main(kernels) == 1
    assert "| rms_norm | [24, 64] | float32 |" in capsys.readouterr().out
    assert not next(r for r in json.loads(out.read_text())["results"] if r["name"] == "rms_norm")["passed"]


def test_cli_check_puts_the_kernel_table_in_the_report(tmp_path, monkeypatch, device):
    out = tmp_path / "r"
    args = ["check", "tiny", "--device", str(device), "--scenario", "one-shot-prefill", "--kernels", "--out", str(out)]
    assert cli.main(args) == 0
    facts = json.loads((out / "report.json").read_text())
    assert {"rms_norm", "experts", "decode_attention (full)"} <= {k["name"] for k in facts["kernels"]}
    assert 'id="kernels"' in (out / "report.html").read_text()
    # The scenario runs the fused path's own import of the kernel; the testbed calls it through
    # the module, so a drifting kernel fails the testbed alone and still fails the check.
    from optimized.kernels import norms

    real = norms.rms_norm
    monkeypatch.setattr(norms, "rms_norm", lambda x, w, eps: real(x, w, eps) * (1 + 2e-6))
    assert cli.main(args) == 1
    facts = json.loads((out / "report.json").read_text())
    assert facts["verdict"] == "divergence" and "rms_norm" in facts["summary"]


# -- the CLI's own logic, without model work (run_scenario and report_facts stand in) ---------


def _capture_of(sc):
    import torch

    from oracle.capture import CaptureBuilder, capture_metadata
    from reference import PRESETS

    builder = CaptureBuilder(capture_metadata(PRESETS["tiny"], path="reference", dtype=torch.float32,
                                              scenario=sc.to_dict()))
    builder.add("r0", "embed", torch.arange(3), torch.ones(3, PRESETS["tiny"].hidden_size))
    return builder.build()


@pytest.fixture
def ran(monkeypatch):
    """The scenarios check/capture ran, in order; report titles land in ran.titles."""
    from types import SimpleNamespace

    import oracle.run

    scenarios: list = []
    titles: list = []

    def run_scenario(sc, **_):
        scenarios.append(sc)
        capture = _capture_of(sc)
        return SimpleNamespace(scenario=sc, passed=True, truth=capture, ref=capture, cand=capture,
                               comparison=SimpleNamespace(first_divergence=None))

    def report_facts(runs, command, title, kernels=None):
        titles.append(title)
        return {"title": title, "verdict": "parity", "summary": "ok", "scenarios": [], "command": command,
                "environment": {"versions": {}, "device": "cpu", "dtype": "float32", "git": None, "host": ""}}

    monkeypatch.setattr(oracle.run, "run_scenario", run_scenario)
    monkeypatch.setattr(oracle.run, "report_facts", report_facts)
    monkeypatch.setattr(optimized.kernels, "kernels_run_on", lambda device: True)  # the fake runs run none
    monkeypatch.setattr(cli, "CPU_JOBS", 1)  # worker processes would not see the patches
    return SimpleNamespace(scenarios=scenarios, titles=titles)


def test_cli_flags_override_a_scenario_file_and_say_so(tmp_path, capsys, ran):
    path = tmp_path / "f.json"
    # Saved on a GPU box: run here with an explicit --device.
    path.write_text(json.dumps(builtin("tiny", device="cuda")[0].to_dict()))
    assert cli.main(["check", "tiny-moe", "--dtype", "bfloat16", "--seed", "3", "--device", "cpu",
                     "--scenario", str(path), "--out", str(tmp_path / "r")]) == 0
    m = ran.scenarios[-1].model
    assert (m.source, m.dtype, m.seed, m.device) == ("tiny-moe", "bfloat16", 3, "cpu")
    err = capsys.readouterr().err
    for line in ("model.source tiny -> tiny-moe (from MODEL)", "model.dtype float32 -> bfloat16 (from --dtype)",
                 "model.seed 0 -> 3 (from --seed)", "model.device cuda -> cpu (from --device)"):
        assert f"scenario {path}: {line}" in err
    assert ran.titles[-1] == "Gemma 4 parity: tiny-moe (bfloat16)"  # what ran, not what the flags default to
    # Without flags the file's model runs as it says (device auto keeps a file's cpu).
    path.write_text(json.dumps(builtin("tiny-kv-eq-v", dtype="float16", device="cpu", seed=2)[0].to_dict()))
    assert cli.main(["check", "--scenario", str(path), "--out", str(tmp_path / "r")]) == 0
    m = ran.scenarios[-1].model
    assert (m.source, m.dtype, m.seed, m.device) == ("tiny-kv-eq-v", "float16", 2, "cpu")
    assert "(from" not in capsys.readouterr().err
    assert ran.titles[-1] == "Gemma 4 parity: tiny-kv-eq-v (float16)"


def test_cli_inject_without_out_keeps_the_clean_report(tmp_path, monkeypatch, capsys, ran):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", "--scenario", "one-shot-prefill"]) == 0
    assert cli.main(["check", "--inject", "missing-softcap"]) == 0  # the fake runs find nothing
    reports = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert reports == ["check-tiny-float32", "check-tiny-float32-inject-missing-softcap"]


def test_cli_capture_and_diff_say_what_they_do(tmp_path, capsys, ran):
    out = tmp_path / "c"
    assert cli.main(["capture", "--scenario", "one-shot-prefill", "--path", "optimized", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "capture: running one-shot-prefill" in err and f"writing {out}" in err
    assert cli.main(["diff", str(out), str(out)]) in (0, 1)
    err = capsys.readouterr().err
    assert f"diff: loading the baseline capture {out}" in err and "diff: comparing 1 request" in err


def test_cli_help_documents_every_option_and_lists_scenarios(capsys):
    import argparse

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}: no --help text"
    assert cli.main(["scenarios"]) == 0
    listed = capsys.readouterr().out
    for sc in builtin():
        assert f"  {sc.name}  " in listed or f"  {sc.name} " in listed


def test_cli_a_kernel_valueerror_is_a_crash_not_bad_input(tmp_path, monkeypatch):
    # Exit 2 tells `git bisect run` and CI "bad input"; a ValueError raised from inside the paged
    # path is a bug, so it must surface as one (a traceback), not as exit 2.
    import oracle.run

    def broken(sc, **_):
        raise ValueError("head dim of q (16) and of the pools (32) differ")  # as a kernel's check would

    monkeypatch.setattr(oracle.run, "run_scenario", broken)
    with pytest.raises(ValueError, match="pools"):
        cli.main(["check", "--scenario", "one-shot-prefill", "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="pools"):
        cli.main(["capture", "--scenario", "one-shot-prefill", "--path", "truth", "--out", str(tmp_path / "c")])


def test_check_runs_scenarios_in_worker_processes_in_order_and_faults_reach_them(tmp_path, capsys, device):
    """--jobs 2: each scenario in a spawned process; results come back in scenario order, and an
    injected fault is patched in the worker that runs the optimized path."""
    argv = ["check", "tiny", "--device", str(device), "--jobs", "2", "--scenario", "one-shot-prefill",
            "--scenario", "decode-past-window", "--inject", "missing-softcap", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "2 at a time" in err and "logits" in out
    facts = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in facts["scenarios"]] == ["one-shot-prefill", "decode-past-window"]
    assert not any(s["passed"] for s in facts["scenarios"])
