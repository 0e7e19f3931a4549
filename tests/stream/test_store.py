"""The window store's fenced write against the real Redis: a stale writer is refused, writing
nothing; a retried write whose first attempt was applied (its reply lost) is not a conflict."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stream.errors import StateConflictError
from stream.settings import RedisSettings
from stream.store import WindowStore
from stream.windows import Snapshot

pytestmark = pytest.mark.integration


def _run(redis_url: str, steps: Any) -> Any:
    async def body() -> Any:
        client = RedisSettings(redis_url=redis_url).client()
        try:
            return await steps(WindowStore(client, "eventcast", "events"))
        finally:
            await client.aclose()

    return asyncio.run(body())


def _snap(applied: int, value: bytes) -> Snapshot:
    return Snapshot(applied, float(applied), {"s1": value}, [])


def test_persist_is_fenced_by_the_applied_offset(redis_url: str) -> None:
    async def steps(store: WindowStore) -> Any:
        await store.persist(0, _snap(9, b"a"), expected=None, features=())
        await store.persist(0, _snap(19, b"b"), expected=9, features=())
        # A writer that still believes offset 9 is stored (another owner moved on): refused.
        with pytest.raises(StateConflictError, match="19"):
            await store.persist(0, _snap(29, b"stale"), expected=9, features=())
        return await store.load(0)

    stored = _run(redis_url, steps)
    assert stored.applied == 19 and stored.blobs == {"s1": b"b"}


def test_a_retried_write_that_was_already_applied_is_not_a_conflict(redis_url: str) -> None:
    """Redis applied the script, then the connection dropped before the reply (Redis stopped):
    the worker retries with the same expected offset and finds its own offset stored."""

    async def steps(store: WindowStore) -> Any:
        await store.persist(1, _snap(9, b"a"), expected=None, features=())
        await store.persist(1, _snap(19, b"b"), expected=9, features=())
        await store.persist(1, _snap(19, b"b"), expected=9, features=())  # the retry
        return await store.load(1)

    stored = _run(redis_url, steps)
    assert stored.applied == 19 and stored.blobs == {"s1": b"b"}
