"""The mini-study's evaluation sets (bundled; written by benchmarks/mini_study/make_data.py), read
relative to this file so the tasks resolve wherever lm-eval starts."""

from __future__ import annotations

from pathlib import Path

import datasets

from cft_adapters.metrics import chrf, contains_answer, language_fidelity
from cft_adapters.util.jsonl import read_jsonl

DATA = Path(__file__).parent / "data"


def _rows(name: str) -> datasets.DatasetDict:
    rows = read_jsonl(DATA / name)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_en_mc(**kwargs) -> datasets.DatasetDict:
    return _rows("en_mc.jsonl")


def load_en_qa(**kwargs) -> datasets.DatasetDict:
    return _rows("en_qa.jsonl")


def load_ml(language: str, **kwargs) -> datasets.DatasetDict:
    return _rows(f"ml_{language}.jsonl")


def process_en_qa(doc: dict, results: list[str]) -> dict[str, float]:
    return {"contains": contains_answer(results[0], doc["reference"])}


def process_ml(doc: dict, results: list[str]) -> dict[str, float]:
    return {
        "contains": contains_answer(results[0], doc["reference"]),
        "langfid": language_fidelity(results[0], doc["language"]),
        "chrf": chrf(results[0], doc["reference"]),
    }
