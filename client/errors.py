"""Errors raised by the client SDK, one class per kind of failure the broker reports."""

from __future__ import annotations


class CachetalkError(Exception):
    """An error returned by the broker, or no response at all.

    `status` is the HTTP status (None when no response arrived), `message` the server's
    message, and `type`, `param`, `code` the fields of its OpenAI-shaped error body.
    """

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


class BadRequestError(CachetalkError):
    """400: the request is invalid, for example c2c for a pair with no bridge."""


class NotFoundError(CachetalkError):
    """404: unknown receiver or sharer."""


class ServiceUnavailableError(CachetalkError):
    """503: an agent is still loading its model."""


class AgentError(CachetalkError):
    """502: an agent is down or failed while serving the request."""


class AgentTimeoutError(CachetalkError):
    """504: an agent timed out."""


class APIConnectionError(CachetalkError):
    """The broker could not be reached, the connection broke, or the request timed out."""


_BY_STATUS = {400: BadRequestError, 404: NotFoundError, 502: AgentError, 503: ServiceUnavailableError,
              504: AgentTimeoutError}


def error_from_body(status: int | None, body: object) -> CachetalkError:
    """Build the matching error from a status and a (possibly OpenAI-shaped) JSON body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", ""))
        kind, param, code = error.get("type"), error.get("param"), error.get("code")
        # An error sent inside a stream has no HTTP status of its own; the broker adds it.
        status = status if status is not None else error.get("status")
    else:
        message = str(body) if body else "no error message"
        kind = param = code = None
    cls = _BY_STATUS.get(status, CachetalkError)
    return cls(message, status=status, type=kind, param=param, code=None if code is None else str(code))
