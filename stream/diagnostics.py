"""What a stuck worker is doing: ``kill -USR1 PID`` writes every thread's stack and every asyncio
task's coroutine stack to stderr (the worker's log), and the worker goes on.

Thread stacks alone show an idle event loop as "in select()"; a coroutine waiting forever (a lock,
an event, a reply that never comes) is only visible in the task stacks.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)


def dump_state(file: TextIO | None = None) -> None:
    """Write all threads' Python stacks, then the stack of every task of the running loop."""
    out = file or sys.stderr
    print("==== eventcast: thread stacks ====", file=out, flush=True)
    faulthandler.dump_traceback(file=out, all_threads=True)
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no running loop in this thread
        tasks = set()
    print(f"==== eventcast: {len(tasks)} asyncio tasks ====", file=out, flush=True)
    for task in sorted(tasks, key=lambda t: t.get_name()):
        state = "done" if task.done() else "pending"
        print(f"-- task {task.get_name()} ({state})", file=out)
        task.print_stack(file=out)
    print("==== eventcast: end of dump ====", file=out, flush=True)


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    request_stop: Callable[[], None],
    request_reload: Callable[[], None],
) -> None:
    """The worker's signals, one set for both engines: SIGTERM/SIGINT finish the batch in flight
    and stop (a second one exits at once, status 1); SIGHUP checks the model directory now;
    SIGUSR1 dumps the stacks (:func:`dump_state`)."""
    signals = 0

    def on_stop_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(1)  # second Ctrl-C / SIGTERM: the user wants out now, without draining
        log.info("stop requested: finishing the batch in flight, then committing")
        request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, request_reload)
    loop.add_signal_handler(signal.SIGUSR1, dump_state)
