"""JSON Lines, read and written one way everywhere (UTF-8, one object per line, blank lines skipped).

Readers of user files with per-line error reports live in data.py; this is for the files the
package writes itself (replay pools, probes, bundled task data).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cft_adapters.util.fs import write_atomic


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def jsonl_text(rows: Iterable[Any]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    write_atomic(Path(path), jsonl_text(rows))
