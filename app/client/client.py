"""AuditClient: a synchronous httpx client for the pbrf-audit REST API (v1).

    from app.client import AuditClient

    with AuditClient("http://127.0.0.1:8000", api_key=None) as api:
        model = api.upload_model("model.onnx", external_data=["model.onnx.data"])
        dataset = api.upload_dataset("train.npz")
        audit = api.start_audit(model, dataset, method="loo")
        audit = api.wait_for_audit(audit, on_progress=lambda a: print(a.status, a.stage, a.progress))
        for flag in api.iter_flags(audit):
            ...

Every error answer raises a ProblemError subclass (app/client/problems.py); results are pydantic models
(app/client/models.py). Objects may be passed where an id is expected (anything with an `id`).
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from .models import (TERMINAL, Audit, Dataset, Flag, LabelChanges, LabelsExport, Methods, Model, Page, Score,
                     Verdict, VerdictName)
from .problems import RateLimited, ServiceUnavailable, WaitTimeout, parse_retry_after, raise_for_problem

DEFAULT_SERVER = "http://127.0.0.1:8000"
USER_AGENT = "pbrf-audit-client/0.1.0"
Ref = str | uuid.UUID | Any  # an id, or an object with an `id` (Model, Dataset, Audit)
FileSource = str | os.PathLike | bytes | IO[bytes]


def _id(ref: Ref) -> str:
    value = getattr(ref, "id", ref)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise TypeError(f"expected an id or an object with an id, got {ref!r}")


class Backoff:
    """Capped exponential delays: initial, initial*factor, ... never above maximum."""

    def __init__(self, initial: float = 0.5, factor: float = 2.0, maximum: float = 10.0):
        if initial <= 0 or factor < 1 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        self.initial, self.factor, self.maximum = initial, factor, maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class AuditClient:
    """The pbrf-audit API. `base_url` is the server (default http://127.0.0.1:8000); `api_key` is sent as
    `Authorization: Bearer <key>` (None: an open server). `http` may be an httpx.Client of your own (e.g.
    Starlette's TestClient around the app); the client then does not close it."""

    def __init__(self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = httpx.Timeout(120.0, connect=10.0),
                 http: httpx.Client | None = None, headers: dict[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(base_url=self.base_url, timeout=timeout)
        self.sleep: Callable[[float], None] = time.sleep  # replaceable in tests

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        """One request; an error answer raises its ProblemError subclass."""
        response = self._http.request(method, path, headers=self._headers | (headers or {}), **kwargs)
        raise_for_problem(response)
        return response

    def _download(self, path: str, dest: Path, *, headers: dict[str, str], params: dict | None = None) -> httpx.Response:
        """Stream a response body to `dest` (through a temporary file beside it: never half-written)."""
        dest = Path(dest)
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        with self._http.stream("GET", path, headers=self._headers | headers, params=params) as response:
            raise_for_problem(response)
            try:
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                os.replace(partial, dest)
            finally:
                partial.unlink(missing_ok=True)
        return response

    @staticmethod
    def _file_part(name: str, source: FileSource, filename: str | None, stack: list) -> tuple:
        if isinstance(source, (bytes, bytearray)):
            if not filename:
                raise ValueError("bytes need a filename (its suffix tells the server the format)")
            return (name, (filename, bytes(source), "application/octet-stream"))
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            handle = open(path, "rb")
            stack.append(handle)
            return (name, (filename or path.name, handle, "application/octet-stream"))
        given = filename or os.path.basename(getattr(source, "name", "") or "")
        if not given:
            raise ValueError("a file object without a name needs a filename")
        return (name, (given, source, "application/octet-stream"))

    def _upload(self, path: str, files: list[tuple[str, FileSource, str | None]], data: dict,
                idempotency_key: str | None) -> dict:
        opened: list = []
        try:
            parts = [self._file_part(name, source, filename, opened) for name, source, filename in files]
            headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
            return self.request("POST", path, files=parts, data={k: v for k, v in data.items() if v is not None},
                                headers=headers).json()
        finally:
            for handle in opened:
                handle.close()

    # ------------------------------------------------------------------ models and datasets
    def upload_model(self, file: FileSource, *, external_data: list[FileSource] | None = None,
                     architecture: dict | str | None = None, name: str | None = None, filename: str | None = None,
                     idempotency_key: str | None = None) -> Model:
        """Upload an ONNX model (with its external-data files: each goes up under its own file name, which must
        be the `location` its tensors name), or .safetensors weights with `architecture` (a dict or JSON text,
        e.g. {"type": "mlp", "input_size": 64, "hidden_sizes": [32], "num_classes": 10})."""
        if isinstance(architecture, dict):
            architecture = json.dumps(architecture)
        files = [("file", file, filename)] + [("external_data", part, None) for part in external_data or []]
        return Model.model_validate(self._upload("/v1/models", files, {"name": name, "architecture": architecture},
                                                 idempotency_key))

    def upload_dataset(self, file: FileSource, *, name: str | None = None, filename: str | None = None,
                       idempotency_key: str | None = None) -> Dataset:
        """Upload a labelled training set: .npz (`inputs`, `labels`), .csv or .parquet (a `label` column)."""
        return Dataset.model_validate(self._upload("/v1/datasets", [("file", file, filename)], {"name": name},
                                                   idempotency_key))

    def get_model(self, model: Ref) -> Model:
        return Model.model_validate(self.request("GET", f"/v1/models/{_id(model)}").json())

    def list_models(self, limit: int = 100) -> list[Model]:
        return [Model.model_validate(m) for m in self.request("GET", "/v1/models", params={"limit": limit}).json()]

    def delete_model(self, model: Ref) -> None:
        self.request("DELETE", f"/v1/models/{_id(model)}")

    def get_dataset(self, dataset: Ref) -> Dataset:
        return Dataset.model_validate(self.request("GET", f"/v1/datasets/{_id(dataset)}").json())

    def list_datasets(self, limit: int = 100) -> list[Dataset]:
        return [Dataset.model_validate(d) for d in self.request("GET", "/v1/datasets", params={"limit": limit}).json()]

    def delete_dataset(self, dataset: Ref) -> None:
        self.request("DELETE", f"/v1/datasets/{_id(dataset)}")

    # ------------------------------------------------------------------ audits
    def methods(self) -> Methods:
        """The influence estimators the server offers, and its default."""
        return Methods.model_validate(self.request("GET", "/v1/methods").json())

    def start_audit(self, model: Ref, dataset: Ref, method: str | None = None, *, idempotency_key: str | None = None,
                    **params: Any) -> Audit:
        """POST /v1/audits. `params` are the audit's other settings as the API names them (damping, batch_size,
        seed, flag_fraction, curvature, verify_top_k, name, ...; the server validates them: 422 otherwise).
        With `idempotency_key`, a repeated call answers the first audit instead of starting another."""
        body = {"model_id": _id(model), "dataset_id": _id(dataset)} | ({"method": method} if method else {}) | params
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Audit.model_validate(self.request("POST", "/v1/audits", json=body, headers=headers).json())

    def get_audit(self, audit: Ref) -> Audit:
        return Audit.model_validate(self.request("GET", f"/v1/audits/{_id(audit)}").json())

    def list_audits(self, limit: int = 100) -> list[Audit]:
        items = self.request("GET", "/v1/audits", params={"limit": limit}).json()["items"]
        return [Audit.model_validate(a) for a in items]

    def cancel_audit(self, audit: Ref) -> Audit:
        return Audit.model_validate(self.request("POST", f"/v1/audits/{_id(audit)}/cancel").json())

    def delete_audit(self, audit: Ref) -> None:
        self.request("DELETE", f"/v1/audits/{_id(audit)}")

    def wait_for_audit(self, audit: Ref, *, timeout: float | None = None,
                       on_progress: Callable[[Audit], None] | None = None,
                       backoff: Backoff | None = None) -> Audit:
        """Poll GET /v1/audits/{id} until the audit has ended (succeeded, failed or cancelled) and return it;
        check `status` (this does not raise for a failed audit). Between polls it waits what the server's
        Retry-After says, else a capped exponential backoff (0.5 s doubling to 10 s). A 503 or 429 while
        polling is waited out the same way. `on_progress` gets every Audit polled (status, progress, stage).
        Raises WaitTimeout after `timeout` seconds (None: no limit)."""
        audit_id = _id(audit)
        backoff = backoff or Backoff()
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Audit | None = None
        while True:
            try:
                response = self.request("GET", f"/v1/audits/{audit_id}")
            except (ServiceUnavailable, RateLimited) as busy:  # transient: wait and ask again
                retry_after = busy.retry_after
            else:
                last = Audit.model_validate(response.json())
                if on_progress is not None:
                    on_progress(last)
                if last.status in TERMINAL:
                    return last
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None:
                delay = retry_after
                backoff.reset()
            else:
                delay = backoff.next_delay()
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = f"; last seen {last.status} at {last.stage} ({last.progress:.0%})" if last else ""
                    raise WaitTimeout(f"audit {audit_id} had not ended after {timeout} s{state}", last)
                delay = min(delay, remaining)
            self.sleep(delay)

    # ------------------------------------------------------------------ results
    def flags_page(self, audit: Ref, *, limit: int = 100, cursor: str | None = None) -> Page[Flag]:
        """One page of the audit's flagged examples, most suspicious first (409 Conflict until it succeeded)."""
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        body = self.request("GET", f"/v1/audits/{_id(audit)}/flags", params=params).json()
        return Page([Flag.model_validate(f) for f in body["items"]], body["next_cursor"])

    def iter_flags(self, audit: Ref, *, page_size: int = 500) -> Iterator[Flag]:
        """Every flag of the audit, most suspicious first, across all pages (fetched as iterated)."""
        cursor = None
        while True:
            page = self.flags_page(audit, limit=page_size, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def scores_page(self, audit: Ref, *, limit: int = 1000, cursor: str | None = None) -> Page[Score]:
        """One page of every example's score, in dataset order."""
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        body = self.request("GET", f"/v1/audits/{_id(audit)}/scores", params=params).json()
        return Page([Score.model_validate(s) for s in body["items"]], body["next_cursor"])

    def iter_scores(self, audit: Ref, *, page_size: int = 5000) -> Iterator[Score]:
        """Every example's score, in dataset order, across all pages (fetched as iterated)."""
        cursor = None
        while True:
            page = self.scores_page(audit, limit=page_size, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def scores_csv(self, audit: Ref) -> str:
        """Every example's score as the server's CSV (index,score,given_label,...)."""
        return self.request("GET", f"/v1/audits/{_id(audit)}/scores", headers={"Accept": "text/csv"}).text

    def download_scores_csv(self, audit: Ref, path: str | os.PathLike) -> Path:
        """Stream the scores CSV to `path`."""
        self._download(f"/v1/audits/{_id(audit)}/scores", Path(path), headers={"Accept": "text/csv"})
        return Path(path)

    def write_flags_csv(self, audit: Ref, path: str | os.PathLike) -> Path:
        """Write every flag (all pages) to a CSV file at `path`, one row per flag, columns as Flag's fields
        (the API serves flags as JSON only; this is the client's rendering)."""
        path = Path(path)
        columns = list(Flag.model_fields)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(partial, "w", newline="") as out:
                writer = csv.DictWriter(out, fieldnames=columns)
                writer.writeheader()
                for flag in self.iter_flags(audit):
                    writer.writerow({k: ("" if v is None else v) for k, v in flag.model_dump(mode="json").items()})
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    # ------------------------------------------------------------------ review
    def put_verdict(self, audit: Ref, index: int, verdict: VerdictName, corrected_label: int | None = None) -> Verdict:
        """Give (or replace) the verdict on the audit's flag at example `index`: "mislabeled" (with
        `corrected_label`, or the flag's suggestion when None), "correct" or "unsure"."""
        body: dict[str, Any] = {"verdict": verdict}
        if corrected_label is not None:
            body["corrected_label"] = corrected_label
        return Verdict.model_validate(
            self.request("PUT", f"/v1/audits/{_id(audit)}/flags/{int(index)}/verdict", json=body).json())

    def delete_verdict(self, audit: Ref, index: int) -> None:
        """Withdraw the verdict on the flag at example `index` (NotFound when there is none)."""
        self.request("DELETE", f"/v1/audits/{_id(audit)}/flags/{int(index)}/verdict")

    def label_changes(self, dataset: Ref, *, corrected: bool = True) -> LabelChanges:
        """The examples whose label the tenant's accepted corrections change."""
        response = self.request("GET", f"/v1/datasets/{_id(dataset)}/labels",
                                params={"corrected": str(corrected).lower()}, headers={"Accept": "application/json"})
        return LabelChanges.model_validate(response.json())

    def export_labels(self, dataset: Ref, path: str | os.PathLike, *, format: Literal["csv", "npz"] | None = None,
                      corrected: bool = True) -> LabelsExport:
        """Write the dataset's labels (with the accepted corrections applied unless corrected=False) to `path`:
        CSV `index,label,original_label`, or .npz with int64 `labels` and `original_labels`. The format is
        `format`, else the file suffix (.csv or .npz)."""
        path = Path(path)
        if format is None:
            format = {".csv": "csv", ".npz": "npz"}.get(path.suffix.lower())
            if format is None:
                raise ValueError(f"say format='csv' or 'npz' (the suffix of {path.name} says neither)")
        if format not in ("csv", "npz"):
            raise ValueError(f"format must be 'csv' or 'npz', not {format!r}")
        accept = "text/csv" if format == "csv" else "application/octet-stream"
        response = self._download(f"/v1/datasets/{_id(dataset)}/labels", path, headers={"Accept": accept},
                                  params={"corrected": str(corrected).lower()})
        return LabelsExport(path=path, format=format, corrected=corrected,
                            changed_examples=int(response.headers.get("X-Changed-Examples", "0")))


__all__ = ["AuditClient", "Backoff", "DEFAULT_SERVER"]
