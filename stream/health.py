"""What the worker's ``/readyz`` and ``/healthz`` report: deliberate pauses and a progress watchdog.

Two different questions, asked by an orchestrator for two different actions:

- **ready** (``/readyz``, 503 → take the worker out of rotation): the model is loaded, the worker
  is in its group, and it is not *deliberately paused*. It pauses fetching on purpose while Redis
  is unreachable or out of memory, or while the broker does not acknowledge what it publishes;
  it resumes by itself. :class:`Pauses` holds those reasons.
- **alive** (``/healthz``, 503 → restart the process): the pipeline makes progress. A worker that
  has records waiting (a batch in flight, or partitions whose end is beyond what it fetched) and
  whose stages have not finished anything for ``--liveness-timeout`` is stuck, unless it is
  deliberately paused: restarting it would not bring Redis or the broker back.
  :class:`Watchdog` is the clock the stages wind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

PAUSE_REASONS = ("redis", "redis_oom", "kafka")


class Pauses:
    """The reasons fetching is paused on purpose. ``on_change(True)`` runs when the first reason
    is taken (pause the consumer), ``on_change(False)`` when the last is released (resume).
    ``gauge`` (``eventcast_paused{reason}``) is 1 while a reason is held."""

    def __init__(self, gauge: Gauge, on_change: Callable[[bool], None]) -> None:
        self._gauge = gauge
        self._on_change = on_change
        self._held: set[str] = set()
        for reason in PAUSE_REASONS:
            gauge.labels(reason).set(0)

    def hold(self, reason: str) -> None:
        if reason in self._held:
            return
        self._held.add(reason)
        self._gauge.labels(reason).set(1)
        if len(self._held) == 1:
            self._on_change(True)

    def release(self, reason: str) -> None:
        if reason not in self._held:
            return
        self._held.discard(reason)
        self._gauge.labels(reason).set(0)
        if not self._held:
            self._on_change(False)

    def __bool__(self) -> bool:
        return bool(self._held)

    @property
    def reasons(self) -> list[str]:
        return sorted(self._held)


class Watchdog:
    """When a pipeline stage last finished something (:meth:`beat`), on the monotonic clock."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def idle_for(self) -> float:
        return self._clock() - self._last

    def expired(self) -> bool:
        return self.idle_for() > self.timeout
