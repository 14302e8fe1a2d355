"""What every benchmark does last: print one table row of medians and ratios, write the JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def machine() -> str:
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {where}"


def publish(title: str, columns: list[str], rows: list[list[str]], result: dict[str, Any], out: str | Path) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {out}")
