"""The embedded default: an in-process fakeredis served on loopback, so no Redis is needed.

The service talks to it over TCP like any Redis, so the CLI in another terminal
(`publish`, `outcome`, `stats`) reaches it at the same URL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Self

import fakeredis
from fakeredis._clients._tcp_server import TCPFakeRequestHandler
from redis.exceptions import ResponseError

SHUTDOWN_POLL_S = 0.05  # seconds: how soon the embedded server notices stop()


class EmbeddedRedisError(Exception):
    pass


class _Handler(TCPFakeRequestHandler):
    """fakeredis's handler lets an error reply escape its loop, so it writes the error and then
    closes the connection; Redis keeps the connection open. A BUSYGROUP or NOSCRIPT reply
    (both routine: creating a group that exists, a script not yet loaded) would otherwise
    break the next command on that connection. Return server errors as replies instead."""

    def setup(self) -> None:
        super().setup()
        read: Callable[..., Any] = self.current_client.read_response

        def read_response(*args: Any, **kwargs: Any) -> Any:
            try:
                return read(*args, **kwargs)
            except ResponseError as exc:
                return exc  # written back as `-<PREFIX> message`, like Redis

        self.current_client.read_response = read_response  # type: ignore[method-assign]


class EmbeddedRedis:
    def __init__(self, host: str = "127.0.0.1", port: int = 6399) -> None:
        self.host, self.port = host, port
        self._server: fakeredis.TcpFakeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        try:
            self._server = fakeredis.TcpFakeServer((self.host, self.port), server_type="redis")
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot serve the embedded Redis on {self.host}:{self.port} ({exc.strerror}); "
                "set DECISION_ROUTER_EMBEDDED_PORT to a free port or DECISION_ROUTER_REDIS_URL to a real Redis"
            ) from None
        self._server.daemon_threads = True
        self._server.RequestHandlerClass = _Handler
        # Port 0 asks the OS for a free port (used by the demo and tests).
        self.port = self._server.server_address[1]
        # shutdown() waits for serve_forever's next look at its stop flag: every poll
        # interval (socketserver's default, 0.5 s, was most of the time Ctrl-C took).
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=SHUTDOWN_POLL_S), name="embedded-redis", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
