"""A Python client for the pbrf-audit REST API (synchronous, httpx); the CLI's audit commands use it.

It imports httpx and pydantic only (no FastAPI, SQLAlchemy, Celery or torch), so it installs beside
the server's dependencies without starting anything of the server. See client.py for an example.
"""

from .client import DEFAULT_SERVER, AuditClient, Backoff
from .models import (Audit, Dataset, Flag, LabelChange, LabelChanges, LabelsExport, Methods, Model, Page, Score,
                     Verdict)
from .problems import (BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, PbrfClientError, ProblemError,
                       RateLimited, ServerError, ServiceUnavailable, Unauthorized, UnsupportedMediaType,
                       ValidationFailed, WaitTimeout, parse_retry_after)

__all__ = ["DEFAULT_SERVER", "AuditClient", "Backoff", "Audit", "Dataset", "Flag", "LabelChange", "LabelChanges",
           "LabelsExport", "Methods", "Model", "Page", "Score", "Verdict", "BadRequest", "Conflict", "Forbidden",
           "NotFound", "PayloadTooLarge", "PbrfClientError", "ProblemError", "RateLimited", "ServerError",
           "ServiceUnavailable", "Unauthorized", "UnsupportedMediaType", "ValidationFailed", "WaitTimeout",
           "parse_retry_after"]
