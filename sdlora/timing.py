"""Wall-clock time per phase of a run (load, cache, train, validation, save), for the end-of-run split."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict


class Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        parts = [f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in self.seconds.items()]
        return f"time: total {total:.1f}s; " + ", ".join(parts)
