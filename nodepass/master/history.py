"""Each instance's traffic over time: its counters sampled every REPORT_INTERVAL, the
last hour (at the default interval) kept as rates per interval."""

from __future__ import annotations

from collections import deque
from typing import Any

from nodepass.master.instances import COUNTERS, Instance, iso

HISTORY_SAMPLES = 720  # one hour at the default REPORT_INTERVAL of 5 s


class TrafficHistory:
    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._samples: dict[str, deque[dict[str, Any]]] = {}
        self._last: dict[str, tuple[float, dict[str, int]]] = {}

    def sample(self, instance: Instance, now: float, current: dict[str, int]
               ) -> dict[str, Any] | None:
        """Take one sample (-> it; None for the first, which only starts the count)."""
        previous = self._last.get(instance.id)
        self._last[instance.id] = (now, current)
        if previous is None or now <= previous[0]:
            return None
        elapsed = now - previous[0]
        sample: dict[str, Any] = {"time": iso(now), "timestamp": round(now, 3)}
        for name in COUNTERS:
            sample[f"{name}_rate"] = round(max(0, current[name] - previous[1][name]) / elapsed,
                                           1)
        running = instance.running
        sample["connections"] = int(instance.report.get("connections") or 0) if running else 0
        sample["ping"] = instance.report.get("ping_ms") if running else None
        self._samples.setdefault(instance.id, deque(maxlen=HISTORY_SAMPLES)).append(sample)
        return sample

    def restart_from_here(self, instance: Instance) -> None:
        """Its counters moved by other than traffic (a reset): the next rate starts anew."""
        self._last.pop(instance.id, None)

    def forget(self, instance: Instance) -> None:
        self._samples.pop(instance.id, None)
        self._last.pop(instance.id, None)

    def window(self, instance: Instance, seconds: float) -> list[dict[str, Any]]:
        since = self.clock.seconds() - seconds
        return [s for s in self._samples.get(instance.id, ()) if s["timestamp"] >= since]
