"""Stop strings on streamed text.

A stop string can arrive split over tokens ("\n" then "\n", or half a word each), so matching
works on the detokenized text, not on token ids. Text that could still turn out to be the start
of a stop string is held back until the next piece says it is not; a stop string itself is never
emitted, nor anything after it. Streaming and whole answers share this, so both give the same text.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""  # text not yet emitted: a suffix that is a proper prefix of some stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of `text` (after what was held back) that is safe to emit now. Once a stop
        string is found, `stopped` is set and everything from it on is dropped."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end: what was held back is text after all."""
        rest, self.held = ("" if self.stopped else self.held), ""
        return rest

    def _partial(self, buf: str) -> int:
        """The length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
