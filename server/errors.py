"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError`. `install_error_handlers` sends it in that shape with its
status, and does the same for FastAPI's request validation errors (400 as in OpenAI's
API, where FastAPI would send 422) and Starlette's HTTP errors (unknown route, wrong
method). Each error's message is added to the request's log line.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error sent to the client as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        default_type = "server_error" if status >= 500 else "invalid_request_error"
        self.error_type = error_type or ERROR_TYPES.get(status, default_type)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def encode_error(error: APIError) -> bytes:
    """Serialize an error body for code that sends raw ASGI messages."""
    return json.dumps(error.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def model_not_found(requested: str, served: str) -> APIError:
    return APIError(404, f"The model `{requested}` does not exist; this server serves `{served}`.",
                    param="model", code="model_not_found")


def context_overflow(limit: int, prompt_tokens: int, completion_tokens: int, where: str = "messages") -> APIError:
    """Build the context-overflow error in the wording that OpenAI clients parse.

    `where` is "messages" for chat requests and "prompt" for the others.
    """
    requested = prompt_tokens + completion_tokens
    message = (f"This model's maximum context length is {limit} tokens. However, you requested {requested} "
               f"tokens ({prompt_tokens} in the {where}, {completion_tokens} in the completion). "
               "Please reduce the length of the messages or completion.")
    return APIError(400, message, param=where, code="context_length_exceeded")


def body_too_large(size: int | None, limit: int) -> APIError:
    """Build the 413 error. `size` is the declared Content-Length, or None when the bytes read went over."""
    size_text = "" if size is None else f" ({size} bytes)"
    return APIError(413, f"Request body{size_text} is over the limit of {limit} bytes; "
                    "send a smaller request or start the server with a larger --max-body-mb.",
                    code="request_too_large")


def validation_error(errors: list[dict]) -> APIError:
    """Summarize pydantic errors as one 400 whose `param` is the first invalid field."""
    if errors and errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "JSON decode error")
        position = errors[0].get("loc", ("body", "?"))[-1]
        return bad_request(f"The request body is not valid JSON: {reason} at character {position}.", param="body",
                           code="invalid_json")
    parts = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        where = ".".join(location) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid value')}")
    first = [str(part) for part in errors[0].get("loc", ()) if part != "body"] if errors else []
    return bad_request("Invalid request: " + "; ".join(parts), param=".".join(first) or None)


def respond(request: Request, error: APIError) -> JSONResponse:
    """Send `error` and record its message in the request's log line (see RequestLogMiddleware)."""
    details = getattr(request.state, "log_details", None)
    if details is not None:
        details["error"] = json.dumps(error.message)
    else:
        logger.info("request failed with %d: %s", error.status, error.message)
    return error_response(error)


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return respond(request, exc)


async def _validation_handler(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    return respond(request, validation_error(list(exc.errors())))


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    messages = {404: f"Not found: {request.method} {request.url.path}",
                405: f"Method {request.method} is not allowed on {request.url.path}"}
    message = messages.get(exc.status_code, str(exc.detail))
    response = respond(request, APIError(exc.status_code, message, code=None))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Send every handled error as an OpenAI error body; RequestLogMiddleware turns the others into a 500."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
