"""KV cache export and import through a real agent's HTTP API, for both default models.

The central property: greedy generation from a cache that the agent exported, the
client decoded and re-encoded, and the agent imported again equals plain generation
from the prompt, token for token. For Gemma 3 the prompt is longer than its 512-token
sliding window, so the sliding-window layers must travel whole.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import httpx
import msgpack
import numpy as np
import pytest

from cachetalk.client import wire
from conftest import AGENT_FIXTURES, AgentProcess

pytestmark = pytest.mark.slow

MODELS = ["smollm2-135m", "gemma3-270m"]
TIMEOUT = httpx.Timeout(300.0)
GEMMA_SLIDING_WINDOW = 512


def long_prompt(sentences: int = 34) -> str:
    """A varied, deterministic text of about 600 tokens ending in a question."""
    colours = ["red", "green", "silver", "yellow", "black"]
    animals = ["fox", "heron", "badger", "otter", "lynx", "crow", "hare"]
    places = ["the harbour", "the old mill", "the library", "the market square", "the bridge", "the orchard"]
    names = ["Ada", "Brahim", "Chen", "Dagny", "Emeka", "Farah", "Gustav", "Hina"]
    parts = zip(range(1, sentences + 1), itertools.cycle(colours), itertools.cycle(animals),
                itertools.cycle(places), itertools.cycle(names))
    notes = [f"Note {i}: at {6 + i % 12} o'clock the {colour} {animal} crossed {place} and met {name}."
             for i, colour, animal, place, name in parts]
    return " ".join(notes) + " Question: whom did the silver otter meet? Answer:"


def tokenize(agent: AgentProcess, **body) -> list[int]:
    response = httpx.post(f"{agent.url}/v1/tokenize", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["token_ids"]


def prefill(agent: AgentProcess, **body) -> httpx.Response:
    response = httpx.post(f"{agent.url}/v1/kv/prefill", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == wire.CONTENT_TYPE
    return response


def generate(agent: AgentProcess, cache: bytes, token_ids: list[int], **options) -> dict:
    body = msgpack.packb({"cache": cache, "token_ids": token_ids, **options}, use_bin_type=True)
    response = httpx.post(f"{agent.url}/v1/kv/generate", content=body,
                          headers={"content-type": wire.CONTENT_TYPE}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def model_card(agent: AgentProcess) -> dict:
    return httpx.get(f"{agent.url}/v1/models", timeout=TIMEOUT).json()["data"][0]


@dataclass
class Export:
    agent: AgentProcess
    prompt_ids: list[int]
    message: bytes
    prefill_ms: float


@pytest.fixture(scope="module", params=MODELS)
def long_export(request) -> Export:
    """The cache of a long prompt except its last token, exported once per model."""
    agent = request.getfixturevalue(AGENT_FIXTURES[request.param])
    prompt_ids = tokenize(agent, prompt=long_prompt())
    response = prefill(agent, token_ids=prompt_ids[:-1])
    return Export(agent, prompt_ids, response.content, float(response.headers["x-cachetalk-prefill-ms"]))


def test_prompt_longer_than_sliding_window(long_export):
    assert len(long_export.prompt_ids) > GEMMA_SLIDING_WINDOW + 50


def test_prefill_header_matches_model(long_export):
    card = model_card(long_export.agent)
    kv = wire.decode(long_export.message)
    header = kv.header

    assert header.model == card["id"]
    assert header.fingerprint == card["fingerprint"]
    assert header.num_layers == card["num_layers"]
    assert header.layer_kinds == card["layer_kinds"]
    assert header.kv_heads == card["kv_heads"]
    assert header.head_dim == card["head_dim"]
    assert header.dtype == card["dtype"] == "float32"
    assert header.token_ids == long_export.prompt_ids[:-1]
    assert long_export.prefill_ms > 0


def test_prefill_keeps_every_position(long_export):
    kv = wire.decode(long_export.message)
    expected = (kv.header.kv_heads, len(long_export.prompt_ids) - 1, kv.header.head_dim)
    for index, (keys, values) in enumerate(kv.layers):
        assert keys.shape == expected, f"layer {index} ({kv.header.layer_kinds[index]}) keys"
        assert values.shape == expected, f"layer {index} ({kv.header.layer_kinds[index]}) values"
        assert np.isfinite(keys).all(), f"layer {index} keys"
        assert np.isfinite(values).all(), f"layer {index} values"
        # Early positions of sliding-window layers are real values, not padding.
        assert np.abs(keys[:, :8]).sum() > 0, f"layer {index} keys of the first tokens"


def test_reimported_cache_generates_like_plain(long_export):
    agent, prompt_ids = long_export.agent, long_export.prompt_ids
    reencoded = wire.encode(wire.decode(long_export.message))
    assert reencoded == long_export.message

    from_cache = generate(agent, reencoded, prompt_ids[-1:], max_tokens=12, temperature=0)
    plain = httpx.post(f"{agent.url}/v1/completions", timeout=TIMEOUT,
                       json={"prompt": prompt_ids, "max_tokens": 12, "temperature": 0}).json()

    assert from_cache["usage"]["completion_tokens"] > 0
    assert from_cache["text"] == plain["choices"][0]["text"]
    assert from_cache["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert from_cache["usage"] == plain["usage"]
    assert len(from_cache["token_ids"]) == from_cache["usage"]["completion_tokens"]
    assert set(from_cache["timings"]) == {"import_ms", "prefill_ms", "decode_ms"}


def test_streamed_generation_matches_plain_response(long_export):
    agent, prompt_ids = long_export.agent, long_export.prompt_ids
    whole = generate(agent, long_export.message, prompt_ids[-1:], max_tokens=6, temperature=0)

    body = msgpack.packb({"cache": long_export.message, "token_ids": prompt_ids[-1:], "max_tokens": 6,
                          "temperature": 0, "stream": True, "request_id": "stream-check"}, use_bin_type=True)
    with httpx.stream("POST", f"{agent.url}/v1/kv/generate", content=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]

    assert [event["token_id"] for event in events[:-1]] == whole["token_ids"]
    assert "".join(event["text"] for event in events) == whole["text"]
    assert {event["id"] for event in events} == {"stream-check"}
    final = events[-1]
    assert final["finish_reason"] == whole["finish_reason"]
    assert final["usage"] == whole["usage"]
    assert set(final["timings"]) == {"import_ms", "prefill_ms", "decode_ms"}


CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Which planet is known as the red planet?"}]


@pytest.mark.parametrize("model", MODELS)
def test_chat_from_cache_matches_chat_completion(agent_for, model):
    agent = agent_for(model)
    prompt_ids = tokenize(agent, messages=CHAT)
    exported = wire.decode(prefill(agent, messages=CHAT).content)
    assert exported.header.token_ids == prompt_ids

    message = prefill(agent, token_ids=prompt_ids[:-1]).content
    from_cache = generate(agent, message, prompt_ids[-1:], max_tokens=10, temperature=0)
    chat = httpx.post(f"{agent.url}/v1/chat/completions", timeout=TIMEOUT,
                      json={"model": model, "messages": CHAT, "max_tokens": 10, "temperature": 0}).json()

    assert from_cache["text"] == chat["choices"][0]["message"]["content"]
    assert from_cache["finish_reason"] == chat["choices"][0]["finish_reason"]
    assert from_cache["usage"] == chat["usage"]


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("model", MODELS)
def test_half_precision_exports_decode(agent_for, model):
    agent = agent_for(model)
    prompt = "The river runs past the mill and into the sea."
    reference = wire.decode(prefill(agent, prompt=prompt).content)
    half = wire.decode(prefill(agent, prompt=prompt, dtype="float16").content)
    brain = wire.decode(prefill(agent, prompt=prompt, dtype="bfloat16").content)

    assert half.header.dtype == "float16"
    assert brain.header.dtype == "bfloat16"
    assert half.header.token_ids == brain.header.token_ids == reference.header.token_ids
    for (keys, values), (half_keys, half_values), (brain_keys, brain_values) in zip(
            reference.layers, half.layers, brain.layers):
        assert half_keys.dtype == np.float16
        assert brain_keys.dtype == np.uint16
        np.testing.assert_allclose(half_keys.astype(np.float32), keys, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(half_values.astype(np.float32), values, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(bfloat16_to_float32(brain_keys), keys, rtol=8e-3, atol=1e-5)
        np.testing.assert_allclose(bfloat16_to_float32(brain_values), values, rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_half_precision_cache_generates_with_cast(agent_for, model):
    agent = agent_for(model)
    prompt_ids = tokenize(agent, prompt="Once upon a time there was a lighthouse keeper who")
    message = prefill(agent, token_ids=prompt_ids[:-1], dtype="bfloat16").content

    result = generate(agent, message, prompt_ids[-1:], max_tokens=4, temperature=0, allow_dtype_cast=True)
    assert result["usage"]["prompt_tokens"] == len(prompt_ids)
    assert result["usage"]["completion_tokens"] == len(result["token_ids"]) > 0


@pytest.mark.parametrize("model", MODELS)
def test_tokenizer_files_rebuild_tokenizer(agent_for, model, tmp_path):
    from transformers import AutoTokenizer

    agent = agent_for(model)
    response = httpx.get(f"{agent.url}/v1/tokenizer", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == wire.CONTENT_TYPE
    payload = msgpack.unpackb(response.content, raw=False)
    assert payload["name"] == model
    assert payload["fingerprint"] == model_card(agent)["fingerprint"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(payload["files"])

    for name, content in payload["files"].items():
        (tmp_path / name).write_bytes(content)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = long_prompt(4)
    assert tokenizer.encode(text) == tokenize(agent, prompt=text)
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode(rendered, add_special_tokens=False) == tokenize(agent, messages=CHAT)
