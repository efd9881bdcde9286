"""Prometheus metrics for /metrics, in the text exposition format (version 0.0.4), written here
rather than through prometheus_client: a few counters, gauges and histograms are all a server
needs, and the core install stays free of another package.

Updated from two threads (the engine thread counts steps and tokens, handlers time first
tokens), so every update takes one lock.
"""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    PREFIX = "gemma4_"

    def __init__(self):
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.ttft = Histogram(TTFT_BUCKETS)
        self.step_time = Histogram(STEP_BUCKETS)
        self.gauges = {"requests_waiting": 0, "requests_running": 0, "kv_pages_in_use": 0, "kv_pages_total": 0}

    def step(self, seconds: float, new_tokens: int, finished: list[str], gauges: dict) -> None:
        """The engine thread, after each step."""
        with self._lock:
            self.step_time.observe(seconds)
            self.generation_tokens += new_tokens
            for reason in finished:
                self.finished[reason] = self.finished.get(reason, 0) + 1
            self.gauges.update(gauges)

    def set_gauges(self, gauges: dict) -> None:
        with self._lock:
            self.gauges.update(gauges)

    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def render(self) -> str:
        p = self.PREFIX
        with self._lock:
            out = [f"# HELP {p}prompt_tokens_total Prompt tokens of admitted requests.",
                   f"# TYPE {p}prompt_tokens_total counter", f"{p}prompt_tokens_total {self.prompt_tokens}",
                   f"# HELP {p}generation_tokens_total Tokens generated (rate() of it is output tokens/s).",
                   f"# TYPE {p}generation_tokens_total counter",
                   f"{p}generation_tokens_total {self.generation_tokens}",
                   f"# HELP {p}requests_finished_total Requests the engine finished, by finish reason.",
                   f"# TYPE {p}requests_finished_total counter"]
            out += [f'{p}requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            helps = {"requests_waiting": "Requests queued for admission.",
                     "requests_running": "Requests admitted and not finished.",
                     "kv_pages_in_use": "Full-attention KV pages held by requests.",
                     "kv_pages_total": "Full-attention KV pages in the pool."}
            for name, value in self.gauges.items():
                out += [f"# HELP {p}{name} {helps[name]}", f"# TYPE {p}{name} gauge", f"{p}{name} {value}"]
            for name, hist, help_ in (("time_to_first_token_seconds", self.ttft,
                                       "Time from a request's arrival to its first token."),
                                      ("step_seconds", self.step_time, "Time of one engine step.")):
                out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram", *hist.lines(p + name)]
        return "\n".join(out) + "\n"
