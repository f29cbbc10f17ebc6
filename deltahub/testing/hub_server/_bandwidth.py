"""A bandwidth limit for the server: one token bucket that every response body of every connection drains.

Why: on loopback a download costs disk + CPU, not transfer time, so "a delta downloads fewer bytes"
never shows in a wall-clock comparison. With ``--bandwidth MBPS`` the server behaves like one shared
link of that rate (concurrent connections split it, as on a real link), so pull-vs-download timings
measured here carry over to a real network of that speed.
"""

from __future__ import annotations

import math
import threading
import time

#: Bytes written per bucket reservation: ~5 ms of the link, within [16 KiB, 1 MiB].
_MIN_PIECE, _MAX_PIECE, _PIECE_SECONDS = 16 * 1024, 1024 * 1024, 0.005


class TokenBucket:
    """A link of ``rate`` bytes per second shared by all threads, with a burst of one write piece.

    :meth:`take` reserves its bytes before sleeping (the balance may go negative), so waiting
    writers are served in arrival order and the bytes through the bucket by time ``t`` never
    exceed ``burst + rate * t``.
    """

    def __init__(self, rate: float) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"bandwidth must be a positive number of bytes per second, got {rate!r}")
        self.rate = float(rate)
        self.piece = int(min(_MAX_PIECE, max(_MIN_PIECE, rate * _PIECE_SECONDS)))
        self.burst = self.piece
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until ``n`` more bytes may go out on the link."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            wait = -self._tokens / self.rate
        if wait > 0:
            time.sleep(wait)
