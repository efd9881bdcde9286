"""Hypothesis strategies that generate scenarios: page sizes, shuffled page orders, chunk splits
(explicit, 1-token, non-page-aligned), several requests with arrivals, decode past the window and
shared prefixes. A failing scenario shrinks to a minimal one; `save_failing` keeps it as JSON so it
replays exactly (`gemma4-testbed check --scenario FILE`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hypothesis import strategies as st

from optimized.kernels import default_device

from .scenario import Scenario, from_dict

FAILING_DIR = Path("reports") / "failing-scenarios"


@st.composite
def _request(draw, index: int, earlier: list[dict]) -> dict:
    req: dict = {"id": f"r{index}", "length": draw(st.integers(1, 14)), "seed": draw(st.integers(0, 999)),
                 "new_tokens": draw(st.integers(0, 6)), "arrival": draw(st.integers(0, 3))}
    if earlier and draw(st.booleans()):
        donor = draw(st.sampled_from(earlier))
        req["prefix_from"] = {"request": donor["id"], "length": draw(st.integers(1, _prompt_len(donor)))}
    total = _prompt_len(req)
    if draw(st.booleans()):  # explicit chunk splits, any lengths (1-token chunks included)
        chunks, left = [], total
        while left:
            c = draw(st.integers(1, left))
            chunks.append(c)
            left -= c
        req["chunks"] = chunks
    return req


def _prompt_len(req: dict) -> int:
    return req["length"] + (req["prefix_from"]["length"] if "prefix_from" in req else 0)


@st.composite
def scenarios(draw, models=("tiny", "tiny-kv-eq-v", "tiny-moe"), dtype: str = "float32",
              device: str | None = None, max_requests: int = 3) -> Scenario:
    """Scenarios on `device`; by default the machine's (`default_device()`: cuda where a GPU
    exists, so generated scenarios run the compiled kernels there)."""
    if device is None:
        device = str(default_device())
    requests: list[dict] = []
    for i in range(draw(st.integers(1, max_requests))):
        requests.append(draw(_request(i, list(requests))))
    raw = {
        "name": "fuzzed",
        "model": {"source": draw(st.sampled_from(models)), "seed": draw(st.integers(0, 3)),
                  "dtype": dtype, "device": device},
        "engine": {"page_size": draw(st.sampled_from([1, 2, 3, 4, 16])), "chunk_size": draw(st.integers(1, 8)),
                   "page_order_seed": draw(st.none() | st.integers(0, 99))},
        "requests": requests,
    }
    return from_dict(raw)


def save_failing(scenario: Scenario, directory: Path = FAILING_DIR) -> Path:
    """Write a failing scenario where it can be replayed; the name is its content hash."""
    text = json.dumps(scenario.to_dict(), indent=2, sort_keys=True) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    path.write_text(text)
    return path
