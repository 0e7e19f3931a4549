"""Retry policy as an injected object (as redis-py's ``Retry``): exponential backoff with jitter
over a fixed set of transient errors. Callers say what to retry; the policy says how."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def _transient_redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rex

    # BusyLoadingError: Redis is loading its AOF after a restart; ReadOnlyError: a replica
    # being promoted; OutOfMemoryError: maxmemory reached (writes pass again once memory is
    # freed; the worker reports it as its own condition). All pass with time.
    # A Redis Cluster during a failover (--redis-cluster; MOVED and ASK the client follows by
    # itself): ClusterDownError (CLUSTERDOWN, MASTERDOWN: a slot's primary is gone and no
    # replica took over yet), TryAgainError (TRYAGAIN: a slot being resharded), ClusterError
    # (the client's redirections ran out) and RedisClusterException: no node answers while the
    # client re-reads the slot map, or a slot is not covered yet (SlotNotCoveredError). That
    # last class also holds the client's usage errors (keys in different slots...), which the
    # worker cannot make: every key of one call shares its partition's hash tag.
    return (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.ReadOnlyError,
            rex.OutOfMemoryError, rex.ClusterError, rex.ClusterDownError, rex.TryAgainError,
            rex.RedisClusterException, ConnectionError, TimeoutError, OSError)  # fmt: skip


@dataclass(frozen=True)
class RetryPolicy:
    """Retry ``errors`` with delays ``base * 2**attempt`` (capped at ``cap``, ±``jitter``),
    ``attempts`` times at most (None: until the ``give_up`` predicate says so)."""

    base: float = 0.05
    cap: float = 2.0
    jitter: float = 0.2
    attempts: int | None = None
    errors: tuple[type[BaseException], ...] = ()

    @classmethod
    def for_redis(cls, attempts: int | None = None) -> RetryPolicy:
        return cls(attempts=attempts, errors=_transient_redis_errors())

    def delay(self, attempt: int) -> float:
        d = min(self.cap, self.base * (2**attempt))
        return max(0.0, d * (1.0 + random.uniform(-self.jitter, self.jitter)))

    async def call(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        on_error: Callable[[BaseException, int], None] | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> T:
        """Await ``op()`` until it succeeds. A retryable error calls ``on_error(exc, attempt)``
        and sleeps; it is re-raised when ``attempts`` are used up or ``give_up()`` is true. Other
        errors propagate at once."""
        attempt = 0
        while True:
            try:
                return await op()
            except self.errors as exc:
                if on_error is not None:
                    on_error(exc, attempt)
                if (self.attempts is not None and attempt + 1 >= self.attempts) or (
                    give_up is not None and give_up()
                ):
                    raise
                await asyncio.sleep(self.delay(attempt))
                attempt += 1
