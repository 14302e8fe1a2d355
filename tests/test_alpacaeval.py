"""AlpacaEval through the real alpaca-eval package, judged by a tiny local model (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cft_adapters import alpacaeval
from cft_adapters.errors import CftError
from cft_adapters.evaluation import check_eval_tasks, scored_tasks
from cft_adapters.rundir import read_manifest
from cft_adapters.recipe import EvalConfig, JudgeConfig
from cft_adapters.util.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]
JUDGE = JudgeConfig(model="builtin:tiny-mistral")


def _items(n: int = 12) -> list[dict]:
    rows = list(read_jsonl(REPO / "lm_eval_tasks" / "cft_smoke" / "data" / "en_gen.jsonl"))[:n]
    # Our answers: the reference cut to different lengths, so the length term of the GLM has data.
    return [{"index": i, "instruction": r["prompt"], "output": r["reference"][: 8 + 4 * i], "reference": r["reference"]}
            for i, r in enumerate(rows)]


def _judge_preference(prompt: str) -> float:
    """What the package should record for one pair: 1 + P(M) / (P(m) + P(M)), from the judge's own logits."""
    from alpaca_eval.utils import prompt_to_chatml

    model, tokenizer = alpacaeval._load_judge(JUDGE.model, JUDGE.quantization, JUDGE.trust_remote_code)
    ids = tokenizer.apply_chat_template(prompt_to_chatml(prompt), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float(), dim=-1)
    p = {t: float(torch.logsumexp(logprobs[alpacaeval._token_ids(tokenizer, t)], 0).exp()) for t in ("m", "M")}
    return 1 + p["M"] / (p["m"] + p["M"])


def test_the_package_judges_with_the_local_model_and_computes_both_win_rates(tiny_model_path) -> None:
    items = _items()
    with alpacaeval.judging(JUDGE):
        metrics, annotations = alpacaeval.judge_items(items, glm="length_controlled_minimal")
    assert metrics["n_judged"] == len(items)
    assert 0 <= metrics["lc_win_rate"] <= 1 and 0 <= metrics["win_rate"] <= 1
    # The package's win rate is the mean preference for ours (preference 2), and each preference is the
    # judge's probability of 'M' over 'm' after the package's own judge prompt.
    prefs = annotations.sort_values("index")["preference"].tolist()
    assert metrics["win_rate"] == pytest.approx(sum(p - 1 for p in prefs) / len(prefs), abs=1e-9)
    first = annotations.sort_values("index").iloc[0]
    expected = _expected_first_preference(items[0])
    assert first["preference"] == pytest.approx(expected, abs=1e-5)


def _expected_first_preference(item: dict) -> float:
    """The judge prompt for item 0 as the package builds it: its template with reference as output_1."""
    from alpaca_eval import constants

    template = (Path(constants.EVALUATORS_CONFIG_DIR) / alpacaeval.PROMPT_TEMPLATE).read_text(encoding="utf-8")
    prompt = (template.replace("{instruction}", item["instruction"]).replace("{output_1}", item["reference"])
              .replace("{output_2}", item["output"]))
    return _judge_preference(prompt)


def test_scores_are_cached_per_item_set_so_two_metrics_judge_once(tiny_model_path, monkeypatch) -> None:
    calls = []
    real = alpacaeval.judge_items
    monkeypatch.setattr(alpacaeval, "judge_items", lambda *a, **k: calls.append(1) or real(*a, **k))
    items = _items(8)
    with alpacaeval.judging(JUDGE):
        first = alpacaeval.score(items, glm="length_controlled_minimal")
        again = alpacaeval.score(items, glm="length_controlled_minimal")
        other = alpacaeval.score(items[:6], glm="length_controlled_minimal")
    assert first == again and len(calls) == 2 and other["n_judged"] == 6


def test_without_a_judge_the_member_is_skipped_with_a_message(monkeypatch) -> None:
    monkeypatch.delenv(alpacaeval.ENV_MODEL, raising=False)
    cfg = EvalConfig(tasks=["cft_smoke_en", "cft_smoke_alpacaeval", "cft_smoke_ml"])
    console = Console(record=True, width=200)
    check_eval_tasks(cfg, "smoke.yaml", console)
    text = console.export_text()
    assert "cft_smoke_alpacaeval skipped: AlpacaEval needs a judge" in text and "EA is averaged without AlpacaEval" in text
    assert scored_tasks(cfg) == ["cft_smoke_en", "cft_smoke_ml"]
    judged = cfg.model_copy(update={"judge": JUDGE})
    assert scored_tasks(judged) == cfg.tasks
    # a limit below what the LC fit needs (5-fold cross-validation) skips it too, with its reason
    few = judged.model_copy(update={"limit": 4})
    assert scored_tasks(few) == ["cft_smoke_en", "cft_smoke_ml"]
    check_eval_tasks(few, "smoke.yaml", console)
    assert "a limit of 4 examples is below the 5" in console.export_text()
    assert scored_tasks(few.model_copy(update={"limits": {"cft_smoke_alpacaeval": 8}})) == cfg.tasks
    with pytest.raises(alpacaeval.JudgeError, match="needs a judge"):
        alpacaeval.score(_items(6), glm="length_controlled_minimal")


def test_an_unreachable_endpoint_or_missing_local_judge_fails_before_training() -> None:
    cfg = EvalConfig(tasks=["cft_smoke_alpacaeval"], judge=JudgeConfig(model="m", endpoint="http://127.0.0.1:9/v1"))
    with pytest.raises(CftError, match=r"smoke.yaml: eval.judge.endpoint: cannot reach http://127.0.0.1:9/v1/models"):
        check_eval_tasks(cfg, "smoke.yaml")
    cfg = EvalConfig(tasks=["cft_smoke_alpacaeval"], judge=JudgeConfig(model="./no/such/judge"))
    with pytest.raises(CftError, match=r"eval.judge.model: no model at './no/such/judge'"):
        check_eval_tasks(cfg, "smoke.yaml")


def test_the_hub_task_reads_a_local_copy_of_alpacaeval(tmp_path, monkeypatch) -> None:
    import importlib.util

    rows = [{"instruction": f"Say {i}.", "output": f"{i}.", "generator": "gpt4_1106_preview"} for i in range(3)]
    (tmp_path / "ae.json").write_text(json.dumps(rows), encoding="utf-8")
    monkeypatch.setenv("CFT_ALPACAEVAL_FILE", str(tmp_path / "ae.json"))
    spec = importlib.util.spec_from_file_location("ae_utils", REPO / "lm_eval_tasks" / "alpacaeval" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = list(utils.load_alpacaeval()["test"])
    assert [d["index"] for d in docs] == [0, 1, 2] and docs[2]["reference"] == "2."
    assert utils.GLM == "length_controlled_v1"  # AlpacaEval's own prompts: the package's default GLM


def test_the_smoke_run_records_a_win_rate_for_every_phase(smoke_run) -> None:
    manifest = read_manifest(smoke_run)
    for record in manifest.phases:
        value = record.eval["cft_smoke_alpacaeval"]["lc_win_rate"]
        assert math.isfinite(value) and 0 <= value <= 1, record.name
        assert "win_rate" in record.eval["cft_smoke_alpacaeval"]
        assert record.eval_settings["judge"]["model"] == "builtin:tiny-mistral"


def test_without_the_alpaca_extra_the_member_is_skipped_and_says_which_extra(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alpaca_eval" else real(name, *a))
    cfg = EvalConfig(tasks=["cft_smoke_en", "cft_smoke_alpacaeval"], judge=JUDGE)
    assert scored_tasks(cfg) == ["cft_smoke_en"]
    console = Console(record=True, width=200)
    check_eval_tasks(cfg, "smoke.yaml", console)
    assert "pip install 'cft-adapters[alpaca]'" in console.export_text()
