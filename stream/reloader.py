"""Hot reload of the model: watch the model directory's ``CURRENT`` pointer (and SIGHUP), load a
new version in a background thread, and hand it to the worker to swap in between batches.

The registry does the safety checks (manifest checksums, config compatibility through
``expect=``, canary outputs); a version that fails them is counted by reason and logged, and the
serving version stays. A refused version is not retried on every poll, only when ``CURRENT``
changes again or on :meth:`ModelReloader.request` (SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from model.errors import EventcastError, ModelLoadError, NoModelError
from model.registry import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)


class ModelReloader:
    """Polls ``registry.current()`` every ``interval`` seconds while started.

    ``load(version)`` loads and checks one version (blocking; run in a thread) against the
    serving config. ``on_failure(reason)`` counts refusals. ``stop()`` is idempotent.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        serving: LoadedModel,
        load: Callable[[str], LoadedModel],
        *,
        interval: float = 1.0,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.serving_version = serving.version
        self._load = load
        self.interval = interval
        self._on_failure = on_failure
        self._pending: LoadedModel | None = None
        self._refused: str | None = None
        self._wake = asyncio.Event()
        self._forced = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="model-reloader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request(self) -> None:
        """Check now and retry even a version refused before (SIGHUP)."""
        self._forced = True
        self._wake.set()

    def take(self) -> LoadedModel | None:
        """The newly loaded version, once (None when there is none); the caller swaps it in."""
        model, self._pending = self._pending, None
        if model is not None:
            self.serving_version = model.version
        return model

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            self._wake.clear()
            forced, self._forced = self._forced, False
            try:
                await self.check(force=forced)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die: log and keep watching
                log.exception("model reload check failed")

    async def check(self, *, force: bool = False) -> bool:
        """Load ``CURRENT`` if it names a version other than the serving (or pending) one;
        returns True when a new version is now pending."""
        target = await asyncio.to_thread(self.registry.current)
        pending = self._pending.version if self._pending is not None else None
        if target is None or target in (self.serving_version, pending):
            return False
        if target == self._refused and not force:
            return False
        try:
            model = await asyncio.to_thread(self._load, target)
        except (ModelLoadError, NoModelError, EventcastError) as exc:
            reason = getattr(
                exc, "reason", "config" if not isinstance(exc, NoModelError) else "missing"
            )
            self._refused = target
            if self._on_failure is not None:
                self._on_failure(reason)
            log.error(
                "model version %s refused (%s), still serving %s: %s",
                target, reason, self.serving_version, exc,
            )  # fmt: skip
            return False
        except Exception as exc:  # a bug or an unexpected file problem: same outcome, counted
            self._refused = target
            if self._on_failure is not None:
                self._on_failure("error")
            log.exception(
                "model version %s failed to load, still serving %s: %s",
                target,
                self.serving_version,
                exc,
            )
            return False
        self._refused = None
        self._pending = model
        log.info("model version %s loaded, swapping in after the current batch", model.version)
        return True
