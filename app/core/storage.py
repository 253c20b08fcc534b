"""Content-addressed artifact store on disk: files are named by their sha256.

Uploads are streamed into a temporary file inside the store while hashing, validated, and only then
moved into place (an atomic rename), so a rejected or interrupted upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    pass


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    @contextmanager
    def staged(self, source: BinaryIO, max_bytes: int, suffix: str = ""):
        """Copy `source` to a temporary file while hashing; yields (path, sha256, size).

        The caller validates the staged file and calls `commit`; anything else deletes it.
        """
        self.ensure()
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=suffix)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            yield path, digest.hexdigest(), size
        finally:
            path.unlink(missing_ok=True)

    def commit(self, staged_path: Path, sha256: str) -> Path:
        target = self.path_for(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            try:
                os.utime(target)  # fresh again: garbage collection spares recently used files
                staged_path.unlink(missing_ok=True)
                return target
            except FileNotFoundError:  # collected just now: store ours instead
                pass
        os.replace(staged_path, target)
        os.utime(target)  # its mtime was the end of staging, before validation ran
        return target

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path_for(sha)
        if not target.exists():
            self.ensure()
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(name, target)
        else:
            os.utime(target)
        return sha

    def collect_garbage(self, referenced: set[str], grace_seconds: float) -> list[str]:
        """Delete stored files no row refers to any more (after a DELETE), once they are older than
        `grace_seconds`: an upload or a result write stores its bytes before its row commits, and a
        reused file is touched, so a fresh file is never taken for garbage. Returns the digests removed."""
        removed = []
        cutoff = time.time() - grace_seconds
        for path in self.root.glob("??/*"):
            sha = path.name
            if sha in referenced or len(sha) != 64:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(sha)
            except FileNotFoundError:
                continue
        return removed
