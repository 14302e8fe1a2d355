"""Offline stand-ins for cft_en / cft_ml: small bundled data, read relative to this file, so the
tasks resolve wherever lm-eval is started from."""

from __future__ import annotations

from pathlib import Path

import datasets

from cft_adapters.metrics import chrf, language_fidelity, rouge_l
from cft_adapters.util.jsonl import read_jsonl

DATA = Path(__file__).parent / "data"


def _rows(name: str, **extra) -> datasets.DatasetDict:
    rows = [{**row, **extra} for row in read_jsonl(DATA / name)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_en_mc(**kwargs) -> datasets.DatasetDict:
    return _rows("en_mc.jsonl")


def load_en_gen(**kwargs) -> datasets.DatasetDict:
    return _rows("en_gen.jsonl", language="en")


def load_ml_gen(language: str, **kwargs) -> datasets.DatasetDict:
    return _rows(f"{language}_gen.jsonl", language=language)


def process_en_gen(doc: dict, results: list[str]) -> dict[str, float]:
    return {"rougeL": rouge_l(results[0], doc["reference"])}


def process_ml_gen(doc: dict, results: list[str]) -> dict[str, float]:
    return {"langfid": language_fidelity(results[0], doc["language"]), "chrf": chrf(results[0], doc["reference"])}
