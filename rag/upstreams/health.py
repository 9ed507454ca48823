"""One upstream's health: in service, or taken out until a /health probe succeeds.

         request or probe fails                     probe fails
    UP ------------------------------> DOWN -------------------------> DOWN
     ^  (probed every interval)         |   (next probe after backoff:    |
     |                                  |    base x 2^(failures-1), capped)|
     +---------- probe succeeds --------+<--------------------------------+

A failed request takes an upstream out at once (no waiting for the next probe), so the requests
after it go elsewhere; it rejoins at the first successful probe. The clock is injected so the
machine is tested without sleeping.

Ignores: HTTP (the pool runs the probes), routing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class HealthPolicy:
    check_interval_s: float = 2.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


class UpstreamHealth:
    """Up or down, when to probe next, and why it went down."""

    def __init__(
        self, policy: HealthPolicy, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._policy = policy
        self._clock = clock
        self.up = True
        self.num_failures = 0  # consecutive, since it was last up
        self.last_error: str | None = None
        self.next_check_at = clock()

    def check_due(self) -> bool:
        return self._clock() >= self.next_check_at

    def record_failure(self, error: str) -> None:
        """A request or a probe failed: out of service until a probe succeeds."""
        self.up = False
        self.num_failures += 1
        self.last_error = error
        backoff = self._policy.backoff_s * 2 ** (self.num_failures - 1)
        self.next_check_at = self._clock() + min(backoff, self._policy.backoff_max_s)

    def record_check(self, ok: bool, error: str | None = None) -> None:
        if not ok:
            self.record_failure(error or "health check failed")
            return
        self.up = True
        self.num_failures = 0
        self.next_check_at = self._clock() + self._policy.check_interval_s
