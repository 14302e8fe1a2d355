"""One home for the digests the package writes: cache keys, config digests, file fingerprints.

A *short digest* is the first 16 hex characters of a sha256: the name of a cache folder, a phase's
config digest. Full digests (a file's content, an adapter's tensors) keep all 64.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(value: Any) -> str:
    """Key-sorted, compact JSON: equal values give equal text, so equal digests. (Its exact form is
    part of every recorded config digest: changing it would make finished phases look changed.)"""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def short_digest(value: str | bytes) -> str:
    """The first 16 hex characters of the sha256 of `value` (text is hashed as UTF-8)."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The full sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
