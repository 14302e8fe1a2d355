"""AlpacaEval 2.0's 805 instructions and its reference answers (GPT-4 Turbo's), judged through the
alpaca-eval package (cft_adapters/alpacaeval.py) with the package's default length-controlled GLM,
`length_controlled_v1`, which reads AlpacaEval's own instruction difficulties (df_gamed.csv, from
the same hub dataset, fetched by the package).

The data is the hub file tatsu-lab/alpaca_eval:alpaca_eval_gpt4_baseline.json, or a local copy of
it named by CFT_ALPACAEVAL_FILE (the offline route, and how the tests read a small one)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from cft_adapters import alpacaeval

HUB_REPO, HUB_FILE = "tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json"
GLM = "length_controlled_v1"


def _file() -> Path:
    local = os.environ.get("CFT_ALPACAEVAL_FILE")
    if local:
        return Path(local)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset"))


def load_alpacaeval(**kwargs) -> datasets.DatasetDict:
    rows = json.loads(_file().read_text(encoding="utf-8"))
    docs = [{"index": i, "instruction": row["instruction"], "reference": row["output"]} for i, row in enumerate(rows)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# The judging and the win rates: cft_adapters/alpacaeval.py (through the alpaca-eval package).
process_alpacaeval = alpacaeval.process_results
lc_win_rate, win_rate = alpacaeval.win_rates(GLM, instruction_difficulty="hub")
