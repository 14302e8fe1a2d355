"""Language identification for language fidelity: langid (2016) against lingua-language-detector,
side by side on the same texts, each over all the languages it knows.

    python benchmarks/langid_compare.py [--answers 60]

Texts with a known language (accuracy):
- sentences: the bundled reference answers of the smoke tasks (en, de, es, fr; full sentences);
- short: the mini-study's reference answers in de, es and fr (mostly one to three words: "samedi",
  "montagne montagne"), the kind of answer the mini-study's models give; pure numbers left out;
- first word: the first word of every sentence above.
Real model answers (no gold label): SmolLM2-135M-Instruct's answers to the mini-study's de/es/fr
prompts; for each detector, the share it puts in the prompt's language, and how often the two agree.

Prints a table and writes benchmarks/results/langid_compare.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import publish  # noqa: E402

TASKS = REPO / "lm_eval_tasks"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gold_sets() -> dict[str, list[tuple[str, str]]]:
    sentences = [(row["reference"], lang) for lang in ("en", "de", "es", "fr")
                 for row in _rows(TASKS / "cft_smoke" / "data" / f"{lang}_gen.jsonl")]
    short = [(row["reference"], lang) for lang in ("de", "es", "fr")
             for row in _rows(TASKS / "cft_mini" / "data" / f"ml_{lang}.jsonl")
             if not re.fullmatch(r"[\d\s.,-]+", row["reference"])]
    first = [(re.findall(r"\w+", text)[0], lang) for text, lang in sentences if re.findall(r"\w+", text)]
    return {"sentences": sentences, "short": short, "first word": first}


def model_answers(n: int) -> list[tuple[str, str]]:
    """SmolLM2-135M-Instruct's answers to the mini-study's prompts, with the prompt's language."""
    from cft_adapters.modeling import load_inference_model
    from cft_adapters.replay import generate_answers

    prompts = [(row["prompt"], lang) for lang in ("de", "es", "fr")
               for row in _rows(TASKS / "cft_mini" / "data" / f"ml_{lang}.jsonl")[: n // 3]]
    model, tokenizer = load_inference_model("builtin:smollm2-135m-instruct", where="benchmark model")
    answers, _ = generate_answers(model, tokenizer, [[{"role": "user", "content": p}] for p, _ in prompts],
                                  batch_size=8, max_new_tokens=32)
    return [(a, lang) for a, (_, lang) in zip(answers, prompts) if a.strip()]


def detectors() -> dict:
    from cft_adapters.metrics import identify_language, identify_language_langid

    return {"langid": identify_language_langid, "lingua": identify_language}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=60, help="model answers to compare on (0: none)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "langid_compare.json"))
    args = parser.parse_args()

    detect = detectors()
    result: dict = {"benchmark": "langid_compare", "sets": {}}
    rows = []
    for name, texts in gold_sets().items():
        entry = {"texts": len(texts)}
        for det, fn in detect.items():
            started = time.perf_counter()
            predicted = [fn(text) for text, _ in texts]
            seconds = time.perf_counter() - started
            wrong = [(t, g, p) for (t, g), p in zip(texts, predicted) if p != g]
            entry[det] = {"correct": len(texts) - len(wrong), "accuracy": round(1 - len(wrong) / len(texts), 4),
                          "ms_per_text": round(1000 * seconds / len(texts), 3), "misread": wrong[:12]}
        result["sets"][name] = entry
        rows.append([name, str(len(texts)), f"{entry['langid']['accuracy']:.3f}", f"{entry['lingua']['accuracy']:.3f}",
                     f"{entry['lingua']['accuracy'] - entry['langid']['accuracy']:+.3f}"])
    if args.answers:
        answers = model_answers(args.answers)
        predicted = {det: [fn(text) for text, _ in answers] for det, fn in detect.items()}
        agree = sum(a == b for a, b in zip(predicted["langid"], predicted["lingua"]))
        entry = {"texts": len(answers), "agreement": round(agree / len(answers), 4),
                 "examples": [{"answer": t, "prompt_language": g, "langid": a, "lingua": b}
                              for (t, g), a, b in list(zip(answers, predicted["langid"], predicted["lingua"]))[:15]]}
        for det in detect:
            entry[det] = {"in_prompt_language": round(sum(p == g for p, (_, g) in zip(predicted[det], answers)) / len(answers), 4)}
        result["sets"]["model answers"] = entry
        rows.append(["model answers (share in prompt language)", str(len(answers)),
                     f"{entry['langid']['in_prompt_language']:.3f}", f"{entry['lingua']['in_prompt_language']:.3f}",
                     f"agree {entry['agreement']:.3f}"])
    publish("language identification: langid vs lingua (accuracy; model answers: share in the prompt's language)",
            ["set", "texts", "langid", "lingua", "lingua - langid"], rows, result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
