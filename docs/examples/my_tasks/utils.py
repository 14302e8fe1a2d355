"""Held-out data for my_en_mc, read relative to this file (so the task resolves from any folder)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (Path(__file__).parent / "my_en_mc.jsonl").read_text(encoding="utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
