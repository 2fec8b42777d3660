"""The client SDK: light imports, request bodies, error mapping, and the async client on a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from broker_fixtures import DEFAULT_BRIDGE, RECEIVER, SHARER
from cachetalk.client import (AgentError, AgentTimeoutError, APIConnectionError, AsyncClient, BadRequestError,
                              CachetalkError, Client, Message, NotFoundError, ServiceUnavailableError,
                              build_chat_body)
from cachetalk.client.errors import error_from_body
from conftest import free_port

IMPORT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import cachetalk.client
from cachetalk.client import AsyncClient, Client, wire
heavy = sorted(name for name in ("torch", "transformers", "fastapi") if sys.modules.get(name) is not None)
print(",".join(heavy) or "none")
"""


def test_client_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_chat_body_from_string_and_options():
    body = build_chat_body("Hi", model=RECEIVER, sharers=[SHARER], mode="c2c", max_tokens=4, temperature=None)

    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert body["cachetalk"] == {"sharers": [SHARER], "mode": "c2c"}
    assert body["max_tokens"] == 4
    assert "temperature" not in body
    assert body["stream"] is False
    assert "stream_options" not in body


def test_chat_body_stream_and_messages():
    messages = [Message(role="system", content="Be brief."), {"role": "user", "content": "Hi"}]

    body = build_chat_body(messages, model=RECEIVER, stream=True, bridge="closed-gate")

    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["cachetalk"] == {"bridge": "closed-gate"}
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("status, cls", [
    (400, BadRequestError), (404, NotFoundError), (502, AgentError), (503, ServiceUnavailableError),
    (504, AgentTimeoutError), (500, CachetalkError),
])
def test_error_class_by_status(status, cls):
    body = {"error": {"message": "went wrong", "type": "server_error", "param": "model", "code": "x"}}

    error = error_from_body(status, body)

    assert type(error) is cls
    assert error.status == status
    assert error.message == "went wrong"
    assert error.param == "model"
    assert error.code == "x"


def test_stream_error_takes_status_from_body():
    error = error_from_body(None, {"error": {"message": "agent gone", "type": "server_error", "status": 502}})

    assert isinstance(error, AgentError)
    assert error.status == 502


def test_unreachable_broker_raises_connection_error():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(APIConnectionError):
            client.health()
        with pytest.raises(APIConnectionError):
            client.chat("Hi", model=RECEIVER)
        with pytest.raises(APIConnectionError):
            list(client.chat_stream("Hi", model=RECEIVER))


@pytest.mark.slow
def test_async_client_end_to_end(broker):
    async def scenario():
        async with AsyncClient(broker.url, timeout=300) as client:
            reply = await client.chat("Name a fruit.", model=RECEIVER, sharers=[SHARER], max_tokens=4, temperature=0)
            stream = client.chat_stream("Name a fruit.", model=RECEIVER, sharers=[SHARER], max_tokens=4,
                                        temperature=0)
            chunks = [chunk async for chunk in stream]
            listings = await asyncio.gather(client.models(), client.agents(), client.bridges(), client.health())
            with pytest.raises(NotFoundError) as missing:
                await client.chat("Hi", model="no-such-model")
            return reply, stream, chunks, listings, missing.value

    reply, stream, chunks, (models, agents, bridges, health), missing = asyncio.run(scenario())

    assert reply.cachetalk.mode == "c2c"
    assert reply.cachetalk.bridge == [DEFAULT_BRIDGE]
    assert stream.text == reply.text
    assert "".join(chunk.text for chunk in chunks) == reply.text
    assert stream.cachetalk.mode == "c2c"
    assert stream.usage.completion_tokens == reply.usage.completion_tokens
    assert RECEIVER in [m.id for m in models]
    assert {a.name for a in agents} >= {RECEIVER, SHARER}
    assert DEFAULT_BRIDGE in [b.name for b in bridges]
    assert health.status == "ok"
    assert missing.status == 404


@pytest.mark.slow
def test_sync_stream_collects_answer(broker):
    with Client(broker.url, timeout=300) as client:
        whole = client.chat("Name a fruit.", model=RECEIVER, mode="solo", max_tokens=4, temperature=0)
        with client.chat("Name a fruit.", model=RECEIVER, mode="solo", max_tokens=4, temperature=0,
                         stream=True) as stream:
            texts = [chunk.text for chunk in stream]

    assert "".join(texts) == whole.text
    assert stream.text == whole.text
    assert stream.finish_reason == whole.finish_reason
    assert stream.cachetalk.mode == "solo"
