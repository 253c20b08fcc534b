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
import resource
import subprocess
import sys
import threading
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


# What the validator's imports (torch, onnx, onnx2pytorch) take of the data segment before any model:
# measured at about 0.7 GB; the memory limit is added on top.
IMPORTS_DATA_BYTES = 1536 * 1024**2
_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()


def _validation_slot(concurrency: int) -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(concurrency)
        return _slots


def _limit_memory(data_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))
    return apply


def inspect_in_subprocess(path: Path, fmt: str, architecture: str | None, timeout: float,
                          external: dict[str, Path] | None = None, memory_bytes: int = 8 * 1024**3,
                          concurrency: int = 2, wait_seconds: float = 10.0) -> ModelMetadata:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBRF_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["OMP_NUM_THREADS"] = "1"  # one validation, one core: the API and the other uploads keep theirs
    slot = _validation_slot(concurrency)
    if not slot.acquire(timeout=wait_seconds):
        raise ArtifactError("validator-busy", f"{concurrency} model validations are already running; retry shortly",
                            status=503)
    try:
        done = subprocess.run([sys.executable, "-m", "app.artifacts.inspect_model", str(path), fmt],
                              input=json.dumps({"architecture": architecture,
                                                "external": {k: str(v) for k, v in (external or {}).items()}}),
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=path.parent,
                              preexec_fn=_limit_memory(IMPORTS_DATA_BYTES + memory_bytes))
    except subprocess.TimeoutExpired:
        raise ArtifactError("model-validation-timeout",
                            f"loading and smoke-testing the model took longer than {timeout:.0f} s") from None
    finally:
        slot.release()
    if done.returncode != 0 and ("MemoryError" in done.stderr or "Cannot allocate memory" in done.stderr):
        raise ArtifactError("model-memory-limit", _MEMORY_LIMIT_TEXT.format(memory_bytes / 1024**3))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise ArtifactError("model-validation-crashed",
                            f"the model crashed the validator (exit code {done.returncode}); it cannot be audited")
    result = json.loads(lines[-1])
    if "error" in result:
        raise ArtifactError(result["error"]["slug"], result["error"]["detail"], result["error"]["status"])
    return ModelMetadata(**result["ok"])


_MEMORY_LIMIT_TEXT = ("converting and smoke-testing the model needed more than the validator's memory limit of "
                      "{:.1f} GiB (PBRF_MODEL_VALIDATION_MEMORY_BYTES): its graph or architecture allocates "
                      "tensors that large")


def main() -> None:
    path, fmt = Path(sys.argv[1]), sys.argv[2]
    request = json.loads(sys.stdin.read())
    external = {name: Path(part) for name, part in request["external"].items()}
    limit = (resource.getrlimit(resource.RLIMIT_DATA)[0] - IMPORTS_DATA_BYTES) / 1024**3
    try:
        loaded = load_model(path, fmt, request["architecture"], external)
    except ArtifactError as exc:
        # an allocation refused by the memory limit inside conversion or the smoke test surfaces as an
        # ArtifactError whose text carries the allocator's message: name the real cause
        if "can't allocate memory" in exc.detail or "Cannot allocate memory" in exc.detail:
            exc = ArtifactError("model-memory-limit", _MEMORY_LIMIT_TEXT.format(limit))
        print(json.dumps({"error": {"slug": exc.slug, "detail": exc.detail, "status": exc.status}}))
        return
    except MemoryError:
        print(json.dumps({"error": {"slug": "model-memory-limit", "detail": _MEMORY_LIMIT_TEXT.format(limit),
                                    "status": 422}}))
        return
    print(json.dumps({"ok": {"format": loaded.format, "num_parameters": loaded.num_parameters,
                             "input_shape": loaded.input_shape, "num_outputs": loaded.num_outputs,
                             "architecture": loaded.architecture, "inputs": loaded.inputs}}))


if __name__ == "__main__":
    main()
