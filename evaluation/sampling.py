"""One background sampler for every memory / utilisation trace of the project."""

from __future__ import annotations

import math
import sys
import threading
import time


class PeriodicSampler:
    """Calls ``read()`` every ``interval_s`` seconds in a daemon thread and keeps what it returns.

    The schedule is fixed from ``start_monotonic`` (default: when started) and the first reading
    is taken at once. When the machine is too busy to keep the schedule, missed slots are skipped,
    never caught up in a burst: the readings' own timestamps tell the truth. A reading that raises
    is skipped and reported once on stderr, so one bad reading never ends a trace.
    """

    def __init__(self, read, interval_s: float, start_monotonic: float | None = None,
                 name: str = "sampler"):
        self.read, self.interval_s = read, interval_s
        self.start_monotonic = start_monotonic
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        if self.start_monotonic is None:
            self.start_monotonic = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list:
        """Stop sampling and return the samples."""
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self):
        slot, warned = 0, False
        while True:
            try:
                self.samples.append(self.read())
            except Exception as error:
                if not warned:
                    print(f"{self._thread.name}: a sample failed and was skipped ({error!r})",
                          file=sys.stderr)
                    warned = True
            elapsed = time.monotonic() - self.start_monotonic
            slot = max(slot + 1, math.floor(elapsed / self.interval_s) + 1)
            if self._stop.wait(max(0.0, slot * self.interval_s - elapsed)):
                return
