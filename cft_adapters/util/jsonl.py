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
    """Every row. Lines end at '\\n' only: str.splitlines() would also cut a row at U+2028, U+2029
    or U+0085, which json.dumps(ensure_ascii=False) writes unescaped inside strings. A line that is
    not JSON raises ValueError naming the file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    return rows


def jsonl_text(rows: Iterable[Any]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    write_atomic(Path(path), jsonl_text(rows))
