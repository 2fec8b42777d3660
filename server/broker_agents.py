"""The broker's side of the agent HTTP API: calls to one agent, with errors mapped for clients.

Every failure of an agent becomes an `APIError` that names the agent. The status is
502 when the agent is down or broke the connection, 504 when it took longer than the
configured timeouts, and 503 while it loads its model. A request the agent rejected
(400, for example a context overflow) keeps the agent's own status and message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from cachetalk.client.wire import CONTENT_TYPE
from cachetalk.server.broker_config import AgentConfig, Timeouts
from cachetalk.server.errors import APIError

logger = logging.getLogger(__name__)


def agent_unreachable(agent: AgentConfig, action: str, exc: Exception) -> APIError:
    return APIError(502, f"agent {agent.name} at {agent.url} failed during {action}: {exc or type(exc).__name__}; "
                    "check that the agent is running", code="agent_unreachable", error_type="server_error")


def agent_timed_out(agent: AgentConfig, action: str, seconds: float) -> APIError:
    return APIError(504, f"agent {agent.name} at {agent.url} timed out after {seconds:g} s during {action}",
                    code="agent_timeout", error_type="server_error")


def _error_from_agent(agent: AgentConfig, action: str, response: httpx.Response) -> APIError:
    try:
        error = response.json().get("error", {})
        message, param, code = error.get("message", ""), error.get("param"), error.get("code")
    except (ValueError, AttributeError):
        message, param, code = response.text[:500], None, None

    status = response.status_code
    if status == 503:
        return APIError(503, f"agent {agent.name} is not ready (still loading its model?): {message}",
                        code="agent_loading")
    if status == 404 and param == "model":
        return APIError(502, f"agent {agent.name} at {agent.url} does not serve the model {agent.served_model}: "
                        f"{message}; fix the agent's name or model in the broker config", code="agent_misconfigured",
                        error_type="server_error")
    if 400 <= status < 500:
        # Passed through with the agent's wording, which clients parse (the context-overflow
        # message starts "This model's maximum context length is"); the agent's name follows.
        message = f"{message} [agent {agent.name}]" if message else f"agent {agent.name} rejected {action}"
        return APIError(status, message, param, code)
    return APIError(502, f"agent {agent.name} failed during {action} with status {status}: {message}",
                    code="agent_error", error_type="server_error")


class AgentClient:
    """Calls to one agent. `info` caches its `/v1/models` entry until the agent fails."""

    def __init__(self, config: AgentConfig, timeouts: Timeouts, http: httpx.AsyncClient):
        self.config = config
        self.timeouts = timeouts
        self.http = http
        self.info: dict | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @asynccontextmanager
    async def _errors(self, action: str):
        """Map transport failures to 502/504 and forget the cached model info, which may be stale."""
        try:
            yield
        except httpx.TimeoutException as exc:
            self.info = None
            raise agent_timed_out(self.config, action, self.timeouts.read) from exc
        except TimeoutError as exc:
            self.info = None
            raise agent_timed_out(self.config, action, self.timeouts.request) from exc
        except httpx.TransportError as exc:
            self.info = None
            raise agent_unreachable(self.config, action, exc) from exc

    async def _request(self, method: str, path: str, action: str, **kwargs) -> httpx.Response:
        async with self._errors(action), asyncio.timeout(self.timeouts.request):
            response = await self.http.request(method, self.url + path, **kwargs)
        if response.status_code >= 400:
            raise _error_from_agent(self.config, action, response)
        return response

    async def model_info(self) -> dict:
        """Return the agent's `/v1/models` entry (fingerprint, layers, ...), fetched once."""
        if self.info is None:
            body = (await self._request("GET", "/v1/models", "GET /v1/models")).json()
            entries = [m for m in body.get("data", []) if m.get("id") == self.config.served_model]
            if not entries:
                served = [m.get("id") for m in body.get("data", [])]
                raise APIError(502, f"agent {self.name} at {self.url} serves {served}, not "
                               f"{self.config.served_model}; fix the agent's name or model in the broker config",
                               code="agent_misconfigured", error_type="server_error")
            self.info = entries[0]
        return self.info

    async def health(self) -> tuple[str, str | None]:
        """Probe `/health`: ("ok" | "loading" | "unreachable", detail)."""
        try:
            response = await self.http.get(self.url + "/health", timeout=self.timeouts.health)
        except httpx.HTTPError as exc:
            return "unreachable", f"{type(exc).__name__}: {exc}".rstrip(": ")
        if response.status_code == 200:
            return "ok", None
        if response.status_code == 503:
            return "loading", None
        return "unreachable", f"/health answered {response.status_code}"

    async def tokenizer_files(self) -> dict:
        """Fetch `/v1/tokenizer`: a map with `name`, `fingerprint` and `files` (name -> bytes)."""
        import msgpack

        response = await self._request("GET", "/v1/tokenizer", "GET /v1/tokenizer")
        return msgpack.unpackb(response.content, raw=False)

    async def prefill(self, token_ids: list[int]) -> tuple[bytes, float, float]:
        """Ask for the KV cache of `token_ids`: (wire-format bytes, agent's prefill ms, round-trip ms)."""
        started = time.perf_counter()
        response = await self._request("POST", "/v1/kv/prefill", "KV prefill", json={"token_ids": token_ids},
                                       timeout=self._timeout())
        wall_ms = (time.perf_counter() - started) * 1000
        prefill_ms = float(response.headers.get("x-cachetalk-prefill-ms", "nan"))
        return response.content, prefill_ms, wall_ms

    async def stream_chat(self, body: dict) -> AsyncIterator[dict]:
        """POST `/v1/chat/completions` with streaming and yield each SSE event's JSON."""
        request = self.http.build_request("POST", self.url + "/v1/chat/completions", json=body,
                                          timeout=self._timeout())
        async for event in self._stream(request, "chat completion"):
            yield event

    async def stream_generate(self, body: bytes) -> AsyncIterator[dict]:
        """POST `/v1/kv/generate` (a msgpack map with `"stream": true`) and yield each SSE event's JSON."""
        request = self.http.build_request("POST", self.url + "/v1/kv/generate", content=body,
                                          headers={"content-type": CONTENT_TYPE}, timeout=self._timeout())
        async for event in self._stream(request, "KV generate"):
            yield event

    async def _stream(self, request: httpx.Request, action: str) -> AsyncIterator[dict]:
        # Leaving this generator early (the client went away) closes the response, so
        # the agent detects the disconnect and stops decoding.
        deadline = time.monotonic() + self.timeouts.request
        async with self._errors(action):
            response = await asyncio.wait_for(self.http.send(request, stream=True), self.timeouts.request)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_from_agent(self.config, action, response)
                lines = response.aiter_lines()
                while True:
                    try:
                        line = await asyncio.wait_for(anext(lines), max(0.0, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise APIError(502, f"agent {self.name} failed during {action}: "
                                       f"{event['error'].get('message')}", code="agent_error",
                                       error_type="server_error")
                    yield event
            finally:
                await response.aclose()
        raise agent_unreachable(self.config, action, RuntimeError("the stream ended without [DONE]"))

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeouts.read, connect=self.timeouts.connect)
