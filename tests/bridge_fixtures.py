"""Fixtures shared by the bridge tests: the default models loaded in process, one torch thread."""

from __future__ import annotations

import pytest
import torch

from cachetalk.server.models import load_model


@pytest.fixture(scope="module")
def one_thread():
    # Passes over a few dozen tokens are too small to split across threads. On a busy
    # 2-core machine, two threads made them about 10x slower (measured with torch 2.13).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def receiver():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def sharer():
    return load_model("gemma3-270m")
