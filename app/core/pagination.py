"""Opaque keyset cursors: base64url of a small JSON object."""

from __future__ import annotations

import base64
import binascii
import json

from .errors import ProblemError


def encode_cursor(key: str, value: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({key: value}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, key: str) -> int:
    if not cursor:
        return 0
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))[key]
        # bool is an int to isinstance, and a value past BIGINT overflows the query: both are forgeries
        if type(value) is not int or not 0 <= value < 2**62:
            raise ValueError
        return value
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(400, "invalid-cursor", "the cursor is not one this API returned") from None
