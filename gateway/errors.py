"""Every failure a client can cause, as OpenAI's error envelope with a stable code.

    GatewayError                  raised by the gateway's own code
    ├── InvalidRequest            400 invalid_request
    ├── InvalidSignature          400 invalid_signature (a Stripe webhook not signed, or stale)
    ├── Unauthorized              401 invalid_api_key
    ├── Forbidden                 403 forbidden (an organization key on an admin route)
    ├── NotFound                  404 not_found / unknown_package
    ├── DuplicateRequest          409 duplicate_request (same Idempotency-Key in flight)
    ├── IdempotencyKeyReused      422 idempotency_key_reused
    ├── RateLimiterUnavailable    503 rate_limiter_unavailable
    ├── PaymentsUnavailable       503 payments_unavailable (no STRIPE_SECRET_KEY)
    └── UpstreamFailed            502 upstream_error / 504 upstream_timeout

One middleware maps these, the policy errors and the ledger errors to responses by class
(`_translate`); anything else is logged and answered with a 500 that reveals nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ledger import errors as ledger
from policies import errors as policy
from policies.pricing import credits_number

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewayError(Exception):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.param = param
        self.extra = extra


class InvalidRequest(GatewayError):
    pass


class InvalidSignature(GatewayError):
    code = "invalid_signature"


class Unauthorized(GatewayError):
    status, code = 401, "invalid_api_key"


class Forbidden(GatewayError):
    status, code, type = 403, "forbidden", "permission_error"


class NotFound(GatewayError):
    status, code, type = 404, "not_found", "not_found_error"

    def __init__(self, message: str, *, code: str = "not_found") -> None:
        super().__init__(message)
        self.code = code


class DuplicateRequest(GatewayError):
    status, code = 409, "duplicate_request"


class IdempotencyKeyReused(GatewayError):
    status, code = 422, "idempotency_key_reused"


class RateLimiterUnavailable(GatewayError):
    status, code, type = 503, "rate_limiter_unavailable", "service_unavailable"


class PaymentsUnavailable(GatewayError):
    status, code, type = 503, "payments_unavailable", "service_unavailable"


class UpstreamFailed(GatewayError):
    status, code, type = 502, "upstream_error", "upstream_error"

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        if timeout:
            self.status, self.code = 504, "upstream_timeout"


def error_body(
    message: str, type_: str, code: str, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return web.json_response(
        error_body(message, type_, code, param, **extra), status=status, headers=headers
    )


def _policy_response(exc: policy.PolicyError, request: web.Request) -> web.Response:
    if isinstance(exc, policy.AccessDenied):
        return error_response(
            403, str(exc), "permission_error", exc.reason, upgrade_plans=exc.upgrade_plans
        )
    if isinstance(exc, policy.RateLimitExceeded):
        seconds = max(1, -(-exc.retry_after_ms // 1000))
        headers = {"Retry-After": str(seconds), "retry-after-ms": str(exc.retry_after_ms)}
        return error_response(
            429, str(exc), "rate_limit_error", "rate_limit_exceeded", headers=headers
        )
    if isinstance(exc, policy.ModelNotFound):
        return error_response(
            404, str(exc), "invalid_request_error", "model_not_found", param="model"
        )
    code = (
        "unknown_capability"
        if isinstance(exc, policy.UnknownCapability)
        else ("unknown_quality_level")
    )
    return error_response(400, str(exc), "invalid_request_error", code)


def _ledger_response(exc: ledger.LedgerError, request: web.Request) -> web.Response:
    if isinstance(exc, ledger.InsufficientCredits):
        return error_response(
            402,
            "Insufficient credits for this request. Top up or lower max_tokens.",
            "insufficient_quota",
            "insufficient_credits",
            headers={"x-should-retry": "false"},
            required=credits_number(exc.required_micro),
            spendable=credits_number(exc.spendable_micro),
            topup_url=str(request.url.origin().join(request.app.router["packages"].url_for())),
        )
    if isinstance(exc, ledger.LedgerUnavailable):
        return error_response(
            503,
            "The credit ledger is unavailable; no call was made.",
            "service_unavailable",
            "ledger_unavailable",
        )
    table: dict[type[ledger.LedgerError], tuple[int, str]] = {
        ledger.UnknownPlan: (400, "unknown_plan"),
        ledger.UnknownOrganization: (404, "not_found"),
        ledger.UnknownReservation: (404, "not_found"),
        ledger.IdempotencyConflict: (422, "idempotency_key_reused"),
        ledger.PlanChangeNotAllowed: (409, "plan_change_not_allowed"),
        ledger.UnknownCatalogEntry: (400, "invalid_request"),
        ledger.InvalidArgument: (400, "invalid_request"),
    }
    status, code = table.get(type(exc), (500, "internal_error"))
    if status == 500:
        log.error("unexpected ledger error: %r", exc)
        return error_response(500, "Internal error.", "server_error", code)
    return error_response(status, str(exc), "invalid_request_error", code)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "invalid_request",
    400: "invalid_request",
}


def _http_response(exc: web.HTTPException) -> web.Response:
    code = _HTTP_CODES.get(exc.status, "invalid_request")
    message = {413: "Request body is larger than the limit."}.get(exc.status, exc.reason)
    allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return error_response(exc.status, message, "invalid_request_error", code, headers=allow)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(
            exc.status, str(exc), exc.type, exc.code, param=exc.param, **exc.extra
        )
    except policy.PolicyError as exc:
        return _policy_response(exc, request)
    except ledger.LedgerError as exc:
        return _ledger_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_response(exc)
    except Exception:  # the last resort for a bug: log it, reveal nothing to the client
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "Internal error.", "server_error", "internal_error")
