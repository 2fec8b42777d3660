"""Each class of bad request gets its status and an OpenAI-shaped body, and the agent keeps serving.

Most tests use the session agents. The 503 and 413 tests start their own smollm2 agent
with a 1 MiB body limit and poll it before its model has loaded.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import httpx
import msgpack
import numpy as np
import pytest

from cachetalk.client import wire
from cachetalk.server.agent import create_app
from conftest import AgentProcess, launch_agent, stop_agent, wait_until_ready

TIMEOUT = httpx.Timeout(300.0)
MESSAGES = [{"role": "user", "content": "Say hello."}]


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def assert_serving(agent: AgentProcess) -> None:
    response = httpx.post(f"{agent.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 1}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


def post_generate(agent: AgentProcess, body: bytes) -> httpx.Response:
    return httpx.post(f"{agent.url}/v1/kv/generate", content=body, headers={"content-type": wire.CONTENT_TYPE},
                      timeout=TIMEOUT)


def generate_body(cache: bytes, token_ids: list[int], **options) -> bytes:
    return msgpack.packb({"cache": cache, "token_ids": token_ids, "max_tokens": 2, **options}, use_bin_type=True)


def export(agent: AgentProcess, **body) -> bytes:
    response = httpx.post(f"{agent.url}/v1/kv/prefill", json={"prompt": "A short prompt", **body}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.content


def model_card(agent: AgentProcess) -> dict:
    return httpx.get(f"{agent.url}/v1/models", timeout=TIMEOUT).json()["data"][0]


def count_tokens(agent: AgentProcess, **body) -> int:
    return httpx.post(f"{agent.url}/v1/tokenize", json=body, timeout=TIMEOUT).json()["count"]


VALIDATION_CASES = [
    ("chat without messages", "/v1/chat/completions", {"model": "smollm2-135m"}, "messages"),
    ("chat with no messages", "/v1/chat/completions", {"messages": []}, "messages"),
    ("max_tokens not a number", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
    ("max_tokens zero", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("temperature too high", "/v1/chat/completions", {"messages": MESSAGES, "temperature": 5}, "temperature"),
    ("several choices", "/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
     "messages.0.role"),
    ("image content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("completion without prompt", "/v1/completions", {"max_tokens": 2}, "prompt"),
    ("completion with log probabilities", "/v1/completions", {"prompt": "hi", "logprobs": 3}, "logprobs"),
    ("two prompts", "/v1/completions", {"prompt": ["one", "two"]}, None),
    ("tokenize prompt and messages", "/v1/tokenize", {"prompt": "hi", "messages": MESSAGES}, None),
    ("prefill without input", "/v1/kv/prefill", {"dtype": "float32"}, None),
    ("prefill unknown dtype", "/v1/kv/prefill", {"prompt": "hi", "dtype": "int8"}, "dtype"),
    ("prefill token id outside vocabulary", "/v1/kv/prefill", {"token_ids": [1, 10_000_000]}, "token_ids"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, path, body, param", VALIDATION_CASES, ids=[case[0] for case in VALIDATION_CASES])
def test_invalid_request_returns_400(smollm_agent, case, path, body, param):
    response = httpx.post(f"{smollm_agent.url}{path}", json=body, timeout=TIMEOUT)
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert_serving(smollm_agent)


@pytest.mark.slow
def test_invalid_json_returns_400(smollm_agent):
    response = httpx.post(f"{smollm_agent.url}/v1/chat/completions", content=b'{"messages": [',
                          headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert_error(response, 400, code="invalid_json", param="body")
    assert_serving(smollm_agent)


@pytest.mark.slow
def test_unknown_fields_are_ignored(smollm_agent):
    body = {"model": "smollm2-135m", "messages": MESSAGES, "max_tokens": 2, "user": "tester", "logit_bias": {},
            "presence_penalty": 0, "some_framework_field": {"nested": True}}
    response = httpx.post(f"{smollm_agent.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text


OVERFLOW = re.compile(r"This model's maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
                      r"\((\d+) in the (messages|prompt), (\d+) in the completion\)\. Please reduce the length of "
                      r"the messages or completion\.")


@pytest.mark.slow
def test_context_overflow_wording(smollm_agent):
    limit = model_card(smollm_agent)["max_model_len"]
    cases = [
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": limit}, "messages",
         count_tokens(smollm_agent, messages=MESSAGES)),
        ("/v1/completions", {"prompt": "Hello there", "max_tokens": limit}, "prompt",
         count_tokens(smollm_agent, prompt="Hello there")),
    ]
    for path, body, where, prompt_tokens in cases:
        error = assert_error(httpx.post(f"{smollm_agent.url}{path}", json=body, timeout=TIMEOUT), 400,
                             code="context_length_exceeded", param=where)
        match = OVERFLOW.fullmatch(error["message"])
        assert match, error["message"]
        assert match.groups() == (str(limit), str(prompt_tokens + limit), str(prompt_tokens), where, str(limit))
        assert_serving(smollm_agent)


@pytest.mark.slow
def test_prefill_and_generate_overflow(smollm_agent):
    limit = model_card(smollm_agent)["max_model_len"]
    response = httpx.post(f"{smollm_agent.url}/v1/kv/prefill", json={"token_ids": [1] * (limit + 1)},
                          timeout=TIMEOUT)
    error = assert_error(response, 400, code="context_length_exceeded")
    assert f"maximum context length is {limit} tokens" in error["message"]

    cache = export(smollm_agent)
    cached = wire.decode(cache).header.num_tokens
    error = assert_error(post_generate(smollm_agent, generate_body(cache, [1], max_tokens=limit)), 400,
                         code="context_length_exceeded")
    assert OVERFLOW.fullmatch(error["message"]).groups()[1:4] == (str(cached + 1 + limit), str(cached + 1), "prompt")
    assert_serving(smollm_agent)


@pytest.mark.slow
def test_malformed_msgpack_returns_400(smollm_agent):
    cache = export(smollm_agent)
    cases = [
        (b"\xc1\x00 not msgpack", "body", "invalid_msgpack"),
        (msgpack.packb([1, 2, 3]), "body", "invalid_msgpack"),
        (msgpack.packb({"token_ids": [1]}), "cache", "invalid_value"),
        (generate_body(b"\xc1 garbage", [1]), "cache", "invalid_kv_cache"),
        (generate_body(cache[:-100], [1]), "cache", "invalid_kv_cache"),
        (generate_body(cache, []), "token_ids", "invalid_value"),
    ]
    for body, param, code in cases:
        assert_error(post_generate(smollm_agent, body), 400, code=code, param=param)
    assert_serving(smollm_agent)


@pytest.mark.slow
def test_other_models_cache_mismatches_fingerprint(smollm_agent, gemma_agent):
    for sender, receiver in ((gemma_agent, smollm_agent), (smollm_agent, gemma_agent)):
        error = assert_error(post_generate(receiver, generate_body(export(sender), [2])), 400,
                             code="kv_cache_mismatch", param="fingerprint")
        assert receiver.model in error["message"]
        assert_serving(receiver)


def synthetic_cache(card: dict, num_layers: int, kv_heads: int, head_dim: int, token_ids: list[int]) -> bytes:
    """Zero-filled float32 cache whose header carries the model's fingerprint and the given shape."""
    header = wire.KVHeader(fingerprint=card["fingerprint"], dtype="float32", layer_kinds=["full"] * num_layers,
                           kv_heads=kv_heads, head_dim=head_dim, token_ids=token_ids)
    zeros = np.zeros((kv_heads, len(token_ids), head_dim), np.float32)  # [kv_heads, tokens, head_dim]
    return wire.encode(wire.KVCache(header, [(zeros, zeros)] * num_layers))


@pytest.mark.slow
def test_edited_header_mismatch_names_field(smollm_agent):
    card = model_card(smollm_agent)
    layers, heads, dim = card["num_layers"], card["kv_heads"], card["head_dim"]
    cases = {
        "num_layers": synthetic_cache(card, layers - 1, heads, dim, [1, 2]),
        "kv_heads": synthetic_cache(card, layers, heads + 1, dim, [1, 2]),
        "head_dim": synthetic_cache(card, layers, heads, dim * 2, [1, 2]),
        "token_ids": synthetic_cache(card, layers, heads, dim, [1, 10_000_000]),
        "dtype": export(smollm_agent, dtype="bfloat16"),
    }
    for field, cache in cases.items():
        error = assert_error(post_generate(smollm_agent, generate_body(cache, [2])), 400,
                             code="kv_cache_mismatch", param=field)
        assert field.replace("token_ids", "token id") in error["message"]
        assert_serving(smollm_agent)

    # The matching shape is accepted, which shows the cases above fail on their one edited field.
    response = post_generate(smollm_agent, generate_body(synthetic_cache(card, layers, heads, dim, [1, 2]), [2]))
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_unknown_model_returns_404(smollm_agent):
    requests = [
        ("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}),
        ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}),
        ("/v1/tokenize", {"model": "no-such-model", "prompt": "hi"}),
        ("/v1/kv/prefill", {"model": "no-such-model", "prompt": "hi"}),
    ]
    for path, body in requests:
        error = assert_error(httpx.post(f"{smollm_agent.url}{path}", json=body, timeout=TIMEOUT), 404,
                             code="model_not_found", param="model")
        assert "no-such-model" in error["message"]
    cache = export(smollm_agent)
    assert_error(post_generate(smollm_agent, generate_body(cache, [1], model="no-such-model")), 404,
                 code="model_not_found")
    assert_serving(smollm_agent)


@pytest.mark.slow
def test_unknown_route_and_method(smollm_agent):
    assert_error(httpx.get(f"{smollm_agent.url}/v1/no-such-endpoint", timeout=TIMEOUT), 404)
    assert_error(httpx.get(f"{smollm_agent.url}/v1/chat/completions", timeout=TIMEOUT), 405)
    assert_serving(smollm_agent)


def wait_for_log(agent: AgentProcess, pattern: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, agent.log()):
            return match.group(0)
        time.sleep(0.2)
    pytest.fail(f"no log line matching {pattern!r} within {timeout_s} s:\n{agent.log()[-3000:]}")


def running_decodes(agent: AgentProcess) -> float:
    text = httpx.get(f"{agent.url}/metrics", timeout=TIMEOUT).text
    return float(re.search(r"^cachetalk:num_requests_running\{[^}]*\} (\S+)$", text, re.M).group(1))


# Counting to 3,000 keeps a model busy for minutes unless the request is cancelled.
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


@pytest.mark.slow
def test_disconnect_cancels_streaming(smollm_agent):
    with httpx.stream("POST", f"{smollm_agent.url}/v1/completions", json={**COUNTING, "stream": True},
                      headers={"x-request-id": "disconnect-stream"}, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: ") for line in received)

    line = wait_for_log(smollm_agent, r"request disconnect-stream cancelled after (\d+) tokens")
    assert int(re.search(r"after (\d+)", line).group(1)) < 3000
    deadline = time.monotonic() + 60
    while running_decodes(smollm_agent) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_decodes(smollm_agent) == 0
    assert_serving(smollm_agent)


@pytest.mark.slow
def test_disconnect_cancels_non_streaming(smollm_agent):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{smollm_agent.url}/v1/completions", json=COUNTING, headers={"x-request-id": "disconnect-plain"},
                   timeout=httpx.Timeout(300.0, read=3.0))
    line = wait_for_log(smollm_agent, r"request disconnect-plain cancelled after (\d+) tokens")
    assert int(re.search(r"after (\d+)", line).group(1)) < 3000
    assert_serving(smollm_agent)


@pytest.fixture(scope="module")
def loading_agent(tmp_path_factory):
    """A fresh smollm2 agent with a 1 MiB body limit, plus the responses it gave before its model loaded."""
    agent = launch_agent("smollm2-135m", tmp_path_factory.mktemp("loading"), "--max-body-mb", "1")
    try:
        early = poll_while_loading(agent)
        wait_until_ready(agent)
        yield agent, early
    finally:
        stop_agent(agent)


def poll_while_loading(agent: AgentProcess, timeout_s: float = 300) -> dict[str, httpx.Response]:
    """Return the first /health, /v1/models and chat responses once the port accepts connections.

    The HTTP server binds before the model starts loading, and loading (importing torch,
    reading the weights, a warm-up pass) takes seconds, so these requests reach a loading agent.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and agent.process.poll() is None:
        try:
            health = httpx.get(f"{agent.url}/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        return {
            "health": health,
            "models": httpx.get(f"{agent.url}/v1/models", timeout=5),
            "chat": httpx.post(f"{agent.url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=5),
        }
    pytest.fail(f"agent never accepted connections:\n{agent.log()}")


@pytest.mark.slow
def test_loading_agent_returns_503(loading_agent):
    agent, early = loading_agent
    assert early["health"].status_code == 503
    assert early["health"].json() == {"status": "loading", "model": "smollm2-135m"}
    for name in ("models", "chat"):
        error = assert_error(early[name], 503, code="model_loading")
        assert error["type"] == "service_unavailable_error"
        assert "loading" in error["message"]

    assert httpx.get(f"{agent.url}/health", timeout=TIMEOUT).json() == {"status": "ok", "model": "smollm2-135m"}
    assert_serving(agent)


@pytest.mark.slow
def test_body_over_limit_returns_413(loading_agent):
    agent, _ = loading_agent
    too_big = b"\0" * (2 << 20)

    def chunks():
        for _ in range(32):
            yield b"\0" * (64 << 10)

    declared = httpx.post(f"{agent.url}/v1/kv/generate", content=too_big, timeout=TIMEOUT)
    assert "1048576 bytes" in assert_error(declared, 413, code="request_too_large")["message"]
    assert_serving(agent)

    streamed = httpx.post(f"{agent.url}/v1/kv/generate", content=chunks(), timeout=TIMEOUT)
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert_error(streamed, 413, code="request_too_large")
    assert_serving(agent)

    streamed_json = httpx.post(f"{agent.url}/v1/chat/completions", content=chunks(),
                               headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert_error(streamed_json, 413, code="request_too_large")
    assert_serving(agent)


def test_unhandled_exception_returns_500(caplog):
    app = create_app("smollm2-135m", load=False)

    @app.get("/fail")
    async def fail():
        raise RuntimeError("boom")

    async def call() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.get("/fail", headers={"x-request-id": "fail-1"}), await client.get("/health")

    with caplog.at_level(logging.ERROR, logger="cachetalk.server.middleware"):
        response, health = asyncio.run(call())

    error = assert_error(response, 500, code="internal_error")
    assert error["type"] == "server_error"
    assert "fail-1" in error["message"]
    assert response.headers["x-request-id"] == "fail-1"
    failures = [record for record in caplog.records if "fail-1" in record.getMessage()]
    assert failures and failures[0].exc_info is not None
    assert health.status_code == 503
    assert health.json() == {"status": "loading", "model": "smollm2-135m"}
