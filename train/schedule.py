"""``worker retrain --every DURATION``: continuous training (the compose file's trainer service).

Loop: retrain once (replaying ``kafka://TOPIC`` up to its current end, so each round sees the
newest events), promote if better, then sleep until the next round. SIGTERM or SIGINT sets a
stop flag: a sleeping loop exits at once, a running round finishes (its version is either fully
written or not at all) and the loop exits after it; a second signal exits immediately. A round
that fails (brokers unreachable, too few events yet for a window, ...) is logged and retried next
round: the flags themselves were validated before the loop started.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from model.errors import EventcastError
from train.retrain import RetrainResult, retrain_once
from train.settings import RetrainSettings

log = logging.getLogger(__name__)


class StopFlag:
    """Set by the first SIGTERM/SIGINT; the second one raises KeyboardInterrupt (exit now)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        log.info("signal %d: stopping after the current round", signum)
        self.event.set()

    def install(self) -> dict[int, object]:
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self.handle)
        return previous


def run_every(
    settings: RetrainSettings,
    *,
    rounds: int | None = None,
    once: Callable[[RetrainSettings], RetrainResult] = retrain_once,
    stop: StopFlag | None = None,
) -> int:
    """Retrain every ``settings.every`` until stopped (or ``rounds`` rounds); exit code 0.

    The interval runs from the start of one round to the start of the next (a round longer than
    the interval starts the next one at once).
    """
    assert settings.every is not None
    interval = settings.every
    stop = stop or StopFlag()
    previous = stop.install() if threading.current_thread() is threading.main_thread() else {}
    done = 0
    try:
        while not stop.event.is_set():
            started = time.monotonic()
            try:
                result = once(settings)
                log.info(
                    "round %d: version %s %s (%s)", done + 1, result.version,
                    "promoted" if result.promoted else "kept aside", result.reason,
                )  # fmt: skip
            except EventcastError as exc:
                log.error("round %d failed: %s (retrying next round)", done + 1, exc)
            done += 1
            if rounds is not None and done >= rounds:
                break
            wait = max(0.0, interval - (time.monotonic() - started))
            stop.event.wait(wait)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
    return 0
