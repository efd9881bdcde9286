"""The engine thread: the one thread that touches the Engine (it is not thread-safe).

The HTTP handlers are coroutines on the server's event loop; they talk to this thread through queues
only. A handler `submit`s its requests (one per choice: n > 1 and batched prompts make several) and
awaits their shared mailbox: per ticket, first ("accepted", rid) or ("rejected", message), then
Events until one is finished, each tagged with the ticket's index. A handler whose client went away
(or that matched a stop string) calls `abort`. The
loop drains its inbox before every step, so a new request joins the running batch at the next step
(continuous batching); with nothing to do it blocks on the inbox instead of spinning.

If the engine raises, the thread records the error, tells every waiting ticket, and stops; later
submissions fail at once with that error (the server answers 503). Engine state after an
unexpected exception is unknown, so it is not touched again.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback

from optimized.engine import SamplingParams

from .metrics import Metrics


class EngineDead(RuntimeError):
    """The engine thread is not running (it failed, or the server is shutting down)."""


class Ticket:
    """One engine request. Its messages go, tagged (index, msg), to `box`: a mailbox it may
    share with the other choices of one HTTP request. The engine thread puts, a handler awaits."""

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 box: asyncio.Queue | None = None, index: int = 0):
        self.prompt, self.params, self.index = prompt, params, index
        self.rid: int | None = None
        self._loop = loop
        self.box: asyncio.Queue = box if box is not None else asyncio.Queue()  # touched on the loop only

    def put(self, msg) -> None:
        """Engine thread: hand msg to the loop (asyncio.Queue is not thread-safe)."""
        try:
            self._loop.call_soon_threadsafe(self.box.put_nowait, (self.index, msg))
        except RuntimeError:  # the loop has closed: nobody is left to read it
            pass


_STOP = object()
IDLE_S = 5.0  # an idle engine thread wakes this often (serve --tp: a heartbeat to the other ranks)


class EngineWorker:
    def __init__(self, engine, name: str = "engine", metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.error: str | None = None  # why the thread died, once it has
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[int, Ticket] = {}  # rid -> ticket, engine thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- handler side ----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    def submit(self, prompt: list[int], params: SamplingParams) -> Ticket:
        """Called on the event loop, whose tickets it makes."""
        return self.submit_many([(prompt, params)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Ticket]:
        """Several requests sharing one mailbox; ticket i tags its messages with i."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is shutting down")
        loop, box = asyncio.get_running_loop(), asyncio.Queue()
        tickets = [Ticket(prompt, params, loop, box, i) for i, (prompt, params) in enumerate(requests)]
        for t in tickets:
            self._inbox.put(("add", t))
        return tickets

    async def next(self, ticket: Ticket, timeout: float) -> tuple | None:
        """The next (index, message) in the ticket's mailbox, None after `timeout` seconds; (None,
        ("dead", why)) once the thread has ended (also for a submission that raced with its end)."""
        try:
            return await asyncio.wait_for(ticket.box.get(), timeout)
        except asyncio.TimeoutError:
            pass
        if not self._thread.is_alive():
            await asyncio.sleep(0)  # let a last call_soon_threadsafe delivery land
            return ticket.box.get_nowait() if not ticket.box.empty() else (
                None, ("dead", self.error or "the engine is shutting down"))
        return None

    def abort(self, ticket: Ticket) -> None:
        """Drop the request if it is still running; harmless if it finished or was rejected."""
        if self._thread.is_alive():
            self._inbox.put(("abort", ticket))

    def call(self, fn, timeout: float = 60.0):
        """Run fn(engine) on the engine thread and return its result (for inspection: the engine
        must not be read from another thread while it steps)."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is shutting down")
        reply: queue.Queue = queue.Queue()
        self._inbox.put(("call", (fn, reply)))
        ok, value = reply.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current step, fail every waiting request, and end the thread."""
        self._stopping = True
        self._inbox.put((_STOP, None))
        self._thread.join(timeout)

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        why = "the engine is shutting down"
        try:
            while True:
                if self.engine.has_work():
                    msg = None
                else:  # idle: wait for a request, telling a replicated engine now and then
                    try:
                        msg = self._inbox.get(timeout=IDLE_S)
                    except queue.Empty:
                        self._idle()
                        continue
                if not self._handle(msg):
                    return
                while True:  # drain whatever else arrived, without blocking
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(msg):
                        return
                if self.engine.has_work():
                    start = time.perf_counter()
                    events = self.engine.step()
                    self.metrics.step(time.perf_counter() - start, len(events),
                                      [e.finish_reason for e in events if e.finished], self._gauges())
                    for event in events:
                        ticket = self._live.get(event.rid)
                        if ticket is None:
                            continue
                        ticket.put(("event", event))
                        if event.finished:
                            del self._live[event.rid]
        except BaseException as e:  # noqa: BLE001 (recorded and reported to every client)
            why = f"engine failed: {type(e).__name__}: {e}"
            self.error = why
            traceback.print_exc()
        finally:
            self._fail_everyone(why)
            close = getattr(self.engine, "close", None)  # a LeadEngine ends the other ranks
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 (the ranks' group is gone: nothing left to end)
                    traceback.print_exc()

    def _idle(self) -> None:
        heartbeat = getattr(self.engine, "heartbeat", None)  # a LeadEngine keeps the other ranks waiting
        if heartbeat is not None:
            heartbeat()

    def gauges(self) -> dict:
        """Fresh gauges, read on the engine thread (after the step in progress)."""
        return self.call(lambda engine: self._gauges(), timeout=10)

    def _gauges(self) -> dict:
        """Queue and pool occupancy for /metrics (engines without stats(), test doubles, report none)."""
        stats = getattr(self.engine, "stats", None)
        cache = getattr(self.engine, "cache", None)
        if stats is None or cache is None:
            return {}
        s = stats()
        total = cache.full.num_pages - 1  # page 0 is the pool's padding page
        return {"requests_waiting": s["waiting"], "requests_running": s["running"],
                "kv_pages_in_use": total - s["free_pages"], "kv_pages_total": total}

    def _handle(self, msg) -> bool:
        """Apply one inbox message; False means stop."""
        if msg is None:
            return True
        kind, arg = msg
        if kind is _STOP:
            return False
        if kind == "add":
            try:
                arg.rid = self.engine.add_request(arg.prompt, arg.params)
            except ValueError as e:  # bad input: the engine is unchanged, the client gets a 400
                arg.put(("rejected", str(e)))
                return True
            self._live[arg.rid] = arg
            self.metrics.admitted(len(arg.prompt))
            arg.put(("accepted", arg.rid))
        elif kind == "abort":
            if arg.rid is not None and self._live.pop(arg.rid, None) is not None:
                self.engine.abort(arg.rid)
        elif kind == "call":
            fn, reply = arg
            try:
                reply.put((True, fn(self.engine)))
            except Exception as e:  # noqa: BLE001 (handed back to the caller)
                reply.put((False, e))
        return True

    def _fail_everyone(self, why: str) -> None:
        for ticket in self._live.values():
            ticket.put(("dead", why))
        self._live.clear()
        while True:  # submissions that raced with the end
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                arg.put(("dead", why))
            elif kind == "call":
                arg[1].put((False, EngineDead(why)))
