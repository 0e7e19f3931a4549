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


def test_a_stale_owner_cannot_write_after_a_new_owner_claimed(redis_url: str) -> None:
    """A zombie (the partition was given to another worker, which loaded it) writes with the
    applied offset it rightly believes stored: refused, and Redis is left as it was."""
    import redis

    async def steps(store: WindowStore) -> Any:
        old = await store.load(2)  # the first owner takes the partition
        await store.persist(2, _snap(9, b"a"), expected=None, features=(), fence=old.fence)
        new = await store.load(2)  # the new owner: a new epoch
        assert new.fence.epoch == old.fence.epoch + 1 and new.applied == 9
        sync = redis.Redis.from_url(redis_url)
        meta_key, win_key, _ = store.keys(2)
        before = sync.hgetall(meta_key), sync.hgetall(win_key)
        with pytest.raises(StateConflictError, match="owner epoch"):
            await store.persist(2, _snap(19, b"stale"), expected=9, features=(), fence=old.fence)
        after = sync.hgetall(meta_key), sync.hgetall(win_key)
        sync.close()
        assert after == before
        # The new owner writes on; the old claim stays refused even at the current offset.
        await store.persist(2, _snap(19, b"b"), expected=9, features=(), fence=new.fence)
        with pytest.raises(StateConflictError):
            await store.persist(2, _snap(29, b"stale"), expected=19, features=(), fence=old.fence)
        # An epoch number reused after Redis lost the hash still fences the old owner (the
        # claim's random owner token differs).
        sync = redis.Redis.from_url(redis_url)
        sync.delete(meta_key, win_key)
        sync.close()
        again = await store.load(2)
        assert again.fence.epoch == old.fence.epoch and again.applied is None
        with pytest.raises(StateConflictError):
            await store.persist(2, _snap(9, b"stale"), expected=None, features=(), fence=old.fence)
        return await store.load(2)

    stored = _run(redis_url, steps)
    assert stored.applied is None and stored.blobs == {}


def test_a_partition_of_20k_series_loads_in_pages(redis_url: str) -> None:
    """The windows hash is read with HSCAN pages, never one reply of every series; the state
    read is the one written."""
    import redis

    n = 20_000
    blobs = {f"series-{i}": f"blob-{i}".encode() * 8 for i in range(n)}

    async def steps(store: WindowStore) -> Any:
        await store.persist(3, Snapshot(41, 7.5, blobs, []), expected=None, features=("x",))
        return await store.load(3)

    sync = redis.Redis.from_url(redis_url)

    def hscans() -> int:
        return int(sync.info("commandstats").get("cmdstat_hscan", {}).get("calls", 0))

    pages_before = hscans()
    stored = _run(redis_url, steps)
    pages = hscans() - pages_before
    sync.close()
    assert stored.applied == 41 and stored.max_ts == 7.5 and stored.features == ("x",)
    assert stored.blobs == blobs
    assert pages >= n // 1000  # (Redis's COUNT is a hint: pages of about 1000 series)


def test_the_store_works_on_a_redis_cluster(redis_cluster: Any) -> None:
    """With --redis-cluster: the claim, the fenced write and the paged load of each partition run
    on its slot's primary; the eviction check asks every primary; the status announcement too."""
    from tests.conftest import unique

    settings = RedisSettings(
        redis_url=redis_cluster.url, redis_cluster=True, redis_prefix=unique("store")
    )

    async def body() -> Any:
        client = settings.client()
        try:
            store = WindowStore(client, settings.prefix, "events")
            assert await store.eviction_policy() == "noeviction"
            for p in range(6):
                fenced = {"features": (), "fence": (await store.load(p)).fence}
                await store.persist(p, _snap(9, b"a"), expected=None, **fenced)
                await store.persist(p, _snap(19, b"b"), expected=9, **fenced)
                with pytest.raises(StateConflictError):
                    await store.persist(p, _snap(29, b"stale"), expected=9, **fenced)
            await store.announce("g", "member-1", {"version": "v1"})
            announced = await client.hgetall(f"{settings.prefix}:workers:g")
            return [await store.load(p, page=1) for p in range(6)], announced
        finally:
            await client.aclose()

    loaded, announced = asyncio.run(body())
    assert [(s.applied, s.blobs) for s in loaded] == [(19, {"s1": b"b"})] * 6
    assert set(announced) == {b"member-1"}
