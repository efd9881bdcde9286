"""Known bug classes (oracle/faults.py): the oracle catches each one at the tap it must first show
at, and an injection leaves nothing behind once its block ends."""

from __future__ import annotations

import json

import pytest

from oracle import cli
from oracle.faults import FAULTS, MOE_FAULTS, FaultScenarioError, UnknownFault, inject, inject_all
from oracle.run import run_scenario
from oracle.scenario import builtin

# Each distinct fault scenario, with the faults that use it.
SCENARIOS = {}
for _fault in FAULTS.values():
    SCENARIOS.setdefault(_fault.scenario_spec["name"], []).append(_fault)


def _patched(faults):
    """(owner, attr) -> the object there now, for every attribute the faults patch."""
    return {(p.owner, p.attr): vars(p.owner)[p.attr] for f in faults for p in f.patches}


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_is_caught_at_its_expected_tap(name, device):
    fault = FAULTS[name]
    run = run_scenario(fault.scenario(device=str(device)), faults=[name])
    first = run.comparison.first_divergence
    assert first is not None, f"{name} was not caught: {run.comparison.summary()}"
    assert first.tap == fault.expect, run.comparison.summary()


@pytest.mark.parametrize("scenario_name", list(SCENARIOS))
def test_after_injection_every_attribute_is_restored_and_the_scenario_holds_parity(scenario_name, device):
    faults = SCENARIOS[scenario_name]
    before = _patched(faults)
    with inject_all([f.name for f in faults]):
        during = _patched(faults)
        assert all(during[key] is not original for key, original in before.items())
    assert all(vars(owner)[attr] is original for (owner, attr), original in before.items())
    run = run_scenario(faults[0].scenario(device=str(device)))
    assert run.passed, run.comparison.summary()


def test_every_fault_restores_its_attributes_even_when_the_block_raises():
    for fault in FAULTS.values():
        before = _patched([fault])
        with pytest.raises(RuntimeError, match="boom"):
            with inject(fault.name):
                raise RuntimeError("boom")
        assert all(vars(owner)[attr] is original for (owner, attr), original in before.items())


def test_unknown_fault_names_fail_before_anything_is_patched(device):
    softcap = FAULTS["missing-softcap"]
    before = _patched([softcap])
    with pytest.raises(UnknownFault, match="known: doubled-key-length, "):
        with inject_all(["missing-softcap", "no-such-fault"]):
            pass
    assert all(vars(owner)[attr] is original for (owner, attr), original in before.items())
    with pytest.raises(UnknownFault):
        run_scenario(softcap.scenario(device=str(device)), faults=["no-such-fault"])


def test_a_fault_refuses_a_scenario_where_its_wrong_ids_would_leave_the_pool(device):
    # One-shot prefill over pages of 16 in a 2-page pool: slot ids read as page ids overflow it.
    with pytest.raises(FaultScenarioError, match="outside the pool"):
        run_scenario(builtin("tiny", device=str(device))[0], faults=["token-granular-page-table"])


def test_cli_check_inject_exits_one_and_names_the_expected_tap(tmp_path, capsys, device):
    fault = FAULTS["rope-restarts-per-chunk"]
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(fault.scenario(device=str(device)).to_dict()))
    code = cli.main(["check", "tiny", "--device", str(device), "--inject", fault.name, "--scenario", str(path),
                     "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"({fault.expect})" in out  # the divergence summary names the tap
    assert f"fault {fault.name}: first divergence {fault.expect}" in out and "(as expected)" in out
    facts = json.loads((tmp_path / "report" / "report.json").read_text())
    assert fault.name in facts["title"] and f"--inject {fault.name}" in facts["command"]


def test_cli_lists_faults_and_rejects_unknown_names(capsys):
    assert cli.main(["faults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [*FAULTS, *MOE_FAULTS]
    assert all(len(line.split()) > 1 for line in lines)  # each with its one-line description
    assert all(line.endswith("(check tiny-moe)") for line in lines[len(FAULTS):])  # the preset it needs
    assert cli.main(["faults", "window-one-short"]) == 0
    assert FAULTS["window-one-short"].expect in capsys.readouterr().out
    for argv in (["check", "tiny", "--inject", "no-such-fault"], ["faults", "no-such-fault"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "no-such-fault" in err and all(name in err for name in FAULTS)


def test_a_moe_fault_runs_on_its_own_preset_and_is_refused_on_a_model_without_experts(capsys, tmp_path):
    """`check --inject` of a MoE fault without MODEL runs it on tiny-moe (on `tiny` it would patch
    nothing and read "not caught"); with a model that has no experts it is refused before any work."""
    name = next(iter(MOE_FAULTS))
    assert cli.main(["check", "--inject", name, "--out", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert f"on {MOE_FAULTS[name].model}" in out and "(as expected)" in out
    assert cli.main(["check", "tiny", "--inject", name]) == 2
    err = capsys.readouterr().err
    assert name in err and "no experts" in err and "tiny-moe" in err
