"""Broker fixtures: test bridges, a second receiver agent and a broker process for the session.

Loaded as a pytest plugin from conftest.py, so that every broker and client test file
shares the same agent and broker processes.

Bridges: `gemma3-270m-to-smollm2-135m` is the trained default bridge when
`bridges/trained/` ships one, else a freshly initialised bridge. `random-open` has all
gates open and random output layers, so that fusion visibly changes the receiver's
cache. `closed-gate` has the same weights with every gate logit negative, so that
fusion returns the receiver's cache untouched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import AgentProcess, free_port, launch_agent, stop_agent, wait_until_ready

RECEIVER, SHARER = "smollm2-135m", "gemma3-270m"
DEFAULT_BRIDGE = f"{SHARER}-to-{RECEIVER}"
SECOND_RECEIVER = "smollm2-135m-b"  # a second agent serving smollm2-135m
BROKER_STARTUP_S = 180


@dataclass
class BrokerProcess:
    port: int
    process: subprocess.Popen
    log_path: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def model_fingerprint(agent: AgentProcess) -> str:
    return httpx.get(f"{agent.url}/v1/models", timeout=30).json()["data"][0]["fingerprint"]


def make_bridge(folder: Path, sharer_fingerprint: str, receiver_fingerprint: str, gates_open: bool,
                random_output: bool, seed: int = 0) -> Path:
    """Write a freshly initialised gemma3-270m -> smollm2-135m bridge into `folder`."""
    import torch

    from cachetalk.bridges.fuser import Fuser, FuserConfig, terminal_layer_map
    from cachetalk.bridges.store import save_bridge

    torch.manual_seed(seed)
    fuser = Fuser(FuserConfig(30, 3, 64, 18, 1, 256), terminal_layer_map(30, 18))
    with torch.no_grad():
        if random_output:
            # The output layers start at zero (an untrained bridge changes nothing); give
            # them weights large enough that the fused cache differs from the receiver's.
            for projector in [*fuser.key_projectors, *fuser.value_projectors]:
                torch.nn.init.normal_(projector.out.weight, std=0.5)
        fuser.gate_logits.fill_(1.0 if gates_open else -1.0)
    card = {"sharer": SHARER, "receiver": RECEIVER, "sharer_fingerprint": sharer_fingerprint,
            "receiver_fingerprint": receiver_fingerprint}
    return save_bridge(folder, fuser, card, dtype="float32")


def start_broker(config: dict, folder: Path) -> BrokerProcess:
    """Write `config` as YAML into `folder`, start `cachetalk broker` on a free port and wait for /health."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "broker.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = folder / f"broker-{port}.log"
    command = [sys.executable, "-m", "cachetalk.cli", "broker", "--config", str(config_path), "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    broker = BrokerProcess(port, process, log_path, config_path)

    deadline = time.monotonic() + BROKER_STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"broker exited with {process.returncode}:\n{broker.log()}")
        try:
            if httpx.get(f"{broker.url}/health", timeout=5).status_code == 200:
                return broker
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_broker(broker)
    pytest.fail(f"broker was not ready after {BROKER_STARTUP_S} s:\n{broker.log()}")


def stop_broker(broker: BrokerProcess) -> None:
    if broker.process.poll() is None:
        broker.process.terminate()
        try:
            broker.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            broker.process.kill()
            broker.process.wait()


@pytest.fixture(scope="session")
def second_smollm_agent(tmp_path_factory) -> Iterator[AgentProcess]:
    """Another agent serving smollm2-135m, as a same-model sharer."""
    agent = launch_agent(RECEIVER, tmp_path_factory.mktemp("agents-b"))
    try:
        wait_until_ready(agent)
        yield agent
    finally:
        stop_agent(agent)


@pytest.fixture(scope="session")
def test_bridges(tmp_path_factory, smollm_agent, gemma_agent) -> dict[str, Path]:
    """Bridge folders by name: the default pair's bridge, `random-open` and `closed-gate`."""
    from cachetalk.bridges.store import default_bridge_dir

    root = tmp_path_factory.mktemp("bridges")
    sharer_fp, receiver_fp = model_fingerprint(gemma_agent), model_fingerprint(smollm_agent)
    trained = default_bridge_dir() / DEFAULT_BRIDGE
    if (trained / "bridge.json").is_file():
        default = shutil.copytree(trained, root / DEFAULT_BRIDGE)
    else:
        default = make_bridge(root / DEFAULT_BRIDGE, sharer_fp, receiver_fp, gates_open=True, random_output=False)
    return {
        DEFAULT_BRIDGE: default,
        "random-open": make_bridge(root / "random-open", sharer_fp, receiver_fp, gates_open=True,
                                   random_output=True),
        "closed-gate": make_bridge(root / "closed-gate", sharer_fp, receiver_fp, gates_open=False,
                                   random_output=True),
    }


@pytest.fixture(scope="session")
def broker(tmp_path_factory, smollm_agent, gemma_agent, second_smollm_agent, test_bridges) -> Iterator[BrokerProcess]:
    """A broker in front of smollm2-135m, gemma3-270m and a second smollm2-135m agent."""
    config = {
        "agents": [
            {"name": RECEIVER, "url": smollm_agent.url},
            {"name": SHARER, "url": gemma_agent.url},
            {"name": SECOND_RECEIVER, "model": RECEIVER, "url": second_smollm_agent.url},
        ],
        # Listed one by one: the first bridge that fits a pair is its default.
        "bridges": [str(path) for path in test_bridges.values()],
        "t2t_max_tokens": 8,
    }
    process = start_broker(config, tmp_path_factory.mktemp("broker"))
    try:
        yield process
    finally:
        stop_broker(process)
