"""Running the app: :class:`GracefulServer` (clean SIGINT/SIGTERM) and :func:`serve_in_thread` (tests and the
load test: uvicorn on an already bound loopback socket, in a daemon thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    """uvicorn's server that first calls ``on_exit`` (the engine loop's ``stop_soon``: every open request ends
    at once) when told to exit, so no open stream keeps the shutdown waiting. ``handle_exit`` runs inside the
    signal handler: ``on_exit`` must take no lock."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def serve_in_thread(app: FastAPI, on_exit: Callable[[], None], host: str = "127.0.0.1",
                    start_timeout_s: float = 30.0) -> tuple[GracefulServer, threading.Thread, str]:
    """Serve ``app`` on ``host`` at a free port in a daemon thread; returns the server, the thread and the base
    URL once it accepts connections (``TimeoutError`` after ``start_timeout_s``). Stop it with
    ``server.handle_exit(signal.SIGTERM, None)`` and join the thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    server = GracefulServer(config, on_exit)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="specdec-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start within {start_timeout_s:.0f} s")
        time.sleep(0.02)
    return server, thread, f"http://{host}:{port}"
