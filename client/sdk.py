"""Python client of the cachetalk broker, synchronous and asynchronous (httpx, no torch).

Start a broker first, for example with `cachetalk up`; the examples below assume it
listens on http://127.0.0.1:8000 with the default agents `smollm2-135m` (receiver) and
`gemma3-270m` (sharer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from cachetalk.client.errors import APIConnectionError
from cachetalk.client.streaming import AsyncChatStream, ChatStream, raise_for_status
from cachetalk.client.types import AgentInfo, BridgeCard, ChatResponse, Health, Message, ModelInfo

DEFAULT_URL = "http://127.0.0.1:8000"
Messages = str | Sequence[dict[str, Any] | Message]


def build_chat_body(messages: Messages, model: str, sharers: Sequence[str] | None = None, mode: str | None = None,
                    bridge: str | None = None, stream: bool = False, **params: Any) -> dict[str, Any]:
    """Build the JSON body of `/v1/chat/completions`; a plain string becomes one user message.

    Parameters left at None are omitted, so the broker's defaults apply.

    Example:
        >>> build_chat_body("Hi", model="smollm2-135m", sharers=["gemma3-270m"], max_tokens=8)["cachetalk"]
        {'sharers': ['gemma3-270m']}
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body: dict[str, Any] = {
        "model": model,
        "messages": [m.model_dump(exclude_none=True) if isinstance(m, Message) else dict(m) for m in messages],
        "stream": stream,
    }
    body.update({name: value for name, value in params.items() if value is not None})

    extension = {name: value for name, value in (("sharers", list(sharers) if sharers else None),
                                                 ("mode", mode), ("bridge", bridge)) if value is not None}
    if extension:
        body["cachetalk"] = extension
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(seconds, 10.0))


class Client:
    """Synchronous client of a cachetalk broker.

    `timeout` is in seconds, per request. Use it as a context manager or call `close()`.

    Example:
        >>> from cachetalk.client import Client
        >>> with Client("http://127.0.0.1:8000") as client:
        ...     reply = client.chat("Is a tomato a fruit?", model="smollm2-135m",
        ...                         sharers=["gemma3-270m"], mode="c2c", max_tokens=16)
        ...     print(reply.text, reply.cachetalk.timings.total_ms)
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 600.0, headers: dict[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=_timeout(timeout), headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _get(self, path: str) -> Any:
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach the broker at {self.base_url}: {exc}") from exc
        raise_for_status(response)
        return response.json()

    def chat(self, messages: Messages, *, model: str, sharers: Sequence[str] | None = None, mode: str | None = None,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, stop: str | list[str] | None = None, bridge: str | None = None,
             stream: bool = False, **params: Any) -> ChatResponse | ChatStream:
        """Ask the receiver `model`, helped by `sharers`, in `mode` "c2c", "t2t" or "solo".

        Without `mode`, the broker uses c2c when sharers are named and solo otherwise.
        `bridge` picks a bridge by name when several fit the pair. Other keyword
        arguments go into the request body as they are. With `stream=True` this returns
        a `ChatStream` (see `chat_stream`).

        Example:
            >>> with Client() as client:
            ...     reply = client.chat([{"role": "user", "content": "What is 2 + 3?"}], model="smollm2-135m",
            ...                         sharers=["gemma3-270m"], max_tokens=16, temperature=0)
            ...     print(reply.text, reply.cachetalk.mode)
        """
        body = build_chat_body(messages, model, sharers, mode, bridge, stream, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, stop=stop, **params)
        if stream:
            return ChatStream(self._http, body)
        try:
            response = self._http.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"request to the broker at {self.base_url} failed: {exc}") from exc
        raise_for_status(response)
        return ChatResponse.model_validate(response.json())

    def chat_stream(self, messages: Messages, *, model: str, **kwargs: Any) -> ChatStream:
        """Stream the answer chunk by chunk; takes the arguments of `chat`.

        Example:
            >>> with Client() as client:
            ...     for chunk in client.chat_stream("Say hello.", model="smollm2-135m", max_tokens=8):
            ...         print(chunk.text, end="", flush=True)
        """
        return self.chat(messages, model=model, stream=True, **kwargs)

    def models(self) -> list[ModelInfo]:
        """List the receivers the broker routes to.

        Example:
            >>> with Client() as client:
            ...     print([m.id for m in client.models()])
        """
        return [ModelInfo.model_validate(m) for m in self._get("/v1/models")["data"]]

    def agents(self) -> list[AgentInfo]:
        """List the agents configured in the broker, with their state.

        Example:
            >>> with Client() as client:
            ...     print({a.name: a.status for a in client.agents()})
        """
        return [AgentInfo.model_validate(a) for a in self._get("/v1/agents")["data"]]

    def bridges(self) -> list[BridgeCard]:
        """List the bridges the broker can apply.

        Example:
            >>> with Client() as client:
            ...     print([(b.sharer, b.receiver, b.parameters) for b in client.bridges()])
        """
        return [BridgeCard.model_validate(b) for b in self._get("/v1/bridges")["data"]]

    def health(self) -> Health:
        """Return the broker's state and each agent's.

        Example:
            >>> with Client() as client:
            ...     print(client.health().agents)
        """
        return Health.model_validate(self._get("/health"))


class AsyncClient:
    """Asynchronous client of a cachetalk broker; the methods of `Client`, awaited.

    Example:
        >>> import asyncio
        >>> from cachetalk.client import AsyncClient
        >>> async def main():
        ...     async with AsyncClient("http://127.0.0.1:8000") as client:
        ...         reply = await client.chat("Is a tomato a fruit?", model="smollm2-135m",
        ...                                   sharers=["gemma3-270m"], max_tokens=16)
        ...         print(reply.text)
        >>> asyncio.run(main())
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 600.0, headers: dict[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=_timeout(timeout), headers=headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _get(self, path: str) -> Any:
        try:
            response = await self._http.get(path)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach the broker at {self.base_url}: {exc}") from exc
        raise_for_status(response)
        return response.json()

    async def chat(self, messages: Messages, *, model: str, sharers: Sequence[str] | None = None,
                   mode: str | None = None, max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
                   bridge: str | None = None, stream: bool = False, **params: Any) -> ChatResponse | AsyncChatStream:
        """Ask the receiver `model`, helped by `sharers`; see `Client.chat`.

        Example:
            >>> async def main():
            ...     async with AsyncClient() as client:
            ...         reply = await client.chat("What is 2 + 3?", model="smollm2-135m", sharers=["gemma3-270m"],
            ...                                   mode="t2t", max_tokens=16)
            ...         print(reply.text, reply.cachetalk.timings)
            >>> asyncio.run(main())
        """
        body = build_chat_body(messages, model, sharers, mode, bridge, stream, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, stop=stop, **params)
        if stream:
            return AsyncChatStream(self._http, body)
        try:
            response = await self._http.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"request to the broker at {self.base_url} failed: {exc}") from exc
        raise_for_status(response)
        return ChatResponse.model_validate(response.json())

    def chat_stream(self, messages: Messages, *, model: str, **kwargs: Any) -> AsyncChatStream:
        """Stream the answer chunk by chunk with `async for`; takes the arguments of `chat`.

        Example:
            >>> async def main():
            ...     async with AsyncClient() as client:
            ...         async for chunk in client.chat_stream("Say hello.", model="smollm2-135m", max_tokens=8):
            ...             print(chunk.text, end="")
            >>> asyncio.run(main())
        """
        body = build_chat_body(messages, model, stream=True, **kwargs)
        return AsyncChatStream(self._http, body)

    async def models(self) -> list[ModelInfo]:
        """List the receivers the broker routes to.

        Example:
            >>> async def main():
            ...     async with AsyncClient() as client:
            ...         print([m.id for m in await client.models()])
            >>> asyncio.run(main())
        """
        return [ModelInfo.model_validate(m) for m in (await self._get("/v1/models"))["data"]]

    async def agents(self) -> list[AgentInfo]:
        """List the agents configured in the broker, with their state.

        Example:
            >>> async def main():
            ...     async with AsyncClient() as client:
            ...         print([a.status for a in await client.agents()])
            >>> asyncio.run(main())
        """
        return [AgentInfo.model_validate(a) for a in (await self._get("/v1/agents"))["data"]]

    async def bridges(self) -> list[BridgeCard]:
        """List the bridges the broker can apply.

        Example:
            >>> async def main():
            ...     async with AsyncClient() as client:
            ...         print([b.name for b in await client.bridges()])
            >>> asyncio.run(main())
        """
        return [BridgeCard.model_validate(b) for b in (await self._get("/v1/bridges"))["data"]]

    async def health(self) -> Health:
        """Return the broker's state and each agent's.

        Example:
            >>> async def main():
            ...     async with AsyncClient() as client:
            ...         print((await client.health()).status)
            >>> asyncio.run(main())
        """
        return Health.model_validate(await self._get("/health"))



