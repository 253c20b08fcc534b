"""Validate an uploaded model in a separate, short-lived process.

The API never converts or runs an untrusted model in its own process. Each validation runs in a child
forked from the *validator server* (`validator_server.py`): a process started once, with an
environment stripped of the service's settings and secrets and one compute thread, that has already
imported torch, onnx and onnx2pytorch. Forking it costs milliseconds, where a fresh interpreter
importing them cost about 5 s of CPU per upload (over a minute on a loaded machine). The child runs
under a data-segment limit, and this side kills it when its time is up. It answers with JSON lines,
not pickle, because it has handled hostile bytes: its pid, then the model's metadata or the
ArtifactError that rejected it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .loaders import ArtifactError

# What the validator's imports (torch, onnx, onnx2pytorch) take of the data segment before any model:
# measured at about 0.7 GB; the memory limit is added on top.
IMPORTS_DATA_BYTES = 1536 * 1024**2
# How long the validator server may take to import its modules; an upload waits for that at most once.
SERVER_START_SECONDS = 300.0
REPLY_BYTES = 1024**2  # a metadata reply is a few kB; anything longer is not one


@dataclass
class ModelMetadata:
    format: str
    num_parameters: int
    input_shape: list[int]
    num_outputs: int
    architecture: dict | None
    inputs: list[dict]


class ValidatorServer:
    """The API's handle on one validator server process: ask it to fork a validation, or to kill one."""

    def __init__(self) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBRF_")}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
        env["OMP_NUM_THREADS"] = "1"  # one validation, one core: the API and the other uploads keep theirs
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.artifacts.validator_server", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, start_new_session=False)
        self.lock = threading.Lock()
        self.control.settimeout(SERVER_START_SECONDS)
        try:
            ready = self.control.recv(64)
        except OSError:
            ready = b""
        self.control.settimeout(None)
        if ready != b"ready":
            self.close()
            raise ArtifactError("validator-unavailable", "the model validator could not be started; retry later",
                                status=503)

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, request: dict) -> socket.socket:
        """Start one validation; returns the socket its child answers on."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs, self.lock:
            socket.send_fds(self.control, [json.dumps(request).encode()], [theirs.fileno()])
        return mine

    def kill(self, pid: int) -> None:
        with self.lock:
            self.control.send(json.dumps({"kill": pid}).encode())

    def close(self) -> None:
        self.control.close()  # the server sees EOF, kills its children and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_server: ValidatorServer | None = None
_server_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()


def validator_server() -> ValidatorServer:
    """The running validator server, started (or restarted, if it died) on demand."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive():
            _server = ValidatorServer()
        return _server


def start_validator_server() -> None:
    """Start the server in the background, so that the first upload need not wait for its imports."""
    def start() -> None:
        try:
            validator_server()
        except ArtifactError:
            pass  # the next upload tries again and says why
    threading.Thread(target=start, name="pbrf-validator-start", daemon=True).start()


def _validation_slot(concurrency: int) -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(concurrency)
        return _slots


def inspect_in_subprocess(path: Path, fmt: str, architecture: str | None, timeout: float,
                          external: dict[str, Path] | None = None, memory_bytes: int = 8 * 1024**3,
                          concurrency: int = 2, wait_seconds: float = 10.0) -> ModelMetadata:
    """Convert and smoke-test a model in a child process. `timeout` bounds the child's own work: the
    validator server's one-time start is not counted against an upload."""
    slot = _validation_slot(concurrency)
    if not slot.acquire(timeout=wait_seconds):
        raise ArtifactError("validator-busy", f"{concurrency} model validations are already running; retry shortly",
                            status=503)
    try:
        server = validator_server()
        with tempfile.NamedTemporaryFile(prefix="pbrf-validator-", suffix=".log") as log:
            request = {"path": str(path), "format": fmt, "architecture": architecture,
                       "external": {name: str(p) for name, p in (external or {}).items()},
                       "data_bytes": IMPORTS_DATA_BYTES + memory_bytes, "log": log.name,
                       "cpu_seconds": math.ceil(timeout)}
            answer = _await_answer(server, server.fork(request), timeout)
            if answer is None:
                messages = Path(log.name).read_bytes()[-65536:].decode(errors="replace")
                if any(text in messages for text in ("MemoryError", "Cannot allocate memory", "bad_alloc")):
                    raise ArtifactError("model-memory-limit", MEMORY_LIMIT_TEXT.format(memory_bytes / 1024**3))
                raise ArtifactError("model-validation-crashed", "the model crashed the validator; it cannot be audited")
    finally:
        slot.release()
    if "error" in answer:
        raise ArtifactError(answer["error"]["slug"], answer["error"]["detail"], answer["error"]["status"])
    return ModelMetadata(**answer["ok"])


def _await_answer(server: ValidatorServer, channel: socket.socket, timeout: float) -> dict | None:
    """The child's answer; None if it died without one. Past `timeout` the child is killed."""
    deadline = time.monotonic() + timeout
    pid = None
    with channel, channel.makefile("rb") as lines:
        try:
            while True:
                channel.settimeout(max(deadline - time.monotonic(), 0.001))
                line = lines.readline(REPLY_BYTES)
                if not line.endswith(b"\n"):
                    return None  # EOF (it died), or a line longer than any answer
                message = json.loads(line)
                if "pid" in message:
                    pid = message["pid"]
                else:
                    return message
        except TimeoutError:
            if pid is not None:
                server.kill(pid)
            raise ArtifactError("model-validation-timeout",
                                f"loading and smoke-testing the model took longer than {timeout:.0f} s") from None
        except (OSError, ValueError):
            return None


MEMORY_LIMIT_TEXT = ("converting and smoke-testing the model needed more than the validator's memory limit of "
                     "{:.1f} GiB (PBRF_MODEL_VALIDATION_MEMORY_BYTES): its graph or architecture allocates "
                     "tensors that large")
