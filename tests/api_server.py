"""The trainer's HTTP API served for a test: a real uvicorn server on a free localhost port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lora_trainer.host import Host
from lora_trainer.server.queue import JobQueue


@contextmanager
def serve_api(queue: JobQueue, host: Host) -> Iterator[str]:
    """The API's routes over `queue` and `host` on a FastAPI app of their own; yields the base URL."""
    import uvicorn
    from fastapi import FastAPI

    from lora_trainer.server.routes import api_router

    app = FastAPI()
    app.include_router(api_router(queue, host))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
