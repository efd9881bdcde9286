"""Serving under tensor parallelism: one server on rank 0, every rank's engine in lockstep.

Each rank holds a shard of the model (optimized/parallel.py), and a step is a collective: every
rank must run the same step on the same batch. Rank 0's server drives a LeadEngine; each call
that changes engine state (add_request, abort) is recorded, and before each step the record goes
to the other ranks with one broadcast, where `follow` replays it on their own engine and steps
too. Replaying the same calls in the same order gives every rank the same request ids, schedule
and seeds (a request without a seed draws one from the engine's own seeded generator), and the
all-reduce gives every rank the same logits, so every rank samples the same tokens.

While the server is idle its engine thread waits for requests; the lead sends an empty record
every few seconds (`heartbeat`) so the other ranks' broadcast never hits the process group's
timeout. `close` ends the followers, which should ignore SIGINT/SIGTERM (torchrun forwards them
to every rank; `gemma4-testbed serve --tp` does) and end when rank 0 says so, after its graceful
shutdown.
"""

from __future__ import annotations

STEP, IDLE, STOP = "step", "idle", "stop"


class LeadEngine:
    """Rank 0's engine as the server's worker sees it: the engine, with its state changes sent to
    the other ranks. Everything else (config, max_context, stats, cache, has_work) is the
    engine's own."""

    def __init__(self, engine, tp):
        self.engine, self.tp = engine, tp
        self._calls: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, params=None, **kw):
        rid = self.engine.add_request(prompt, params, **kw)  # bad input raises here, and is not sent
        self._calls.append(("add_request", (prompt, params), kw))
        return rid

    def abort(self, rid) -> None:
        self.engine.abort(rid)
        self._calls.append(("abort", (rid,), {}))

    def step(self):
        self._send(STEP)
        return self.engine.step()

    def heartbeat(self) -> None:
        self._send(IDLE)

    def close(self) -> None:
        self._send(STOP)

    def _send(self, then: str) -> None:
        calls, self._calls = self._calls, []
        self.tp.broadcast_object((calls, then))


def follow(engine, tp) -> None:
    """A rank other than 0: replay rank 0's calls on this rank's engine, step when it steps, and
    return when it closes."""
    while True:
        calls, then = tp.broadcast_object(None)
        for name, args, kw in calls:
            getattr(engine, name)(*args, **kw)
        if then == STEP:
            engine.step()
        elif then == STOP:
            return
