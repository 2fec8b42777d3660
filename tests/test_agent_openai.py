"""The `openai` package talks to a real agent unchanged: chat, streaming, completions, models, stop, seed."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import AgentProcess

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are"


def client_for(agent: AgentProcess) -> OpenAI:
    return OpenAI(base_url=f"{agent.url}/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def smollm(smollm_agent) -> OpenAI:
    return client_for(smollm_agent)


def first_occurrence_cut(text: str) -> tuple[str, str]:
    """Pick a stop string from the middle of `text`; return it and the text before its first occurrence."""
    start = len(text) // 2
    stop = text[start:start + 3]
    return stop, text[:text.index(stop)]


def test_models_list(smollm):
    models = smollm.models.list().data
    assert [model.id for model in models] == ["smollm2-135m"]
    assert models[0].object == "model"
    assert models[0].owned_by == "cachetalk"
    assert models[0].model_extra["max_model_len"] == 8192  # SmolLM2-135M's max_position_embeddings


def test_chat_completion(smollm):
    response = smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=12,
                                              temperature=0)
    choice = response.choices[0]
    assert response.id.startswith("chatcmpl-")
    assert response.model == "smollm2-135m"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_with_usage(smollm):
    whole = smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_completion_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices
                      if chunk.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish_reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert {chunk.id for chunk in chunks} == {chunks[0].id}


def test_completion(smollm):
    response = smollm.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=8, temperature=0)
    assert response.id.startswith("cmpl-")
    assert response.object == "text_completion"
    assert response.choices[0].text
    assert response.choices[0].finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= 8


def test_completion_stream_with_usage(smollm):
    whole = smollm.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(smollm.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))

    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage


def test_completion_stop_honoured(smollm):
    free = smollm.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0)
    stop, expected = first_occurrence_cut(free.choices[0].text)

    stopped = smollm.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0,
                                        stop=[stop, "\nObservation:"])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_stream_stop_honoured(smollm):
    free = smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=16, temperature=0)
    stop, expected = first_occurrence_cut(free.choices[0].message.content)

    chunks = list(smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=16,
                                                 temperature=0, stop=stop, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_ignore_eos_decodes_to_max_tokens(smollm):
    question = [{"role": "user", "content": "What is 2+2?"}]
    plain = smollm.chat.completions.create(model="smollm2-135m", messages=question, max_tokens=24, temperature=0)
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 24

    forced = smollm.chat.completions.create(model="smollm2-135m", messages=question, max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length"
    assert forced.usage.completion_tokens == 24
    assert forced.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_frequency_penalty_curbs_repeats(smollm):
    prompt = "red, green, red, green, red, green,"
    plain = smollm.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0)
    penalized = smollm.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0,
                                          frequency_penalty=2.0)
    plain_text, penalized_text = plain.choices[0].text, penalized.choices[0].text
    assert penalized_text != plain_text
    assert penalized_text.count("blue") < plain_text.count("blue")


def test_seed_repeats_sampling(smollm):
    texts = [smollm.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                       top_p=0.95, seed=1234).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]


def test_unknown_model_raises_not_found(smollm):
    with pytest.raises(openai.NotFoundError) as error:
        smollm.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert error.value.code == "model_not_found"
    assert error.value.param == "model"


def test_context_overflow_raises_bad_request(smollm):
    with pytest.raises(openai.BadRequestError) as error:
        smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=9000)
    assert error.value.code == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in error.value.message


def test_gemma_chat_and_models(gemma_agent):
    client = client_for(gemma_agent)
    models = client.models.list().data
    assert [model.id for model in models] == ["gemma3-270m"]
    assert models[0].model_extra["max_model_len"] == 32768  # Gemma 3 270M's max_position_embeddings

    response = client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.choices[0].message.content
    assert 0 < response.usage.completion_tokens <= 8

    chunks = list(client.chat.completions.create(model="gemma3-270m", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == response.choices[0].message.content
    assert chunks[-1].usage == response.usage


def metric_value(agent: AgentProcess, name: str) -> float:
    """Sum a metric's samples over all label values."""
    text = httpx.get(f"{agent.url}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_metrics_count_chat_tokens(smollm_agent, smollm):
    names = ["cachetalk:prompt_tokens_total", "cachetalk:generation_tokens_total",
             "cachetalk:e2e_request_latency_seconds_count", "cachetalk:time_to_first_token_seconds_count"]
    before = {name: metric_value(smollm_agent, name) for name in names}
    response = smollm.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=4, temperature=0)
    after = {name: metric_value(smollm_agent, name) for name in names}

    assert after["cachetalk:prompt_tokens_total"] - before["cachetalk:prompt_tokens_total"] == \
        response.usage.prompt_tokens
    assert after["cachetalk:generation_tokens_total"] - before["cachetalk:generation_tokens_total"] == \
        response.usage.completion_tokens
    assert after["cachetalk:e2e_request_latency_seconds_count"] - \
        before["cachetalk:e2e_request_latency_seconds_count"] == 1
    assert after["cachetalk:time_to_first_token_seconds_count"] - \
        before["cachetalk:time_to_first_token_seconds_count"] == 1
    assert metric_value(smollm_agent, "cachetalk:requests_total") > 0
