"""`cachetalk up`: the default stack as local processes, two agents and the broker.

    cachetalk up [--port 8000] [--demo]

Starts an agent for the receiver `smollm2-135m` (port 8001), one for the sharer
`gemma3-270m` (port 8002) and the broker (port 8000) with every bridge under
`bridges/trained/`, the default pair first. It waits until all of them are healthy,
prints the URLs and runs until Ctrl-C or SIGTERM, then stops all three. Each process
runs in its own process group, which is signalled as a whole, so nothing stays behind.
Process logs go to files under `$CACHETALK_HOME/logs/`.

With `--demo` it sends one question in each mode (c2c, t2t, solo), prints the answers
and their timings, and stops the stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from cachetalk.server.broker_config import find_bridge_folders
from cachetalk.server.fetch import cachetalk_home

logger = logging.getLogger(__name__)

RECEIVER = "smollm2-135m"
SHARER = "gemma3-270m"
DEFAULT_BRIDGE = f"{SHARER}-to-{RECEIVER}"
STOP_GRACE_S = 10.0


class StackError(RuntimeError):
    """A process of the stack failed to start or did not become healthy in time."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


@dataclass
class Service:
    name: str
    url: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # A new session makes the child the leader of its own process group, so that
        # stopping it reaches every process it started, and Ctrl-C in the terminal
        # reaches only `cachetalk up`, which then stops the children in order.
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()

    def healthy(self) -> bool:
        """Return whether /health returns 200 and, for the broker, the tokenizers are no longer loading."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                body = json.loads(response.read() or b"{}")
                return response.status == 200 and body.get("tokenizers") not in ("not started", "loading")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StackError(f"port {port} on {host} is in use ({exc.strerror}); stop what listens there or choose "
                             "other ports (--port, --receiver-port, --sharer-port; 0 picks free ports)") from None


def bridge_folders(root: Path) -> list[Path]:
    """Return every bridge folder under `root`, the default pair first."""
    if not root.is_dir():
        return []
    folders = find_bridge_folders([root])
    return sorted(folders, key=lambda folder: folder.name != DEFAULT_BRIDGE)


def write_broker_config(folder: Path, agents: dict[str, str], bridges: list[Path], t2t_max_tokens: int | None) -> Path:
    config: dict = {"agents": [{"name": name, "url": url} for name, url in agents.items()],
                    "bridges": [str(b) for b in bridges]}
    if t2t_max_tokens is not None:
        config["t2t_max_tokens"] = t2t_max_tokens
    path = folder / "broker.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Stack:
    """The agents and the broker as child processes."""

    def __init__(self, args: argparse.Namespace, run_dir: Path):
        host = args.host
        ports = {name: port or free_port(host) for name, port in
                 (("receiver", args.receiver_port), ("sharer", args.sharer_port), ("broker", args.port))}
        for port in ports.values():
            check_port(host, port)
        logs = Path(args.log_dir) if args.log_dir else cachetalk_home() / "logs"
        python = [sys.executable, "-m", "cachetalk.cli", f"--log-level={args.log_level}"]
        # More torch threads than free cores make every parallel region wait for a
        # descheduled thread: measured here, a 41-token prefill took 160 ms with one thread
        # and 250 to 2,400 ms with two on a busy 2-core machine.
        threads = ["--threads", str(args.threads)]
        if args.max_batch is not None:
            threads += ["--max-batch", str(args.max_batch)]

        agents = {RECEIVER: f"http://{host}:{ports['receiver']}", SHARER: f"http://{host}:{ports['sharer']}"}
        self.bridges = bridge_folders(Path(args.bridges))
        config = write_broker_config(run_dir, agents, self.bridges, args.t2t_max_tokens)
        self.services = [
            Service(RECEIVER, agents[RECEIVER], python + ["agent", "--model", RECEIVER, "--host", host,
                                                          "--port", str(ports["receiver"]), *threads],
                    logs / f"agent-{RECEIVER}.log"),
            Service(SHARER, agents[SHARER], python + ["agent", "--model", SHARER, "--host", host,
                                                      "--port", str(ports["sharer"]), *threads],
                    logs / f"agent-{SHARER}.log"),
            Service("broker", f"http://{host}:{ports['broker']}",
                    python + ["broker", "--config", str(config), "--host", host, "--port", str(ports["broker"]),
                              "--threads", "1"],
                    logs / "broker.log"),
        ]

    @property
    def broker_url(self) -> str:
        return self.services[-1].url

    def start(self) -> None:
        for service in self.services:
            service.start()
            print(f"started {service.name} (pid {service.process.pid}) at {service.url}, log {service.log_path}",
                  flush=True)

    def wait_healthy(self, timeout: float) -> None:
        """Poll every /health until all return 200; raise StackError if a process exits or time runs out."""
        deadline = time.monotonic() + timeout
        waiting = list(self.services)
        while waiting:
            self.check_running()
            waiting = [s for s in waiting if not s.healthy()]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.name for s in waiting)
                raise StackError(f"{names} not healthy after {timeout:g} s; see the logs under "
                                 f"{waiting[0].log_path.parent} (or raise --ready-timeout)")
            if waiting:
                time.sleep(0.5)

    def check_running(self) -> None:
        for service in self.services:
            code = service.process.poll() if service.process else None
            if code is not None:
                raise StackError(f"{service.name} exited with code {code}; last lines of {service.log_path}:\n"
                                 f"{service.log_tail()}")

    def stop(self) -> None:
        """SIGTERM every process group, wait up to STOP_GRACE_S seconds, then SIGKILL what is left."""
        running = [s for s in self.services if s.process is not None]
        for service in reversed(running):
            _signal_group(service.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for service in reversed(running):
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop within %g s; killing it", service.name,
                               service.process.pid, STOP_GRACE_S)
            # The group may hold processes the child started, even when the child has exited.
            _signal_group(service.process, signal.SIGKILL)
            service.process.wait()
        if running:
            print("stopped " + ", ".join(s.name for s in running), flush=True)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address every process listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="broker port (default 8000; 0 picks a free port)")
    parser.add_argument("--receiver-port", type=int, default=8001,
                        help=f"port of the {RECEIVER} agent (default 8001; 0 picks a free port)")
    parser.add_argument("--sharer-port", type=int, default=8002,
                        help=f"port of the {SHARER} agent (default 8002; 0 picks a free port)")
    parser.add_argument("--bridges", default=None,
                        help="folder of bridge folders the broker loads (default: bridges/trained of the package)")
    parser.add_argument("--t2t-max-tokens", type=int, default=None,
                        help="max tokens a sharer writes in t2t mode (default: the broker's, 256)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads per agent (default: half the CPU cores, since two agents share them)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="most concurrent requests whose decode steps an agent runs as one batch (default: the "
                             "agent's, 16; 1 turns batching off)")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for all processes to become healthy (default 600; the first start "
                             "downloads and converts the models)")
    parser.add_argument("--log-dir", default=None, help="folder for the process logs (default $CACHETALK_HOME/logs)")
    parser.add_argument("--demo", action="store_true",
                        help="ask one question in c2c, t2t and solo mode, print answers and timings, then stop")
    parser.add_argument("--demo-max-tokens", type=int, default=48, help="max tokens per demo answer (default 48)")


def run(args: argparse.Namespace) -> int:
    if args.bridges is None:
        from cachetalk.bridges.store import default_bridge_dir

        args.bridges = str(default_bridge_dir())
    args.log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())

    previous = {s: signal.signal(s, raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    stack = None
    try:
        with tempfile.TemporaryDirectory(prefix="cachetalk-up-") as run_dir:
            stack = Stack(args, Path(run_dir))
            if not any(b.name == DEFAULT_BRIDGE for b in stack.bridges):
                print(f"warning: no bridge {DEFAULT_BRIDGE} in {args.bridges}; c2c from {SHARER} to {RECEIVER} "
                      "answers 400 until one is trained (cachetalk bridge train)", flush=True)
            stack.start()
            stack.wait_healthy(args.ready_timeout)
            print(f"ready: broker {stack.broker_url} (OpenAI base URL {stack.broker_url}/v1), agents "
                  + ", ".join(f"{s.name} {s.url}" for s in stack.services[:-1]), flush=True)
            if args.demo:
                from cachetalk.server.stack_demo import run_demo

                logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
                return run_demo(stack.broker_url, RECEIVER, SHARER, args.demo_max_tokens)
            print("press Ctrl-C to stop", flush=True)
            while True:
                stack.check_running()
                time.sleep(1.0)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Stopped as exc:
        print(f"received {exc}, stopping", flush=True)
        return 0
    finally:
        # Signals stay handled until every child is stopped, so a second Ctrl-C cannot
        # interrupt the stop and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if stack is not None:
            stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
