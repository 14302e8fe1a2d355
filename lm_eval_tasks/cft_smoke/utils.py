"""Offline stand-ins for cft_en / cft_ml: small bundled data, read relative to this file, so the
tasks resolve wherever lm-eval is started from."""

from __future__ import annotations

from pathlib import Path

import datasets

from cft_adapters import alpacaeval
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


# AlpacaEval on the bundled English prompts: our answer against the bundled reference answer, judged
# through the alpaca-eval package (cft_adapters/alpacaeval.py). The length-controlled GLM is the
# package's `length_controlled_minimal`: these are not AlpacaEval's 805 instructions, so the
# instruction difficulties the default GLM reads do not exist for them.
def load_alpacaeval(**kwargs) -> datasets.DatasetDict:
    rows = [{"index": i, "instruction": row["prompt"], "reference": row["reference"]}
            for i, row in enumerate(read_jsonl(DATA / "en_gen.jsonl"))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


process_alpacaeval = alpacaeval.process_results
lc_win_rate, win_rate = alpacaeval.win_rates("length_controlled_minimal")
