"""Streamed chat completions: server-sent events parsed into typed chunks (httpx, no torch)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from cachetalk.client.errors import APIConnectionError, error_from_body
from cachetalk.client.types import CachetalkInfo, ChatChunk, Usage


def raise_for_status(response: httpx.Response) -> None:
    """Raise the `CachetalkError` subclass that matches an error response; do nothing below 400."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise error_from_body(response.status_code, body)


def _parse_event(line: str) -> ChatChunk | None | bool:
    """Parse one SSE line: a chunk, None for a line to skip, False at `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return False
    event = json.loads(data)
    if "error" in event:
        raise error_from_body(None, event)
    return ChatChunk.model_validate(event)


class _StreamState:
    """Progress of a stream so far: text, finish reason, usage and the `cachetalk` object."""

    def __init__(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.cachetalk: CachetalkInfo | None = None

    def record(self, chunk: ChatChunk) -> None:
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage
        self.cachetalk = chunk.cachetalk or self.cachetalk


class ChatStream(_StreamState):
    """Chunks of a streamed chat completion; iterate it once, or use it as a context manager.

    After the iteration, `text`, `finish_reason`, `usage` and `cachetalk` hold the
    whole answer. Leaving the loop early closes the request, and the broker cancels the
    work on the agents.

    Example:
        >>> from cachetalk.client import Client
        >>> with Client() as client, client.chat_stream("Name a color.", model="smollm2-135m",
        ...                                              max_tokens=8) as stream:
        ...     for chunk in stream:
        ...         print(chunk.text, end="")
        ...     print(stream.cachetalk.timings.total_ms)
    """

    def __init__(self, http: httpx.Client, body: dict[str, Any]):
        super().__init__()
        self._http = http
        self._body = body
        self._response: httpx.Response | None = None

    def _open(self) -> None:
        if self._response is not None:
            return
        try:
            request = self._http.build_request("POST", "/v1/chat/completions", json=self._body)
            self._response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach the broker at {self._http.base_url}: {exc}") from exc
        if self._response.status_code >= 400:
            self._response.read()
            self.close()
            raise_for_status(self._response)

    def __enter__(self) -> ChatStream:
        self._open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[ChatChunk]:
        self._open()
        try:
            for line in self._response.iter_lines():
                chunk = _parse_event(line)
                if chunk is False:
                    break
                if chunk is not None:
                    self.record(chunk)
                    yield chunk
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream from the broker broke: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection; the broker then stops the work on the agents."""
        if self._response is not None:
            self._response.close()


class AsyncChatStream(_StreamState):
    """Chunks of a streamed chat completion, for `async for`; see `ChatStream`.

    Example:
        >>> import asyncio
        >>> from cachetalk.client import AsyncClient
        >>> async def main():
        ...     async with AsyncClient() as client:
        ...         async for chunk in client.chat_stream("Name a color.", model="smollm2-135m", max_tokens=8):
        ...             print(chunk.text, end="")
        >>> asyncio.run(main())
    """

    def __init__(self, http: httpx.AsyncClient, body: dict[str, Any]):
        super().__init__()
        self._http = http
        self._body = body
        self._response: httpx.Response | None = None

    async def _open(self) -> None:
        if self._response is not None:
            return
        try:
            request = self._http.build_request("POST", "/v1/chat/completions", json=self._body)
            self._response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach the broker at {self._http.base_url}: {exc}") from exc
        if self._response.status_code >= 400:
            await self._response.aread()
            await self.aclose()
            raise_for_status(self._response)

    async def __aenter__(self) -> AsyncChatStream:
        await self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def __aiter__(self) -> AsyncIterator[ChatChunk]:
        await self._open()
        try:
            async for line in self._response.aiter_lines():
                chunk = _parse_event(line)
                if chunk is False:
                    break
                if chunk is not None:
                    self.record(chunk)
                    yield chunk
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream from the broker broke: {exc}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; the broker then stops the work on the agents."""
        if self._response is not None:
            await self._response.aclose()
