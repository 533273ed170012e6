"""One backoff for everything that tries again: the client's reconnects to its server
and the master's restarts of an instance that keeps failing."""

from __future__ import annotations

import random
from collections.abc import Callable

CAP_FACTOR = 12  # the delay stops growing at 12 cooldowns (60 s at the default 5 s)


def backoff(cooldown: float, jitter: float = 0.0,
            rand: Callable[[], float] = random.random) -> Callable[[int], float]:
    """The delay before attempt ``n`` (n >= 1): ``cooldown``, doubling while attempts
    keep failing, capped at CAP_FACTOR cooldowns, plus up to ``jitter`` of itself at
    random (so a fleet of clients does not stampede a restarted server)."""
    cap = cooldown * CAP_FACTOR

    def delay(attempt: int) -> float:
        base = min(cooldown * 2 ** min(max(attempt, 1) - 1, 30), cap)
        return base + base * jitter * rand() if jitter else base

    return delay
