"""An HTTP app (FastAPI) served by uvicorn in a background thread, for tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from fastapi import FastAPI

from model.errors import EventcastError


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL
    (``http://host:port``) once it accepts connections, and shut it down on exit.

    ``port=0`` picks a free port. Raises EventcastError when the server does not start within
    ``timeout``. ``worker serve`` itself uses :func:`deploy.http.server.run_server`.
    """
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise EventcastError(f"the HTTP server did not start within {timeout:.0f}s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
