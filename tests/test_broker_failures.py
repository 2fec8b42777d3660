"""The broker when agents die, stall or lose their client: 502, 504, cancellation, recovery."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from broker_fixtures import RECEIVER, SHARER, start_broker, stop_broker
from conftest import AGENT_THREADS, AgentProcess, launch_agent, stop_agent, wait_until_ready
from cachetalk.client import AgentError, AgentTimeoutError, Client

pytestmark = pytest.mark.slow

VICTIM = "victim"  # the broker's name for an agent that the tests kill
LONG_QUESTION = "Write a long story about a lighthouse keeper and her cat."
# With ignore_eos the receiver decodes all 400 tokens, so an early end-of-sequence cannot finish the
# request before the test kills the agent or hangs up.
LONG = {"max_tokens": 400, "ignore_eos": True}
WAIT_S = 120


def metric(agent_url: str, name: str) -> float:
    """Sum of one metric's samples on an agent's /metrics."""
    text = httpx.get(f"{agent_url}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_for_metric(agent_url: str, name: str, predicate, timeout: float = WAIT_S) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = metric(agent_url, name)
        if predicate(value):
            return value
        time.sleep(0.05)
    pytest.fail(f"{name} on {agent_url} did not reach the expected value within {timeout} s")


def restart_agent(agent: AgentProcess) -> AgentProcess:
    """Start an agent serving the same model on the same port as `agent`, which has died."""
    command = [sys.executable, "-m", "cachetalk.cli", "agent", "--model", agent.model, "--port", str(agent.port),
               "--threads", AGENT_THREADS]
    with agent.log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    revived = AgentProcess(agent.model, agent.port, process, agent.log_path)
    wait_until_ready(revived)
    return revived


def run_in_thread(call) -> dict:
    """Start `call()` in a thread; the returned dict gets "result" or "error" and "thread"."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = call()
        except Exception as exc:
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=target, daemon=True)
    outcome["thread"].start()
    return outcome


@pytest.fixture
def victim_agent(tmp_path):
    agent = launch_agent(RECEIVER, tmp_path)
    wait_until_ready(agent)
    holder = {"agent": agent}
    yield holder
    stop_agent(holder["agent"])


def test_killed_agent_is_502_then_recovers(victim_agent, tmp_path):
    agent = victim_agent["agent"]
    broker = start_broker({"agents": [{"name": VICTIM, "model": RECEIVER, "url": agent.url}]}, tmp_path / "broker")
    try:
        with Client(broker.url, timeout=300) as client:
            # Non-streamed: kill the agent while it decodes.
            pending = run_in_thread(lambda: client.chat(LONG_QUESTION, model=VICTIM, **LONG))
            wait_for_metric(agent.url, "cachetalk:num_requests_running", lambda v: v >= 1)
            agent.process.kill()
            agent.process.wait()
            pending["thread"].join(WAIT_S)

            error = pending.get("error")
            assert isinstance(error, AgentError), pending
            assert error.status == 502
            assert VICTIM in error.message

            health = client.health()
            assert health.status == "ok"
            assert health.agents[VICTIM].status == "unreachable"
            assert health.ready is False
            with pytest.raises(AgentError) as down:
                client.chat("Hi", model=VICTIM, max_tokens=2)
            assert VICTIM in down.value.message

            # The broker serves again once the agent is back on its port.
            agent = victim_agent["agent"] = restart_agent(agent)
            reply = client.chat("Hi", model=VICTIM, max_tokens=2)
            assert reply.usage.completion_tokens >= 1
            assert client.health().agents[VICTIM].status == "ok"

            # Streamed: the error arrives as the last event and the SDK raises it.
            stream = client.chat_stream(LONG_QUESTION, model=VICTIM, **LONG)
            chunks = iter(stream)
            next(chunks)
            wait_for_metric(agent.url, "cachetalk:num_requests_running", lambda v: v >= 1)
            agent.process.kill()
            agent.process.wait()
            with pytest.raises(AgentError) as broken:
                for _ in chunks:
                    pass
            assert broken.value.status == 502
            assert VICTIM in broken.value.message
            assert client.health().status == "ok"
    finally:
        stop_broker(broker)


def test_slow_agent_is_504(smollm_agent, tmp_path):
    config = {"agents": [{"name": RECEIVER, "url": smollm_agent.url}], "timeouts": {"request": 1.0}}
    broker = start_broker(config, tmp_path / "broker")
    try:
        with Client(broker.url, timeout=300) as client:
            with pytest.raises(AgentTimeoutError) as error:
                client.chat(LONG_QUESTION, model=RECEIVER, **LONG)
            assert error.value.status == 504
            assert RECEIVER in error.value.message
            assert "timed out" in error.value.message
            assert client.health().status == "ok"
        # The agent saw the broker give up and stopped decoding.
        wait_for_metric(smollm_agent.url, "cachetalk:num_requests_running", lambda v: v == 0)
    finally:
        stop_broker(broker)


def post_and_hang_up_later(url: str, body: dict) -> socket.socket:
    """Send a chat request over a raw socket without reading the answer; closing the socket hangs up."""
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("mode", ["c2c", "solo"])
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_agent_work(broker, smollm_agent, mode, stream):
    extension = {"sharers": [SHARER], "mode": mode} if mode == "c2c" else {"mode": "solo"}
    body = {"model": RECEIVER, "messages": [{"role": "user", "content": LONG_QUESTION}], **LONG, "stream": stream,
            "cachetalk": extension}
    finished_before = metric(smollm_agent.url, "cachetalk:request_success_total")

    sock = post_and_hang_up_later(broker.url, body)
    wait_for_metric(smollm_agent.url, "cachetalk:num_requests_running", lambda v: v >= 1)
    sock.close()

    # Without cancellation the receiver would decode all 400 tokens and count a finish.
    wait_for_metric(smollm_agent.url, "cachetalk:num_requests_running", lambda v: v == 0)
    assert metric(smollm_agent.url, "cachetalk:request_success_total") == finished_before
    broker_metrics = httpx.get(f"{broker.url}/metrics", timeout=30).text
    assert f'cachetalk_broker_requests_total{{mode="{mode}",outcome="client_disconnected"}}' in broker_metrics
