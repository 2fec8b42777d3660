"""ASGI middleware shared by the agent and the broker: request log and body-size limit.

`RequestLogMiddleware` gives each request an id (the `x-request-id` header, or a new
one), logs one line when the response ends, and turns an unhandled exception into an
OpenAI-shaped 500. `BodyLimitMiddleware` rejects a body over the limit with 413, by its
Content-Length header first and by the bytes actually received otherwise.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachetalk.server.errors import APIError, body_too_large, encode_error

logger = logging.getLogger(__name__)

# Called once per finished request with (method, path, status, seconds).
RequestHook = Callable[[str, str, int, float], None]


async def send_error(send: Send, error: APIError, request_id: str | None = None, scope: Scope | None = None) -> None:
    """Send `error` as a whole response; with `scope`, also record its message in the request's log line."""
    if scope is not None and "log_details" in scope.get("state", {}):
        scope["state"]["log_details"]["error"] = json.dumps(error.message)
    body = encode_error(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestLogMiddleware:
    """Log one line per request with its id, status and duration; never let an exception escape.

    Handlers add `key=value` details to the line through `request.state.log_details`
    (a dict). Requests to `quiet_paths` (health probes, scrapes) are logged at DEBUG.
    """

    def __init__(self, app: ASGIApp, on_finish: RequestHook | None = None,
                 quiet_paths: tuple[str, ...] = ("/health", "/metrics")):
        self.app = app
        self.on_finish = on_finish
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = Headers(scope=scope).get("x-request-id") or new_request_id()
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started, log_details={})
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", request_id.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            state["log_details"]["outcome"] = "client disconnected"
            status = status or 499
        except Exception:
            logger.error("request %s %s %s failed", request_id, scope["method"], scope["path"], exc_info=True)
            if status == 0:
                status = 500
                await send_error(send, APIError(500, f"Internal server error while handling request {request_id}; "
                                                "see the server log.", code="internal_error"), request_id)

        self._log(scope, request_id, status, time.perf_counter() - started, state["log_details"])

    def _log(self, scope: Scope, request_id: str, status: int, seconds: float, details: dict) -> None:
        level = logging.DEBUG if scope["path"] in self.quiet_paths else logging.INFO
        extra = "".join(f" {key}={value}" for key, value in details.items())
        logger.log(level, "request %s %s %s %d %.1f ms%s", request_id, scope["method"], scope["path"], status,
                   seconds * 1000, extra)
        if self.on_finish is not None:
            self.on_finish(scope["method"], scope["path"], status, seconds)


class BodyLimitMiddleware:
    """Reject request bodies larger than `max_bytes` with an OpenAI-shaped 413."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = scope.get("state", {}).get("request_id")
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, body_too_large(int(declared), self.max_bytes), request_id, scope)
            return

        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise ClientDisconnect("request body is over the size limit")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # the handler's own error about the cut-off body is replaced by the 413 below
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await send_error(send, body_too_large(None, self.max_bytes), request_id, scope)
