"""The validator server: `python -m app.artifacts.validator_server FD`, started by inspect_model.py.

It imports everything a validation needs once, then waits on the control socket FD for requests: a
JSON request with a socket attached forks one child that validates a model and answers on that
socket; `{"kill": pid}` kills a child of this server whose time is up. Only this process reaps its
children, so a kill can never reach a recycled pid. It exits, killing its children, when the API
closes the control socket (the API stopped or died)."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import sys
from pathlib import Path

from app.artifacts.inspect_model import IMPORTS_DATA_BYTES, MEMORY_LIMIT_TEXT
from app.artifacts.loaders import ArtifactError, load_model

LOG_BYTES = 16 * 1024**2  # what a child may write to its message file (and to any file)


def _preload() -> None:
    """Import what the converters import lazily, so that no child pays for it."""
    import onnx  # noqa: F401
    import onnx2pytorch  # noqa: F401
    import safetensors.torch  # noqa: F401

    try:
        import onnxruntime  # noqa: F401  the conversion's reference run
    except ImportError:
        pass


def _validate(reply: socket.socket, request: dict) -> int:
    """In the forked child: limit memory, convert and smoke-test, answer. Returns the exit code."""
    reply.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    # the allocator's and converter's messages go to a file the API reads if this child dies
    log = os.open(request["log"], os.O_WRONLY | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    data_bytes = request["data_bytes"]
    resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (LOG_BYTES, LOG_BYTES))
    # CPU time as well as wall-clock: a child the API could not kill in time still stops
    cpu = int(request["cpu_seconds"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    limit_gib = (data_bytes - IMPORTS_DATA_BYTES) / 1024**3
    try:
        loaded = load_model(Path(request["path"]), request["format"], request["architecture"],
                            {name: Path(part) for name, part in request["external"].items()})
        answer = {"ok": {"format": loaded.format, "num_parameters": loaded.num_parameters,
                         "input_shape": loaded.input_shape, "num_outputs": loaded.num_outputs,
                         "architecture": loaded.architecture, "inputs": loaded.inputs}}
    except ArtifactError as exc:
        # an allocation refused by the memory limit inside conversion or the smoke test surfaces as an
        # ArtifactError whose text carries the allocator's message: name the real cause
        if "can't allocate memory" in exc.detail or "Cannot allocate memory" in exc.detail:
            exc = ArtifactError("model-memory-limit", MEMORY_LIMIT_TEXT.format(limit_gib))
        answer = {"error": {"slug": exc.slug, "detail": exc.detail, "status": exc.status}}
    except MemoryError:
        answer = {"error": {"slug": "model-memory-limit", "detail": MEMORY_LIMIT_TEXT.format(limit_gib),
                            "status": 422}}
    reply.sendall(json.dumps(answer).encode() + b"\n")
    return 0


def _reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def serve(control: socket.socket) -> None:
    children: set[int] = set()
    control.send(b"ready")
    while True:
        readable, _, _ = select.select([control], [], [], 1.0)
        _reap(children)
        if not readable:
            continue
        message, fds, _, _ = socket.recv_fds(control, 65536, 1)
        if not message:
            break  # the API closed its end
        request = json.loads(message)
        if "kill" in request:
            for fd in fds:
                os.close(fd)
            if request["kill"] in children:
                os.kill(request["kill"], signal.SIGKILL)
            continue
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        reply = socket.socket(fileno=fds[0])
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                code = _validate(reply, request)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        children.add(pid)
        reply.close()
    for pid in children:
        os.kill(pid, signal.SIGKILL)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the service's process group: the API decides
    control = socket.socket(fileno=int(sys.argv[1]))
    _preload()
    serve(control)


if __name__ == "__main__":
    main()
