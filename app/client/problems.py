"""Typed exceptions for the API's RFC 9457 problem documents (application/problem+json).

Every error answer of the API is a problem document `{type, title, status, detail, instance?, errors?}`
(app/core/errors.py). `raise_for_problem` turns a response with status >= 400 into the `ProblemError`
subclass for its status, carrying those members, the raw body and `retry_after` (seconds, from the
`Retry-After` header; the API sends it on 202, on 409 for results of an unfinished job, 429 and 503).
"""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime
from datetime import UTC, datetime
from typing import Any

import httpx


class PbrfClientError(Exception):
    """Base of every error this client raises itself (transport errors stay httpx.HTTPError)."""


class WaitTimeout(PbrfClientError, TimeoutError):
    """wait_for_audit gave up: the audit had not ended within the timeout."""

    def __init__(self, message: str, audit: Any = None):
        super().__init__(message)
        self.audit = audit


class ProblemError(PbrfClientError):
    """An error answer of the API.

    status: the HTTP status; type: the problem type URI (`https://pbrf-audit.dev/problems/<slug>`);
    title, detail, instance, errors (request validation errors: loc, msg, type) as the server sent them;
    body: the raw decoded body (a dict; for a body that is not JSON, {"detail": <text>});
    retry_after: seconds from the Retry-After header, or None; headers: the response headers.
    """

    def __init__(self, status: int, type: str, title: str, detail: str, *, instance: str | None = None,
                 errors: list[dict] | None = None, body: dict | None = None, retry_after: float | None = None,
                 headers: httpx.Headers | None = None):
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.instance = instance
        self.errors = errors
        self.body = body if body is not None else {}
        self.retry_after = retry_after
        self.headers = headers

    @property
    def slug(self) -> str:
        """The last segment of `type`, e.g. "not-found", "audit-not-succeeded"."""
        return self.type.rstrip("/").rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, type={self.type!r}, detail={self.detail!r})"


class BadRequest(ProblemError):
    """400, e.g. `invalid-cursor`, or an upload the server refused."""


class Unauthorized(ProblemError):
    """401: a missing, unknown or revoked API key."""


class Forbidden(ProblemError):
    """403."""


class NotFound(ProblemError):
    """404: no such object for this tenant (another tenant's objects are not found either)."""


class Conflict(ProblemError):
    """409, e.g. `audit-not-succeeded` (results of an unfinished audit: see retry_after), `audit-active`,
    `model-in-use`."""


class PayloadTooLarge(ProblemError):
    """413: an upload over the server's size limit."""


class UnsupportedMediaType(ProblemError):
    """415, e.g. a pickled .pt model."""


class ValidationFailed(ProblemError):
    """422: the request's data was refused; `errors` lists each field's problem where the server named them."""


class RateLimited(ProblemError):
    """429: too many active jobs or requests; `retry_after` says when to try again."""


class ServerError(ProblemError):
    """5xx."""


class ServiceUnavailable(ServerError):
    """503: the database or server is busy (see retry_after), or a dependency is unreachable."""


_BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: ValidationFailed, 429: RateLimited, 503: ServiceUnavailable}


def problem_class(status: int) -> type[ProblemError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ProblemError


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds ("2") or an HTTP date (RFC 9110 10.2.3);
    None when absent or unreadable. A date in the past gives 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def problem_from_response(response: httpx.Response) -> ProblemError:
    """The typed exception for an error response (its body must have been read)."""
    status = response.status_code
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        # not a problem document (a proxy's HTML page, an empty body): keep what there is
        text = response.text.strip()
        body = {"detail": text[:2000]} if text else {}
    title = str(body.get("title") or response.reason_phrase or "HTTP error")
    detail = body.get("detail")
    detail = detail if isinstance(detail, str) else (json.dumps(detail) if detail is not None else "")
    errors = body.get("errors") if isinstance(body.get("errors"), list) else None
    return problem_class(status)(
        status, str(body.get("type") or "about:blank"), title, detail, instance=body.get("instance"), errors=errors,
        body=body, retry_after=parse_retry_after(response.headers.get("Retry-After")), headers=response.headers)


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the ProblemError subclass for an error response (status >= 400); reads a streamed body."""
    if response.status_code < 400:
        return
    response.read()
    raise problem_from_response(response)
