"""`cachetalk up`: the demo end to end, and stopping by signal with no process left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker_fixtures import DEFAULT_BRIDGE

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 600
STARTED = re.compile(r"^started (\S+) \(pid (\d+)\)")


def up_command(bridges: Path | None, log_dir: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "cachetalk.cli", "up", "--port", "0", "--receiver-port", "0",
               "--sharer-port", "0", "--threads", "1", "--t2t-max-tokens", "8", "--log-dir", str(log_dir), *extra]
    if bridges is not None:
        command += ["--bridges", str(bridges)]
    return command


@pytest.fixture
def bridges_dir(request) -> Path | None:
    """None (the shipped bridges) when the trained default bridge exists, else the test bridges."""
    from cachetalk.bridges.store import default_bridge_dir

    if (default_bridge_dir() / DEFAULT_BRIDGE / "bridge.json").is_file():
        return None
    # The test bridges need the session agents (for the model fingerprints): start them only here.
    return request.getfixturevalue("test_bridges")[DEFAULT_BRIDGE].parent


def started_pids(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in map(STARTED.match, output.splitlines()) if m}


def assert_gone(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # each child led its own process group


class LineReader:
    """Read a process's stdout in a thread, so that the test can wait for a line with a timeout."""

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        pytest.fail(f"no line matching {pattern!r}; output so far:\n{''.join(self.seen)}")


def test_up_demo_answers_each_mode(bridges_dir, tmp_path):
    result = subprocess.run(up_command(bridges_dir, tmp_path, "--demo", "--demo-max-tokens", "6"),
                            capture_output=True, text=True, timeout=READY_TIMEOUT_S + 300)

    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    for mode in ("c2c", "t2t", "solo"):
        assert re.search(rf"^{mode}: smollm2-135m", output, re.M), output
    assert output.count("answer: ") == 3
    assert output.count("timings (ms): ") == 3
    assert "bridge " in output
    pids = started_pids(output)
    assert set(pids) == {"smollm2-135m", "gemma3-270m", "broker"}
    assert_gone(pids)


@pytest.mark.parametrize("signum, when", [(signal.SIGTERM, "ready"), (signal.SIGINT, "loading")])
def test_up_stops_every_process_on_signal(bridges_dir, tmp_path, signum, when):
    process = subprocess.Popen(up_command(bridges_dir, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    reader = LineReader(process)
    try:
        reader.wait_for(r"^started broker", timeout=60)
        if when == "ready":
            reader.wait_for(r"^ready: broker http://127\.0\.0\.1:\d+", timeout=READY_TIMEOUT_S)
        process.send_signal(signum)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    output = "".join(reader.seen)
    pids = started_pids(output)
    assert code == 0, output
    assert set(pids) == {"smollm2-135m", "gemma3-270m", "broker"}
    assert_gone(pids)
