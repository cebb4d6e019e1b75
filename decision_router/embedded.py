"""The embedded default: an in-process fakeredis served on loopback, so no Redis is needed.

The service talks to it over TCP like any Redis, so the CLI in another terminal
(`publish`, `outcome`, `stats`) reaches it at the same URL.
"""

from __future__ import annotations

import threading
from types import TracebackType

import fakeredis


class EmbeddedRedisError(Exception):
    pass


class EmbeddedRedis:
    def __init__(self, host: str = "127.0.0.1", port: int = 6399) -> None:
        self.host, self.port = host, port
        self._server: fakeredis.TcpFakeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        try:
            self._server = fakeredis.TcpFakeServer((self.host, self.port), server_type="redis")
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot serve the embedded Redis on {self.host}:{self.port} ({exc.strerror}); "
                "set DECISION_ROUTER_EMBEDDED_PORT to a free port or DECISION_ROUTER_REDIS_URL to a real Redis"
            ) from None
        self._server.daemon_threads = True
        # Port 0 asks the OS for a free port (used by the demo and tests).
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-redis", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.stop()
