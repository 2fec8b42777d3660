"""c2c, t2t and solo through a real broker in front of real agents, with the SDK and the openai package.

Answers are greedy (temperature 0), so two ways of computing the same cache must give
the same text: a closed-gate bridge and a same-model handoff both equal solo.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from broker_fixtures import DEFAULT_BRIDGE, RECEIVER, SECOND_RECEIVER, SHARER
from cachetalk.client import BadRequestError, Client, NotFoundError

pytestmark = pytest.mark.slow

QUESTION = "Name three colors of the rainbow."
MAX_TOKENS = 8
C2C_STAGES = ("tokenize_ms", "sharer_prefill_ms", "receiver_prefill_ms", "transfer_ms", "serialization_ms",
              "bridge_ms", "decode_ms", "total_ms")


@pytest.fixture(scope="module")
def client(broker):
    with Client(broker.url, timeout=300) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def solo_text(client) -> str:
    return client.chat(QUESTION, model=RECEIVER, max_tokens=MAX_TOKENS, temperature=0).text


def ask(client: Client, **kwargs):
    return client.chat(QUESTION, model=RECEIVER, max_tokens=MAX_TOKENS, temperature=0, **kwargs)


def test_solo_reports_receiver_stages(client, solo_text):
    reply = ask(client, mode="solo")

    assert reply.text == solo_text
    assert reply.text.strip()
    assert reply.cachetalk.mode == "solo"
    assert reply.cachetalk.sharers == []
    assert reply.cachetalk.bridge is None
    timings = reply.cachetalk.timings
    assert timings.receiver_prefill_ms is not None
    assert timings.decode_ms is not None
    assert timings.total_ms >= timings.decode_ms
    assert timings.sharer_prefill_ms is None
    assert timings.bridge_ms is None


def test_c2c_is_default_with_sharers(client):
    reply = ask(client, sharers=[SHARER])

    assert reply.cachetalk.mode == "c2c"
    assert reply.cachetalk.sharers == [SHARER]
    assert reply.cachetalk.bridge == [DEFAULT_BRIDGE]
    assert reply.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.prompt_tokens > 10
    for stage in C2C_STAGES:
        assert getattr(reply.cachetalk.timings, stage) is not None, stage
    assert reply.cachetalk.timings.sharer_decode_ms is None


def test_t2t_reports_sharer_stages(client):
    reply = ask(client, sharers=[SHARER], mode="t2t")

    assert reply.cachetalk.mode == "t2t"
    assert reply.cachetalk.bridge is None
    assert reply.text.strip()
    timings = reply.cachetalk.timings
    assert timings.sharer_prefill_ms is not None
    assert timings.sharer_decode_ms is not None
    assert timings.receiver_prefill_ms is not None
    assert timings.bridge_ms is None
    assert [note.sharer for note in reply.cachetalk.notes] == [SHARER]
    assert isinstance(reply.cachetalk.notes[0].text, str)


@pytest.mark.parametrize("mode", ["c2c", "t2t", "solo"])
def test_stream_matches_whole_answer(client, mode):
    sharers = None if mode == "solo" else [SHARER]
    whole = ask(client, sharers=sharers, mode=mode)

    chunks = list(client.chat_stream(QUESTION, model=RECEIVER, sharers=sharers, mode=mode, max_tokens=MAX_TOKENS,
                                     temperature=0))

    assert "".join(chunk.text for chunk in chunks) == whole.text
    assert chunks[-1].cachetalk is not None
    assert chunks[-1].cachetalk.mode == mode
    assert chunks[-1].cachetalk.timings.total_ms is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.cachetalk is None for chunk in chunks[:-1])
    assert any(chunk.finish_reason in ("stop", "length") for chunk in chunks)


def test_closed_gate_equals_solo(client, solo_text):
    reply = ask(client, sharers=[SHARER], bridge="closed-gate")

    assert reply.cachetalk.bridge == ["closed-gate"]
    assert reply.text == solo_text


def test_open_random_bridge_changes_answer(client, solo_text):
    reply = ask(client, sharers=[SHARER], bridge="random-open")

    assert reply.cachetalk.bridge == ["random-open"]
    assert reply.text != solo_text


def test_same_model_handoff_equals_solo(client, solo_text):
    reply = ask(client, sharers=[SECOND_RECEIVER])

    assert reply.cachetalk.mode == "c2c"
    assert reply.cachetalk.bridge == [None]
    assert reply.text == solo_text
    assert reply.cachetalk.timings.receiver_prefill_ms is None  # the receiver did not prefill
    assert reply.cachetalk.timings.sharer_prefill_ms is not None
    assert reply.cachetalk.timings.bridge_ms is None


@pytest.mark.parametrize("mode", ["c2c", "t2t", "solo"])
def test_ignore_eos_reaches_the_receiver(client, mode):
    sharers = None if mode == "solo" else [SHARER]
    short = client.chat("What is 2+2?", model=RECEIVER, max_tokens=24, temperature=0)
    assert short.usage.completion_tokens < 24  # the receiver alone stops early

    reply = client.chat("What is 2+2?", model=RECEIVER, sharers=sharers, mode=mode, bridge="closed-gate"
                        if mode == "c2c" else None, max_tokens=24, temperature=0, ignore_eos=True)
    assert reply.finish_reason == "length"
    assert reply.usage.completion_tokens == 24


def test_penalties_reach_the_receiver(client):
    question = "Say red, green, red, green, red, green."
    plain = client.chat(question, model=RECEIVER, max_tokens=24, temperature=0)
    penalized = client.chat(question, model=RECEIVER, max_tokens=24, temperature=0, frequency_penalty=2.0,
                            presence_penalty=0.5)
    assert penalized.text != plain.text

    through_c2c = client.chat(question, model=RECEIVER, sharers=[SHARER], bridge="closed-gate", max_tokens=24,
                              temperature=0, frequency_penalty=2.0, presence_penalty=0.5)
    assert through_c2c.text == penalized.text


def test_two_sharers_fuse_in_turn(client, solo_text):
    reply = ask(client, sharers=[SHARER, SECOND_RECEIVER], bridge="closed-gate")

    assert reply.cachetalk.sharers == [SHARER, SECOND_RECEIVER]
    assert reply.cachetalk.bridge == ["closed-gate", None]
    assert reply.text == solo_text
    assert reply.cachetalk.timings.bridge_ms is not None


def test_openai_package_extra_body(broker):
    sdk = openai.OpenAI(base_url=f"{broker.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]

    reply = sdk.chat.completions.create(model=RECEIVER, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"cachetalk": {"sharers": [SHARER], "mode": "c2c"}})
    stream = sdk.chat.completions.create(model=RECEIVER, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, extra_body={"cachetalk": {"sharers": [SHARER]}})
    chunks = list(stream)

    assert reply.choices[0].message.content
    assert reply.model_extra["cachetalk"]["mode"] == "c2c"
    assert reply.model_extra["cachetalk"]["bridge"] == [DEFAULT_BRIDGE]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].model_extra["cachetalk"]["mode"] == "c2c"


def test_openai_package_sees_errors(broker):
    sdk = openai.OpenAI(base_url=f"{broker.url}/v1", api_key="unused", max_retries=0)

    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as no_bridge:
        sdk.chat.completions.create(model=SHARER, messages=[{"role": "user", "content": "Hi"}],
                                    extra_body={"cachetalk": {"sharers": [RECEIVER], "mode": "c2c"}})

    assert "no-such-model" in missing.value.message
    assert f"{RECEIVER}->{SHARER}" in no_bridge.value.message


def test_unknown_receiver_or_sharer_is_404(client):
    with pytest.raises(NotFoundError) as receiver:
        client.chat("Hi", model="no-such-model", max_tokens=2)
    with pytest.raises(NotFoundError) as sharer:
        client.chat("Hi", model=RECEIVER, sharers=["no-such-sharer"], max_tokens=2)

    assert receiver.value.status == 404
    assert "no-such-model" in receiver.value.message
    assert sharer.value.status == 404
    assert "no-such-sharer" in sharer.value.message
    assert sharer.value.param == "cachetalk.sharers"


def test_c2c_without_bridge_is_400(client):
    with pytest.raises(BadRequestError) as error:
        client.chat("Hi", model=SHARER, sharers=[RECEIVER], mode="c2c", max_tokens=2)

    assert error.value.status == 400
    assert f"{RECEIVER}->{SHARER}" in error.value.message
    for name in (DEFAULT_BRIDGE, "random-open", "closed-gate"):
        assert name in error.value.message
    assert error.value.code == "bridge_not_found"


@pytest.mark.parametrize("body, param", [
    ({"model": RECEIVER, "messages": [{"role": "user", "content": "Hi"}], "cachetalk": {"mode": "c2c"}},
     "cachetalk.sharers"),
    ({"model": RECEIVER, "messages": [{"role": "user", "content": "Hi"}],
      "cachetalk": {"sharers": [SHARER], "bridge": "no-such-bridge"}}, "cachetalk.bridge"),
    ({"model": RECEIVER, "messages": [{"role": "user", "content": "Hi"}], "cachetalk": {"mode": "telepathy"}},
     "cachetalk.mode"),
    ({"model": RECEIVER, "messages": []}, "messages"),
    ({"model": RECEIVER, "messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n"),
])
def test_invalid_request_is_400(broker, body, param):
    response = httpx.post(f"{broker.url}/v1/chat/completions", json=body, timeout=60)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]
    assert error["type"] == "invalid_request_error"


def test_listings_describe_agents_and_bridges(client):
    models = client.models()
    agents = {agent.name: agent for agent in client.agents()}
    bridges = {bridge.name: bridge for bridge in client.bridges()}
    health = client.health()

    assert [m.id for m in models] == [RECEIVER, SHARER, SECOND_RECEIVER]
    assert set(agents) == {RECEIVER, SHARER, SECOND_RECEIVER}
    assert all(agent.status == "ok" for agent in agents.values())
    assert agents[SECOND_RECEIVER].model["fingerprint"] == agents[RECEIVER].model["fingerprint"]
    assert agents[SHARER].model["fingerprint"] != agents[RECEIVER].model["fingerprint"]
    assert set(bridges) == {DEFAULT_BRIDGE, "random-open", "closed-gate"}
    assert bridges["closed-gate"].sharer == SHARER
    assert bridges["closed-gate"].receiver == RECEIVER
    assert bridges["closed-gate"].sharer_fingerprint == agents[SHARER].model["fingerprint"]
    assert bridges["closed-gate"].parameters > 0
    assert bridges["closed-gate"].size_bytes > 0
    assert health.status == "ok"
    assert {name: h.status for name, h in health.agents.items()} == dict.fromkeys(agents, "ok")


def test_health_reports_tokenizers_ready(client):
    deadline = time.monotonic() + 300
    while client.health().tokenizers == "loading" and time.monotonic() < deadline:
        time.sleep(0.5)

    health = client.health()
    assert health.tokenizers == "ready"
    assert health.ready is True


def test_metrics_expose_stage_histograms(broker, client):
    ask(client, sharers=[SHARER])

    text = httpx.get(f"{broker.url}/metrics", timeout=30).text

    for stage in ("sharer_prefill", "receiver_prefill", "bridge", "transfer", "decode", "total"):
        assert f'cachetalk_broker_stage_seconds_count{{mode="c2c",stage="{stage}"}}' in text, stage
    assert 'cachetalk_broker_requests_total{mode="c2c",outcome="ok"}' in text


def test_context_overflow_keeps_agent_wording(client):
    with pytest.raises(BadRequestError) as error:
        client.chat("word " * 9000, model=RECEIVER, mode="solo", max_tokens=2)

    assert error.value.message.startswith("This model's maximum context length is 8192 tokens")
    assert error.value.message.endswith(f"[agent {RECEIVER}]")
