from __future__ import annotations

import datasets

from cft_adapters.metrics import chrf, language_fidelity

AYA = "CohereLabs/aya_evaluation_suite"
CONFIG = "dolly_machine_translated"


def load_aya_prompts(language: str, codes: list[str], **kwargs) -> datasets.DatasetDict:
    """The config's test rows whose ISO 639-3 `language` is one of `codes`, tagged with `language`."""
    rows = datasets.load_dataset(AYA, CONFIG, split="test")
    kept = rows.filter(lambda doc: doc["language"] in codes)
    if len(kept) == 0:
        present = sorted(set(rows["language"]))
        raise ValueError(f"{AYA}/{CONFIG}: no rows with language in {codes}; codes present: {present}")
    return datasets.DatasetDict({"test": kept.map(lambda doc: {"cft_language": language})})


def process_langfid(doc: dict, results: list[str]) -> dict[str, float]:
    answer = results[0].strip()
    return {"langfid": language_fidelity(answer, doc["cft_language"]), "chrf": chrf(answer, doc["targets"])}
