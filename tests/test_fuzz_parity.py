"""Property-generated scenarios must hold parity: no false alarm on a clean optimized path.

Each example runs a whole scenario through both paths (seconds under Triton's interpreter), so CI
draws a few; `HYPOTHESIS_PROFILE=thorough` (or bench/calibrate_tolerance.py) draws many. A failing
scenario shrinks to a minimal one and is saved under reports/failing-scenarios/ to replay with
`gemma4-testbed check --scenario FILE`.
"""

from __future__ import annotations

import json

from hypothesis import given, settings

from oracle.run import run_scenario
from oracle.scenario import load
from oracle.strategies import save_failing, scenarios
from oracle.testing import scenario


@settings(max_examples=4)
@given(sc=scenarios())
def test_generated_scenarios_hold_parity(sc):
    run = run_scenario(sc)
    if not run.passed:
        path = save_failing(sc)
        raise AssertionError(f"{run.comparison.summary()}\nreplay: gemma4-testbed check --scenario {path}")


def test_saved_scenarios_replay_exactly(tmp_path):
    original = scenario("tiny", lengths=[5, 3], new_tokens=1, page_size=2, chunk_size=2)
    path = save_failing(original, tmp_path)
    assert load(path) == original
    first = run_scenario(load(path))
    second = run_scenario(load(path))
    assert json.dumps(first.comparison.to_dict()) == json.dumps(second.comparison.to_dict())
    assert first.layout == second.layout
