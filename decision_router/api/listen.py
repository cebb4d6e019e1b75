"""Binding the HTTP API's socket: kept apart from the app so that the `--workers` supervisor can check
the port without importing FastAPI and uvicorn."""

from __future__ import annotations

import socket


class ApiStartError(Exception):
    """The API could not listen (port taken, bad host): one line for the CLI. `cannot_bind`: the address
    was refused, so the CLI adds how to pick another (8080, the default, is often taken)."""

    def __init__(self, message: str, *, cannot_bind: bool = False) -> None:
        super().__init__(message)
        self.cannot_bind = cannot_bind


def bind_api_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn would bind it: SO_REUSEADDR), or ApiStartError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ApiStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", cannot_bind=True) from None
    return sock
