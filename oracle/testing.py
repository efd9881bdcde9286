"""Differential tests in a few lines, for kernel developers:

    from oracle.testing import assert_parity, scenario

    def test_my_kernel_under_chunked_prefill():
        assert_parity(scenario("tiny", lengths=[13, 6], new_tokens=2, page_size=4, chunk_size=3))

A failing assertion names the first divergent layer and tensor, where in the sequence it sits,
and the values there. Pass `runner_factory` to judge a modified optimized path.
"""

from __future__ import annotations

from pathlib import Path

from optimized.kernels import default_device

from .run import ScenarioRun, run_scenario
from .scenario import Scenario, from_dict, load


class ParityError(AssertionError):
    def __init__(self, run: ScenarioRun):
        self.run = run
        super().__init__(f"scenario {run.scenario.name!r}: {run.comparison.summary()}")


def scenario(model: str = "tiny", *, lengths=(12,), new_tokens: int = 2, page_size: int = 4,
             chunk_size: int = 5, page_order_seed: int | None = 0, dtype: str = "float32",
             device: str | None = None, seed: int = 0, name: str = "test") -> Scenario:
    """A scenario of independent random prompts of the given lengths, on `device` (by default the
    machine's, `default_device()`: a GPU where there is one, where the kernels run compiled)."""
    if device is None:
        device = str(default_device())
    return from_dict({
        "name": name,
        "model": {"source": model, "seed": seed, "dtype": dtype, "device": device},
        "engine": {"page_size": page_size, "chunk_size": chunk_size, "page_order_seed": page_order_seed},
        "requests": [{"id": f"r{i}", "length": n, "seed": seed + i, "new_tokens": new_tokens}
                     for i, n in enumerate(lengths)],
    })


def assert_parity(s: Scenario | dict | str | Path, *, device: str | None = None, **run_kwargs) -> ScenarioRun:
    """Run the scenario on both paths; raise ParityError (an AssertionError) unless every tap is
    within its noise budget. Returns the run for further checks. `device` runs it there instead of
    on the scenario's own device, e.g. `str(default_device())` to replay on this machine a scenario
    file saved on another (a failing scenario saved by a CPU-only CI run says "cpu")."""
    if isinstance(s, dict):
        s = from_dict(s)
    elif isinstance(s, (str, Path)):
        s = load(s)
    if device is not None:
        s = s.with_model(device=str(device))
    run = run_scenario(s, **run_kwargs)
    if not run.passed:
        raise ParityError(run)
    return run
