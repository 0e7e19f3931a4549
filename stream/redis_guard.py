"""Redis calls of the worker under its retry policy, with deliberate pauses.

While Redis is unreachable, or refuses writes because it is out of memory (``OOM``), the worker
retries the same operation with backoff, pauses fetching (:class:`stream.health.Pauses`: not
ready, still alive) and commits nothing; it resumes by itself when the operation passes. It
gives up only when told to (the worker stops, or a rebalance must abandon the batch), raising
:class:`~stream.errors.RedisUnavailableError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import OutOfMemoryError

from stream.errors import RedisUnavailableError
from stream.health import Pauses
from stream.metrics import Metrics
from stream.retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")


class GuardedRedis:
    """Runs Redis operations under ``retry``; ``give_up()`` true ends the retrying."""

    def __init__(
        self,
        retry: RetryPolicy,
        metrics: Metrics,
        pauses: Pauses,
        give_up: Callable[[], bool],
    ) -> None:
        self.retry = retry
        self.metrics = metrics
        self.pauses = pauses
        self.give_up = give_up

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        return self.retry.errors

    async def call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Await ``op()`` until it succeeds (``what`` names it in logs). Raises
        RedisUnavailableError when told to give up first."""
        held: set[str] = set()

        def on_error(exc: BaseException, attempt: int) -> None:
            self.metrics.redis_errors.inc()
            oom = isinstance(exc, OutOfMemoryError)
            reason = "redis_oom" if oom else "redis"
            if oom:
                self.metrics.redis_oom.inc()
            if reason in held:
                return
            if oom:
                log.error(
                    "Redis is out of memory (OOM: maxmemory reached) during %s: pausing, "
                    "committing nothing until its writes pass again", what,
                )  # fmt: skip
            else:
                log.warning(
                    "Redis unavailable during %s (%s): pausing, committing nothing", what, exc
                )
            held.add(reason)
            self.pauses.hold(reason)

        try:
            return await self.retry.call(op, on_error=on_error, give_up=self.give_up)
        except self.retry.errors as exc:
            raise RedisUnavailableError(f"Redis unavailable during {what}: {exc}") from exc
        finally:
            if held:
                log.info("Redis is back after %s; resuming", what)
            for reason in held:
                self.pauses.release(reason)
