"""The real worker (:class:`stream.worker.Worker`) in its own event loop in a thread.

For tests that need the worker in-process (its metrics objects, a fast start); kill and restart
tests run it as a subprocess instead (``tests/stream/conftest.py``: ``ProcWorker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from deploy.cli import settings as cli_settings

log = logging.getLogger(__name__)


class ThreadWorker:
    """A :class:`stream.worker.Worker` running in its own event loop in a thread."""

    def __init__(
        self, argv: list[str], environ: dict[str, str] | None = None, **worker_kwargs: Any
    ) -> None:
        from stream.worker import Worker

        # No gc.freeze in the shared test process (it would pin every test's leftovers); the
        # subprocess workers (ProcWorker) run with the default, freeze on.
        if not any(a in ("--gc-freeze", "--no-gc-freeze") for a in argv):
            argv = [*argv, "--no-gc-freeze"]
        # ``environ``: only the test hooks read from it (EVENTCAST_FAULT), never the real one.
        environ = environ or {}
        self.settings = cli_settings(argv, environ=environ)
        self.worker = Worker(self.settings, **worker_kwargs)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def body() -> None:
            try:
                await self.worker.start()
                self.started.set()
                await self.worker.run()
            finally:
                await self.worker.stop()

        try:
            self.loop.run_until_complete(body())
        except BaseException as exc:  # reported by stop()/check(), and logged now, so that a
            self.error = exc  # test that times out waiting shows why the worker ended
            log.error("worker thread ended with %r", exc, exc_info=exc)
        finally:
            self.started.set()
            self.loop.close()

    def start(self, timeout: float = 60) -> ThreadWorker:
        self.thread.start()
        assert self.started.wait(timeout), "worker did not start"
        self.check()
        return self

    def check(self) -> None:
        """Raise the worker's error if it ended with one (a test waiting on it fails fast)."""
        if self.error is not None:
            raise self.error

    def dump(self, wait: float = 5.0) -> str:
        """The worker's thread and asyncio task stacks (stream/diagnostics.py)."""
        import io

        from stream.diagnostics import dump_state

        if not self.thread.is_alive():
            return f"(worker thread ended: {self.error!r})"
        buf = io.StringIO()
        done = threading.Event()

        def run() -> None:
            try:
                dump_state(buf)
            finally:
                done.set()

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(run)
        done.wait(wait)
        return buf.getvalue()[-12000:]

    def call(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self, timeout: float = 30) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.worker.request_stop)
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        self.check()
