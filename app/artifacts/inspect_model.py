"""Validate an uploaded model in a separate, short-lived process.

The API never converts or runs an untrusted model in its own process: this module is executed as
`python -m app.artifacts.inspect_model PATH FORMAT` (JSON on stdin: the architecture, and the
external-data parts as {file name: path}) with a time limit and
an environment stripped of the service's settings and secrets. It prints one JSON line: the model's
metadata, or the ArtifactError that rejected it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .loaders import ArtifactError, load_model


@dataclass
class ModelMetadata:
    format: str
    num_parameters: int
    input_shape: list[int]
    num_outputs: int
    architecture: dict | None
    inputs: list[dict]


def inspect_in_subprocess(path: Path, fmt: str, architecture: str | None, timeout: float,
                          external: dict[str, Path] | None = None) -> ModelMetadata:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBRF_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    try:
        done = subprocess.run([sys.executable, "-m", "app.artifacts.inspect_model", str(path), fmt],
                              input=json.dumps({"architecture": architecture,
                                                "external": {k: str(v) for k, v in (external or {}).items()}}),
                              capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=path.parent)
    except subprocess.TimeoutExpired:
        raise ArtifactError("model-validation-timeout",
                            f"loading and smoke-testing the model took longer than {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise ArtifactError("model-validation-crashed",
                            f"the model crashed the validator (exit code {done.returncode}); it cannot be audited")
    result = json.loads(lines[-1])
    if "error" in result:
        raise ArtifactError(result["error"]["slug"], result["error"]["detail"], result["error"]["status"])
    return ModelMetadata(**result["ok"])


def main() -> None:
    path, fmt = Path(sys.argv[1]), sys.argv[2]
    request = json.loads(sys.stdin.read())
    external = {name: Path(part) for name, part in request["external"].items()}
    try:
        loaded = load_model(path, fmt, request["architecture"], external)
    except ArtifactError as exc:
        print(json.dumps({"error": {"slug": exc.slug, "detail": exc.detail, "status": exc.status}}))
        return
    print(json.dumps({"ok": {"format": loaded.format, "num_parameters": loaded.num_parameters,
                             "input_shape": loaded.input_shape, "num_outputs": loaded.num_outputs,
                             "architecture": loaded.architecture, "inputs": loaded.inputs}}))


if __name__ == "__main__":
    main()
