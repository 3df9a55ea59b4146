"""Progress of a prep run: records/s and tokens/s.

On a terminal: one tqdm bar on stderr, refreshed at most twice a second. Otherwise (a log file, a Ray job's
output): one plain line every ``interval`` seconds at most, so logs stay short.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, desc: str = "prep", interval: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.desc = desc
        self.interval = interval
        self.records = self.tokens = 0
        self.t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, unit=" records", file=self.stream, mininterval=0.5, dynamic_ncols=True)

    def update(self, records: int, tokens: int) -> None:
        self.records += records
        self.tokens += tokens
        if not self.enabled:
            return
        rate_r, rate_t = self.rates()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate_t:,.0f} tokens/s", refresh=False)
            self._bar.update(records)
        elif time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            self._line(rate_r, rate_t)

    def rates(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return self.records / dt, self.tokens / dt

    def _line(self, rate_r: float, rate_t: float) -> None:
        print(f"{self.desc}: {self.records:,} records, {self.tokens:,} tokens ({rate_r:,.0f} records/s, "
              f"{rate_t:,.0f} tokens/s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
