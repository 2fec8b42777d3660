"""Shared fixtures: real agent processes serving the default models on 127.0.0.1.

`smollm_agent` and `gemma_agent` start one `cachetalk agent` process per model for the
whole test session and stop it at the end. Other tests can start their own agents with
`launch_agent`, `wait_until_ready` and `stop_agent`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Broker fixtures (test bridges, a broker process) live in tests/broker_fixtures.py.
pytest_plugins = ["broker_fixtures", "bridge_fixtures"]

# Upper bound for an agent to return 200 on /health. A first start converts the
# default models from GGUF, which takes about a minute on a 2-core CPU.
STARTUP_TIMEOUT_S = 600
# One CPU thread per agent: several agents and the test process share the machine,
# and PyTorch's default of one thread per core slows everyone down when they compete.
AGENT_THREADS = "1"


@dataclass
class AgentProcess:
    model: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_agent(model: str, log_dir: Path, *extra_args: str) -> AgentProcess:
    """Start `cachetalk agent` for `model` on a free port without waiting for it."""
    port = free_port()
    log_path = log_dir / f"agent-{model}-{port}.log"
    command = [sys.executable, "-m", "cachetalk.cli", "agent", "--model", model, "--port", str(port),
               "--threads", AGENT_THREADS, *extra_args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return AgentProcess(model, port, process, log_path)


def wait_until_ready(agent: AgentProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll /health until it returns 200; fail with the agent's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            pytest.fail(f"agent {agent.model} exited with {agent.process.returncode}:\n{agent.log()}")
        try:
            if httpx.get(f"{agent.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_agent(agent)
    pytest.fail(f"agent {agent.model} was not ready after {timeout_s} s:\n{agent.log()}")


def stop_agent(agent: AgentProcess) -> None:
    if agent.process.poll() is None:
        agent.process.terminate()
        try:
            agent.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait()


def _session_agent(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = launch_agent(model, tmp_path_factory.mktemp("agents"))
    try:
        wait_until_ready(agent)
        yield agent
    finally:
        stop_agent(agent)


@pytest.fixture(scope="session")
def smollm_agent(tmp_path_factory) -> Iterator[AgentProcess]:
    """An agent serving smollm2-135m (the default receiver) for the whole session."""
    yield from _session_agent("smollm2-135m", tmp_path_factory)


@pytest.fixture(scope="session")
def gemma_agent(tmp_path_factory) -> Iterator[AgentProcess]:
    """An agent serving gemma3-270m (the default sharer) for the whole session."""
    yield from _session_agent("gemma3-270m", tmp_path_factory)


AGENT_FIXTURES = {"smollm2-135m": "smollm_agent", "gemma3-270m": "gemma_agent"}


@pytest.fixture
def agent_for(request) -> Callable[[str], AgentProcess]:
    """Map a default model name to its session agent, starting the agent on first use."""
    return lambda model: request.getfixturevalue(AGENT_FIXTURES[model])
