"""Property-generated scenarios must hold parity: no false alarm on a clean optimized path.

Each example runs a whole scenario through both paths (seconds under Triton's interpreter), so CI
draws a fifth of the profile's count (4); `HYPOTHESIS_PROFILE=thorough` (or
bench/calibrate_tolerance.py) draws many. Scenarios run on the machine's device (`scenarios()`
and `scenario()` default to `default_device()`; the tests pass it explicitly). A failing
scenario shrinks to a minimal one and is saved under reports/failing-scenarios/ to replay with
`gemma4-testbed check --scenario FILE`.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from optimized.kernels import default_device
from oracle.run import run_scenario
from oracle.scenario import load
from oracle.strategies import save_failing, scenarios
from oracle.testing import assert_parity, scenario

DEVICE = str(default_device())  # the machine's (conftest's `device`), at import for the strategy


@pytest.mark.slow  # a property sweep (README: the second test command)
@settings(max_examples=max(1, settings.default.max_examples // 5))
@given(sc=scenarios(device=DEVICE))
def test_generated_scenarios_hold_parity(sc):
    run = run_scenario(sc)
    if not run.passed:
        path = save_failing(sc)
        raise AssertionError(f"{run.comparison.summary()}\nreplay: gemma4-testbed check --scenario {path}")


def test_saved_scenarios_replay_exactly(tmp_path, device):
    # Saved as a CPU-only CI run saves it ("device": "cpu"), replayed on this machine's device.
    original = scenario("tiny", lengths=[5, 3], new_tokens=1, page_size=2, chunk_size=2, device="cpu")
    path = save_failing(original, tmp_path)
    assert load(path) == original
    first = assert_parity(path, device=str(device))
    second = run_scenario(load(path).with_model(device=str(device)))
    assert first.scenario.model.device == str(device)
    assert json.dumps(first.comparison.to_dict()) == json.dumps(second.comparison.to_dict())
    assert first.layout == second.layout
