"""compose.yaml and docker/Dockerfile, checked without a Docker engine.

The services' commands run as local processes: each container port maps to a free
loopback port, service host names in the broker config map to 127.0.0.1, and the model
volume maps to the local model cache. The healthchecks run as they are written, with
the port mapped, and the broker starts only after both agents pass theirs, as
`depends_on: condition: service_healthy` demands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from broker_fixtures import DEFAULT_BRIDGE, RECEIVER, SHARER
from conftest import AGENT_THREADS, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONTAINER_CONFIG = "/app/docker/broker.yaml"
HEALTHY_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def container_port(service: dict) -> int:
    command = service["command"]
    return int(command[command.index("--port") + 1])


def start_order(services: dict) -> list[str]:
    """Service names, each after the services it depends on."""
    order: list[str] = []
    while len(order) < len(services):
        ready = [name for name, service in services.items()
                 if name not in order and all(dep in order for dep in service.get("depends_on", {}))]
        assert ready, f"services depend on each other in a cycle: {sorted(set(services) - set(order))}"
        order.extend(sorted(ready))
    return order


def test_compose_declares_three_services(compose):
    services = compose["services"]

    assert set(services) == {"sharer", "receiver", "broker"}
    assert "models" in compose["volumes"]
    for name, service in services.items():
        assert service["command"][0] == "cachetalk", name
        health = service["healthcheck"]
        assert health["test"][:3] == ["CMD", "python", "-c"], name
        assert "urllib.request" in health["test"][3], name
        assert f":{container_port(service)}/health" in health["test"][3], name
        assert health["interval"] == "5s", name
        assert int(health["start_period"].rstrip("s")) >= 120, name
        home = service["environment"]["CACHETALK_HOME"]
        assert f"models:{home}" in service["volumes"], name
    assert services["broker"]["depends_on"] == {"receiver": {"condition": "service_healthy"},
                                                "sharer": {"condition": "service_healthy"}}
    assert services["receiver"]["command"][2:4] == ["--model", RECEIVER]
    assert services["sharer"]["command"][2:4] == ["--model", SHARER]


def test_compose_keeps_gpu_block_commented():
    text = COMPOSE.read_text()

    assert "#   resources:" in text
    assert "capabilities: [gpu]" in text


def test_dockerfile_builds_one_cpu_image():
    text = DOCKERFILE.read_text()

    assert "FROM python:3.11-slim" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert 'pip install ".[server]"' in text
    assert "CACHETALK_HOME" in text


def local_broker_config(ports: dict[str, tuple[int, int]], folder: Path, test_bridges: dict[str, Path]) -> Path:
    """docker/broker.yaml with service URLs on loopback and bridge paths made absolute."""
    source = ROOT / "docker" / "broker.yaml"
    config = yaml.safe_load(source.read_text())
    config["agents"] = [dict(agent, url=_map_url(agent["url"], ports)) for agent in config["agents"]]
    bridges = [(source.parent / path).resolve() for path in config["bridges"]]
    # The trained bridges ship with the repository; until they exist, use the test bridges.
    config["bridges"] = [str(path) for path in bridges if path.is_dir()] or [str(test_bridges[DEFAULT_BRIDGE])]
    path = folder / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _map_url(url: str, ports: dict[str, tuple[int, int]]) -> str:
    for service, (inside, outside) in ports.items():
        if url == f"http://{service}:{inside}":
            return f"http://127.0.0.1:{outside}"
    raise AssertionError(f"broker config URL {url} names no compose service")


def local_command(name: str, service: dict, ports: dict[str, tuple[int, int]], config: Path) -> list[str]:
    command = [sys.executable, "-m", "cachetalk.cli", *service["command"][1:]]
    command = [{"0.0.0.0": "127.0.0.1", CONTAINER_CONFIG: str(config)}.get(arg, arg) for arg in command]
    command[command.index("--port") + 1] = str(ports[name][1])
    if command[3] == "agent":
        command += ["--threads", AGENT_THREADS]  # several agents share this machine's cores
    return command


def wait_healthy(name: str, service: dict, port: tuple[int, int], process: subprocess.Popen, log: Path) -> None:
    probe = service["healthcheck"]["test"][3].replace(f":{port[0]}/", f":{port[1]}/")
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"service {name} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"service {name} not healthy after {HEALTHY_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


@pytest.mark.slow
def test_compose_services_answer_locally(compose, test_bridges, tmp_path):
    services = compose["services"]
    ports = {name: (container_port(service), free_port()) for name, service in services.items()}
    config = local_broker_config(ports, tmp_path, test_bridges)
    processes: list[subprocess.Popen] = []
    try:
        for name in start_order(services):
            service = services[name]
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(local_command(name, service, ports, config), stdout=out,
                                           stderr=subprocess.STDOUT)
            processes.append(process)
            # Compose starts a service once the ones it depends on are healthy. Waiting for
            # each service in start order gives the same guarantee.
            wait_healthy(name, service, ports[name], process, log)

        broker_url = f"http://127.0.0.1:{ports['broker'][1]}"
        body = {"model": RECEIVER, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                "cachetalk": {"sharers": [SHARER]}}
        response = httpx.post(f"{broker_url}/v1/chat/completions", json=body, timeout=300)
        health = httpx.get(f"{broker_url}/health", timeout=30).json()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    assert response.status_code == 200, response.text
    assert response.json()["cachetalk"]["mode"] == "c2c"
    assert response.json()["choices"][0]["message"]["content"] is not None
    assert {name: agent["status"] for name, agent in health["agents"].items()} == {RECEIVER: "ok", SHARER: "ok"}
