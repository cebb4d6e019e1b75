"""The request body cap: a body larger than any request the API could accept is refused with
413 before it is read, not parsed whole and then refused item by item.

The cap is DECISION_ROUTER_API_MAX_BODY_BYTES, by default the largest batch the prediction
gate could accept in full: MAX_ITEMS items of DECISION_ROUTER_MAX_PAYLOAD_BYTES each. A
declared Content-Length over the cap is refused from the header alone (no byte of the body
read); a chunked body is counted as it arrives and refused at the chunk that crosses the cap.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decision_router.api.routes_predictions import MAX_ITEMS
from decision_router.settings import Settings


def max_body_bytes(settings: Settings) -> int:
    return settings.api_max_body_bytes or settings.max_payload_bytes * MAX_ITEMS


class BodyLimit:
    """ASGI middleware: 413 with a JSON `detail` for a request body over `max_bytes`."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.detail = (
            f"request body over {max_bytes} bytes (DECISION_ROUTER_API_MAX_BODY_BYTES): send at most "
            f"{MAX_ITEMS} predictions per request, each under DECISION_ROUTER_MAX_PAYLOAD_BYTES"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refuse = JSONResponse({"detail": self.detail}, status_code=413)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await refuse(scope, receive, send)
            return
        received, refused = 0, False

        async def capped() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now, then tell the app the client left, so it stops reading.
                    # (An exception raised here would reach FastAPI wrapped by the logging
                    # middleware's task group, and become its generic 400.)
                    refused = True
                    await refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:  # the app's own answer to a refused body is dropped
                await send(message)

        await self.app(scope, capped, send_unless_refused)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # the server refuses a malformed length itself
