"""The CLI's client commands: `audit`, `status`, `flags`, `export`, which talk to a running server through
app.client (registered on the `pbrf-audit` app by app/cli.py's `register`).

Exit codes: 0 done; 1 the audit failed or was cancelled; 2 a usage error; 3 the server answered an error
(problem+json: its type and detail are printed); 4 the server could not be reached; 5 --timeout passed;
130 interrupted while waiting (the audit goes on on the server).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import typer

from app.client import DEFAULT_SERVER, Audit, AuditClient, Flag, ProblemError, WaitTimeout

PANEL = "Client (talks to a running server; PBRF_SERVER, PBRF_API_KEY)"
EXIT_AUDIT_FAILED, EXIT_PROBLEM, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 3, 4, 5, 130

Server = Annotated[str, typer.Option("--server", envvar="PBRF_SERVER", help="The server's base URL")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="PBRF_API_KEY", show_default=False,
                                            help="API key, sent as Authorization: Bearer")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (progress and messages go to stderr)")]


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


@contextmanager
def _client(server: str, api_key: str | None) -> Iterator[AuditClient]:
    """An AuditClient whose errors end the command with a readable message and an exit code."""
    import httpx

    err = _stderr()
    try:
        with AuditClient(server, api_key) as api:
            yield api
    except ProblemError as problem:
        err.print(f"[bold red]error:[/] the server answered {problem.status} {problem.title}", markup=True)
        err.print(f"  type: {problem.type}", markup=False)
        err.print(f"  detail: {problem.detail}", markup=False)
        if problem.retry_after is not None:
            err.print(f"  retry after: {problem.retry_after:g} s", markup=False)
        raise typer.Exit(EXIT_PROBLEM) from None
    except httpx.HTTPError as exc:
        err.print(f"[bold red]error:[/] could not talk to the server at {server}: {type(exc).__name__}: {exc}",
                  markup=True)
        err.print("  (is it running? `make run` serves on http://127.0.0.1:8000; --server or PBRF_SERVER "
                  "say where)", markup=False)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except WaitTimeout as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(EXIT_TIMEOUT) from None


def _fail(message: str, code: int = 2) -> typer.Exit:
    _stderr().print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code)


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that reads as JSON (0.01, 64, true, null, "x", [1]) is that, else a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise _fail(f"--param takes key=value, not {pair!r}")
        try:
            params[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip().replace("-", "_")] = value
    return params


def _parse_architecture(value: str | None) -> dict | None:
    """JSON text, or @FILE / a path to a JSON file."""
    if value is None:
        return None
    text = value
    if value.startswith("@") or (not value.lstrip().startswith("{") and Path(value).is_file()):
        try:
            text = Path(value.removeprefix("@")).read_text()
        except OSError as exc:
            raise _fail(f"--architecture: cannot read {value!r}: {exc}") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"--architecture is not JSON ({exc}); e.g. "
                    '\'{"type": "mlp", "input_size": 64, "hidden_sizes": [32], "num_classes": 10}\'') from None
    if not isinstance(parsed, dict):
        raise _fail("--architecture must be a JSON object")
    return parsed


def _wait(api: AuditClient, audit: Audit, timeout: float | None) -> Audit:
    """Poll until the audit ends, showing its status, stage and progress on stderr: a live bar on a terminal,
    a line per stage otherwise (logs, CI)."""
    err = _stderr()
    try:
        if err.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

            with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                          TimeElapsedColumn(), console=err, transient=False) as bar:
                task = bar.add_task(f"{audit.status}: {audit.stage or ''}", total=1.0, completed=audit.progress)

                def show(current: Audit) -> None:
                    bar.update(task, completed=current.progress,
                               description=f"{current.status}: {current.stage or ''}")

                return api.wait_for_audit(audit, timeout=timeout, on_progress=show)
        seen: list[tuple] = []

        def log(current: Audit) -> None:
            state = (current.status, current.stage)
            if not seen or seen[-1] != state:
                seen.append(state)
                err.print(f"{current.status}: {current.stage or ''} {current.progress:.0%}", markup=False)

        return api.wait_for_audit(audit, timeout=timeout, on_progress=log)
    except KeyboardInterrupt:
        err.print(f"stopped waiting; the audit goes on on the server: pbrf-audit status {audit.id} --wait",
                  markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _flags_table(flags: list[Flag], title: str | None = None):
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("rank", "right"), ("index", "right"), ("given label", "right"), ("predicted", "right"),
                          ("suggested label", "right"), ("score", "right")):
        table.add_column(name, justify=justify)
    for f in flags:
        table.add_row(str(f.rank), str(f.index), str(f.given_label), str(f.predicted_label),
                      "-" if f.suggested_label is None else str(f.suggested_label), f"{f.score:.6g}")
    return table


def _top_flags(api: AuditClient, audit: Audit, top: int) -> list[Flag]:
    if top <= 0:
        return []
    return list(islice(api.iter_flags(audit, page_size=min(top, 1000)), top))


def _ended_badly(audit: Audit) -> str | None:
    if audit.status == "succeeded":
        return None
    return f"audit {audit.id} {audit.status}" + (f": {audit.error}" if audit.error else "")


def _summary_line(audit: Audit) -> str:
    summary = audit.summary or {}
    total = (summary.get("seconds") or {}).get("total")
    took = f" in {total:.1f} s" if isinstance(total, (int, float)) else ""
    return (f"audit {audit.id} {audit.status} ({audit.method}): {summary.get('num_flagged', '?')} of "
            f"{summary.get('num_examples', '?')} examples flagged{took}")


def audit(
    model: Annotated[Path, typer.Option("--model", exists=True, dir_okay=False, help=(
        "The model: .onnx, or .safetensors with --architecture"))],
    data: Annotated[Path, typer.Option("--data", exists=True, dir_okay=False, help=(
        "The labelled training set: .npz (inputs, labels), .csv or .parquet (a label column)"))],
    external_data: Annotated[list[Path] | None, typer.Option("--external-data", exists=True, dir_okay=False, help=(
        "An ONNX external-data file (e.g. model.onnx.data); repeat for several"))] = None,
    architecture: Annotated[str | None, typer.Option("--architecture", help=(
        'With .safetensors: the built-in architecture as JSON, e.g. '
        '\'{"type": "mlp", "input_size": 64, "hidden_sizes": [32], "num_classes": 10}\', or @FILE'))] = None,
    method: Annotated[str | None, typer.Option("--method", help="Influence estimator (server default: folds; "
                                                "see GET /v1/methods)")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help=(
        "Another audit setting as key=value (damping=0.01, batch_size=64, curvature=exact, flag_fraction=0.1, "
        "...); repeat for several"))] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="How many of the most suspicious flags to print")] = 10,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="Give up waiting after this many "
                                                  "seconds (exit 5; the audit goes on)")] = None,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a model and its training set, audit them, and print the most suspicious examples.

    Shows the audit's progress on stderr while it runs; exits 1 when it fails or is cancelled."""
    params = _parse_params(param or [])
    arch = _parse_architecture(architecture)
    err = _stderr()
    with _client(server, api_key) as api:
        with err.status(f"uploading {model.name} (the server converts and checks it)"):
            uploaded_model = api.upload_model(model, external_data=list(external_data or []), architecture=arch)
        err.print(f"model {uploaded_model.id}: {uploaded_model.num_parameters} parameters, "
                  f"{uploaded_model.num_outputs} outputs", markup=False)
        with err.status(f"uploading {data.name}"):
            dataset = api.upload_dataset(data)
        err.print(f"dataset {dataset.id}: {dataset.num_examples} examples, {dataset.num_classes} classes",
                  markup=False)
        started = api.start_audit(uploaded_model, dataset, method, **params)
        err.print(f"audit {started.id} ({started.method}) started", markup=False)
        final = _wait(api, started, timeout)
        problem = _ended_badly(final)
        flags = [] if problem else _top_flags(api, final, top)
    if as_json:
        _print_json({"audit": final.model_dump(mode="json"), "flags": [f.model_dump(mode="json") for f in flags]})
    elif not problem:
        out = _stdout()
        out.print(_flags_table(flags, title=f"top {len(flags)} flags, most suspicious first"))
        out.print(_summary_line(final), markup=False)
        out.print(f"all flags: pbrf-audit flags {final.id} --limit 1000; corrected labels after review: "
                  f"pbrf-audit export {dataset.id} --out labels.csv", markup=False)
    if problem:
        raise _fail(problem, EXIT_AUDIT_FAILED)


def status(
    audit_id: Annotated[str, typer.Argument(help="The audit's id")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until it ends, with a progress bar")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="With --wait: give up after this "
                                                  "many seconds (exit 5)")] = None,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show an audit's status, stage and progress (exit 1 when it failed or was cancelled)."""
    with _client(server, api_key) as api:
        current = api.get_audit(audit_id)
        if wait:
            current = _wait(api, current, timeout)
    if as_json:
        _print_json(current.model_dump(mode="json"))
    else:
        out = _stdout()
        out.print(f"audit {current.id}: {current.status}, stage {current.stage or '-'}, "
                  f"{current.progress:.0%} (method {current.method})", markup=False)
        if current.status == "succeeded":
            out.print(_summary_line(current), markup=False)
        if current.error:
            out.print(f"error: {current.error}", markup=False)
    if current.status in ("failed", "cancelled"):
        raise typer.Exit(EXIT_AUDIT_FAILED)


def flags(
    audit_id: Annotated[str, typer.Argument(help="The audit's id")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many flags, most suspicious first")] = 20,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List a succeeded audit's flagged examples, most suspicious first."""
    with _client(server, api_key) as api:
        found = list(islice(api.iter_flags(audit_id, page_size=min(limit, 1000)), limit))
    if as_json:
        _print_json([f.model_dump(mode="json") for f in found])
    else:
        _stdout().print(_flags_table(found, title=f"{len(found)} flags of audit {audit_id}"))


def export(
    dataset_id: Annotated[str, typer.Argument(help="The dataset's id")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="Where to write the labels")],
    format: Annotated[str | None, typer.Option("--format", help=(
        "csv (index,label,original_label) or npz (labels, original_labels); default: --out's suffix, else csv"))] = None,
    original: Annotated[bool, typer.Option("--original", help="The labels as uploaded, without the corrections")] = False,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
) -> None:
    """Write a dataset's labels with the accepted corrections (mislabeled verdicts) applied."""
    chosen = (format or {".npz": "npz"}.get(out.suffix.lower(), "csv")).lower()
    if chosen not in ("csv", "npz"):
        raise _fail(f"--format must be csv or npz, not {format!r}")
    with _client(server, api_key) as api:
        written = api.export_labels(dataset_id, out, format=chosen, corrected=not original)
    what = "as uploaded" if original else f"{written.changed_examples} changed by the accepted corrections"
    _stderr().print(f"wrote {written.path} ({written.format}; {what})", markup=False)


def register(app: typer.Typer) -> None:
    """Add the client commands to the `pbrf-audit` app."""
    for command in (audit, status, flags, export):
        app.command(rich_help_panel=PANEL)(command)
