"""OpenAI-compatible text endpoints of the agent: /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from cachetalk.server.errors import APIError
from cachetalk.server.openai_api import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    sse_event,
)
from cachetalk.server.runtime import DecodeStream, ModelRuntime, encode_messages, encode_prompt, sampling_params

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def openai_router(runtime: ModelRuntime) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        lm = runtime.require(body.model)
        prompt_ids = encode_messages(lm, body.messages)
        params = sampling_params(lm, len(prompt_ids), body, body.max_new_tokens(), where="messages")
        stream = DecodeStream(runtime, request, None, prompt_ids, params, len(prompt_ids))
        completion_id = f"chatcmpl-{request.state.request_id}"

        if body.stream:
            events = chat_events(stream, completion_id, lm.name, body.include_usage())
            return StreamingResponse(guard_events(events, request), media_type="text/event-stream",
                                     headers=SSE_HEADERS)

        async with aclosing(stream.steps()) as steps:
            async for _ in steps:
                pass
        return ChatCompletionResponse(
            id=completion_id, model=lm.name, usage=Usage.of(stream.prompt_tokens, stream.completion_tokens),
            choices=[ChatChoice(message=AssistantMessage(content=stream.text), finish_reason=stream.finish_reason)])

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request):
        lm = runtime.require(body.model)
        prompt_ids = encode_prompt(lm, body.prompt)
        params = sampling_params(lm, len(prompt_ids), body, body.max_tokens, where="prompt")
        stream = DecodeStream(runtime, request, None, prompt_ids, params, len(prompt_ids))
        completion_id = f"cmpl-{request.state.request_id}"

        if body.stream:
            events = completion_events(stream, completion_id, lm.name, body.include_usage())
            return StreamingResponse(guard_events(events, request), media_type="text/event-stream",
                                     headers=SSE_HEADERS)

        async with aclosing(stream.steps()) as steps:
            async for _ in steps:
                pass
        return CompletionResponse(
            id=completion_id, model=lm.name, usage=Usage.of(stream.prompt_tokens, stream.completion_tokens),
            choices=[CompletionChoice(text=stream.text, finish_reason=stream.finish_reason)])

    return router


async def chat_events(stream: DecodeStream, completion_id: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return sse_event(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice]))

    yield chunk(ChatDelta(role="assistant", content=""))
    async with aclosing(stream.steps()) as steps:
        async for step in steps:
            if step.text:
                yield chunk(ChatDelta(content=step.text))
            if step.finish_reason is not None:
                yield chunk(ChatDelta(), step.finish_reason)
    if include_usage:
        usage = Usage.of(stream.prompt_tokens, stream.completion_tokens)
        yield sse_event(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage))
    yield SSE_DONE


async def completion_events(stream: DecodeStream, completion_id: str, model: str,
                            include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    async with aclosing(stream.steps()) as steps:
        async for step in steps:
            if step.text or step.finish_reason is not None:
                choice = CompletionChoice(text=step.text, finish_reason=step.finish_reason)
                yield sse_event(CompletionResponse(id=completion_id, created=created, model=model, choices=[choice]))
    if include_usage:
        usage = Usage.of(stream.prompt_tokens, stream.completion_tokens)
        yield sse_event(CompletionResponse(id=completion_id, created=created, model=model, choices=[], usage=usage))
    yield SSE_DONE


async def guard_events(events: AsyncIterator[str], request: Request) -> AsyncIterator[str]:
    """Pass SSE events through; an error after the response started becomes an error event.

    The status line is already sent by then, so the error travels in the stream, in the
    same shape OpenAI uses, followed by `[DONE]`.
    """
    try:
        async for event in events:
            yield event
    except Exception as exc:
        request_id = request.state.request_id
        logger.error("request %s failed while streaming", request_id, exc_info=True)
        error = exc if isinstance(exc, APIError) else APIError(
            500, f"Internal server error while streaming request {request_id}; see the server log.",
            code="internal_error")
        yield sse_event(error.body())
        yield SSE_DONE
    finally:
        await events.aclose()

