"""Test-only fault injection: ``EVENTCAST_FAULT=POINT:N`` makes the worker SIGKILL itself the
``N``-th time a batch reaches ``POINT``. Points, in batch order:

- ``after_publish``: forecasts and dead-letter records acknowledged (or, with exactly-once, sent
  in the open transaction), windows not yet written to Redis, offsets not committed;
- ``after_window_write``: windows and applied offset written to Redis, offsets not committed;
- ``before_commit``: immediately before the offset commit (or the transaction commit);
- ``stall_infer``: not a kill: the inference stage hangs for good after the model answered on
  the ``N``-th batch (a stuck stage, for the liveness watchdog's test);
- ``slow_infer``: not a kill either: every batch's inference stage takes ``N`` ms longer (a slow
  model), so that under steady load a batch is always in flight (the rebalance tests: a
  rebalance must find work in flight, not a pipeline that happens to be idle).

Never set it in production: it exists so the fault tests can kill the worker at exact points.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from stream.settings import Fault

log = logging.getLogger(__name__)


class FaultInjector:
    """Counts visits per point; kills the process at the configured one."""

    def __init__(self, fault: Fault | None) -> None:
        self.fault = fault
        self._visits = 0

    def _reached(self, point: str) -> bool:
        if self.fault is None or point != self.fault.point:
            return False
        self._visits += 1
        return self._visits == self.fault.n

    def hit(self, point: str) -> None:
        if self._reached(point):
            log.warning("fault injection: SIGKILL at %s (batch %d)", point, self._visits)
            os.kill(os.getpid(), signal.SIGKILL)

    async def stall(self, stage: str, until: asyncio.Event) -> None:
        """Hang until ``until`` is set (the worker is asked to stop) when ``stall_<stage>`` is
        the configured point and reached."""
        if self._reached(f"stall_{stage}"):
            log.warning("fault injection: %s stage stalled (batch %d)", stage, self._visits)
            await until.wait()

    async def slow(self, stage: str) -> None:
        """Take ``n`` ms longer when ``slow_<stage>`` is the configured point (every batch)."""
        if self.fault is not None and self.fault.point == f"slow_{stage}":
            await asyncio.sleep(self.fault.n / 1000)
