"""Stop strings that cut the answer exactly, also when one spans two chunks (canvases).

Text that could be the start of a stop string is held back until the next chunk decides it.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` when a stop string appears (it is cut off)."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(i for i, _ in hits)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if s.startswith(buf[-k:]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
