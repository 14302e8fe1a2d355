"""The lm_eval_tasks/ families: generated files, offline validation, and the smoke tasks scored
through the real lm-eval pipeline with scripted models whose right answers are known."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM

from cft_adapters.evaluation import task_manager, unknown_tasks
from cft_adapters.taskgen import stale, validate_offline
from cft_adapters.tasks_path import tasks_dir

DATA = tasks_dir() / "cft_smoke" / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


class ScriptedLM(LM):
    """Answers generation prompts from a table (else `fallback`) and prefers the listed MC choices."""

    def __init__(self, answers: dict[str, str], fallback: str, mc: dict[str, str]):
        super().__init__()
        self.answers, self.fallback, self.mc = answers, fallback, mc

    def generate_until(self, requests):
        return [self.answers.get(req.args[0], self.fallback) for req in requests]

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, continuation = req.args
            out.append((0.0 if self.mc.get(context) == continuation.strip() else -10.0, False))
        return out

    def loglikelihood_rolling(self, requests):
        return [0.0 for _ in requests]


def _oracle() -> ScriptedLM:
    answers = {r["prompt"]: r["reference"] for f in ("en_gen.jsonl", "fr_gen.jsonl", "de_gen.jsonl", "es_gen.jsonl") for r in _rows(f)}
    mc = {f"Question: {r['question']}\nAnswer:": r["choices"][r["answer"]] for r in _rows("en_mc.jsonl")}
    return ScriptedLM(answers, fallback="", mc=mc)


def _evaluate(lm: LM, tasks: list[str]) -> dict:
    return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(), bootstrap_iters=0)["results"]


def test_generated_task_files_are_up_to_date() -> None:
    assert stale(tasks_dir()) == [], "run: python -m cft_adapters.taskgen"


def test_task_groups_validate_offline() -> None:
    assert validate_offline(["cft_en", "cft_ml", "cft_smoke_en", "cft_smoke_ml"]) == []


def test_offline_validation_catches_a_missing_member(tmp_path, monkeypatch) -> None:
    import shutil

    import cft_adapters.taskgen as taskgen

    copy = tmp_path / "lm_eval_tasks"
    shutil.copytree(tasks_dir(), copy)
    group = copy / "cft_smoke" / "_cft_smoke_en.yaml"
    group.write_text(group.read_text().replace("cft_smoke_en_gen", "cft_smoke_en_gne"))
    monkeypatch.setattr(taskgen, "tasks_dir", lambda: copy)
    assert validate_offline(["cft_smoke_en"]) == ["cft_smoke_en: member 'cft_smoke_en_gne' is not a known lm-eval task or group"]


@pytest.mark.slow
def test_stock_lm_eval_lists_the_families() -> None:
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "ls", "tasks", "--include_path", str(tasks_dir())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ["cft_en", "cft_ml", "cft_ml_seen", "cft_ml_unseen", "cft_smoke_en", "cft_smoke_ml",
                 "cft_xlsum_en", "cft_xlsum_fr", "cft_langfid_fr", "cft_langfid_zh", "cft_smoke_ml_fr"]:
        assert f"|{name} " in proc.stdout, name


def test_smoke_tasks_give_full_marks_to_the_reference_answers() -> None:
    results = _evaluate(_oracle(), ["cft_smoke_en", "cft_smoke_ml"])
    assert results["cft_smoke_en_mc"]["acc,none"] == 1.0
    assert results["cft_smoke_en_gen"]["rougeL,none"] == pytest.approx(1.0)
    for lang in ("de", "es", "fr"):
        assert results[f"cft_smoke_ml_{lang}"]["chrf,none"] == pytest.approx(1.0)
        assert results[f"cft_smoke_ml_{lang}"]["langfid,none"] > 0.9, lang


def test_smoke_ml_penalises_answers_in_the_wrong_language() -> None:
    english = ScriptedLM({}, fallback="I am sorry, but I can only answer this question in English.", mc={})
    results = _evaluate(english, ["cft_smoke_ml"])
    for lang in ("de", "es", "fr"):
        assert results[f"cft_smoke_ml_{lang}"]["langfid,none"] == 0.0
        assert results[f"cft_smoke_ml_{lang}"]["chrf,none"] < 0.3


def test_unknown_task_names_suggest_close_matches() -> None:
    problems = unknown_tasks(["cft_smoke_en", "cft_smok_ml", "hellaswag"])
    assert len(problems) == 1
    assert problems[0].startswith("eval.tasks[1]: unknown lm-eval task or group 'cft_smok_ml'; did you mean 'cft_smoke_ml'")


def test_unknown_task_fails_at_dry_run(tmp_path, capsys) -> None:
    from cft_adapters.cli import main

    from conftest import SMOKE

    code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", "eval.tasks=[cft_smoke_en, cft_smok_ml]", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "eval.tasks[1]: unknown lm-eval task or group 'cft_smok_ml'; did you mean 'cft_smoke_ml'" in err
    assert not (tmp_path / "o").exists()


def test_tasks_path_module_prints_the_folder() -> None:
    proc = subprocess.run([sys.executable, "-m", "cft_adapters.tasks_path"], capture_output=True, text=True)
    assert proc.stdout.strip() == str(tasks_dir())
    assert (tasks_dir() / "cft_smoke" / "_cft_smoke_en.yaml").is_file()


def test_tasks_of_our_own_folders_skip_lm_evals_index_and_score_the_same() -> None:
    """cft_* tasks that need nothing of lm-eval's own are resolved without indexing its few thousand
    task files; a family that names lm-eval tasks (cft_en: IFEval, MMLU, ...) gets the full index."""
    own = task_manager(["cft_smoke_en", "cft_smoke_ml"])
    assert "cft_smoke_en_mc" in own.all_tasks and "mmlu" not in own.all_tasks
    assert "mmlu" in task_manager(["cft_en"]).all_tasks and "mmlu" in task_manager().all_tasks
    problems = unknown_tasks(["cft_smoke_en", "mmluu"])  # a did-you-mean still draws on every lm-eval task
    assert len(problems) == 1 and problems[0].startswith("eval.tasks[1]: unknown") and "'mmlu'" in problems[0]
    lm = ScriptedLM({}, "Paris", {})
    a = simple_evaluate(model=lm, tasks=["cft_smoke_en_mc"], task_manager=own, bootstrap_iters=0)["results"]
    b = simple_evaluate(model=lm, tasks=["cft_smoke_en_mc"], task_manager=task_manager(), bootstrap_iters=0)["results"]
    assert a == b
