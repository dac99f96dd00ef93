"""One error taxonomy for the whole gateway, rendered as the OpenAI error envelope.

Every failure a client can see is a `GatewayError` subclass carrying its HTTP status and
OpenAI error type; `envelope()` is the only renderer (JSON bodies and SSE error events).
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)


def envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    default_code = "context_length_exceeded"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(GatewayError):
    """The model's queue is full; come back after `Retry-After` seconds."""

    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"


class ClientClosed(GatewayError):
    status = 499
    type = "client_closed_request"


class ChatTemplateFailed(GatewayError):
    """The model's chat template itself broke on these messages: an error in the template, or
    past its time or size bound. The server's fault, not the request's."""

    status = 500
    type = "server_error"
    default_code = "chat_template_failed"


class UpstreamFailed(GatewayError):
    """The model's worker died or answered garbage while serving this request."""

    status = 502
    type = "server_error"
    default_code = "worker_failed"


class UpstreamUnreachable(UpstreamFailed):
    """Nothing was sent: the connection itself failed, so the request may be retried."""


class ModelUnavailable(GatewayError):
    """The model cannot serve now: its load failed, it is stopping, or it timed out loading."""

    status = 503
    type = "service_unavailable"
    default_code = "model_unavailable"


class OutOfMemory(ModelUnavailable):
    default_code = "out_of_memory"


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    default_code = "timeout"


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    502: UpstreamFailed,
    503: ModelUnavailable,
    504: GatewayTimeout,
}


def error_for_status(status: int, message: str, code: str | None = None) -> GatewayError:
    """The error class a bare HTTP status maps to (for framework-raised HTTP errors)."""
    cls = _BY_STATUS.get(status, BadRequest if 400 <= status < 500 else GatewayError)
    return cls(message, code=code)


# Statuses an upstream may answer that are about the gateway's own credentials or route to
# it, not about the client's request: relayed as they are they would mislead the client.
_NOT_RELAYED = {401, 403, 407}


def from_envelope(status: int, body: object, source: str = "the upstream") -> GatewayError:
    """Rebuild an error relayed from a worker or a remote upstream, keeping its status: a
    4xx or 5xx, except the engine's own 401/403/407, which like any other status (a 3xx,
    a 2xx other than 200) become a 502 that names it."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        shown = str(body)[:200] if body is not None else "a body that is not JSON"
        return UpstreamFailed(f"{source} answered HTTP {status} with {shown}")
    message = str(detail.get("message") or f"HTTP {status}")
    if not 400 <= status < 600 or status in _NOT_RELAYED:
        return UpstreamFailed(f"{source} answered HTTP {status}: {message[:500]}")
    err = error_for_status(status, message)
    err.status = status
    err.param = detail.get("param") if isinstance(detail.get("param"), str) else None
    code = detail.get("code")
    err.code = code if isinstance(code, str) else err.code
    if status == 503 and err.code == "out_of_memory":
        return OutOfMemory(err.message, param=err.param)
    return err
