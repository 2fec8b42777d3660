"""The agent's cachetalk endpoints: tokenization, KV cache export (prefill) and generation from an imported cache.

A broker tokenizes with /v1/tokenize (or rebuilds the tokenizer from /v1/tokenizer),
requests a prompt's KV cache from /v1/kv/prefill in the wire format, and sends a cache plus
the remaining prompt tokens to /v1/kv/generate.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from cachetalk.client import wire
from cachetalk.server.agent_openai import SSE_HEADERS, guard_events
from cachetalk.server.errors import bad_request, context_overflow, validation_error
from cachetalk.server.openai_api import SSE_DONE, KVGenerateRequest, PrefillRequest, TokenizeRequest, Usage, sse_event
from cachetalk.server.runtime import (
    DecodeStream,
    ModelRuntime,
    check_token_ids,
    encode_messages,
    encode_prompt,
    sampling_params,
)

if TYPE_CHECKING:
    from cachetalk.server.models import LoadedModel


def kv_router(runtime: ModelRuntime) -> APIRouter:
    router = APIRouter()
    tokenizer_files: dict[str, bytes] = {}

    @router.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        lm = runtime.require(body.model)
        if body.messages is not None:
            ids = encode_messages(lm, body.messages, body.add_generation_prompt)
        else:
            ids = list(lm.tokenizer.encode(body.prompt, add_special_tokens=True))
        return {"token_ids": ids, "count": len(ids), "max_model_len": lm.context_length}

    @router.get("/v1/tokenizer")
    async def tokenizer() -> Response:
        lm = runtime.require()
        if not tokenizer_files:
            tokenizer_files.update(await run_in_threadpool(save_tokenizer_files, lm))
        body = msgpack.packb({"name": lm.name, "fingerprint": lm.fingerprint, "files": tokenizer_files},
                             use_bin_type=True)
        return Response(body, media_type=wire.CONTENT_TYPE)

    @router.post("/v1/kv/prefill")
    async def kv_prefill(body: PrefillRequest, request: Request) -> Response:
        lm = runtime.require(body.model)
        token_ids = prompt_token_ids(lm, body)
        if len(token_ids) > lm.context_length:
            raise context_overflow(lm.context_length, len(token_ids), 0, where="prompt")

        message, prefill_s = await run_in_threadpool(export_cache, runtime, token_ids, body.dtype)
        runtime.metrics.kv_exported_tokens.labels(lm.name).inc(len(token_ids))
        runtime.metrics.kv_prefill.labels(lm.name).observe(prefill_s)
        request.state.log_details.update(tokens=len(token_ids), prefill_ms=f"{prefill_s * 1000:.1f}",
                                         bytes=len(message))
        headers = {"x-cachetalk-prefill-ms": f"{prefill_s * 1000:.1f}", "x-cachetalk-num-tokens": str(len(token_ids))}
        return Response(message, media_type=wire.CONTENT_TYPE, headers=headers)

    @router.post("/v1/kv/generate", response_model=None)
    async def kv_generate(request: Request):
        lm = runtime.require()
        body = parse_generate_body(await request.body())
        runtime.require(body.model)
        if body.request_id:
            request.state.request_id = body.request_id
        check_token_ids(lm, body.token_ids, "token_ids")

        started = time.perf_counter()
        cache, cached_tokens = await run_in_threadpool(import_cache, lm, body.cache, body.allow_dtype_cast)
        import_ms = round((time.perf_counter() - started) * 1000, 1)
        runtime.metrics.kv_imported_tokens.labels(lm.name).inc(cached_tokens)

        prompt_tokens = cached_tokens + len(body.token_ids)
        params = sampling_params(lm, prompt_tokens, body, body.max_tokens, where="prompt")
        stream = DecodeStream(runtime, request, cache, body.token_ids, params, prompt_tokens)
        request.state.log_details.update(cached_tokens=cached_tokens, import_ms=import_ms)

        if body.stream:
            events = generate_events(stream, request.state.request_id, import_ms)
            return StreamingResponse(guard_events(events, request), media_type="text/event-stream",
                                     headers=SSE_HEADERS)

        async with aclosing(stream.steps()) as steps:
            async for _ in steps:
                pass
        return generate_summary(stream, request.state.request_id, import_ms) | {
            "text": stream.text, "token_ids": stream.generated}

    return router


def prompt_token_ids(lm: LoadedModel, body: PrefillRequest) -> list[int]:
    if body.token_ids is not None:
        if not body.token_ids:
            raise bad_request("token_ids is empty; send at least one token.", param="token_ids")
        check_token_ids(lm, body.token_ids, "token_ids")
        return list(body.token_ids)
    if body.messages is not None:
        return encode_messages(lm, body.messages, body.add_generation_prompt)
    return encode_prompt(lm, body.prompt)


def export_cache(runtime: ModelRuntime, token_ids: list[int], dtype: str | None) -> tuple[bytes, float]:
    """Prefill `token_ids` and serialize the cache of every layer and position; return (message, seconds)."""
    from cachetalk.server.kv import cache_layers, prefill, to_wire  # needs torch, see runtime.py

    lm = runtime.lm
    with runtime.lock:
        started = time.perf_counter()
        cache, _ = prefill(lm, token_ids)
        seconds = time.perf_counter() - started
    return wire.encode(to_wire(lm, cache_layers(cache), token_ids, dtype)), seconds


def import_cache(lm: LoadedModel, message: bytes, allow_cast: bool):
    """Decode and validate a wire-format cache; return (DynamicCache, its token count)."""
    from cachetalk.server.kv import CacheMismatchError, build_cache, from_wire  # needs torch, see runtime.py

    try:
        kv = wire.decode(message)
        layers = from_wire(lm, kv, allow_cast=allow_cast)
    except wire.WireFormatError as exc:
        # "message" names the whole wire message, which is the request's `cache` field.
        param = "cache" if exc.field == "message" else exc.field
        raise bad_request(str(exc), param=param, code="invalid_kv_cache") from None
    except CacheMismatchError as exc:
        raise bad_request(str(exc), param=exc.field, code="kv_cache_mismatch") from None
    return build_cache(layers), kv.header.num_tokens


def parse_generate_body(raw: bytes) -> KVGenerateRequest:
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise bad_request(f"The request body is not valid msgpack ({reason}); send a msgpack map with content "
                          f"type {wire.CONTENT_TYPE}.", param="body", code="invalid_msgpack") from None
    if not isinstance(fields, dict):
        raise bad_request(f"The request body must be a msgpack map, got {type(fields).__name__}.", param="body",
                          code="invalid_msgpack")
    try:
        return KVGenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


def generate_summary(stream: DecodeStream, request_id: str, import_ms: float) -> dict:
    return {
        "id": request_id,
        "finish_reason": stream.finish_reason,
        "usage": Usage.of(stream.prompt_tokens, stream.completion_tokens).model_dump(),
        "timings": {"import_ms": import_ms, **stream.timings_ms()},
    }


async def generate_events(stream: DecodeStream, request_id: str, import_ms: float):
    async with aclosing(stream.steps()) as steps:
        async for step in steps:
            if step.token_id is not None or step.text:
                yield sse_event({"id": request_id, "text": step.text, "token_id": step.token_id})
    yield sse_event(generate_summary(stream, request_id, import_ms) | {"text": "", "token_id": None})
    yield SSE_DONE


def save_tokenizer_files(lm: LoadedModel) -> dict[str, bytes]:
    """Collect the files that `AutoTokenizer.from_pretrained(folder)` rebuilds this tokenizer from, plus generation_config.json."""
    with tempfile.TemporaryDirectory() as folder:
        lm.tokenizer.save_pretrained(folder)
        lm.model.generation_config.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}
