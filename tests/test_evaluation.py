"""Every phase scored in-process through lm-eval, on the model in memory, and the same numbers from
lm-eval's own CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cft_adapters.cli import eval_main, main
from cft_adapters.evaluation import CheckpointScorer
from cft_adapters.manifest import RunManifest
from cft_adapters.modeling import load_base_model, load_tokenizer
from cft_adapters.recipe import EvalConfig, load_recipe
from cft_adapters.tasks_path import tasks_dir

from conftest import SMOKE


@pytest.mark.slow
def test_phases_0_1_2_all_scored_in_run_json(smoke_run: Path) -> None:
    manifest = RunManifest.read(smoke_run)
    assert [p.eval_status for p in manifest.phases] == ["done"] * 3
    for phase in manifest.phases:
        assert 0.0 <= phase.eval["cft_smoke_en_mc"]["acc"] <= 1.0
        assert {"langfid", "chrf"} <= set(phase.eval["cft_smoke_ml_fr"])
        assert phase.eval_groups["cft_smoke_ml"] == ["cft_smoke_ml_de", "cft_smoke_ml_es", "cft_smoke_ml_fr"]
        results = smoke_run / phase.eval_files[-1]
        assert results.parent == smoke_run / phase.dirname / "eval"
        assert json.loads(results.read_text())["results"]["cft_smoke_en_mc"]["acc,none"] == phase.eval["cft_smoke_en_mc"]["acc"]
    report = (smoke_run / "report.md").read_text()
    assert "| 2 french_german |" in report and "Backward transfer" in report
    assert manifest.eval_base_precision == "nf4"


def _fresh_scores(manifest: RunManifest, run: Path, eval_cfg: EvalConfig, index: int, tmp_path: Path) -> dict:
    recipe = load_recipe(run / "recipe.resolved.yaml")
    base = load_base_model(recipe.model, manifest.base_model_path)
    tok = load_tokenizer(recipe.model, manifest.base_model_path)
    record = manifest.phases[index]
    adapter = run / record.checkpoint if record.checkpoint else None
    return CheckpointScorer(eval_cfg, tok, base).score(adapter, tmp_path / f"fresh{index}").metrics


@pytest.mark.slow
def test_adapter_swap_scores_exactly_like_a_fresh_load(smoke_run: Path, tmp_path: Path) -> None:
    manifest = RunManifest.read(smoke_run)
    recipe = load_recipe(smoke_run / "recipe.resolved.yaml")
    eval_cfg = EvalConfig(tasks=["cft_smoke_en_mc", "cft_smoke_ml_fr"], limit=6, batch_size=4)
    base = load_base_model(recipe.model, manifest.base_model_path)
    scorer = CheckpointScorer(eval_cfg, load_tokenizer(recipe.model, manifest.base_model_path), base)
    swapped = {}
    for index in (1, 2, 0, 1):  # swap forward, back to the base, and again
        record = manifest.phases[index]
        adapter = smoke_run / record.checkpoint if record.checkpoint else None
        swapped.setdefault(index, []).append(scorer.score(adapter, tmp_path / f"swap{index}").metrics)
    assert swapped[1][0] == swapped[1][1]
    for index in (0, 1, 2):
        assert swapped[index][0] == _fresh_scores(manifest, smoke_run, eval_cfg, index, tmp_path), index
    # per-task limits (the tasks built once, handed to lm-eval as objects) score what one limit does
    limited = eval_cfg.model_copy(update={"limit": None, "limits": {"cft_smoke_en_mc": 6, "cft_smoke_ml_*": 6}})
    assert CheckpointScorer(limited, scorer.tokenizer, base, scorer.peft_model).score(
        None, tmp_path / "limits").metrics == swapped[0][0]
    # ... and on groups: the same members and the same group aggregates
    groups = EvalConfig(tasks=["cft_smoke_en", "cft_smoke_ml"], limit=3, batch_size=4)
    by_limit = CheckpointScorer(groups, scorer.tokenizer, base, scorer.peft_model).score(None, tmp_path / "g1")
    by_limits = CheckpointScorer(groups.model_copy(update={"limit": None, "limits": {"cft_smoke_en": 3, "cft_smoke_ml": 3}}),
                                 scorer.tokenizer, base, scorer.peft_model).score(None, tmp_path / "g2")
    assert by_limits.metrics == by_limit.metrics and by_limits.groups == by_limit.groups
    assert {"cft_smoke_en", "cft_smoke_ml"} <= set(by_limits.metrics)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_model_path) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "run"
    assert main([str(SMOKE), f"output_dir={out}", "model.quantization=none", "eval.tasks=[cft_smoke_en]"]) == 0
    return out


@pytest.mark.slow
def test_stock_lm_eval_cli_reproduces_the_in_process_score(fp32_run: Path, tmp_path: Path) -> None:
    manifest = RunManifest.read(fp32_run)
    assert manifest.eval_base_precision == "fp32"
    adapter = fp32_run / manifest.phases[1].checkpoint
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={manifest.base_model_path},peft={adapter}",
           "--include_path", str(tasks_dir()), "--tasks", "cft_smoke_en",
           "--apply_chat_template", "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    recorded = manifest.phases[1].eval
    assert results["cft_smoke_en_mc"]["acc,none"] == pytest.approx(recorded["cft_smoke_en_mc"]["acc"], abs=1e-6)
    assert results["cft_smoke_en_mc"]["acc_norm,none"] == pytest.approx(recorded["cft_smoke_en_mc"]["acc_norm"], abs=1e-6)
    assert results["cft_smoke_en_gen"]["rougeL,none"] == pytest.approx(recorded["cft_smoke_en_gen"]["rougeL"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="lm-eval 0.4.13 + transformers 5: the stock CLI cannot load an NF4 base "
                   "(unexpected keyword 'load_in_4bit'); NF4 scoring goes through cft-eval. If this passes, "
                   "upstream fixed it: update the README's NF4 note and drop this marker.")
def test_stock_cli_nf4_base_loads(tiny_model_path: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={tiny_model_path},load_in_4bit=True,bnb_4bit_quant_type=nf4",
           "--include_path", str(tasks_dir()), "--tasks", "cft_smoke_en_mc", "--limit", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "load_in_4bit" not in proc.stderr, proc.stderr[-500:]
    assert proc.returncode == 0


@pytest.mark.slow
def test_failing_task_marks_eval_failed_keeps_adapter_and_cft_eval_retries(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    # cft_langfid_fr reads the Aya suite from the hub, which is switched off here: it fails.
    code = main([str(SMOKE), f"output_dir={out}", "eval.tasks=[cft_smoke_en_mc, cft_langfid_fr]",
                 "training.max_steps=2", "eval.limit=4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "evaluation failed for phase(s) 0 base, 1 english, 2 french_german" in err and "cft-eval" in err
    manifest = RunManifest.read(out)
    assert [p.status for p in manifest.phases] == ["done"] * 3
    assert [p.eval_status for p in manifest.phases] == ["failed"] * 3
    assert all(p.eval_error for p in manifest.phases)
    assert (out / "phase_2_french_german/adapter/adapter_model.safetensors").is_file()

    assert eval_main([str(out), "--tasks", "cft_smoke_en_mc", "--limit", "4"]) == 0
    manifest = RunManifest.read(out)
    assert [p.eval_status for p in manifest.phases] == ["done"] * 3
    assert all("acc" in p.eval["cft_smoke_en_mc"] for p in manifest.phases)
    assert (out / "report.md").is_file()


def test_cft_eval_errors_are_clean(tmp_path: Path, capsys) -> None:
    assert eval_main([str(tmp_path)]) == 2
    assert "no run.json here" in capsys.readouterr().err
    assert eval_main(["--include-path"]) == 0
    assert capsys.readouterr().out.strip() == str(tasks_dir())


@pytest.mark.slow
def test_cft_eval_on_a_subset_with_other_settings_is_a_separate_labelled_set(smoke_run: Path, tmp_path: Path) -> None:
    """The README's example: other limit and precision, two phases. report.md and the run's own
    scores stay as they were; the new scores are their own result set with their own report."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = RunManifest.read(run)
    report_before = (run / "report.md").read_bytes()
    assert eval_main([str(run), "--tasks", "cft_smoke_en", "--limit", "8", "--base-precision", "fp32",
                      "--phases", "0,2"]) == 0
    after = RunManifest.read(run)
    assert (run / "report.md").read_bytes() == report_before
    assert after.eval_base_precision == before.eval_base_precision == "nf4"
    for old, new in zip(before.phases, after.phases):
        assert new.eval == old.eval and new.eval_settings == old.eval_settings
    assert [sorted(p.eval_sets) for p in after.phases] == [["limit8-fp32"], [], ["limit8-fp32"]]
    subset = after.phases[2].eval_sets["limit8-fp32"]
    assert subset.settings["limit"] == 8 and subset.settings["base_precision"] == "fp32"
    assert (run / subset.eval_files[0]).parent == run / "phase_2_french_german" / "eval" / "limit8-fp32"
    report = (run / "report-limit8-fp32.md").read_text()
    assert "Scored with: limit=8," in report and "base_precision=fp32" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ") and "english" in line
            or line.startswith("| 2 french_german") or line.startswith("| 0 base")}
    assert rows["1 english"].split("|")[2].strip() == "-"  # not scored this way: not compared
    assert rows["2 french_german"].split("|")[2].strip() != "-"


def test_result_set_label_names_what_differs() -> None:
    from cft_adapters.scoring import result_set_label

    own = {"limit": None, "num_fewshot": None, "batch_size": 8, "apply_chat_template": True, "base_precision": "nf4"}
    assert result_set_label({**own, "limit": 8, "base_precision": "fp32"}, own) == "limit8-fp32"
    assert result_set_label({**own, "num_fewshot": 5}, own) == "5shot"


@pytest.mark.slow
def test_changed_eval_settings_are_refused_even_without_tasks(smoke_run: Path, tmp_path: Path, capsys) -> None:
    """With eval.tasks: [] nothing is scored, but the resolved recipe would still claim limit 2."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    resolved = (run / "recipe.resolved.yaml").read_bytes()
    assert main([str(SMOKE), f"output_dir={run}", "eval.tasks=[]", "eval.limit=2"]) == 1
    assert "eval.limit: None -> 2" in capsys.readouterr().err
    assert (run / "recipe.resolved.yaml").read_bytes() == resolved


@pytest.mark.slow
def test_cft_eval_on_some_tasks_keeps_the_report_whole_and_checks_its_options(smoke_run: Path, tmp_path: Path,
                                                                              capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    assert eval_main([str(run), "--tasks", "cft_smoke_en", "--phases", "0"]) == 0  # the run's own settings
    report = (run / "report.md").read_text()
    assert "cft_smoke_ml_fr" in report  # the report still covers every task of the run, not this call's
    assert RunManifest.read(run).phases[0].eval_sets == {}
    capsys.readouterr()
    assert eval_main([str(run), "--limit", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("--limit:") and "Traceback" not in err
    assert not list(run.glob("report-*.md"))


@pytest.mark.slow
def test_tasks_added_to_a_finished_run_are_scored_alone(smoke_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    first = RunManifest.read(out)
    tasks = [*first.phases[0].eval_tasks, "cft_smoke_en_mc"]  # a member of a scored group, now asked for by name
    capsys.readouterr()
    assert main([str(SMOKE), f"output_dir={out}", f"eval.tasks=[{', '.join(tasks)}]"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "evaluating cft_smoke_en_mc" in printed and "evaluating cft_smoke_en," not in printed
    for before, after in zip(first.phases, RunManifest.read(out).phases):
        assert after.eval_tasks == sorted(tasks)
        assert after.eval["cft_smoke_ml_fr"] == before.eval["cft_smoke_ml_fr"]
        assert len(after.eval_files) == len(before.eval_files) + 1  # one results file, with the new task alone
        assert set(json.loads((out / after.eval_files[-1]).read_text())["results"]) == {"cft_smoke_en_mc"}
