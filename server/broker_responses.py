"""Responses of the broker's chat endpoint: one JSON body or a server-sent event stream.

Either way the mode runs in its own task, and a client that disconnects cancels it,
which closes the open requests to the agents so that they stop their work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from cachetalk.server.broker_modes import MODES, ChatRequest, Outcome, Piece
from cachetalk.server.errors import APIError

if TYPE_CHECKING:
    from cachetalk.server.broker import Broker

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, events: AsyncIterator) -> AsyncIterator:
    """Run `events` in its own task and yield its items; cancel it when the client disconnects.

    Cancelling the task closes the open requests to the agents, which stop their work.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for item in events:
                queue.put_nowait(item)
            queue.put_nowait(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
            if not isinstance(exc, Exception):
                raise

    producer = asyncio.create_task(pump())
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        while True:
            getter = asyncio.create_task(queue.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                raise ClientGone()
            item = getter.result()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        watcher.cancel()
        producer.cancel()


def _info(request: ChatRequest, outcome: Outcome) -> dict:
    info = {"mode": request.mode, "sharers": request.sharers, "bridge": outcome.bridge, "timings": outcome.timings}
    if outcome.notes is not None:
        info["notes"] = outcome.notes
    return info


def log_details(http_request: Request, chat: ChatRequest, outcome: Outcome | None) -> None:
    details = http_request.state.log_details
    details.update(mode=chat.mode, receiver=chat.receiver, sharers=",".join(chat.sharers) or "-")
    if outcome is not None:
        details.update({key: value for key, value in outcome.timings.items() if value is not None})


async def respond_json(broker: Broker, http_request: Request, chat: ChatRequest) -> JSONResponse:
    parts, outcome = [], None
    async for item in _until_disconnect(http_request, MODES[chat.mode](broker.context, chat)):
        if isinstance(item, Piece):
            parts.append(item.text)
        else:
            outcome = item
    broker.metrics.observe(chat.mode, outcome.timings)
    log_details(http_request, chat, outcome)
    body = {
        "id": f"chatcmpl-{chat.id}", "object": "chat.completion", "created": int(time.time()), "model": chat.receiver,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                     "finish_reason": outcome.finish_reason}],
        "usage": outcome.usage, "cachetalk": _info(chat, outcome),
    }
    return JSONResponse(body)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def respond_stream(broker: Broker, http_request: Request, chat: ChatRequest, include_usage: bool) -> AsyncIterator[str]:
    base = {"id": f"chatcmpl-{chat.id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": chat.receiver}
    # Stays "client_disconnected" when the server cancels this generator because the
    # client went away.
    result = "client_disconnected"
    try:
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        async for item in _until_disconnect(http_request, MODES[chat.mode](broker.context, chat)):
            if isinstance(item, Piece):
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": item.text}, "finish_reason": None}]})
                continue
            broker.metrics.observe(chat.mode, item.timings)
            log_details(http_request, chat, item)
            last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": item.finish_reason}]}
            if include_usage:
                yield _sse(last)
                last = {**base, "choices": [], "usage": item.usage}
            yield _sse({**last, "cachetalk": _info(chat, item)})
        result = "ok"
    except APIError as exc:
        # The status line has gone out already: the error travels as the last event.
        result = str(exc.status)
        log_details(http_request, chat, None)
        logger.warning("request %s failed while streaming with %d: %s", chat.id, exc.status, exc.message)
        yield _sse({"error": {**exc.body()["error"], "status": exc.status}})
    except ClientGone:
        return
    except Exception:
        result = "500"
        logger.error("request %s failed while streaming", chat.id, exc_info=True)
        error = APIError(500, f"internal error while serving request {chat.id}; see the broker log",
                         code="internal_error", error_type="server_error")
        yield _sse({"error": {**error.body()["error"], "status": 500}})
    finally:
        broker.metrics.outcomes.labels(chat.mode, result).inc()
        http_request.state.log_details["outcome"] = result
    yield "data: [DONE]\n\n"
